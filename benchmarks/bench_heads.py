"""mmseg decode heads alone on R-50-D8 feature maps: PIDEHead against NLHead, GCHead, DNLHead, CCHead, FCNHead.

Each head is built from mmseg's own config of its model (``configs/_base_/models/<model>_r50-d8.py`` of the
installed mmseg: in_channels=2048, channels=512, num_classes=19, dropout 0.1, ...; SyncBN replaced by BN,
as on one device), the PIDE heads from the project's config
``configs/pidehead/pidehead-diffusion_r50-d8_4xb2-40k_cityscapes-512x1024.py`` with ``operator`` set for each
operator (or, where that config is missing, NLHead's settings with the NonLocal arguments dropped), and
timed on the feature maps a ResNet-50-D8 backbone gives on Cityscapes:

* ``train``: two 512x1024 crops, features (2, 2048, 64, 128), training mode: the head's forward,
  its loss against random labels (mmseg's ``loss``: logits resized to the crop, cross-entropy) and
  backward into the head and the features;
* ``test``: whole-image inference at 1024x2048, features (1, 2048, 128, 256), eval mode under
  ``torch.no_grad()``: the head's ``predict`` (forward, logits resized to the image).

Columns: parameters; FLOPs of one image's forward at each size (fvcore through ``pide_zoo.flops``, the
project's handles; the PIDE blocks counted on the path they run); median time and peak memory growth of
each mode (``harness.py``: one spawned process per measurement, VmHWM or
``torch.cuda.max_memory_allocated``, MB = 2**20 bytes); time and memory relative to NLHead, the head PIDEHead
replaces. A head whose attention is predicted beyond ``--max-gb`` is skipped and says so. CCHead needs
mmcv's ``CrissCrossAttention`` op; where that op cannot run (no mmcv ops, or a device it lacks) its row
says why.

Run from the repository root:

    PYTHONPATH=. python benchmarks/bench_heads.py --quick           # smoke test: C=64 features, tiny maps
    PYTHONPATH=. python benchmarks/bench_heads.py | tee heads.txt   # the sizes above, on CPU
    PYTHONPATH=. python benchmarks/bench_heads.py --heads PIDEHead,NLHead --modes test --operators diffusion
"""
from __future__ import annotations

import argparse
import os.path as osp
import time
from dataclasses import dataclass
from typing import Any, Optional

from harness import (
    CONTENTION_WARN,
    GIB,
    MIB,
    REPO_ROOT,
    add_harness_args,
    default_memory_budget_gb,
    ensure_repo_on_path,
    environment_lines,
    fmt_num,
    fmt_pct,
    fmt_ratio,
    measure_step,
    print_table,
    progress,
    run_isolated,
    setup,
    verdict,
    wait_for_idle,
)

OPERATORS = ('diffusion', 'frac_laplacian', 'inv_frac_laplacian', 'log')
# mmseg's model config of each head (configs/_base_/models/ of the installed mmseg).
MMSEG_HEAD_CONFIGS = {
    'NLHead': 'nonlocal_r50-d8.py',
    'GCHead': 'gcnet_r50-d8.py',
    'DNLHead': 'dnl_r50-d8.py',
    'CCHead': 'ccnet_r50-d8.py',
    'FCNHead': 'fcn_r50-d8.py',
}
HEADS = ('PIDEHead',) + tuple(MMSEG_HEAD_CONFIGS)
PIDE_CONFIG = REPO_ROOT / 'configs' / 'pidehead' / 'pidehead-diffusion_r50-d8_4xb2-40k_cityscapes-512x1024.py'
NONLOCAL_ARGS = ('reduction', 'use_scale', 'mode')
# mode: (features B, C, H, W; image H, W)
MODES = {'train': ((2, 2048, 64, 128), (512, 1024)), 'test': ((1, 2048, 128, 256), (1024, 2048))}
QUICK_MODES = {'train': ((2, 64, 16, 32), (128, 256)), 'test': ((1, 64, 32, 64), (256, 512))}
QUICK_CHANNELS = 32
# NLHead and DNLHead attend every position to every position (B x N x N float32): copies live at the peak,
# measured with this script (train: product, softmax kept for backward, their gradients; test: two).
ATTENTION_COPIES = {'train': 4, 'test': 2}
# Issue 12's targets, diffusion head against NLHead: (speed-up >=, memory ratio <=) per mode.
TARGETS = {'train': (1.3, 0.7), 'test': (5.0, 0.2)}
GOALS = {'train': (1.5, 0.5)}


@dataclass(frozen=True)
class Spec:
    """One measurement, sent to a child process."""

    head: str
    operator: str
    mode: str
    features: tuple[int, int, int, int]
    image: tuple[int, int]
    device: str
    repeats: int
    warmup: int
    budget_s: float
    threads: Optional[int]
    channels: Optional[int] = None  # the heads' width; None: the configs' (512)
    pide_method: str = 'auto'
    flops: bool = True


def head_config(head: str, operator: str = 'diffusion', in_channels: Optional[int] = None,
                channels: Optional[int] = None, pide_method: str = 'auto') -> tuple[dict, str]:
    """The decode-head config of ``head`` (see the module docstring) and the file it came from."""
    import mmseg
    from mmengine.config import Config

    if head == 'PIDEHead' and PIDE_CONFIG.is_file():
        source = str(PIDE_CONFIG.relative_to(REPO_ROOT))
        cfg = Config.fromfile(str(PIDE_CONFIG)).model.decode_head.to_dict()
    else:
        base = MMSEG_HEAD_CONFIGS['NLHead' if head == 'PIDEHead' else head]
        source = f'mmseg::_base_/models/{base}' + (' (NonLocal arguments dropped)' if head == 'PIDEHead' else '')
        path = osp.join(osp.dirname(mmseg.__file__), '.mim', 'configs', '_base_', 'models', base)
        cfg = Config.fromfile(path).model.decode_head.to_dict()
    if head == 'PIDEHead':
        for key in NONLOCAL_ARGS:
            cfg.pop(key, None)
        cfg.update(type='PIDEHead', operator=operator, method=pide_method)
    cfg.update(norm_cfg=dict(type='BN', requires_grad=True), in_index=0)  # one device; one feature map passed
    if in_channels is not None:
        cfg['in_channels'] = in_channels
    if channels is not None:
        cfg['channels'] = channels
    return cfg, source


def attention_bytes(spec: Spec) -> int:
    """Predicted peak of the N x N attention of NLHead and DNLHead (0 for the others)."""
    if spec.head not in ('NLHead', 'DNLHead'):
        return 0
    b, _, h, w = spec.features
    return ATTENTION_COPIES[spec.mode] * 4 * b * (h * w) ** 2


def _register_modules() -> None:
    import mmseg.models  # noqa: F401  (registers mmseg's heads)
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')
    try:
        import pide_zoo.seg  # noqa: F401  (registers PIDEHead)
    except ImportError:
        pass


def pide_head_available() -> bool:
    ensure_repo_on_path()
    _register_modules()
    from mmseg.registry import MODELS

    return MODELS.get('PIDEHead') is not None


def measure(spec: Spec) -> dict[str, Any]:
    """Time one head in one mode, read its peak memory, count its parameters and FLOPs."""
    import torch
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    ensure_repo_on_path()
    _register_modules()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    torch.manual_seed(0)
    b, c, h, w = spec.features
    cfg, _ = head_config(spec.head, spec.operator, c, spec.channels, spec.pide_method)
    head = MODELS.build(cfg).to(device)
    train = spec.mode == 'train'
    head.train(train)
    params = sum(p.numel() for p in head.parameters())
    block = next((m for m in head.modules() if type(m).__name__ == 'PIDEBlock'), None)
    path = block.method if block is not None else ''
    feats = torch.randn(b, c, h, w, device=device, requires_grad=train)
    img_h, img_w = spec.image
    samples = []
    for _ in range(b):
        s = SegDataSample(metainfo=dict(img_shape=(img_h, img_w), pad_shape=(img_h, img_w)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, cfg['num_classes'], (1, img_h, img_w), device=device))
        samples.append(s)
    metas = [s.metainfo for s in samples]

    def step() -> Any:
        if not train:
            with torch.no_grad():
                return head.predict([feats], metas, None)
        head.zero_grad(set_to_none=True)
        feats.grad = None
        losses = head.loss([feats], samples, None)
        loss = sum(v for k, v in losses.items() if 'loss' in k)
        loss.backward()
        return loss.detach()

    # The math libraries' one-off set-up on a tiny input, so that it is not charged to the measurement.
    tiny = torch.randn(1, c, 8, 16, device=device, requires_grad=train)
    if train:
        head([tiny]).sum().backward()
        head.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            head([tiny])
    del tiny
    result = measure_step(step, device, warmup=spec.warmup, repeats=spec.repeats, budget_s=spec.budget_s)
    del result['out']
    result.update(params=params, path=path)
    if spec.flops:
        result.update(one_image_flops(head, (c, h, w)))
    return result


def one_image_flops(head: Any, size: tuple[int, int, int]) -> dict[str, Any]:
    """fvcore FLOPs of the head's forward on one image's features (eval mode, PIDE blocks as configured)."""
    import torch

    from pide_zoo.flops import module_flop_analysis

    p = next(head.parameters())
    fa = module_flop_analysis(head, ([torch.randn(1, *size, device=p.device)],), nonlocal_method=None)
    return {'flops': fa.total(), 'unsupported': sorted(fa.unsupported_ops())}


def head_label(head: str, operator: str) -> str:
    return f'PIDEHead {operator}' if head == 'PIDEHead' else head


def run_all(args: argparse.Namespace) -> dict[tuple[str, str], dict[str, Any]]:
    """Every (head, operator) in every mode; results keyed by (label, mode)."""
    modes = QUICK_MODES if args.quick else MODES
    entries = [(h, op) for h in args.heads for op in (args.operators if h == 'PIDEHead' else ('',))]
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for head, op in entries:
        label = head_label(head, op)
        for mode in args.modes:
            features, image = modes[mode]
            spec = Spec(head=head, operator=op or 'diffusion', mode=mode, features=features, image=image,
                        device=args.device, repeats=args.repeats, warmup=args.warmup, budget_s=args.case_budget_s,
                        threads=args.threads, channels=QUICK_CHANNELS if args.quick else None,
                        pide_method=args.pide_method, flops=not args.no_flops)
            need = attention_bytes(spec) / GIB
            if need > args.max_gb:
                results[(label, mode)] = {'skipped': f'skipped (attention would need ~{need:.1f} GB)'}
                progress(f'{label} | {mode} | skipped (would need ~{need:.1f} GB)')
                continue
            if head == 'PIDEHead' and not args.pide_available:
                results[(label, mode)] = {'error': 'PIDEHead is not registered (pide_zoo.seg has none yet)'}
                continue
            progress(f'{label} | {mode} {features} ...')
            wait_for_idle(args.wait_idle_s)
            r = run_isolated(measure, spec, in_process=args.in_process)
            results[(label, mode)] = r
            progress(f'    failed: {r["error"]}' if 'error' in r else
                     f'    {r["ms"]:.1f} ms, {r["peak"] / MIB:.1f} MB ({r["runs"]} runs)')
    return results


def table_rows(args: argparse.Namespace, results: dict[tuple[str, str], dict[str, Any]]) -> list[list[str]]:
    labels = list(dict.fromkeys(label for label, _ in results))
    rows = []
    for label in labels:
        per_mode = {m: results.get((label, m), {}) for m in args.modes}
        ok = {m: r for m, r in per_mode.items() if 'ms' in r}
        first = next(iter(ok.values()), {})
        row = [label, first.get('path', ''), f'{first["params"]:,}' if first else '']
        for mode in ('train', 'test'):
            row.append(fmt_num(ok[mode]['flops'] / 1e9) if mode in ok and 'flops' in ok[mode] else '')
        for mode in ('train', 'test'):
            r = per_mode.get(mode)
            if mode not in args.modes:
                row += ['', '']
            elif mode in ok:
                row += [fmt_num(r['ms']), fmt_num(r['peak'] / MIB)]
            else:
                row += [r.get('skipped') or f'failed: {r.get("error", "not run")}', '']
        for mode in ('train', 'test'):
            ref, r = results.get(('NLHead', mode), {}), ok.get(mode)
            if r and 'ms' in ref:
                row += [fmt_ratio(ref['ms'] / r['ms']), fmt_ratio(r['peak'] / max(ref['peak'], 1))]
            else:
                row += ['—', '—']
        busy = [r['others'] for r in ok.values() if r.get('others') is not None]
        row.append(fmt_pct(max(busy)) if busy else '—')
        rows.append(row)
    return rows


def target_lines(results: dict[tuple[str, str], dict[str, Any]], quick: bool) -> list[str]:
    lines = []
    for mode, (speed, memory) in TARGETS.items():
        ref = results.get(('NLHead', mode), {})
        for op in ('diffusion', 'frac_laplacian'):
            r = results.get((head_label('PIDEHead', op), mode), {})
            name = f'- PIDEHead {op} vs NLHead, {mode}'
            if 'ms' not in r or 'ms' not in ref:
                lines.append(f'{name}: not measured')
                continue
            t, m = ref['ms'] / r['ms'], r['peak'] / max(ref['peak'], 1)
            busy = ' (timed under CPU contention)' if any(
                (x['others'] or 0) > CONTENTION_WARN for x in (r, ref)) else ''
            if op == 'diffusion':
                goal = f', goal {GOALS[mode][0]:g}x / {GOALS[mode][1]:g}' if mode in GOALS else ''
                lines.append(f'{name}: speed-up {t:.2f}x (target >= {speed:g}x{goal}): {verdict(t >= speed)}{busy}; '
                             f'memory growth {m:.2f} of NLHead\'s (target <= {memory:g}): {verdict(m <= memory)}')
            else:
                lines.append(f'{name}: speed-up {t:.2f}x (target: faster, > 1x): {verdict(t > 1)}{busy}')
    if quick:
        lines.append('- (--quick: tiny stand-ins for the target sizes, so these verdicts mean nothing)')
    return lines


def _parse_list(value: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if value == 'all':
        return allowed
    items = tuple(v.strip() for v in value.split(',') if v.strip())
    bad = [i for i in items if i not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f'unknown {what} {bad}; choose from {allowed} or all')
    return items


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_harness_args(parser, repeats=3)
    parser.add_argument('--heads', type=lambda v: _parse_list(v, HEADS, 'head(s)'), default=HEADS,
                        help=f'comma-separated heads out of {",".join(HEADS)}, or all')
    parser.add_argument('--operators', type=lambda v: _parse_list(v, OPERATORS, 'operator(s)'), default=OPERATORS,
                        help='operators of the PIDE heads, comma-separated, or all')
    parser.add_argument('--modes', type=lambda v: _parse_list(v, tuple(MODES), 'mode(s)'), default=tuple(MODES),
                        help='train (2x 512x1024 crops, fwd+bwd) and/or test (1024x2048 whole image, fwd)')
    parser.add_argument('--pide-method', default='auto', help="PIDE heads' evaluation path ('auto', 'dense', ...)")
    parser.add_argument('--max-gb', type=float, default=None,
                        help='skip a head whose attention is predicted beyond this (default: half the free memory)')
    parser.add_argument('--no-flops', action='store_true', help='skip the fvcore FLOP counts (one more forward each)')
    args = parser.parse_args(argv)
    setup(parser, args)
    if args.max_gb is None:
        args.max_gb = default_memory_budget_gb(args.device)
    args.pide_available = 'PIDEHead' not in args.heads or pide_head_available()
    modes = QUICK_MODES if args.quick else MODES
    start = time.perf_counter()
    results = run_all(args)
    elapsed = time.perf_counter() - start

    print('\n'.join(environment_lines(args, f'heads only within {args.max_gb:.1f} GB (estimated attention)')))
    shapes = '; '.join(f'{m}: features {modes[m][0]}, image {modes[m][1][0]}x{modes[m][1][1]}' for m in args.modes)
    print(f'\n## mmseg decode heads alone, R-50-D8 features ({shapes})\n')
    sources = {h: head_config(h)[1] for h in args.heads}
    print('- configs: ' + '; '.join(f'{h}: {s}' for h, s in sources.items()) + '; BN for SyncBN'
          + (f'; --quick: in_channels {modes["train"][0][1]}, channels {QUICK_CHANNELS}' if args.quick else ''))
    print('- train: forward + loss (logits resized to the crop, cross-entropy) + backward, training mode; '
          'test: predict (forward + resize to the image) under no_grad, eval mode')
    print('- GFLOPs: fvcore, one image\'s forward at the train / test feature size; ms: median; MB: peak memory '
          'growth (2^20 bytes)')
    print('- x NL time: NLHead time / this (higher = faster); x NL mem: this peak / NLHead peak (lower = less)\n')
    print_table(['head', 'path', 'params', 'GFLOPs train', 'GFLOPs test', 'train ms', 'train MB', 'test ms',
                 'test MB', 'train x NL time', 'train x NL mem', 'test x NL time', 'test x NL mem', 'CPU others'],
                table_rows(args, results), left=2)
    unsupported = {f'{label}: {", ".join(r["unsupported"])}' for (label, _), r in results.items()
                   if r.get('unsupported')}
    if unsupported:
        print('\nOps fvcore could not count (left out of GFLOPs): ' + '; '.join(sorted(unsupported)))
    cc = [r for (label, _), r in results.items() if label == 'CCHead' and 'error' in r]
    if cc:
        print(f'\nCCHead did not run here: mmcv\'s CrissCrossAttention op failed ({cc[0]["error"]}).')
    print('\nTargets (CPU; PIDEHead diffusion against NLHead): train (2, 2048, 64, 128) >= 1.3x faster with <= 0.7 of '
          'its peak-memory growth (goal 1.5x, 0.5); whole-image test (1, 2048, 128, 256) >= 5x faster with <= 1/5; '
          'the frac head faster than NLHead in both.')
    print('\n'.join(target_lines(results, args.quick)))
    how = {r['memory_how'] for r in results.values() if 'memory_how' in r}
    print(f'\nPeak memory read with {", ".join(sorted(how)) or "n/a"}. Total benchmark time {elapsed / 60:.1f} min.')


if __name__ == '__main__':
    main()
