"""One training iteration of the paper's BDD100K segmentation configs: time and peak memory.

    python benchmarks/bench_seg_iteration.py [--batch 8] [--repeats 2] [--device cpu|cuda]

Builds the model of each ``configs/bdd100k_*.py`` (Hamiltonian-74 and the four nonlocal variants,
each nonlocal one with the efficient path ``method='auto'`` and the paper's ``'dense'`` kernel) and
times forward + loss + backward + SGD step on random 160x90 images at batch 8, each case in a fresh
process (``harness.py``). Peak memory: on CPU the growth of the resident high-water mark (VmHWM, reset through
/proc/self/clear_refs after the model and batch are built); on CUDA ``max_memory_allocated``; with a
GPU, images per second as well. Ratios dense / efficient are printed side by side.
"""
from __future__ import annotations

import argparse
import math
import os.path as osp
from typing import Any

from harness import MIB, ensure_repo_on_path, measure_step, run_isolated

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = ['bdd100k_hamiltonian74', 'bdd100k_pide_diffusion', 'bdd100k_pide_frac', 'bdd100k_pide_invfrac',
           'bdd100k_pide_log']


def measure(config: str, method: str, batch: int, repeats: int, device: str) -> dict[str, Any]:
    """Median time and peak memory growth of one training iteration of ``config`` (in a fresh process)."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    ensure_repo_on_path()
    import pide_zoo.seg  # noqa: F401
    from pide_zoo.layers import PIDEBlock

    init_default_scope('mmseg')
    torch.manual_seed(0)
    cfg = Config.fromfile(osp.join(ROOT, 'configs', f'{config}.py'))
    model = MODELS.build(cfg.model).to(device).train()
    for m in model.modules():
        if isinstance(m, PIDEBlock):
            m.method = method if method == 'dense' else m.method
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 90, 160, device=device)
    samples = []
    for _ in range(batch):
        s = SegDataSample(metainfo=dict(img_shape=(90, 160), pad_shape=(90, 160)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 19, (1, 90, 160), device=device))
        samples.append(s)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        losses = model.loss(x, samples)
        sum(v for k, v in losses.items() if 'loss' in k).backward()
        opt.step()

    step()  # before the meter starts: allocations and the optimizer's momentum buffers are state, not the step's
    r = measure_step(step, torch.device(device), warmup=0, repeats=repeats, budget_s=math.inf)
    return {'s': r['ms'] / 1e3, 'mb': r['peak'] / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--configs', nargs='+', default=CONFIGS)
    args = parser.parse_args()
    print(f'one training iteration (forward, loss, backward, SGD step), 160x90, batch {args.batch}, '
          f'{args.device}, median of {args.repeats}')
    print('| config | method | s / iter | peak MB | dense / efficient time | dense / efficient memory |'
          + (' images / s |' if args.device == 'cuda' else ''))
    print('|---|---|---|---|---|---|' + ('---|' if args.device == 'cuda' else ''))
    for config in args.configs:
        results = {}
        for method in (['auto'] if config.endswith('hamiltonian74') else ['auto', 'dense']):
            r = run_isolated(measure, config, method, args.batch, args.repeats, args.device)
            if 'error' in r:
                print(f'| {config} | {method} | failed: {r["error"]} | | | |', flush=True)
                continue
            results[method] = r['s'], r['mb']
            t, mem = results[method]
            ratio = ''
            if method == 'dense' and 'auto' in results:
                ratio = f' {t / results["auto"][0]:.2f}x | {mem / max(results["auto"][1], 1e-9):.2f}x |'
            else:
                ratio = ' | |'
            ips = f' {args.batch / t:.1f} |' if args.device == 'cuda' else ''
            print(f'| {config} | {"efficient" if method == "auto" else "dense"} | {t:.2f} | {mem:.0f} |{ratio}{ips}',
                  flush=True)


if __name__ == '__main__':
    main()
