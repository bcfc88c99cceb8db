"""The fused path against the rate of its own matrix products: how much of its time is GEMM work.

For each case and distance operator, one call of ``nonlocal_aggregate(..., method='fused')`` forward and backward
(gradients of theta, phi and the key values) against the same GEMMs as plain contiguous ``bmm`` calls over the
same query tiles: per tile the squared distances (E), the aggregate (C) forward, and the distances again, the
kernel gradient (C), the values' gradient (C), theta's and phi's gradients (E each) backward — E + C multiply-adds
per query-key pair forward, 3E + 2C backward. Variants run interleaved in one process:

* ``fused``: this checkout's path; ``baseline``: the same call through the ``pide_zoo/layers/ops`` package of
  another checkout (``--baseline PATH``, e.g. the commit an optimisation starts from); ``compiled``: the fused path
  with ``compile_tiles=True`` (``--compile``; compiled in the warm-up rounds, which are not timed);
* ``GEMMs``: the matrix products alone, each tile-sized product a fresh tensor; ``GEMMs, outputs reused``: the same
  with the tile-sized products written into one buffer allocated once, as the fused path writes them (a fresh
  tile's pages cost the first write a page fault each).

Columns: time per call, GFLOP/s (2 flops per multiply-add), the rate relative to either GEMM reference, the share
of the time spent outside the GEMMs (1 - t_GEMMs / t), and the speed-up over the baseline.

    python benchmarks/bench_roofline.py --quick
    python benchmarks/bench_roofline.py --threads 1 --baseline ../base      # BDD block and CIFAR Unit
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import harness
import torch
from bench_nonlocal import Case

DISTANCE_OPERATORS = ('frac_laplacian', 'inv_frac_laplacian', 'log')


def build_cases(args: Any) -> list[Case]:
    if args.quick:
        return [Case('tiny 20x12 B=2 C=16 pool 3', 2, 16, 12, 20, 3)]
    return [Case('CIFAR Unit 32x32 B=64 C=32 pool 2', 64, 32, 32, 32, 2),
            Case('BDD 160x90 B=8 C=112 pool 3', 8, 112, 90, 160, 3)]


def load_ops(root: Path) -> Any:
    """The ``pide_zoo/layers/ops`` package of another checkout, as a package of its own name (it imports nothing
    outside itself), so both versions run side by side in this process."""
    path = root / 'pide_zoo' / 'layers' / 'ops'
    if not (path / '__init__.py').is_file():
        raise SystemExit(f'--baseline {root}: no pide_zoo/layers/ops package there')
    spec = importlib.util.spec_from_file_location('baseline_pide_ops', path / '__init__.py',
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def inputs(case: Case, device: Any) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    n, m, c, e = case.height * case.width, case.keys(), case.channels, case.channels // 2
    theta = torch.randn(case.batch, e, n, generator=g)
    phi = torch.randn(case.batch, e, m, generator=g)
    vq, vk = torch.randn(case.batch, c, n, generator=g), torch.randn(case.batch, c, m, generator=g)
    return tuple(t.to(device).requires_grad_(i != 2) for i, t in enumerate((theta, phi, vq, vk)))


def aggregate_step(ops: Any, operator: str, tensors: tuple[torch.Tensor, ...], grad: torch.Tensor,
                   **kwargs: Any) -> Callable:
    def step() -> None:
        out = ops.nonlocal_aggregate(*tensors, operator=operator, method='fused', embed_scale=4.0, **kwargs)
        torch.autograd.grad(out, [tensors[0], tensors[1], tensors[3]], grad)
    return step


def gemm_step(case: Case, tile: int, device: Any, reuse: bool = False) -> Callable:
    """The fused path's GEMMs on contiguous operands of the same shapes, tile by tile; with ``reuse``, the tile-sized
    products written into buffers allocated once, as the fused path writes them."""
    b, n, m, c, e = case.batch, case.height * case.width, case.keys(), case.channels, case.channels // 2
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    phi, vk, theta_t = rnd(b, e, m), rnd(b, c, m), rnd(b, tile, e)
    w, g_t, sg = rnd(b, tile, m), rnd(b, c, tile), rnd(b, tile, m)
    g_vk, g_phi = rnd(b, c, m), rnd(b, e, m)
    buf = torch.empty(b * tile * m, device=device) if reuse else None

    def tile_out(rows: int) -> Optional[torch.Tensor]:
        return buf[:b * rows * m].view(b, rows, m) if reuse else None

    def step() -> None:
        for start in range(0, n, tile):
            rows = min(tile, n - start)
            th, wt, gt, st = theta_t[:, :rows], w[:, :rows], g_t[:, :, :rows], sg[:, :rows]
            torch.bmm(th, phi, out=tile_out(rows))  # forward: distances
            torch.bmm(vk, wt.transpose(1, 2))  # forward: aggregate
            torch.bmm(th, phi, out=tile_out(rows))  # backward: distances again
            torch.bmm(gt.transpose(1, 2), vk, out=tile_out(rows))  # kernel gradient
            g_vk.baddbmm_(gt, wt)  # the values' gradient
            torch.bmm(phi, st.transpose(1, 2))  # theta's gradient
            g_phi.baddbmm_(th.transpose(1, 2), st)  # phi's gradient
    return step


def gflop(case: Case) -> float:
    e, c = case.channels // 2, case.channels
    return 2 * case.batch * case.height * case.width * case.keys() * ((e + c) + (3 * e + 2 * c)) / 1e9


def main(argv: Optional[list[str]] = None) -> None:
    parser = harness.make_parser(__file__, __doc__, 'roofline', repeats=3, warmup=1)
    harness.add_choices(parser, '--operators', DISTANCE_OPERATORS)
    parser.add_argument('--baseline', type=Path, default=None,
                        help='another checkout whose pide_zoo/layers/ops runs beside this one (its commit)')
    parser.add_argument('--compile', action='store_true', help='also the fused path with compile_tiles=True')
    args, device = harness.parse(parser, argv)
    from pide_zoo.layers import ops

    base = load_ops(args.baseline) if args.baseline else None
    rows = []
    for case in build_cases(args):
        tensors = inputs(case, device)
        grad = torch.randn_like(tensors[2])
        tile = ops.query_tile(case.batch, case.keys(), device=device)
        steps = {'GEMMs': gemm_step(case, tile, device), 'GEMMs reused': gemm_step(case, tile, device, reuse=True)}
        for op in args.operators:
            steps[f'{op} fused'] = aggregate_step(ops, op, tensors, grad)
            if base is not None:
                steps[f'{op} baseline'] = aggregate_step(base, op, tensors, grad)
            if args.compile:
                steps[f'{op} compiled'] = aggregate_step(ops, op, tensors, grad, compile_tiles=True)
        harness.progress(f'{case.label}: {len(steps)} variants, tile {tile}')
        ms = harness.time_interleaved(steps, device, repeats=args.repeats, warmup=args.warmup)
        work, gemm, reused = gflop(case), ms['GEMMs'], ms['GEMMs reused']
        rows.append([case.label, '—', 'GEMMs', gemm, round(work / gemm * 1e3, 1), 1.0, harness.ratio(reused, gemm),
                     0.0, None])
        rows.append([case.label, '—', 'GEMMs, outputs reused', reused, round(work / reused * 1e3, 1),
                     harness.ratio(gemm, reused), 1.0, None, None])
        for op in args.operators:
            for variant in [v for v in ('fused', 'compiled', 'baseline') if f'{op} {v}' in ms]:
                t = ms[f'{op} {variant}']
                ok = isinstance(t, float)
                rows.append([case.label, op, variant, t, round(work / t * 1e3, 1) if ok else None,
                             harness.ratio(gemm, t), harness.ratio(reused, t), round(1 - gemm / t, 3) if ok else None,
                             harness.ratio(ms.get(f'{op} baseline'), t) if variant != 'baseline' else None])
    harness.write_table(
        args.out, args, 'roofline', 'The fused path against the rate of its own GEMMs (forward + backward, one call)',
        ['case', 'operator', 'variant', 'ms', 'GFLOP/s', 'rate / GEMMs', 'rate / GEMMs reused', 'non-GEMM share',
         'speed-up vs baseline'],
        rows, 'E = C/2 embedding channels, keys pooled; flops: 2 per multiply-add of the GEMM work (E + C per pair '
        'forward, 3E + 2C backward); GEMMs: the same products as contiguous bmm calls over the same tiles, each '
        'tile-sized product a fresh tensor, or (GEMMs reused) written into one buffer; the '
        'baseline: --baseline ' + (str(args.baseline) if args.baseline else '(none)'))


if __name__ == '__main__':
    main()
