"""Training-step time of whole timm networks side by side: what a PIDE block costs inside a network.

The first model is the reference; every other row prints its step time relative to it. One step is
forward, cross-entropy, backward and an SGD update on a fixed random batch, in training mode. Each model
runs in a fresh spawned process together with the reference, their steps interleaved (A, B, A, B, ...), so
that slow drifts of a shared machine hit both alike and no third model shares their allocator and caches;
each ratio is taken within its process, over the medians of ``--repeats`` rounds, with the share of the
CPUs other processes used meanwhile (harness). ``--in-process`` (and ``--quick``) interleave every model in
this one process instead.

    PYTHONPATH=. python benchmarks/bench_network.py                       # nl_hamiltonian74 vs hamiltonian74
    PYTHONPATH=. python benchmarks/bench_network.py --models hamiltonian74,nl_hamiltonian74,nl_hamiltonian74_frac
    PYTHONPATH=. python benchmarks/bench_network.py --device cuda --batch 128
    PYTHONPATH=. python benchmarks/bench_network.py --compile             # both models under torch.compile
    PYTHONPATH=. python benchmarks/bench_network.py --floors              # what parts of the block cost

With ``--floors`` two more rows take nl_hamiltonian74 with its PIDE blocks cut down to parts of themselves:
``[stages]`` keeps only each stage's batch norm, activation and residual step (B_k = X + h ReLU(BN(B_{k-1})),
no embedding, aggregate or 1x1 convolution), ``[stages+conv]`` adds the stage's 1x1 convolution back. The
block's full-resolution elementwise work costs at least the first row, whatever computes the aggregate.

With ``--compile [BACKEND]`` every model is wrapped in ``torch.compile`` (default backend inductor); its first
steps compile forward and backward, take as long as that takes, and are reported apart, never timed.

Issue target (CPU, CIFAR 32x32, batch 32): nl_hamiltonian74 <= 1.10x hamiltonian74 (goal 1.05x).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

from harness import (
    CpuContention,
    add_harness_args,
    environment_lines,
    fmt_pct,
    print_table,
    progress,
    run_isolated,
    setup,
    wait_for_idle,
)

TARGET_RATIO = 1.10
FLOOR_MODEL = 'nl_hamiltonian74'
FLOORS = {f'{FLOOR_MODEL}[stages]': False, f'{FLOOR_MODEL}[stages+conv]': True}  # name -> keep the 1x1 conv


def cut_pide_blocks(model, keep_conv: bool) -> None:
    """Replace every PIDEBlock of ``model`` by its stages' norm, activation and residual (and 1x1 conv)."""
    import torch
    from torch import nn

    from pide_zoo.layers import PIDEBlock
    from pide_zoo.layers.nonlocal_block import _pointwise_conv  # the block's own 1x1 convolution

    class StagesOnly(nn.Module):
        def __init__(self, block: PIDEBlock):
            super().__init__()
            self.convs, self.norms, self.act, self.h = block.convs, block.norms, block.act, block.h

        def forward(self, x):
            out = x
            for conv, norm in zip(self.convs, self.norms):
                t = _pointwise_conv(out, conv.weight, conv.bias) if keep_conv else out
                out = torch.add(x, self.act(norm(t)), alpha=self.h)
            return out

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PIDEBlock):
                setattr(parent, name, StagesOnly(child))


def measure_models(names: list[str], cfg: dict) -> dict:
    """Interleaved training steps of ``names`` in this process: median ms, parameter count, compiling time
    and the CPU share other processes took meanwhile."""
    import timm
    import torch

    import pide_zoo  # noqa: F401  (registers the models)

    if cfg['threads']:  # a spawned process does not inherit the parent's setting
        torch.set_num_threads(cfg['threads'])
    device = torch.device(cfg['device'])
    torch.manual_seed(0)
    x = torch.randn(cfg['batch'], 3, cfg['img_size'], cfg['img_size'], device=device)
    y = torch.randint(0, cfg['num_classes'], (cfg['batch'],), device=device)
    models, opts = {}, {}
    for name in names:
        model = timm.create_model(FLOOR_MODEL if name in FLOORS else name, num_classes=cfg['num_classes'])
        if name in FLOORS:
            cut_pide_blocks(model, keep_conv=FLOORS[name])
        model = model.to(device).train()
        opts[name] = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        models[name] = torch.compile(model, backend=cfg['compile']) if cfg['compile'] else model

    def step(name: str) -> float:
        opts[name].zero_grad(set_to_none=True)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(models[name](x), y).backward()
        opts[name].step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    compile_s = {}
    if cfg['compile']:
        # Two untimed steps per model: the first compiles forward and backward, a second may recompile.
        for name in names:
            t0 = time.perf_counter()
            step(name)
            step(name)
            compile_s[name] = time.perf_counter() - t0
    wait_for_idle(cfg['wait_idle_s'])
    for _ in range(cfg['warmup']):
        for name in names:
            step(name)
    times = {name: [] for name in names}
    contention = CpuContention()
    for _ in range(cfg['repeats']):
        for name in names:
            times[name].append(step(name))
    return {'ms': {name: 1e3 * statistics.median(t) for name, t in times.items()},
            'params': {name: sum(p.numel() for p in models[name].parameters()) / 1e6 for name in names},
            'compile_s': compile_s, 'others': contention.fraction(), 'threads': torch.get_num_threads()}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_harness_args(parser, repeats=20)
    parser.add_argument('--models', default='hamiltonian74,nl_hamiltonian74',
                        help='comma-separated timm model names; the first is the reference')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('--compile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                        help='torch.compile every model with BACKEND (inductor when given bare)')
    parser.add_argument('--floors', action='store_true',
                        help=f'add {FLOOR_MODEL} with its PIDE blocks cut to their stages (see above)')
    args = parser.parse_args(argv)
    setup(parser, args)
    if args.quick:
        args.batch, args.repeats, args.warmup = 2, 2, 1

    names = [m for m in args.models.split(',') if m]
    if args.floors:
        names += [n for n in FLOORS if n not in names]
    if len(names) < 2:
        parser.error('--models needs a reference and at least one model to compare with it')
    if len(set(names)) != len(names):
        parser.error(f'--models names each model once, got {",".join(names)}')
    ref = names[0]
    cfg = dict(device=args.device, batch=args.batch, img_size=args.img_size, num_classes=args.num_classes,
               compile=args.compile, warmup=args.warmup, repeats=args.repeats, wait_idle_s=args.wait_idle_s,
               threads=args.threads)
    # In fresh processes each model is paired with the reference alone: with more models in one process
    # they share the allocator's heap and caches, which moved single rows by up to 0.13x of the reference.
    groups = [names] if args.in_process else [[ref, name] for name in names[1:]]
    results = []
    for i, group in enumerate(groups, 1):
        progress(f'[{i}/{len(groups)}] {" and ".join(group)}, {args.warmup} + {args.repeats} interleaved rounds')
        result = run_isolated(measure_models, group, cfg, in_process=args.in_process)
        if 'error' in result:
            raise SystemExit(f'measuring {", ".join(group)} failed: {result["error"]}')
        results.append(result)

    ms = {name: r['ms'][name] for r in results for name in r['ms'] if name != ref}
    ref_ms = {name: r['ms'][ref] for r in results for name in r['ms'] if name != ref}  # in the same process
    ms[ref] = ref_ms[ref] = statistics.median(r['ms'][ref] for r in results)
    params = {name: p for r in results for name, p in r['params'].items()}
    compile_s = {name: t for r in results for name, t in r['compile_s'].items()}
    others = [r['others'] for r in results if r['others'] is not None]
    args.threads = results[0]['threads']  # as the measuring processes ran
    how = f', torch.compile(backend={args.compile!r})' if args.compile else ''
    layout = ('models interleaved in one process' if args.in_process
              else f'each model interleaved with {ref} in a fresh process')
    print(f'Training step (forward, loss, backward, SGD), batch {args.batch}, {args.img_size}x{args.img_size}, '
          f'{layout}{how}\n')
    print('\n'.join(environment_lines(args, budget_note='no time budget (interleaved rounds)')))
    print()
    rows = [[name, f'{params[name]:.3f}', f'{ms[name]:.1f}', f'{ref_ms[name]:.1f}', f'{ms[name] / ref_ms[name]:.3f}x']
            for name in names]
    print_table(['model', 'params (M)', 'step ms (median)', f'{ref} ms (same process)', f'/ {ref}'], rows)
    if compile_s:
        print('\nfirst two (compiling) steps, untimed above: '
              + ', '.join(f'{name} {t:.1f} s' for name, t in compile_s.items()))
    print(f'\nCPU used by other processes during the timed rounds: {fmt_pct(max(others) if others else None)}')
    if ref == 'hamiltonian74' and 'nl_hamiltonian74' in ms:
        ratio = ms['nl_hamiltonian74'] / ref_ms['nl_hamiltonian74']
        print(f'target nl_hamiltonian74 / hamiltonian74 <= {TARGET_RATIO:.2f}: {ratio:.3f} '
              f'{"PASS" if ratio <= TARGET_RATIO else "FAIL"}')


if __name__ == '__main__':
    main()
