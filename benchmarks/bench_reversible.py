"""Activation memory and time of reversible vs stored back-propagation through Hamiltonian blocks.

    python benchmarks/bench_reversible.py [--channels 32] [--size 32] [--batch 32] [--depths 2 4 8 16]

For each Unit depth m it runs forward+backward of a ``HamiltonianUnit`` twice, side by side in one
process: with stored activations and with ``reversible=True``. "Saved MB" is the size of the tensors
autograd keeps for the backward pass (counted with ``torch.autograd.graph.saved_tensors_hooks``, exact
and independent of allocator noise); on CUDA the peak allocated memory is printed as well. Time is the
median of ``--repeats`` runs. The reversible path should keep its saved memory constant in m while
the stored path grows linearly, at the price of recomputing each block about twice.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pide_zoo.layers.hamiltonian import HamiltonianUnit


def measure(unit: HamiltonianUnit, x: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """Median time (ms), saved-for-backward MB, and CUDA peak MB (0 on CPU) of forward+backward."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    times, peak = [], 0.0
    for i in range(repeats + 1):
        saved.clear()
        xi = x.clone().requires_grad_()
        if x.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unit(xi)
        out.square().mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
        if i:  # the first run warms up
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), sum(saved) / 2 ** 20, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--channels', type=int, default=32)
    parser.add_argument('--size', type=int, default=32)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--depths', type=int, nargs='+', default=[2, 4, 8, 16])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=args.device)
    print(f'HamiltonianUnit C={args.channels}, {args.size}x{args.size}, batch {args.batch}, {args.device}, '
          f'median of {args.repeats}')
    print('| blocks m | stored: ms | stored: saved MB | reversible: ms | reversible: saved MB | saved ratio | '
          'time ratio |' + (' CUDA peak MB stored / reversible |' if x.is_cuda else ''))
    print('|---|---|---|---|---|---|---|' + ('---|' if x.is_cuda else ''))
    for depth in args.depths:
        stored = HamiltonianUnit(args.channels, depth, reversible=False).to(args.device).train()
        rev = HamiltonianUnit(args.channels, depth, reversible=True).to(args.device).train()
        rev.load_state_dict(stored.state_dict())
        ts, ms, ps = measure(stored, x, args.repeats)
        tr, mr, pr = measure(rev, x, args.repeats)
        line = (f'| {depth} | {ts:.0f} | {ms:.1f} | {tr:.0f} | {mr:.1f} | {ms / mr:.1f}x less | '
                f'{tr / ts:.2f}x |')
        print(line + (f' {ps:.0f} / {pr:.0f} |' if x.is_cuda else ''), flush=True)


if __name__ == '__main__':
    main()
