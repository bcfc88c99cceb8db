"""Forward+backward time and peak memory of nonlocal blocks against the number of positions N: a log-log figure.

Each series is one block, measured at feature maps from CIFAR's 32x32 (N = 1,024) to BDD100K's
full 1280x720 (N = 921,600), W x H, training mode, forward+backward (``bench_nonlocal.measure``, each
point in a fresh process through ``harness.py``):

* ``diffusion``: PIDEBlock, diffusion operator, efficient path = low rank (O(N) time and memory);
* ``frac_laplacian``, ``inv_frac_laplacian``, ``log``: PIDEBlock, efficient path = fused query tiles
  (O(N M) time, O(N) memory);
* ``dense_diffusion``, ``dense_frac_laplacian``: PIDEBlock with ``method='dense'``, the paper's N x M
  kernel (O(N M) time and memory);
* ``mmcv_embedded_gaussian``, ``mmcv_dot_product``: mmcv's ``NonLocal2d`` with ``sub_sample=True``
  (keys max-pooled by 2); ``timm_nonlocal``: timm's ``NonLocalAttn`` (every position a key).

The PIDE blocks pool their keys by ``--subsample`` (default 3, as the BDD100K configs), so M = N/9
there. Defaults ``--batch 1`` and ``--channels 112``: 112 is the width at which the paper's BDD100K
network applies its PIDE blocks (the BDD cases of ``bench_nonlocal.py``), and batch 1 is how a
1280x720 image runs at all (training or whole-image inference); a larger batch multiplies every point
by about the same factor and only moves the large sizes out of reach sooner.

Before each point the script predicts its peak memory (the kernel or attention copies of
``bench_nonlocal`` for the quadratic series, and the growth of the series' last two points for all)
and its time (from the last two points, at least linear for the low-rank series and quadratic for the
others); a point predicted beyond ``--max-gb`` or ``--max-case-s`` is not run and ends its series,
drawn in the figure as a marker at the predicted value ("out of memory budget" / "out of time
budget"). Results go to a JSON file (``--json``, default next to the figure) and the figure to
``--output`` (default docs/figures/nonlocal_scaling.png); ``--plot-only JSON`` redraws a saved run.

Run from the repository root:

    PYTHONPATH=. python benchmarks/bench_scaling.py --quick          # smoke test, tiny sizes, figure in /tmp
    PYTHONPATH=. python benchmarks/bench_scaling.py                  # full sizes, docs/figures/nonlocal_scaling.png
    PYTHONPATH=. python benchmarks/bench_scaling.py --plot-only docs/figures/nonlocal_scaling.json
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from bench_nonlocal import (
    DENSE_KERNEL_COPIES,
    PEER_KERNEL_COPIES,
    PEERS,
    Case,
    Spec,
    measure,
)
from harness import (
    GIB,
    MIB,
    REPO_ROOT,
    add_harness_args,
    default_memory_budget_gb,
    environment_lines,
    fmt_duration,
    progress,
    run_isolated,
    setup,
    wait_for_idle,
)

# name: (model, operator, method, label)
SERIES = {
    'diffusion': ('pide', 'diffusion', 'auto', 'PIDE diffusion (low rank)'),
    'frac_laplacian': ('pide', 'frac_laplacian', 'auto', 'PIDE frac. Laplacian (fused)'),
    'inv_frac_laplacian': ('pide', 'inv_frac_laplacian', 'auto', 'PIDE inv. frac. Laplacian (fused)'),
    'log': ('pide', 'log', 'auto', 'PIDE log kernel (fused)'),
    'dense_diffusion': ('pide', 'diffusion', 'dense', 'PIDE diffusion, dense'),
    'dense_frac_laplacian': ('pide', 'frac_laplacian', 'dense', 'PIDE frac. Laplacian, dense'),
    'mmcv_embedded_gaussian': ('mmcv_embedded_gaussian', '', '', 'mmcv NonLocal2d embedded Gaussian (pool 2)'),
    'mmcv_dot_product': ('mmcv_dot_product', '', '', 'mmcv NonLocal2d dot product (pool 2)'),
    'timm_nonlocal': ('timm_nonlocal', '', '', 'timm NonLocalAttn'),
}
SIZES = ((32, 32), (64, 64), (160, 90), (320, 180), (640, 360), (960, 540), (1280, 720))  # W x H
QUICK_SIZES = ((8, 8), (16, 16), (32, 18), (48, 27))
OVER_MEMORY, OVER_TIME = 'out of memory budget', 'out of time budget'


def quadratic_memory(series: str) -> bool:
    model, _, method, _ = SERIES[series]
    return model in PEERS or method == 'dense'


def analytic_memory(series: str, case: Case) -> float:
    """Bytes of the N x M kernel copies the series holds at its peak (0 for the linear-memory series)."""
    model, operator, method, _ = SERIES[series]
    if model in PEERS:
        return PEER_KERNEL_COPIES * case.kernel_bytes(PEERS[model][2])
    return DENSE_KERNEL_COPIES[operator] * case.kernel_bytes() if method == 'dense' else 0.0


def extrapolate(points: list[tuple[int, float]], n: int, exponent: float) -> Optional[float]:
    """The last point grown to ``n`` by the slope of the last two (log-log), at least ``exponent``, at most 2.5."""
    if not points:
        return None
    n1, v1 = points[-1]
    slope = exponent
    if len(points) > 1:
        n0, v0 = points[-2]
        if v0 > 0 and v1 > 0 and n1 > n0:
            slope = max(exponent, min(2.5, math.log(v1 / v0) / math.log(n1 / n0)))
    return v1 * (n / n1) ** slope


def run_series(args: argparse.Namespace, series: str, cases: list[Case]) -> list[dict[str, Any]]:
    model, operator, method, _ = SERIES[series]
    grows = 2.0 if quadratic_memory(series) else 1.0
    cost = 1.0 if series == 'diffusion' else 2.0  # the low-rank path is O(N); every other kernel O(N M)
    times: list[tuple[int, float]] = []
    peaks: list[tuple[int, float]] = []
    out = []
    for case in cases:
        n = case.queries
        point = {'series': series, 'width': case.width, 'height': case.height, 'n': n,
                 'm': case.keys(PEERS[model][2]) if model in PEERS else case.keys()}
        mem = max(analytic_memory(series, case), extrapolate(peaks, n, grows) or 0.0)
        sec = extrapolate(times, n, cost)
        point.update(predicted_mb=mem / MIB, predicted_ms=None if sec is None else 1e3 * sec)
        label = f'{series} {case.width}x{case.height}'
        if mem / GIB > args.max_gb:
            point['status'] = OVER_MEMORY
            progress(f'{label}: {OVER_MEMORY} (predicted {mem / GIB:.3g} GB > {args.max_gb:.3g} GB)')
            out.append(point)
            break
        if sec is not None and sec > args.max_case_s:
            point['status'] = OVER_TIME
            progress(f'{label}: {OVER_TIME} (predicted {fmt_duration(sec)} > {args.max_case_s:g} s)')
            out.append(point)
            break
        spec = Spec(case=case, operator=operator or 'diffusion', method=method or 'auto', device=args.device,
                    repeats=args.repeats, warmup=args.warmup, budget_s=args.case_budget_s, threads=args.threads,
                    save_path=None, model=model)
        progress(f'{label} ...')
        wait_for_idle(args.wait_idle_s)
        r = run_isolated(measure, spec, in_process=args.in_process)
        if 'error' in r:
            point.update(status='error', error=r['error'])
            progress(f'    failed: {r["error"]}')
            out.append(point)
            break
        point.update(status='ok', ms=r['ms'], peak_mb=r['peak'] / MIB, runs=r['runs'], others=r['others'],
                     path=r['resolved'], params=r['params'])
        progress(f'    {r["ms"]:.1f} ms, {r["peak"] / MIB:.1f} MB ({r["runs"]} runs)')
        times.append((n, r['ms'] / 1e3))
        peaks.append((n, max(r['peak'], 1.0)))
        out.append(point)
    return out


def plot(data: dict[str, Any], output: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colors = plt.get_cmap('tab10')
    styles = {'pide': '-', 'dense': '--', 'peer': ':'}
    sizes = sorted({(p['n'], p['width'], p['height']) for p in data['results']})
    for (key, scale, ylabel), ax in zip((('ms', 1e-3, 'forward+backward time (s)'),
                                         ('peak_mb', 1 / 1024, 'peak memory growth (GiB)')), axes):
        for i, series in enumerate(s for s in SERIES if any(p['series'] == s for p in data['results'])):
            points = [p for p in data['results'] if p['series'] == series]
            model, _, method, label = SERIES[series]
            style = styles['peer' if model in PEERS else 'dense' if method == 'dense' else 'pide']
            ok = [p for p in points if p['status'] == 'ok' and p[key] > 0]  # a log axis has no 0
            color = colors(i % 10)
            ax.plot([p['n'] for p in ok], [p[key] * scale for p in ok], style, marker='o', ms=4, color=color,
                    label=label)
            end = points[-1]
            predicted = end.get('predicted_' + ('ms' if key == 'ms' else 'mb'))
            if end['status'] in (OVER_MEMORY, OVER_TIME) and predicted and ok:
                marker = 'X' if end['status'] == OVER_MEMORY else 'D'
                ax.plot([ok[-1]['n'], end['n']], [ok[-1][key] * scale, predicted * scale], ':', color=color, lw=1)
                ax.plot(end['n'], predicted * scale, marker, ms=9, mfc='none', mec=color, mew=1.5)
            elif end['status'] == 'error' and ok:
                ax.plot(ok[-1]['n'], ok[-1][key] * scale, 'x', ms=10, color=color)
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xticks([n for n, _, _ in sizes], labels=[f'{w}x{h}\n{n:,}' for n, w, h in sizes], fontsize=7)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel('positions N = W x H')
        ax.set_ylabel(ylabel)
        ax.grid(True, which='major', alpha=0.3)
        lo, hi = sizes[0][0], sizes[-1][0]
        ys = [p[key] * scale for p in data['results'] if p['status'] == 'ok' and p[key] > 0]  # log axes
        if ys:  # slope guides through the smallest measured value
            y0 = min(ys)
            for power, text in ((1, 'N'), (2, 'N²')):
                ax.plot([lo, hi], [y0, y0 * (hi / lo) ** power], color='0.6', lw=0.8, zorder=0)
                ax.annotate(f'∝ {text}', (hi, y0 * (hi / lo) ** power), fontsize=8, color='0.4', ha='right',
                            va='bottom')
            ax.set_ylim(y0 / 2, max(max(ys), y0) * 50)
        else:  # nothing ran: log axes need some positive range
            ax.set_ylim(1e-3, 1.0)
    handles, _ = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], ls='none', marker='X', mfc='none', mec='k', ms=8, label=f'predicted, {OVER_MEMORY}'),
                Line2D([], [], ls='none', marker='D', mfc='none', mec='k', ms=7, label=f'predicted, {OVER_TIME}'),
                Line2D([], [], ls='none', marker='x', color='k', ms=8, label='next size failed')]
    fig.legend(handles=handles, loc='lower center', ncol=3, fontsize=8, frameon=False)
    env = data['setup']
    fig.suptitle(f'Nonlocal blocks, forward+backward, training mode: batch {env["batch"]}, C={env["channels"]}, '
                 f'PIDE keys pooled by {env["subsample"]}; {env["device"]}, {env["threads"]} threads; '
                 f'budgets {env["max_gb"]:.1f} GB, {env["max_case_s"]:g} s per case', fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 0.95))
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=130)
    plt.close(fig)


def print_summary(data: dict[str, Any]) -> None:
    print('\n'.join(data['environment']))
    print('\n| series | W x H | N | M | status | fwd+bwd ms | peak MB |')
    print('|---|---|---:|---:|---|---:|---:|')
    for p in data['results']:
        ms = f'{p["ms"]:,.1f}' if p['status'] == 'ok' else (
            f'(~{p["predicted_ms"]:,.0f})' if p.get('predicted_ms') else '')
        mb = f'{p["peak_mb"]:,.1f}' if p['status'] == 'ok' else (
            f'(~{p["predicted_mb"]:,.0f})' if p.get('predicted_mb') else '')
        status = p['status'] if p['status'] != 'error' else f'failed: {p["error"]}'
        print(f'| {p["series"]} | {p["width"]}x{p["height"]} | {p["n"]:,} | {p["m"]:,} | {status} | {ms} | {mb} |')


def parse_sizes(value: str) -> tuple[tuple[int, int], ...]:
    try:
        sizes = tuple(tuple(int(v) for v in s.lower().split('x')) for s in value.split(',') if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f'sizes must be comma-separated WxH pairs like 32x32,160x90, got {value!r}')
    return tuple(sorted(sizes, key=lambda s: s[0] * s[1]))


def parse_series(value: str) -> tuple[str, ...]:
    if value == 'all':
        return tuple(SERIES)
    names = tuple(v.strip() for v in value.split(',') if v.strip())
    bad = [n for n in names if n not in SERIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f'unknown series {bad}; choose from {tuple(SERIES)} or all')
    return names


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_harness_args(parser, repeats=3)
    parser.add_argument('--batch', type=int, default=1, help='batch size (see the module docstring)')
    parser.add_argument('--channels', type=int, default=112, help='channels C (see the module docstring)')
    parser.add_argument('--subsample', type=int, default=3, help='key max-pool of the PIDE blocks')
    parser.add_argument('--sizes', type=parse_sizes, default=SIZES,
                        help='feature maps, comma-separated WxH (default: ' + ','.join(f'{w}x{h}' for w, h in SIZES)
                             + ')')
    parser.add_argument('--series', type=parse_series, default=tuple(SERIES),
                        help=f'comma-separated series out of {",".join(SERIES)}, or all')
    parser.add_argument('--max-gb', type=float, default=None,
                        help='skip a point predicted to need more peak memory (default: half the free memory)')
    parser.add_argument('--max-case-s', type=float, default=600.0,
                        help='skip a point whose one forward+backward is predicted to take longer')
    parser.add_argument('--output', type=Path, default=None,
                        help='figure (default docs/figures/nonlocal_scaling.png; with --quick a file in the temp dir)')
    parser.add_argument('--json', type=Path, default=None, help='results (default: the figure with .json)')
    parser.add_argument('--plot-only', type=Path, default=None, metavar='JSON',
                        help='redraw the figure from a saved JSON, measuring nothing')
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = (Path(tempfile.gettempdir()) / 'nonlocal_scaling_quick.png' if args.quick
                       else REPO_ROOT / 'docs' / 'figures' / 'nonlocal_scaling.png')
    if args.plot_only is not None:
        if not args.plot_only.is_file():
            parser.error(f'--plot-only: no such file {args.plot_only}')
        data = json.loads(args.plot_only.read_text())
        plot(data, args.output)
        print_summary(data)
        print(f'\nFigure: {args.output}')
        return
    if args.batch < 1 or args.channels < 2 or args.subsample < 1:
        parser.error('--batch and --subsample must be >= 1 and --channels >= 2')
    setup(parser, args)
    if args.max_gb is None:
        args.max_gb = default_memory_budget_gb(args.device)
    json_path = args.json or args.output.with_suffix('.json')
    sizes = QUICK_SIZES if args.quick else args.sizes
    channels = 16 if args.quick else args.channels
    cases = [Case(f'{w}x{h}', args.batch, channels, h, w, args.subsample, (), dense=False, role='scaling')
             for w, h in sizes]

    start = time.perf_counter()
    results = []
    for series in args.series:
        results += run_series(args, series, cases)
    import torch

    data = {
        'environment': environment_lines(args, f'budgets {args.max_gb:.1f} GB (predicted peak) and '
                                               f'{args.max_case_s:g} s (predicted fwd+bwd) per point'),
        'setup': {'batch': args.batch, 'channels': channels, 'subsample': args.subsample, 'device': args.device,
                  'threads': args.threads or torch.get_num_threads(), 'max_gb': args.max_gb,
                  'max_case_s': args.max_case_s, 'quick': args.quick},
        'results': results,
        'elapsed_s': time.perf_counter() - start,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1))
    plot(data, args.output)
    print_summary(data)
    print(f'\nFigure: {args.output}; results: {json_path}. Total benchmark time {data["elapsed_s"] / 60:.1f} min.')


if __name__ == '__main__':
    main()
