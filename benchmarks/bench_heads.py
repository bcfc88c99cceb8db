"""mmseg decode heads alone on ResNet-50-D8 features: PIDEHead against NLHead, GCHead, DNLHead, CCHead, FCNHead.

Each mmseg head comes from the installed mmseg's own model config (``_base_/models/<model>_r50-d8.py``:
in_channels 2048, channels 512, 19 classes; BN for SyncBN, as on one device), PIDEHead from this project's
``configs/pidehead/pidehead-diffusion_r50-d8_4xb2-40k_cityscapes-512x1024.py`` with each operator. Two modes on
the feature maps a ResNet-50-D8 gives on Cityscapes:

* ``train``: two 512x1024 crops, features (2, 2048, 64, 128): forward, mmseg's loss (logits resized to the
  crop, cross-entropy against random labels) and backward, training mode;
* ``test``: whole-image inference at 1024x2048, features (1, 2048, 128, 256): ``predict`` under no_grad.

The heads of a mode are timed interleaved; GFLOPs: fvcore's (``pide_zoo.flops``), one image's forward at the train
size. NLHead and DNLHead (N x N attention) run only where predicted to fit ``--max-gb``.

    python benchmarks/bench_heads.py --quick
    python benchmarks/bench_heads.py --heads PIDEHead,NLHead --modes train --operators diffusion,frac_laplacian
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import harness
import torch

from pide_zoo.layers import OPERATORS  # the operator table's paper operators

MMSEG_CONFIGS = {'NLHead': 'nonlocal_r50-d8.py', 'GCHead': 'gcnet_r50-d8.py', 'DNLHead': 'dnl_r50-d8.py',
                 'CCHead': 'ccnet_r50-d8.py', 'FCNHead': 'fcn_r50-d8.py'}
HEADS = ('PIDEHead',) + tuple(MMSEG_CONFIGS)
PIDE_CONFIG = harness.REPO_ROOT / 'configs' / 'pidehead' / 'pidehead-diffusion_r50-d8_4xb2-40k_cityscapes-512x1024.py'
# mode: (features B, C, H, W; image H, W)
MODES = {'train': ((2, 2048, 64, 128), (512, 1024)), 'test': ((1, 2048, 128, 256), (1024, 2048))}
QUICK_MODES = {'train': ((2, 64, 16, 32), (128, 256)), 'test': ((1, 64, 32, 64), (256, 512))}
# B x N x N float32 attention copies at the peak (train: product, softmax, their gradients; test: two).
ATTENTION_COPIES = {'train': 4, 'test': 2}


def build_head(head: str, operator: str, args: argparse.Namespace, device: Any) -> Any:
    """The head from its config (module docstring), or why it could not be built."""
    import mmseg
    from mmengine.config import Config
    from mmseg.registry import MODELS

    models = Path(mmseg.__file__).parent / '.mim' / 'configs' / '_base_' / 'models'
    cfg = Config.fromfile(str(PIDE_CONFIG if head == 'PIDEHead' else models / MMSEG_CONFIGS[head]))
    cfg = cfg.model.decode_head.to_dict()
    cfg.update(norm_cfg=dict(type='BN', requires_grad=True), in_index=0, in_channels=args.modes_cfg['train'][0][1],
               **(dict(block_cfg=dict(operator=operator)) if operator else {}),
               **(dict(channels=32) if args.quick else {}))
    try:
        return MODELS.build(cfg).to(device)
    except Exception as exc:  # CCHead without mmcv's compiled ops, say
        return harness.error_text(exc)


def run_mode(mode: str, heads: dict[str, Any], device: Any, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    (b, c, h, w), (img_h, img_w) = args.modes_cfg[mode]
    train = mode == 'train'
    torch.manual_seed(0)
    feats = torch.randn(b, c, h, w, device=device, requires_grad=train)
    samples = [SegDataSample(metainfo=dict(img_shape=(img_h, img_w), pad_shape=(img_h, img_w)),
                             gt_sem_seg=PixelData(data=torch.randint(0, 19, (1, img_h, img_w), device=device)))
               for _ in range(b)]
    steps, results = {}, {}
    for label, head in heads.items():
        need = ATTENTION_COPIES[mode] * 4 * b * (h * w) ** 2 / harness.GIB if label in ('NLHead', 'DNLHead') else 0
        if isinstance(head, str) or need > args.max_gb:
            results[label] = {'ms': head if isinstance(head, str) else f'skipped: needs ~{need:.1f} GB'}
            continue

        def step(head=head) -> None:
            head.train(train)
            if not train:
                with torch.no_grad():
                    head.predict([feats], [s.metainfo for s in samples], None)
                return
            head.zero_grad(set_to_none=True)
            feats.grad = None
            sum(v for k, v in head.loss([feats], samples, None).items() if 'loss' in k).backward()

        steps[label] = step
    harness.progress(f'{mode} {(b, c, h, w)}: {", ".join(steps)}')
    for label, ms in harness.time_interleaved(steps, device, repeats=args.repeats, warmup=args.warmup).items():
        results[label] = {'ms': ms, 'mb': None if isinstance(ms, str) else harness.peak_mb(steps[label], device)}
    return results


def main(argv: Optional[list[str]] = None) -> None:
    parser = harness.make_parser(__file__, __doc__, 'heads')
    harness.add_choices(parser, '--heads', HEADS)
    harness.add_choices(parser, '--operators', OPERATORS)
    harness.add_choices(parser, '--modes', tuple(MODES))
    parser.add_argument('--max-gb', type=float, default=None, help='memory budget (default: half the free memory)')
    args, device = harness.parse(parser, argv)
    import mmseg.models  # noqa: F401  (registers mmseg's heads)
    from mmengine.registry import init_default_scope

    import pide_zoo.seg  # noqa: F401  (registers PIDEHead)
    from pide_zoo.flops import module_flop_analysis

    init_default_scope('mmseg')
    args.modes_cfg = QUICK_MODES if args.quick else MODES
    heads = {f'{h} {op}'.strip(): build_head(h, op, args, device)
             for h in args.heads for op in (args.operators if h == 'PIDEHead' else ('',))}
    results = {mode: run_mode(mode, heads, device, args) for mode in args.modes}
    rows = []
    for label, head in heads.items():
        built = not isinstance(head, str)
        feats = [torch.randn(1, *args.modes_cfg['train'][0][1:], device=device)]
        flops = module_flop_analysis(head, (feats,), nonlocal_method=None).total() / 1e9 if built else None
        row = [label, getattr(getattr(head, 'pide_block', None), 'method', ''),
               sum(p.numel() for p in head.parameters()) if built else None, flops]
        for mode in MODES:
            r, ref = results.get(mode, {}).get(label, {'ms': None}), results.get(mode, {}).get('NLHead', {})
            row += [r['ms'], r.get('mb'), harness.ratio(ref.get('ms'), r['ms'])]
        rows.append(row)
    shapes = '; '.join(f'{m}: features {f}, image {i[0]}x{i[1]}' for m, (f, i) in args.modes_cfg.items())
    harness.write_table(args.out, args, name='heads', title='mmseg decode heads on R-50-D8 features', rows=rows,
                        columns=['head', 'path', 'params', 'GFLOPs (train size, 1 image)', 'train ms', 'train MB',
                                 'train: NLHead time / this', 'test ms', 'test MB', 'test: NLHead time / this'],
                        notes=f'{shapes}; median of {args.repeats} interleaved rounds after {args.warmup}; MB: peak '
                              'growth (2^20 bytes)' + ('; --quick: in_channels 64, channels 32' if args.quick else ''))


if __name__ == '__main__':
    main()
