"""Speed and memory of the PIDE nonlocal block: the efficient paths against the paper's dense kernel and peers.

For each operator (diffusion, fractional Laplacian, inverse fractional Laplacian, log kernel) and
feature-map sizes from Bohn, Griebel & Kannan (2021), this times one forward+backward pass of a
:class:`pide_zoo.layers.PIDEBlock` (two stages, default hyper-parameters, training mode) and
measures its peak memory, with ``method='auto'`` and with ``method='dense'`` (the full N x M kernel,
as the paper computed it), side by side in the same run. ``'auto'`` resolves to ``'lowrank'`` for the
dot diffusion kernel (O(N E C), the kernel never formed) and to the fused tiled evaluation otherwise
(query tiles of the kernel in an autograd Function with a hand-written backward: each tile evaluated
once forward and once backward, only the embeddings, values and O(B N) statistics saved); the table
names the resolved path. ``--level operator`` times one call of the functional core
``nonlocal_aggregate`` instead (embeddings fixed projections of the input, no convolution, batch norm
or activation): the part of the block the paths differ in. Cases (``--cases``):

* ``cifar``: CIFAR-10 ResNet units: 32x32 C=32, 16x16 C=64, 8x8 C=112, key subsample 2, batch
  ``--cifar-batch`` (default 8: on CPU a training batch would take minutes per case);
* ``bdd``: BDD100K 160x90 (W x H) C=112, batch ``--bdd-batch`` (default 8), subsample 3;
* ``bdd_sub1``: BDD100K 160x90 C=112, batch 8, subsample 1, distance kernels only: dense needs several
  copies of a B*N*M float32 kernel (6.6 GB each) and runs only within ``--max-dense-gb``;
* ``full_res``: BDD100K at full resolution 1280x720, batch 1, C=112, subsample 3, efficient path only,
  for the operators in ``--full-res-ops`` (default diffusion; ``all`` for every operator);
* ``peers`` (not in ``all``): the PIDE block of each operator (efficient path, keys pooled by
  ``--peer-subsample``) against mmcv's ``NonLocal2d`` (``embedded_gaussian`` and ``dot_product``,
  ``sub_sample=True``: keys max-pooled by 2) and timm's ``NonLocalAttn`` (no key pooling) on the same
  BDD 160x90 C=112 input, batch ``--bdd-batch``, training mode, with their parameter counts. Peers
  whose N x M attention is predicted beyond ``--max-dense-gb`` are skipped and say so.

How it measures (``harness.py``): each measurement in a fresh spawned process (``--in-process`` trades
that for speed; ``--quick`` implies it); median wall time of forward+backward over ``--repeats`` runs
after ``--warmup`` runs, fewer where they would exceed ``--case-budget-s`` (the ``runs`` column says how
many); peak memory as growth over what the block, the input and the output gradient already hold,
from the resident high-water mark (CPU) or ``torch.cuda.max_memory_allocated``, MB = 2**20 bytes;
agreement of the efficient and the dense path (same seed, same weights) as
max |efficient - dense| / max |dense| over the output and the input gradient.

Run from the repository root:

    PYTHONPATH=. python benchmarks/bench_nonlocal.py --quick            # smoke test, tiny sizes
    PYTHONPATH=. python benchmarks/bench_nonlocal.py | tee bench.txt    # full sizes on CPU
    PYTHONPATH=. python benchmarks/bench_nonlocal.py --level operator --cases bdd,full_res
    PYTHONPATH=. python benchmarks/bench_nonlocal.py --cases peers
    PYTHONPATH=. python benchmarks/bench_nonlocal.py --device cuda --cifar-batch 128 --full-res-ops all
    PYTHONPATH=. python benchmarks/bench_nonlocal.py --cases bdd --operators diffusion --wait-idle-s 300

The table goes to stdout, progress lines to stderr. On a shared machine, other processes' load inflates
the times many-fold (the math libraries' threads contend for the cores): the ``CPU others`` column says
how busy the CPUs were, and ``--wait-idle-s`` waits for quiet before each measurement.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

from harness import (
    CONTENTION_WARN,
    GIB,
    MIB,
    add_harness_args,
    default_memory_budget_gb,
    ensure_repo_on_path,
    environment_lines,
    fmt_duration,
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
DISTANCE_OPERATORS = OPERATORS[1:]
# Case groups for --cases: CIFAR units, BDD100K 160x90 (sub 3 and sub 1), BDD100K at 1280x720; 'all' means
# these. 'peers' compares with other libraries' nonlocal blocks and is asked for by name.
CASE_GROUPS = ('cifar', 'bdd', 'bdd_sub1', 'full_res')
EXTRA_GROUPS = ('peers',)
# Other libraries' nonlocal blocks: (library class, mode or '' , keys max-pooled by).
PEERS = {
    'mmcv_embedded_gaussian': ('mmcv NonLocal2d', 'embedded_gaussian', 2),
    'mmcv_dot_product': ('mmcv NonLocal2d', 'dot_product', 2),
    'timm_nonlocal': ('timm NonLocalAttn', '', 1),
}
# Live B x N x M float32 tensors at the dense path's peak, measured with this script at 40x40, B=8:
# about 3.8 (diffusion) and 5-6 (distance kernels: squared distance, mask, kernel and their gradients).
DENSE_KERNEL_COPIES = {'diffusion': 4, 'frac_laplacian': 6, 'inv_frac_laplacian': 6, 'log': 6}
# The peers' softmax or scaled attention: the product, the attention kept for backward and their gradients.
PEER_KERNEL_COPIES = 4
# Issue 10's targets at BDD 160x90, batch 8, C=112, pool 3 (CPU, forward+backward).
TARGET_OP_SPEEDUP = 2.5  # operator level, each distance kernel: dense time / fused time
TARGET_OP_MEMORY = 3.0  # ... and dense / fused peak-memory growth
TARGET_BLOCK_SPEEDUP = 1.5  # block level, each distance kernel
TARGET_BLOCK_MEMORY = 2.0
TARGET_SUB1_PEAK_MB = 1.5 * 1024  # block, pool 1, default allocator
# Diffusion no slower than before the fused path: its speed-up over dense measured then (README, same sizes).
TARGET_DIFFUSION_SPEEDUP = {'operator': 18.0, 'block': 4.5}


@dataclass(frozen=True)
class Case:
    """One feature-map size; ``role`` is its group in ``--cases`` and ties it to a target."""

    label: str
    batch: int
    channels: int
    height: int
    width: int
    subsample: int
    operators: tuple[str, ...]
    dense: bool = True
    role: str = 'cifar'

    @property
    def queries(self) -> int:
        return self.height * self.width

    def keys(self, pool: Optional[int] = None) -> int:
        # MaxPool2d floors each side.
        pool = self.subsample if pool is None else pool
        return (self.height // pool) * (self.width // pool)

    def kernel_bytes(self, pool: Optional[int] = None) -> int:
        """Bytes of one float32 B x N x M kernel."""
        return 4 * self.batch * self.queries * self.keys(pool)


@dataclass(frozen=True)
class Spec:
    """One measurement, sent to a child process. ``model`` is ``'pide'`` or a key of :data:`PEERS`."""

    case: Case
    operator: str
    method: str
    device: str
    repeats: int
    warmup: int
    budget_s: float
    threads: Optional[int]
    save_path: Optional[str]
    level: str = 'block'
    model: str = 'pide'


def peer_memory_bytes(case: Case, model: str) -> int:
    """Predicted peak of a peer's N x M attention (the term that grows quadratically)."""
    return PEER_KERNEL_COPIES * case.kernel_bytes(PEERS[model][2])


def dense_memory_bytes(case: Case, operator: str) -> int:
    return DENSE_KERNEL_COPIES[operator] * case.kernel_bytes()


# ---------------------------------------------------------------------------------------------
# Measurement (runs in the child process)
# ---------------------------------------------------------------------------------------------

def operator_stage(case: Case, *, operator: str, method: str) -> Any:
    """The functional core alone: ``nonlocal_aggregate(theta, phi, X, pool(X))`` with the embeddings as leaves.

    theta (B, C/2, N) and phi (B, C/2, M) are parameters, so forward+backward computes the gradients the
    block would send into its embeddings and values, but no convolution, batch norm or activation of
    the block is timed or held.
    """
    import torch
    import torch.nn.functional as F

    from pide_zoo.layers.pide_ops import nonlocal_aggregate

    class OperatorStage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            e = case.channels // 2
            self.theta = torch.nn.Parameter(torch.randn(case.batch, e, case.queries))
            self.phi = torch.nn.Parameter(torch.randn(case.batch, e, case.keys()))

        def forward(self, x):
            keys = F.max_pool2d(x, case.subsample) if case.subsample > 1 else x
            theta, phi = self.theta, self.phi
            if x.shape[2:] != (case.height, case.width):  # the warm-up's tiny input: embeddings of its size
                e = theta.shape[1]
                theta = torch.randn(x.shape[0], e, x.shape[2] * x.shape[3], device=x.device)
                phi = torch.randn(x.shape[0], e, keys.shape[2] * keys.shape[3], device=x.device)
            return nonlocal_aggregate(theta, phi, x.flatten(2), keys.flatten(2), operator=operator, lam=0.1,
                                      method=method).view_as(x)

    return OperatorStage()


def build_module(spec: Spec) -> tuple[Any, str]:
    """The module ``spec`` measures and the name of its evaluation path."""
    c = spec.case
    if spec.model in PEERS:
        library, mode, _ = PEERS[spec.model]
        if library.startswith('mmcv'):
            from mmcv.cnn import NonLocal2d

            return NonLocal2d(c.channels, mode=mode, sub_sample=True), mode
        from timm.layers import NonLocalAttn

        return NonLocalAttn(c.channels), 'embedded gaussian'
    if spec.model != 'pide':
        raise ValueError(f'model must be pide or one of {tuple(PEERS)}, got {spec.model!r}')
    from pide_zoo.layers.nonlocal_block import PIDEBlock
    from pide_zoo.layers.pide_ops import resolve_method

    if spec.level == 'block':
        block = PIDEBlock(c.channels, operator=spec.operator, subsample=c.subsample, method=spec.method)
        return block, block.method
    return operator_stage(c, operator=spec.operator, method=spec.method), resolve_method(spec.method, spec.operator,
                                                                                          'dot')


def measure(spec: Spec) -> dict[str, Any]:
    """Time forward+backward of one block (or operator) and read its peak memory; see the module docstring."""
    import torch

    ensure_repo_on_path()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    c = spec.case
    torch.manual_seed(0)  # same weights and inputs for both methods, so their outputs can be compared
    block, resolved = build_module(spec)
    block = block.to(device).train()
    params = sum(p.numel() for p in block.parameters())
    x = torch.randn(c.batch, c.channels, c.height, c.width, device=device, requires_grad=True)
    # A random cotangent: out.sum() would send almost nothing back through the batch norms.
    grad_out = torch.randn_like(x)

    def step() -> Any:
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = block(x)
        out.backward(grad_out)
        return out

    # One pass on a minimal input first: the one-off lazy set-up of the math libraries (thread pools,
    # kernel caches) would otherwise be charged to whichever measurement comes first.
    side = 2 * max(c.subsample, 2)
    tiny = torch.randn(2, c.channels, side, side, device=device, requires_grad=True)
    block(tiny).sum().backward()
    block.zero_grad(set_to_none=True)
    del tiny
    result = measure_step(step, device, warmup=spec.warmup, repeats=spec.repeats, budget_s=spec.budget_s)
    out = result.pop('out')
    if spec.save_path:
        torch.save({'out': out.detach().cpu(), 'grad': x.grad.detach().cpu()}, spec.save_path)
    result.update(resolved=resolved, params=params)
    return result


def max_rel_diff(path_a: str, path_b: str) -> float:
    import torch

    a, b = torch.load(path_a), torch.load(path_b)
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in ('out', 'grad'))


# ---------------------------------------------------------------------------------------------
# Cases, tables and targets (parent process)
# ---------------------------------------------------------------------------------------------

def build_cases(args: argparse.Namespace) -> list[Case]:
    ops = tuple(args.operators)
    dist = tuple(o for o in ops if o in DISTANCE_OPERATORS)
    full = tuple(o for o in ops if o in args.full_res_ops)
    cb, bb, ps = args.cifar_batch, args.bdd_batch, args.peer_subsample
    if args.quick:
        return [
            Case(f'tiny 8x8 B={cb} C=8 sub 2', cb, 8, 8, 8, 2, ops, role='cifar'),
            Case(f'tiny 20x12 B={bb} C=16 sub 3', bb, 16, 12, 20, 3, ops, role='bdd'),
            Case(f'tiny 20x12 B={bb} C=16 sub 1', bb, 16, 12, 20, 1, dist, role='bdd_sub1'),
            Case('tiny 64x36 B=1 C=16 sub 3', 1, 16, 36, 64, 3, full, dense=False, role='full_res'),
            Case(f'tiny 20x12 B={bb} C=16', bb, 16, 12, 20, ps, ops, dense=False, role='peers'),
        ]
    return [
        Case(f'CIFAR 32x32 B={cb} C=32 sub 2', cb, 32, 32, 32, 2, ops, role='cifar'),
        Case(f'CIFAR 16x16 B={cb} C=64 sub 2', cb, 64, 16, 16, 2, ops, role='cifar'),
        Case(f'CIFAR 8x8 B={cb} C=112 sub 2', cb, 112, 8, 8, 2, ops, role='cifar'),
        Case(f'BDD 160x90 B={bb} C=112 sub 3', bb, 112, 90, 160, 3, ops, role='bdd'),
        Case(f'BDD 160x90 B={bb} C=112 sub 1', bb, 112, 90, 160, 1, dist, role='bdd_sub1'),
        Case('BDD 1280x720 B=1 C=112 sub 3', 1, 112, 720, 1280, 3, full, dense=False, role='full_res'),
        Case(f'BDD 160x90 B={bb} C=112', bb, 112, 90, 160, ps, ops, dense=False, role='peers'),
    ]


def run_all(args: argparse.Namespace, cases: list[Case]) -> tuple[list[list[str]], dict[tuple[str, str, str], Any]]:
    """Measure every case but the peers; returns the table rows and the results keyed by (role, operator, method)."""
    rows: list[list[str]] = []
    results: dict[tuple[str, str, str], Any] = {}
    fused_ms_per_entry: dict[str, float] = {}  # measured fused speed, to estimate skipped full-res cases
    tmp = tempfile.TemporaryDirectory(prefix='bench_nonlocal_')
    base = dict(device=args.device, repeats=args.repeats, warmup=args.warmup, budget_s=args.case_budget_s,
                threads=args.threads, level=args.level)
    for case in cases:
        for op in args.operators:
            if op not in case.operators:
                if case.role == 'full_res':
                    est = fused_ms_per_entry.get(op)
                    est_s = '' if est is None else f', est. {fmt_duration(est * case.kernel_bytes() / 4e3)} fwd+bwd'
                    rows.append([case.label, op, 'auto', '', f'skipped (not in --full-res-ops{est_s})'])
                continue
            save = case.dense
            eff_path = os.path.join(tmp.name, 'eff.pt') if save else None
            spec = Spec(case=case, operator=op, method='auto', save_path=eff_path, **base)
            progress(f'{case.label} | {op} | auto ...')
            wait_for_idle(args.wait_idle_s)
            eff = run_isolated(measure, spec, in_process=args.in_process)
            results[(case.role, op, 'auto')] = eff
            if 'error' in eff:
                rows.append([case.label, op, 'auto', '', f'failed: {eff["error"]}'])
                progress(f'    failed: {eff["error"]}')
            else:
                rows.append([case.label, op, f'auto ({eff["resolved"]})', eff['runs'], fmt_num(eff['ms']),
                             fmt_num(eff['peak'] / MIB), '', '', '', fmt_pct(eff['others'])])
                progress(f'    {eff["ms"]:.1f} ms, {eff["peak"] / MIB:.1f} MB ({eff["runs"]} runs, '
                         f'warm-up {", ".join(f"{t:.0f}" for t in eff["warmup_ms"])} ms)')
                if eff['resolved'] != 'lowrank':
                    fused_ms_per_entry[op] = eff['ms'] / (case.kernel_bytes() / 4)
            need_gb = dense_memory_bytes(case, op) / GIB
            need = f'~{need_gb:.1f} GB: ~{DENSE_KERNEL_COPIES[op]} x {case.kernel_bytes() / GIB:.2f} GB kernel'
            if not case.dense:
                rows.append([case.label, op, 'dense', '', f'not run (would need {need})'])
                continue
            if need_gb > args.max_dense_gb:
                rows.append([case.label, op, 'dense', '', f'skipped (would need {need})'])
                progress(f'{case.label} | {op} | dense skipped (would need {need})')
                continue
            dense_path = os.path.join(tmp.name, 'dense.pt')
            progress(f'{case.label} | {op} | dense ...')
            wait_for_idle(args.wait_idle_s)
            dense = run_isolated(measure, replace(spec, method='dense', save_path=dense_path),
                                 in_process=args.in_process)
            results[(case.role, op, 'dense')] = dense
            if 'error' in dense:
                rows.append([case.label, op, 'dense', '', f'failed: {dense["error"]}'])
                progress(f'    failed: {dense["error"]}')
                continue
            progress(f'    {dense["ms"]:.1f} ms, {dense["peak"] / MIB:.1f} MB ({dense["runs"]} runs)')
            ok = 'error' not in eff
            t_ratio = dense['ms'] / eff['ms'] if ok else None
            m_ratio = dense['peak'] / max(eff['peak'], 1) if ok else None
            diff = f'{max_rel_diff(eff_path, dense_path):.1e}' if ok else '—'
            rows.append([case.label, op, 'dense', dense['runs'], fmt_num(dense['ms']),
                         fmt_num(dense['peak'] / MIB), fmt_ratio(t_ratio), fmt_ratio(m_ratio), diff,
                         fmt_pct(dense['others'])])
    tmp.cleanup()
    return rows, results


def run_peers(args: argparse.Namespace, case: Case) -> tuple[list[list[str]], dict[str, Any]]:
    """The PIDE block of each operator and the peers on ``case``; rows relative to mmcv's embedded Gaussian."""
    base = dict(case=case, device=args.device, repeats=args.repeats, warmup=args.warmup,
                budget_s=args.case_budget_s, threads=args.threads, save_path=None, level='block')
    specs = [Spec(operator=op, method='auto', **base) for op in args.operators]
    specs += [Spec(operator='', method='', model=name, **base) for name in args.peers]
    results: dict[str, Any] = {}
    for spec in specs:
        name = f'PIDEBlock {spec.operator}' if spec.model == 'pide' else f'{PEERS[spec.model][0]}'
        if spec.model in PEERS and peer_memory_bytes(case, spec.model) / GIB > args.max_dense_gb:
            need = peer_memory_bytes(case, spec.model) / GIB
            results[spec.model] = {'skipped': f'skipped (would need ~{need:.1f} GB: ~{PEER_KERNEL_COPIES} x '
                                              f'{case.kernel_bytes(PEERS[spec.model][2]) / GIB:.2f} GB attention)'}
            progress(f'{case.label} | {name} | {results[spec.model]["skipped"]}')
            continue
        progress(f'{case.label} | {name} {PEERS[spec.model][1] if spec.model in PEERS else ""} ...')
        wait_for_idle(args.wait_idle_s)
        r = run_isolated(measure, spec, in_process=args.in_process)
        results[spec.model if spec.model in PEERS else spec.operator] = r
        progress(f'    failed: {r["error"]}' if 'error' in r else
                 f'    {r["ms"]:.1f} ms, {r["peak"] / MIB:.1f} MB ({r["runs"]} runs)')
    ref = results.get('mmcv_embedded_gaussian')
    ref = ref if ref and 'ms' in ref else None
    rows = []
    for spec in specs:
        key = spec.model if spec.model in PEERS else spec.operator
        r = results[key]
        if spec.model == 'pide':
            name, pool = f'PIDEBlock {spec.operator}', case.subsample
        else:
            library, mode, pool = PEERS[spec.model]
            name = f'{library} {mode}'.strip()
        keys = f'{case.keys(pool):,}' + (f' (max-pool {pool})' if pool > 1 else ' (all)')
        if 'ms' not in r:
            rows.append([name, keys, '', '', '', r.get('skipped') or f'failed: {r["error"]}'])
            continue
        rows.append([name, keys, r['resolved'], f'{r["params"]:,}', r['runs'], fmt_num(r['ms']),
                     fmt_num(r['peak'] / MIB), fmt_ratio(r['ms'] / ref['ms']) if ref else '—',
                     fmt_ratio(r['peak'] / max(ref['peak'], 1)) if ref else '—', fmt_pct(r['others'])])
    return rows, results


def target_lines(results: dict[tuple[str, str, str], Any], args: argparse.Namespace) -> list[str]:
    """Issue 10's targets, each with its measured value and PASS / FAIL / not measured."""

    def pair(role: str, op: str) -> Optional[tuple[float, float, bool]]:
        eff, dense = results.get((role, op, 'auto')), results.get((role, op, 'dense'))
        if not (eff and dense and 'error' not in eff and 'error' not in dense):
            return None
        busy = any((r['others'] or 0) > CONTENTION_WARN for r in (eff, dense))
        return dense['ms'] / eff['ms'], dense['peak'] / max(eff['peak'], 1), busy

    level = args.level
    speed_t, mem_t = ((TARGET_OP_SPEEDUP, TARGET_OP_MEMORY) if level == 'operator'
                      else (TARGET_BLOCK_SPEEDUP, TARGET_BLOCK_MEMORY))
    lines = []
    for op in OPERATORS:
        if op not in args.operators:
            continue
        st = TARGET_DIFFUSION_SPEEDUP[level] if op == 'diffusion' else speed_t
        p = pair('bdd', op)
        if p is None:
            lines.append(f'- {op} 160x90 pool 3 ({level}): not measured')
            continue
        t, m, busy = p
        mem = (f'memory dense/eff {m:.2f}x' if op == 'diffusion'
               else f'memory dense/eff {m:.2f}x (target >= {mem_t:g}x): {verdict(m >= mem_t)}')
        lines.append(f'- {op} 160x90 pool 3 ({level}): speed-up over dense {t:.2f}x (target >= {st:g}x): '
                     f'{verdict(t >= st)}{" (timed under CPU contention)" if busy else ""}; {mem}')
    allocator = ('' if not os.environ.get('MALLOC_MMAP_THRESHOLD_')
                 else ' (MALLOC_MMAP_THRESHOLD_ set: the target is for the default allocator)')
    for op in DISTANCE_OPERATORS:
        if op not in args.operators:
            continue
        r = results.get(('bdd_sub1', op, 'auto'))
        if r and 'error' not in r:
            mb = r['peak'] / MIB
            scope = '' if level == 'block' else ' (the target is for --level block)'
            lines.append(f'- {op} 160x90 pool 1 ({level}): peak {mb:,.0f} MB (target <= {TARGET_SUB1_PEAK_MB:,.0f} '
                         f'MB): {verdict(mb <= TARGET_SUB1_PEAK_MB)}{scope}{allocator}')
        else:
            lines.append(f'- {op} 160x90 pool 1: {"FAIL: " + r["error"] if r else "not measured"}')
    for op in args.operators:
        full = results.get(('full_res', op, 'auto'))
        if full and 'error' not in full:
            lines.append(f'- {op} 1280x720 B=1 ({level}): runs, {full["ms"] / 1e3:.2f} s fwd+bwd, '
                         f'{full["peak"] / GIB:.2f} GB peak: PASS')
        elif full:
            lines.append(f'- {op} 1280x720 B=1 ({level}): FAIL: {full["error"]}')
    if args.quick:
        lines.append('- (--quick: tiny stand-ins for the target sizes, so these verdicts mean nothing)')
    return lines


def parse_cases(value: str) -> tuple[str, ...]:
    groups = ()
    for v in (v.strip() for v in value.split(',') if v.strip()):
        groups += CASE_GROUPS if v == 'all' else (v,)
    bad = [g for g in groups if g not in CASE_GROUPS + EXTRA_GROUPS]
    if bad:
        raise argparse.ArgumentTypeError(f'unknown case group(s) {bad}; choose from {CASE_GROUPS + EXTRA_GROUPS} '
                                         'or all')
    return groups


def parse_operators(value: str) -> tuple[str, ...]:
    if value == 'all':
        return OPERATORS
    if value == 'none':
        return ()
    ops = tuple(v.strip() for v in value.split(',') if v.strip())
    bad = [o for o in ops if o not in OPERATORS]
    if bad:
        raise argparse.ArgumentTypeError(f'unknown operator(s) {bad}; choose from {OPERATORS}, all or none')
    return ops


def parse_peers(value: str) -> tuple[str, ...]:
    if value in ('all', 'none'):
        return tuple(PEERS) if value == 'all' else ()
    peers = tuple(v.strip() for v in value.split(',') if v.strip())
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise argparse.ArgumentTypeError(f'unknown peer(s) {bad}; choose from {tuple(PEERS)}, all or none')
    return peers


def print_peers(args: argparse.Namespace, case: Case, rows: list[list[str]]) -> None:
    print(f'\n## Peers: nonlocal blocks forward+backward, {case.label}, training mode\n')
    print(f'- PIDEBlock: 2 stages, keys max-pooled by {case.subsample}, efficient path (auto); mmcv NonLocal2d: '
          'reduction 2, use_scale, sub_sample=True; timm NonLocalAttn: its defaults (C/8 embedding, no pooling)')
    print('- time / EG and peak / EG: relative to mmcv NonLocal2d embedded_gaussian (lower is better)\n')
    print_table(['block', 'keys M', 'path', 'params', 'runs', 'fwd+bwd ms', 'peak MB', 'time / EG', 'peak / EG',
                 'CPU others'], rows, left=3)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_harness_args(parser)
    parser.add_argument('--cifar-batch', type=int, default=8, help='batch of the CIFAR cases')
    parser.add_argument('--bdd-batch', type=int, default=8, help='batch of the 160x90 BDD100K and peer cases')
    parser.add_argument('--max-dense-gb', type=float, default=None,
                        help='run dense (and peers) only where the estimated peak fits (default: half the free '
                             'memory)')
    parser.add_argument('--operators', type=parse_operators, default=OPERATORS,
                        help='comma-separated operators to benchmark, or all')
    parser.add_argument('--full-res-ops', type=parse_operators, default=('diffusion',),
                        help='operators to run at 1280x720 (comma-separated, all or none)')
    parser.add_argument('--cases', type=parse_cases, default=CASE_GROUPS,
                        help=f'comma-separated case groups out of {",".join(CASE_GROUPS + EXTRA_GROUPS)}; all = '
                             f'{",".join(CASE_GROUPS)} (so all,peers for everything)')
    parser.add_argument('--peers', type=parse_peers, default=tuple(PEERS),
                        help=f'peer blocks of the peers group, out of {",".join(PEERS)}, all or none')
    parser.add_argument('--peer-subsample', type=int, default=3,
                        help='key max-pool of the PIDE blocks in the peers group (3: the BDD100K configs)')
    parser.add_argument('--level', choices=('block', 'operator'), default='block',
                        help='block: a whole PIDEBlock (embeddings, 2 stages, 1x1 convs, batch norms); operator: '
                             'one nonlocal_aggregate call, the part the efficient paths replace (the peers group '
                             'always measures blocks)')
    args = parser.parse_args(argv)
    setup(parser, args)
    if args.max_dense_gb is None:
        args.max_dense_gb = default_memory_budget_gb(args.device)

    cases = [c for c in build_cases(args) if c.role in args.cases]
    start = time.perf_counter()
    rows, results = run_all(args, [c for c in cases if c.role != 'peers'])
    peers = [c for c in cases if c.role == 'peers']
    peer_rows, peer_results = run_peers(args, peers[0]) if peers else ([], {})
    elapsed = time.perf_counter() - start

    print('\n'.join(environment_lines(args, f'dense and peers only within {args.max_dense_gb:.1f} GB (estimated)')))
    if rows:
        what = 'PIDEBlock' if args.level == 'block' else 'nonlocal_aggregate (one stage of the functional core)'
        print(f'\n## {what} forward+backward: efficient path (auto) vs dense kernel\n')
        print('- sizes are W x H; N = W*H queries, M = keys after max-pool by `sub`; embed C/2; '
              + ('2 stages, train mode' if args.level == 'block' else 'one aggregate, no conv/BN/ReLU'))
        print(f'- CPU others: share of all CPUs busy with other processes during the timed runs; (!) above '
              f'{100 * CONTENTION_WARN:.0f}%: that time is inflated by contention')
        print('- runs: timed runs (median reported); 1w: the warm-up alone, as it exceeded --case-budget-s')
        print(f'- fwd+bwd ms: median wall time; peak MB: memory growth over {args.level} + input + output grad '
              '(2^20 bytes);')
        print('  ratios are dense/efficient (higher = efficient path better); max rel diff compares output and '
              'input gradient\n')
        print_table(['case', 'operator', 'method', 'runs', 'fwd+bwd ms', 'peak MB', 'time dense/eff',
                     'mem dense/eff', 'max rel diff', 'CPU others'], rows, left=3)
        print(f'\nTargets (CPU, BDD 160x90, batch 8, C=112, fwd+bwd): at pool 3 every distance kernel >= '
              f'{TARGET_OP_SPEEDUP:g}x faster than dense with <= 1/{TARGET_OP_MEMORY:g} of its peak-memory growth '
              f'(operator level), >= {TARGET_BLOCK_SPEEDUP:g}x and <= 1/{TARGET_BLOCK_MEMORY:g} (block level); '
              f'at pool 1 every distance-kernel block <= {TARGET_SUB1_PEAK_MB / 1024:g} GB peak growth with the '
              'default allocator; diffusion no slower than before the fused path (its speed-up then); every operator '
              'in --full-res-ops runs at 1280x720 batch 1.')
        print('\n'.join(target_lines(results, args)))
    if peers:
        print_peers(args, peers[0], peer_rows)
    how = {r['memory_how'] for r in [*results.values(), *peer_results.values()] if 'memory_how' in r}
    print(f'\nPeak memory read with {", ".join(sorted(how)) or "n/a"}. Total benchmark time {elapsed / 60:.1f} min.')


if __name__ == '__main__':
    main()
