"""PIDE operators and blocks against the paper's dense kernel, other libraries' nonlocal blocks and FlexAttention.

Forward+backward, training mode; each table's variants timed interleaved (harness.py). Tables (``--tables``):

* ``operators``: one ``nonlocal_aggregate`` (gradients into theta, phi and the values), the efficient path
  (``auto``: low rank for diffusion, fused query tiles otherwise) beside ``dense`` (the N x M kernel, as the
  paper), and their agreement: max |eff - dense| / max |dense| over the output and the gradients;
* ``blocks``: the same for a whole ``PIDEBlock`` (two stages);
* ``peers``: the PIDE blocks (keys pooled by 3) beside mmcv's ``NonLocal2d`` (keys pooled by 2; the block of
  mmseg's ``NLHead``, whose head bench_heads.py measures) and timm's ``NonLocalAttn`` (every position a key);
* ``flex`` (CUDA only: FlexAttention has no backward on CPU): fused, dense and compiled ``flex_attention`` for the
  positive kernels at E <= 128. Its ``score_mod`` returns log K_ij = log(lam c) - p/2 log d2 with
  d2 = |q|^2 + |k|^2 - 2 q.k, and its log-sum-exp undoes the row normalisation: sum_j K_ij V_j = out exp(lse).

Sizes: CIFAR units (32x32 C=32, 16x16 C=64, 8x8 C=112, keys pooled by 2), BDD100K 160x90 C=112 pooled by 3, and
with ``--full-res`` 1280x720 (batch 1, efficient path only, about an hour per distance kernel on 2 CPU cores).
Dense and the peers run only where their N x M copies are predicted to fit ``--max-gb``. Each table goes to
``<--out stem>_<table>.json``: by default docs/benchmarks/nonlocal_operators.json, _blocks, _peers, _flex.

    python benchmarks/bench_nonlocal.py --quick --out /tmp/nonlocal.json
    python benchmarks/bench_nonlocal.py --device cuda --tables flex,blocks
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Optional

import harness
import torch
import torch.nn.functional as F

from pide_zoo.layers import OPERATORS  # the operator table's paper operators

TABLES = ('operators', 'blocks', 'peers', 'flex')
FLEX_OPERATORS = ('frac_laplacian', 'inv_frac_laplacian')
LAM = 0.1
# Live B x N x M float32 copies at the peak, measured at 40x40: dense PIDE (kernel, mask, gradients); peers
# (product, softmax kept for backward, their gradients).
DENSE_COPIES = {'diffusion': 4, 'frac_laplacian': 6, 'inv_frac_laplacian': 6, 'log': 6}
PEER_COPIES = 4
# label: (library, mode, key pooling)
PEERS = {'mmcv NonLocal2d embedded_gaussian': ('mmcv', 'embedded_gaussian', 2),
         'mmcv NonLocal2d dot_product': ('mmcv', 'dot_product', 2),
         'timm NonLocalAttn': ('timm', '', 1)}


@dataclass(frozen=True)
class Case:
    label: str
    batch: int
    channels: int
    height: int
    width: int
    pool: int
    dense: bool = True

    def keys(self, pool: Optional[int] = None) -> int:
        pool = pool or self.pool
        return (self.height // pool) * (self.width // pool)

    def kernel_gb(self, pool: Optional[int] = None) -> float:
        """One float32 B x N x M kernel."""
        return 4 * self.batch * self.height * self.width * self.keys(pool) / harness.GIB


def build_cases(args: argparse.Namespace) -> list[Case]:
    b = args.batch
    if args.quick:
        return [Case('tiny 8x8 B=2 C=8 pool 2', 2, 8, 8, 8, 2), Case('tiny 20x12 B=2 C=16 pool 3', 2, 16, 12, 20, 3)]
    cases = [Case(f'CIFAR 32x32 B={b} C=32 pool 2', b, 32, 32, 32, 2),
             Case(f'CIFAR 16x16 B={b} C=64 pool 2', b, 64, 16, 16, 2),
             Case(f'CIFAR 8x8 B={b} C=112 pool 2', b, 112, 8, 8, 2),
             Case(f'BDD 160x90 B={b} C=112 pool 3', b, 112, 90, 160, 3)]
    return cases + ([Case('BDD 1280x720 B=1 C=112 pool 3', 1, 112, 720, 1280, 3, dense=False)] if args.full_res else [])


def flex_aggregate(theta: Any, phi: Any, v_query: Any, v_key: Any, operator: str, flex: Any) -> Any:
    """``nonlocal_aggregate`` (normalizer 'key') of a positive kernel through FlexAttention (module docstring)."""
    from pide_zoo.layers import pide_constant

    s = 0.5  # the paper's order for both operators, n = 2
    power = 2 + 2 * s if operator == 'frac_laplacian' else 2 - 2 * s
    log_c = math.log(LAM * pide_constant(operator, s))

    def heads(t: Any) -> Any:  # (B, D, L) -> (B, 1, L, D), D zero-padded to a power of two (>= 16)
        d = t.shape[1]
        return F.pad(t, (0, 0, 0, max(16, 1 << (d - 1).bit_length()) - d)).transpose(1, 2).unsqueeze(1)

    q, k, v = heads(theta), heads(phi), heads(v_key)
    qq, kk = theta.pow(2).sum(1), phi.pow(2).sum(1)

    def score_mod(score: Any, b: Any, h: Any, i: Any, j: Any) -> Any:
        d2 = qq[b, i] + kk[b, j] - 2 * score
        return torch.where(d2 > 0, log_c - 0.5 * power * torch.log(d2), -math.inf)

    try:
        from torch.nn.attention.flex_attention import AuxRequest
        out, aux = flex(q, k, v, score_mod=score_mod, scale=1.0, return_aux=AuxRequest(lse=True))
        lse = aux.lse
    except ImportError:  # torch before AuxRequest
        out, lse = flex(q, k, v, score_mod=score_mod, scale=1.0, return_lse=True)
    rowsum = lse.exp()  # (B, 1, N): sum_j K_ij
    agg = (out * rowsum.unsqueeze(-1))[:, 0, :, :v_key.shape[1]].transpose(1, 2)
    if operator == 'frac_laplacian':
        agg = v_query * rowsum[:, :1] - agg
    return agg / phi.shape[2]


def build(kind: str, case: Case, operator: str, method: str, flex: Any = None, embed: Optional[int] = None) -> Any:
    """The module a row measures: ``kind`` 'operator', 'block' or a key of PEERS."""
    torch.manual_seed(0)  # same weights for every path of a row
    if kind == 'block':
        from pide_zoo.layers import PAPER_WIDTHS, PIDEBlock

        return PIDEBlock(case.channels, operator=operator, subsample=case.pool, method=method, **PAPER_WIDTHS)
    if kind in PEERS:
        library, mode, _ = PEERS[kind]
        if library == 'mmcv':
            from mmcv.cnn import NonLocal2d

            return NonLocal2d(case.channels, mode=mode, sub_sample=True)
        from timm.layers import NonLocalAttn

        return NonLocalAttn(case.channels)
    from pide_zoo.layers import nonlocal_aggregate, resolve_method

    class Operator(torch.nn.Module):
        """``nonlocal_aggregate`` alone: theta and phi are parameters, the values the input and its pooled keys."""

        def __init__(self) -> None:
            super().__init__()
            self.method = method if method == 'flex' else resolve_method(method, operator, 'dot')
            e = embed or case.channels // 2
            self.theta = torch.nn.Parameter(torch.randn(case.batch, e, case.height * case.width))
            self.phi = torch.nn.Parameter(torch.randn(case.batch, e, case.keys()))

        def forward(self, x: Any) -> Any:
            keys = (F.max_pool2d(x, case.pool) if case.pool > 1 else x).flatten(2)
            if method == 'flex':
                return flex_aggregate(self.theta, self.phi, x.flatten(2), keys, operator, flex).view_as(x)
            return nonlocal_aggregate(self.theta, self.phi, x.flatten(2), keys, operator=operator, lam=LAM,
                                      method=method).view_as(x)

    return Operator()


def measure(modules: dict[str, Any], case: Case, device: Any, args: argparse.Namespace,
            reference: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """Each module's interleaved fwd+bwd time, peak memory, parameters and agreement with ``reference``."""
    torch.manual_seed(1)
    x = torch.randn(case.batch, case.channels, case.height, case.width, device=device, requires_grad=True)
    grad_out = torch.randn_like(x)  # out.sum() would send almost nothing back through the batch norms
    modules = {name: m.to(device).train() for name, m in modules.items()}
    last: dict[str, Any] = {}

    def step(module: Any) -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        last['out'] = module(x)
        last['out'].backward(grad_out)

    results: dict[str, dict[str, Any]] = {}
    steps = {name: (lambda m=m: step(m)) for name, m in modules.items()}
    for name, ms in harness.time_interleaved(steps, device, repeats=args.repeats, warmup=args.warmup).items():
        results[name] = {'ms': ms}
        if isinstance(ms, str):
            continue
        results[name]['mb'] = harness.peak_mb(steps[name], device)
        grads = [last['out'].detach(), x.grad] + [p.grad for p in modules[name].parameters() if p.dim() == 3]
        if reference in modules:  # only to compare with it
            results[name]['tensors'] = [g.detach().double().cpu() for g in grads]
        results[name]['params'] = sum(p.numel() for p in modules[name].parameters())
    ref = results.get(reference, {}).get('tensors')
    for r in results.values():
        if ref is not None and 'tensors' in r:
            r['diff'] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                            for a, b in zip(r['tensors'], ref))
    return results


def versus_dense(kind: str, cases: list[Case], device: Any, args: argparse.Namespace) -> list[list[Any]]:
    rows = []
    for case in cases:
        for op in args.operators:
            need = DENSE_COPIES[op] * case.kernel_gb()
            modules = {'auto': build(kind, case, op, 'auto')}
            if case.dense and need <= args.max_gb:
                modules['dense'] = build(kind, case, op, 'dense')
            harness.progress(f'{kind} | {case.label} | {op} | {", ".join(modules)}')
            r = measure(modules, case, device, args, 'dense')
            eff, dense = r['auto'], r.get('dense', {'ms': 'not run' if not case.dense else f'needs ~{need:.1f} GB'})
            rows.append([case.label, op, modules['auto'].method, eff['ms'], dense['ms'],
                         harness.ratio(dense['ms'], eff['ms']), eff.get('mb'), dense.get('mb'),
                         harness.ratio(dense.get('mb'), eff.get('mb')), eff.get('diff')])
    return rows


def peers(case: Case, device: Any, args: argparse.Namespace) -> list[list[Any]]:
    modules = {f'PIDEBlock {op}': build('block', case, op, 'auto') for op in args.operators}
    skipped = {name: f'skipped: needs ~{PEER_COPIES * case.kernel_gb(p):.1f} GB' for name, (_, _, p) in PEERS.items()
               if PEER_COPIES * case.kernel_gb(p) > args.max_gb}
    for name in [n for n in PEERS if n not in skipped]:
        try:
            modules[name] = build(name, case, '', '')
        except ImportError as exc:  # mmcv not installed
            skipped[name] = harness.error_text(exc)
    harness.progress(f'peers | {case.label} | {", ".join(modules)}')
    r = measure(modules, case, device, args)
    ref = r.get('mmcv NonLocal2d embedded_gaussian', {})
    rows = []
    for name in dict.fromkeys([*modules, *PEERS]):
        pool = case.pool if name.startswith('PIDE') else PEERS[name][2]
        res = r.get(name, {'ms': skipped.get(name)})
        path = getattr(modules.get(name), 'method', '')
        rows.append([name, case.keys(pool), pool, path, res.get('params'), res['ms'], res.get('mb'),
                     harness.ratio(res['ms'], ref.get('ms')), harness.ratio(res.get('mb'), ref.get('mb'))])
    return rows


def flex_rows(case: Case, device: Any, args: argparse.Namespace) -> list[list[Any]]:
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for op in [o for o in FLEX_OPERATORS if o in args.operators]:
        for e in (8, 16) if args.quick else (32, 56, 128):
            modules = {m: build('operator', case, op, m, flex, e) for m in ('fused', 'flex', 'dense')}
            harness.progress(f'flex | {case.label} E={e} | {op}')
            r = measure(modules, case, device, args, 'dense')
            f, fl, d = r['fused'], r['flex'], r['dense']
            rows.append([case.label, op, e, f['ms'], d['ms'], fl['ms'], f.get('mb'), d.get('mb'), fl.get('mb'),
                         f.get('diff'), fl.get('diff')])
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = harness.make_parser(__file__, __doc__, 'nonlocal')
    harness.add_choices(parser, '--tables', TABLES)
    harness.add_choices(parser, '--operators', OPERATORS)
    parser.add_argument('--batch', type=harness.positive_int, default=8, help='batch of the CIFAR and 160x90 cases')
    parser.add_argument('--full-res', action='store_true', help='add BDD100K 1280x720 (batch 1, efficient path)')
    parser.add_argument('--max-gb', type=float, default=None,
                        help='run dense and peers only where predicted to fit (default: half the free memory)')
    parser.add_argument('--matmul-precision', choices=('highest', 'high', 'medium'), default='highest',
                        help='torch.set_float32_matmul_precision for the run (high/medium: TF32/bf16 GEMMs)')
    args, device = harness.parse(parser, argv)
    torch.set_float32_matmul_precision(args.matmul_precision)
    notes = (f'fwd+bwd, training mode, median of {args.repeats} interleaved rounds after {args.warmup}; MB: peak '
             f'growth (2^20 bytes); float32, matmul precision {args.matmul_precision!r}')

    def write(table: str, title: str, columns: list[str], rows: list[list[Any]], more: str = '') -> None:
        harness.write_table(args.out.with_name(f'{args.out.stem}_{table}.json'), args, f'nonlocal_{table}', title,
                            columns, rows, notes + more)

    columns = ['case', 'operator', 'path', 'efficient ms', 'dense ms', 'time dense/eff', 'efficient MB', 'dense MB',
               'memory dense/eff', 'max rel diff']
    cases = build_cases(args)
    bdd = next(c for c in cases if c.pool == 3 and c.dense)  # BDD100K 160x90: peers and flex
    if 'operators' in args.tables:
        write('operators', 'nonlocal_aggregate (one stage): efficient path vs the dense kernel', columns,
              versus_dense('operator', cases, device, args))
    if 'blocks' in args.tables:
        write('blocks', 'PIDEBlock (2 stages): efficient path vs the dense kernel', columns,
              versus_dense('block', cases, device, args))
    if 'peers' in args.tables:
        write('peers', f'Nonlocal blocks, {bdd.label}', ['block', 'keys M', 'key pool', 'path', 'params', 'ms', 'MB',
                                                         'time / mmcv EG', 'memory / mmcv EG'],
              peers(bdd, device, args), '; EG: mmcv NonLocal2d embedded_gaussian')
    if 'flex' in args.tables:
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
            why = '' if device.type == 'cuda' else 'FlexAttention has no backward on CPU; run it with --device cuda'
        except ImportError as exc:
            why = f'torch.nn.attention.flex_attention unavailable ({harness.error_text(exc)})'
        if why:
            print(f'\nflex table skipped: {why}')
        else:
            write('flex', 'Positive kernels: fused path, dense and FlexAttention (nonlocal_aggregate)',
                  ['case', 'operator', 'E', 'fused ms', 'dense ms', 'flex ms', 'fused MB', 'dense MB', 'flex MB',
                   'fused max rel diff', 'flex max rel diff'], flex_rows(bdd, device, args),
                  '; flex: torch.compile(flex_attention); rel diff against dense over the output and the gradients '
                  'of x, theta and phi')


if __name__ == '__main__':
    main()
