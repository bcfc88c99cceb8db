"""How the nonlocal blocks' forward+backward time and peak memory grow with the positions N: a table and a figure.

Each series is one block (training mode, batch ``--batch``, C=``--channels``), measured at feature maps from
CIFAR's 32x32 (N = 1,024) to BDD100K's full 1280x720 (N = 921,600):

* PIDE blocks, keys pooled by 3 (M = N/9): ``diffusion`` (low rank, O(N) time and memory), ``frac_laplacian``,
  ``inv_frac_laplacian``, ``log`` (fused query tiles: O(N M) time, O(N) memory), ``dense_diffusion`` and
  ``dense_frac_laplacian`` (the paper's N x M kernel);
* mmcv ``NonLocal2d`` (``sub_sample=True``: keys pooled by 2) and timm ``NonLocalAttn`` (every position a key).

Each point's peak memory and time are predicted first (N x M copies, the last two points' growth); one predicted
beyond ``--max-gb`` or ``--max-case-s`` ends its series, drawn as an open marker. The table goes to ``--out``
(docs/figures/nonlocal_scaling.json), the figure beside it (.png); ``--plot-only`` redraws it from the JSON.

    python benchmarks/bench_scaling.py --quick --out /tmp/scaling.json
    python benchmarks/bench_scaling.py --max-case-s 120
    python benchmarks/bench_scaling.py --plot-only docs/figures/nonlocal_scaling.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional

import harness
from bench_nonlocal import DENSE_COPIES, PEER_COPIES, PEERS, Case, build, measure

# series: (what build() measures, operator, method, legend)
SERIES = {
    'diffusion': ('block', 'diffusion', 'auto', 'PIDE diffusion (low rank)'),
    'frac_laplacian': ('block', 'frac_laplacian', 'auto', 'PIDE frac. Laplacian (fused)'),
    'inv_frac_laplacian': ('block', 'inv_frac_laplacian', 'auto', 'PIDE inv. frac. Laplacian (fused)'),
    'log': ('block', 'log', 'auto', 'PIDE log kernel (fused)'),
    'dense_diffusion': ('block', 'diffusion', 'dense', 'PIDE diffusion, dense'),
    'dense_frac_laplacian': ('block', 'frac_laplacian', 'dense', 'PIDE frac. Laplacian, dense'),
    'mmcv_embedded_gaussian': ('mmcv NonLocal2d embedded_gaussian', '', '', 'mmcv NonLocal2d emb. Gaussian (pool 2)'),
    'mmcv_dot_product': ('mmcv NonLocal2d dot_product', '', '', 'mmcv NonLocal2d dot product (pool 2)'),
    'timm_nonlocal': ('timm NonLocalAttn', '', '', 'timm NonLocalAttn'),
}
SIZES = ((32, 32), (64, 64), (160, 90), (320, 180), (640, 360), (960, 540), (1280, 720))  # W x H
QUICK_SIZES = ((8, 8), (16, 16), (32, 18))
POOL = 3
COLUMNS = ['series', 'W x H', 'N', 'M', 'status', 'ms', 'MB', 'predicted ms', 'predicted MB']
OVER_MEMORY, OVER_TIME = 'over the memory budget', 'over the time budget'


def extrapolate(points: list[tuple[int, float]], n: int, exponent: float) -> Optional[float]:
    """The last point grown to ``n`` by the log-log slope of the last two, at least ``exponent``, at most 2.5."""
    if not points:
        return None
    n1, v1 = points[-1]
    slope = exponent
    if len(points) > 1 and points[-2][1] > 0 and v1 > 0 and n1 > points[-2][0]:
        slope = max(exponent, min(2.5, math.log(v1 / points[-2][1]) / math.log(n1 / points[-2][0])))
    return v1 * (n / n1) ** slope


def run_series(series: str, cases: list[Case], device: Any, args: argparse.Namespace) -> list[list[Any]]:
    kind, operator, method, _ = SERIES[series]
    pool = PEERS[kind][2] if kind in PEERS else POOL
    quadratic = kind in PEERS or method == 'dense'
    times: list[tuple[int, float]] = []
    peaks: list[tuple[int, float]] = []
    rows = []
    for case in cases:
        n = case.height * case.width
        copies = PEER_COPIES if kind in PEERS else DENSE_COPIES[operator] if method == 'dense' else 0
        mb = max(copies * case.kernel_gb(pool) * 1024, extrapolate(peaks, n, 2.0 if quadratic else 1.0) or 0.0)
        ms = extrapolate(times, n, 1.0 if series == 'diffusion' else 2.0)
        rows.append([series, f'{case.width}x{case.height}', n, case.keys(pool), 'ok', None, None, ms, mb or None])
        over_memory = mb / 1024 > args.max_gb
        if over_memory or (ms or 0) / 1e3 > args.max_case_s:
            rows[-1][4] = OVER_MEMORY if over_memory else OVER_TIME
            harness.progress(f'{series} {rows[-1][1]}: {rows[-1][4]} (predicted {mb:,.0f} MB, {ms or 0:,.0f} ms)')
            break
        harness.progress(f'{series} {rows[-1][1]} ...')
        try:
            r = measure({series: build(kind, case, operator, method)}, case, device, args)[series]
        except Exception as exc:  # building it, say mmcv missing
            r = {'ms': harness.error_text(exc)}
        if isinstance(r['ms'], str):
            rows[-1][4] = r['ms']
            break
        rows[-1][5:7] = r['ms'], r['mb']
        times.append((n, r['ms']))
        peaks.append((n, max(r['mb'] or 0, 1e-3)))
    return rows


def plot(data: dict[str, Any], figure: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    points = [dict(zip(data['columns'], r)) for r in data['rows']]
    sizes = sorted({(p['N'], p['W x H']) for p in points})
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, key, label in ((axes[0], 'ms', 'forward+backward time (ms)'), (axes[1], 'MB', 'peak memory growth (MB)')):
        for i, series in enumerate(dict.fromkeys(p['series'] for p in points)):
            kind, _, method, legend = SERIES[series]
            ok = [p for p in points if p['series'] == series and p['status'] == 'ok' and p[key]]
            style = ':' if kind in PEERS else '--' if method == 'dense' else '-'
            color = plt.get_cmap('tab10')(i % 10)
            ax.plot([p['N'] for p in ok], [p[key] for p in ok], style, marker='o', ms=4, color=color, label=legend)
            end = [p for p in points if p['series'] == series][-1]
            if end['status'] in (OVER_MEMORY, OVER_TIME) and end[f'predicted {key}'] and ok:
                ax.plot([ok[-1]['N'], end['N']], [ok[-1][key], end[f'predicted {key}']], ':', color=color, lw=1)
                ax.plot(end['N'], end[f'predicted {key}'], 'X' if end['status'] == OVER_MEMORY else 'D', ms=8,
                        mfc='none', mec=color)
        ax.set(xscale='log', yscale='log', xlabel='positions N = W x H', ylabel=label)
        ax.set_xticks([n for n, _ in sizes], labels=[f'{s}\n{n:,}' for n, s in sizes], fontsize=7)
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc='upper left', fontsize=7, title_fontsize=7,
                   title='open: predicted, over the memory (X) or time (◇) budget')
    fig.suptitle(f'{data["title"]}; {data["environment"]["device"]}, {data["environment"]["threads"]} threads')
    fig.tight_layout()
    fig.savefig(figure, dpi=130)
    plt.close(fig)
    print(f'figure: {figure}')


def main(argv: Optional[list[str]] = None) -> None:
    parser = harness.make_parser(__file__, __doc__, 'nonlocal_scaling')
    parser.set_defaults(out=harness.REPO_ROOT / 'docs' / 'figures' / 'nonlocal_scaling.json')
    harness.add_choices(parser, '--series', tuple(SERIES))
    parser.add_argument('--batch', type=harness.positive_int, default=1, help='1: how a 1280x720 image runs at all')
    parser.add_argument('--channels', type=int, default=112, help="112: the paper's BDD100K PIDE blocks")
    parser.add_argument('--max-gb', type=float, default=None, help='memory budget per point (default: half the free)')
    parser.add_argument('--max-case-s', type=float, default=600.0, help='time budget of one fwd+bwd per point')
    parser.add_argument('--plot-only', type=Path, default=None, metavar='JSON', help='redraw the figure of a saved run')
    args, device = harness.parse(parser, argv)
    if args.plot_only is not None:
        if not args.plot_only.is_file():
            parser.error(f'--plot-only: no such file {args.plot_only}')
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix('.png'))
        return
    if args.channels < 2:
        parser.error(f'--channels must be >= 2, got {args.channels}')
    channels = 16 if args.quick else args.channels
    cases = [Case(f'{w}x{h}', args.batch, channels, h, w, POOL) for w, h in (QUICK_SIZES if args.quick else SIZES)]
    rows = []
    for series in args.series:
        rows += run_series(series, cases, device, args)
    harness.write_table(args.out, args, 'nonlocal_scaling', columns=COLUMNS, rows=rows,
                        title=f'Nonlocal blocks fwd+bwd, training mode, batch {args.batch}, C={channels}',
                        notes=f'median of {args.repeats} rounds after {args.warmup}; MB: peak growth (2^20 bytes); '
                              f'budgets {args.max_gb:.1f} GB and {args.max_case_s:g} s per point (predicted)')
    plot(json.loads(args.out.read_text()), args.out.with_suffix('.png'))


if __name__ == '__main__':
    main()
