"""Reversible against stored back-propagation through a Unit of Hamiltonian blocks: memory and time by depth.

For each depth m, ``HamiltonianUnit(C, m)`` with stored activations and with ``reversible=True`` (same weights) run
forward+backward interleaved. ``saved MB``: the tensors autograd keeps for the backward (``saved_tensors_hooks``,
exact); the reversible Unit's stay flat in m, at the price of recomputing each block in the backward.

    python benchmarks/bench_reversible.py --quick
    python benchmarks/bench_reversible.py --device cuda --batch 128
"""
from __future__ import annotations

from typing import Any, Optional

import harness
import torch


def main(argv: Optional[list[str]] = None) -> None:
    parser = harness.make_parser(__file__, __doc__, 'reversible')
    parser.add_argument('--channels', type=int, default=32)
    parser.add_argument('--size', type=harness.positive_int, default=32, help='feature map side (32: CIFAR)')
    parser.add_argument('--batch', type=harness.positive_int, default=32)
    parser.add_argument('--depths', type=lambda v: [harness.positive_int(d) for d in v.split(',')], default=[2, 4, 8])
    args, device = harness.parse(parser, argv)
    if args.channels < 2 or args.channels % 2:
        parser.error(f'--channels must be even and >= 2, got {args.channels}')
    from pide_zoo.layers import HamiltonianUnit

    c, size, batch, depths = (8, 8, 2, (1, 2)) if args.quick else (args.channels, args.size, args.batch, args.depths)
    x = torch.randn(batch, c, size, size, device=device)
    rows = []
    for depth in depths:
        torch.manual_seed(0)
        units = {'stored': HamiltonianUnit(c, depth).to(device).train()}
        units['reversible'] = HamiltonianUnit(c, depth, reversible=True).to(device).train()
        units['reversible'].load_state_dict(units['stored'].state_dict())
        saved: dict[str, int] = {}

        def step(name: str, units: dict = units, saved: dict = saved) -> None:
            saved[name] = 0

            def pack(t: Any) -> Any:
                saved[name] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = units[name](x.clone().requires_grad_())
            out.square().mean().backward()

        harness.progress(f'depth {depth}')
        steps = {name: (lambda name=name: step(name)) for name in units}
        ms = harness.time_interleaved(steps, device, repeats=args.repeats, warmup=args.warmup)
        mb = {name: harness.peak_mb(steps[name], device) for name in units}
        rows.append([depth, ms['stored'], ms['reversible'], harness.ratio(ms['reversible'], ms['stored']),
                     saved['stored'] / harness.MIB, saved['reversible'] / harness.MIB, mb['stored'],
                     mb['reversible']])
    harness.write_table(
        args.out, args, 'reversible', f'HamiltonianUnit C={c}, {size}x{size}, batch {batch}: stored vs reversible',
        ['blocks m', 'stored ms', 'reversible ms', 'time rev/stored', 'stored saved MB', 'reversible saved MB',
         'stored peak MB', 'reversible peak MB'], rows,
        f'fwd+bwd, median of {args.repeats} interleaved rounds after {args.warmup}; saved MB: tensors kept for the '
        'backward pass; peak MB: peak growth (2^20 bytes)')


if __name__ == '__main__':
    main()
