"""The long-range demo's training iteration per operator, side by side: what each PIDE block costs in the demo.

One iteration as mmengine's runner does it after the data loader: ``model.train_step`` (the data preprocessor,
forward, loss, backward and the config's SGD update) on one fixed batch of the demo's images, for the local
network (``configs/demo_longrange_local.py``) and ``configs/demo_longrange.py`` with each operator, interleaved in
one process; each row is timed relative to diffusion's. ``--compile-tiles`` adds each distance operator with
``compile_tiles=True``; its compiling iterations are reported in the notes, never timed.

    python benchmarks/bench_demo.py --quick
    python benchmarks/bench_demo.py --threads 1 --compile-tiles
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import harness
import numpy as np
import torch

OPERATORS = ('local', 'diffusion', 'frac_laplacian', 'inv_frac_laplacian', 'log')
DISTANCE = ('frac_laplacian', 'inv_frac_laplacian', 'log')


def build_step(operator: str, batch: dict, device: Any, compile_tiles: bool = False) -> tuple[Callable, int]:
    """One training iteration of the demo network with ``operator`` ('local': no blocks), and its parameters."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import MODELS

    if operator == 'local':
        cfg = Config.fromfile(str(harness.REPO_ROOT / 'configs' / 'demo_longrange_local.py'))
    else:
        cfg = Config.fromfile(str(harness.REPO_ROOT / 'configs' / 'demo_longrange.py'))
        block = {'model.backbone.block_cfg.operator': operator}
        if compile_tiles:
            block['model.backbone.block_cfg.compile_tiles'] = True
        cfg.merge_from_dict(block)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).to(device).train()
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    return (lambda: model.train_step(batch, wrapper)), sum(p.numel() for p in model.parameters())


def demo_batch(size: int) -> dict:
    """``size`` of the demo's samples as the data loader hands them over (uint8 CHW images, label maps)."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    from pide_zoo.seg.datasets import make_longrange_sample

    rng = np.random.default_rng(0)
    inputs, samples = [], []
    for _ in range(size):
        img, label = make_longrange_sample(rng)
        inputs.append(torch.from_numpy(img[:, :, ::-1].copy()).permute(2, 0, 1).contiguous())  # BGR, as loaded
        sample = SegDataSample(gt_sem_seg=PixelData(data=torch.from_numpy(label).long()[None]))
        sample.set_metainfo(dict(img_shape=label.shape, ori_shape=label.shape, pad_shape=label.shape))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def main(argv: Optional[list[str]] = None) -> None:
    parser = harness.make_parser(__file__, __doc__, 'demo_step', repeats=10)
    harness.add_choices(parser, '--operators', OPERATORS)
    parser.add_argument('--batch', type=harness.positive_int, default=8, help="images per iteration (the demo's 8)")
    parser.add_argument('--compile-tiles', action='store_true', help='also each distance operator with compile_tiles')
    args, device = harness.parse(parser, argv)
    from mmengine.registry import init_default_scope

    import pide_zoo.seg  # noqa: F401  (registers the demo's model parts, as the configs' custom_imports do)

    init_default_scope('mmseg')

    if args.quick:
        args.batch = 1
    batch = demo_batch(args.batch)
    steps, params, compiling = {}, {}, {}
    for op in args.operators:
        steps[op], params[op] = build_step(op, batch, device)
        if args.compile_tiles and op in DISTANCE:
            name = f'{op} (compiled tiles)'
            steps[name], params[name] = build_step(op, batch, device, compile_tiles=True)
            t0 = time.perf_counter()
            steps[name]()
            compiling[name] = time.perf_counter() - t0
    reference = 'diffusion' if 'diffusion' in steps else next(iter(steps))
    harness.progress(f'{", ".join(steps)}: {args.warmup} + {args.repeats} interleaved rounds, batch {args.batch}')
    ms = harness.time_interleaved(steps, device, repeats=args.repeats, warmup=args.warmup)
    rows = [[name, params[name], ms[name], harness.ratio(ms[name], ms[reference])] for name in steps]
    how = ('; untimed compiling iterations: ' + ', '.join(f'{n} {t:.1f} s' for n, t in compiling.items())
           if compiling else '')
    harness.write_table(
        args.out, args, 'demo_step', f"The long-range demo's training iteration, batch {args.batch} of 32x96",
        ['network', 'params', 'iteration ms', f'time / {reference}'], rows,
        f'model.train_step on one fixed batch (preprocessing, forward, loss, backward, SGD), no data loading; median '
        f'of {args.repeats} interleaved rounds after {args.warmup}; local: configs/demo_longrange_local.py, the '
        f'operators: configs/demo_longrange.py with block_cfg.operator{how}')


if __name__ == '__main__':
    main()
