"""Functional core of the PIDE nonlocal operators.

Discretisations of the partial integro-differential operators of Bohn, Griebel & Kannan,
*Deep Neural Networks and PIDE discretizations* (2021), Sections 3 and 4.2-4.4:

* nonlocal diffusion ``L`` (4.1):          (1/N) sum_j w_ij (V_j - V_i),  w_ij = lam theta_i . phi_j
* fractional Laplacian ``(-Delta)^s`` (4.4): (c_{n,s}/N) sum_j lam |theta_i - phi_j|^-(n+2s) (V_i - V_j)
* inverse fractional Laplacian ``(-Delta)^-s`` (4.5): (c_{n,-s}/N) sum_j lam |theta_i - phi_j|^-(n-2s) V_j
* log kernel ``(-Delta)^-1`` for s = n/2 (4.6): (c_n/N) sum_j lam (-2 log|theta_i - phi_j| - gamma) V_j

Three ways to evaluate them, all exact:

* ``'lowrank'``: the dot-product diffusion kernel has rank E, so sum_j w_ij V_j = lam theta_i^T (Phi V^T)
  costs O(N E C) and never forms the N x M kernel;
* ``'fused'`` (alias ``'tiled'``): any kernel, evaluated over tiles of query positions by an autograd
  function with a hand-written backward that saves only the inputs and O(B N) row sums and evaluates
  each tile once more to form every gradient, so memory stays O(tile M) beyond the inputs;
* ``'dense'``: the N x M kernel at once, as the paper computed it (for benchmarks and FLOP counts).
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from functools import partial
from numbers import Real
from typing import Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    'OPERATORS', 'OPERATOR_ALIASES', 'KERNELS', 'NORMALIZERS', 'METHODS', 'METHOD_ALIASES', 'EULER_GAMMA',
    'resolve_operator', 'default_s', 'check_s', 'check_normalizer', 'check_tile_size', 'pide_constant',
    'pide_kernel', 'apply_kernel', 'nonlocal_aggregate', 'resolve_method', 'query_tile', 'KERNEL_SCALES',
    'WIDTH_SCALE_TAU', 'check_kernel_args', 'width_scale', 'embed_scale_for', 'ieee_fp32_matmul',
    'evaluate_kernel', 'evaluate_aggregate',
]

OPERATORS = ('diffusion', 'frac_laplacian', 'inv_frac_laplacian', 'log')
KERNELS = ('dot', 'gaussian')
NORMALIZERS = ('key', 'query', 'rowsum')
METHODS = ('auto', 'lowrank', 'fused', 'dense')
# Earlier name of the fused tiled path, still accepted.
METHOD_ALIASES = {'tiled': 'fused'}
EULER_GAMMA = 0.5772156649015329
KERNEL_SCALES = ('paper', 'width')
# Length unit tau sqrt(E) of the 'width' scale for the distance kernels. tau = 1.5 keeps the power kernels'
# pre-BN signal at 1.8e-2 - 6e-2 (6-20x batch norm's sqrt(eps)) from 16 to 2048 channels (tau = 1: frac 5e-3);
# the log kernel's scale only shifts its constant part, which nearly cancels gamma at tau = 1.5 (7e-3), so it
# keeps tau = 1 (1.4e-2 - 1.7e-2). benchmarks/bench_init.py prints the table.
WIDTH_SCALE_TAU = {'frac_laplacian': 1.5, 'inv_frac_laplacian': 1.5, 'log': 1.0}

# The paper's names and common spellings for each operator.
OPERATOR_ALIASES = {
    'diffusion': 'diffusion', 'nonlocal_diffusion': 'diffusion', 'L': 'diffusion',
    'frac_laplacian': 'frac_laplacian', 'fractional_laplacian': 'frac_laplacian', 'frac': 'frac_laplacian',
    '(-Delta)^s': 'frac_laplacian', '(-Delta)^{1/2}': 'frac_laplacian',
    'inv_frac_laplacian': 'inv_frac_laplacian', 'inverse_fractional_laplacian': 'inv_frac_laplacian',
    'invfrac': 'inv_frac_laplacian', 'inv_frac': 'inv_frac_laplacian', 'riesz': 'inv_frac_laplacian',
    '(-Delta)^-s': 'inv_frac_laplacian', '(-Delta)^{-1/2}': 'inv_frac_laplacian',
    'log': 'log', 'log_kernel': 'log', 'inv_laplacian': 'log', '(-Delta)^-1': 'log', '(-Delta)^{-1}': 'log',
}

# Below this multiple of the machine epsilon (relative to |theta_i|^2 + |phi_j|^2) a squared
# distance obtained from |a|^2 - 2 a.b + |b|^2 is rounding noise: the pair counts as coincident.
_COINCIDENT_EPS = 64.0
_ROWSUM_EPS = 1e-6
# Elements of one kernel tile (B * tile * M) when tile_size is not given. On CPU the fused path ran
# fastest with tiles of about 2^21 elements (8 MiB in float32: 128 queries x 1590 keys x batch 8 at
# BDD100K 160x90, pool 3), which the cores' caches and the allocator reuse; tiles of 2^23 and more lost
# 2-3x to cache misses and page zeroing. GPUs want larger tiles to fill the device: 2^24 (64 MiB).
# With many keys that rule leaves too few queries per tile, and every tile streams all keys once: tiles get
# at least 64 queries while they stay within 2^25 elements (frac fwd+bwd, CPU: 102,240 keys, batch 1
# 23.6 -> 19.4 ns per pair for 20 -> 64 queries; 14,400 keys, batch 8 20.1 -> 16.0 ns for 18 -> 64).
_TILE_ELEMENTS = {'cpu': 1 << 21}
_TILE_ELEMENTS_DEFAULT = 1 << 24
_TILE_MIN_QUERIES = 64
_TILE_MAX_ELEMENTS = 1 << 25


def resolve_operator(operator: str) -> str:
    """Canonical operator name for ``operator`` or one of its aliases (``OPERATOR_ALIASES``)."""
    try:
        return OPERATOR_ALIASES[operator]
    except (KeyError, TypeError):
        raise ValueError(
            f'operator must be one of {OPERATORS} or an alias {sorted(OPERATOR_ALIASES)}, got {operator!r}'
        ) from None


def default_s(operator: str, n: int = 2) -> Optional[float]:
    """The paper's order ``s`` for ``operator``: 1/2, 1/2 and n/2 (log kernel); None for diffusion."""
    return {'diffusion': None, 'frac_laplacian': 0.5, 'inv_frac_laplacian': 0.5, 'log': n / 2}[
        resolve_operator(operator)]


def check_s(operator: str, s: Optional[float], n: int = 2) -> Optional[float]:
    """Validate the order ``s`` of ``operator`` in dimension ``n``; returns the default when None."""
    operator = resolve_operator(operator)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f'n (the dimension of the domain) must be a positive int, got {n!r}')
    if s is None:
        return default_s(operator, n)
    if operator == 'diffusion':
        raise ValueError(f"s is not used by operator 'diffusion'; pass s=None, got {s!r}")
    if not isinstance(s, Real) or isinstance(s, bool):
        raise ValueError(f's must be a real number, got {s!r}')
    s = float(s)
    if operator == 'frac_laplacian' and not 0 < s < 1:
        raise ValueError(f"s must satisfy 0 < s < 1 for operator 'frac_laplacian', got {s}")
    if operator == 'inv_frac_laplacian' and not 0 < s < n / 2:
        raise ValueError(f"s must satisfy 0 < s < n/2 = {n / 2} for operator 'inv_frac_laplacian', got {s}")
    if operator == 'log' and s != n / 2:
        raise ValueError(f"s must equal n/2 = {n / 2} for operator 'log', got {s}")
    return s


def pide_constant(operator: str, s: Optional[float] = None, n: int = 2) -> float:
    """The operator's normalising constant: c_{n,s}, c_{n,-s} or c_n (1 for diffusion).

    c_{n,s} = 4^s Gamma(n/2 + s) / (pi^(n/2) |Gamma(-s)|),
    c_{n,-s} = Gamma(n/2 - s) / (4^s pi^(n/2) Gamma(s)),
    c_n = 1 / ((4 pi)^(n/2) Gamma(n/2)).
    """
    operator = resolve_operator(operator)
    s = check_s(operator, s, n)
    if operator == 'diffusion':
        return 1.0
    if operator == 'frac_laplacian':
        return 4 ** s * math.gamma(n / 2 + s) / (math.pi ** (n / 2) * abs(math.gamma(-s)))
    if operator == 'inv_frac_laplacian':
        return math.gamma(n / 2 - s) / (4 ** s * math.pi ** (n / 2) * math.gamma(s))
    return 1.0 / ((4 * math.pi) ** (n / 2) * math.gamma(n / 2))


def check_kernel_args(operator: str, s: Optional[float] = None, n: int = 2, kernel: str = 'dot',
                      embed_scale: float = 1.0) -> tuple[str, Optional[float]]:
    """Validate a kernel's arguments; returns the canonical operator name and the order s."""
    operator = resolve_operator(operator)
    s = check_s(operator, s, n)
    if kernel not in KERNELS:
        raise ValueError(f'kernel must be one of {KERNELS}, got {kernel!r}')
    if kernel != 'dot' and operator != 'diffusion':
        raise ValueError(f"kernel={kernel!r} applies to operator 'diffusion' only, got operator={operator!r}")
    if not isinstance(embed_scale, Real) or isinstance(embed_scale, bool) or not 0 < embed_scale < math.inf:
        raise ValueError(f'embed_scale must be a positive finite number, got {embed_scale!r}')
    return operator, s


def width_scale(operator: str, kernel: str, embed_channels: int) -> float:
    """The ``embed_scale`` of ``kernel_scale='width'`` for embeddings of width E = ``embed_channels``.

    |theta_i - phi_j| grows like sqrt(E), so the paper's power kernels shrink like E^-(n+-2s)/2: from 16
    channels on, the fractional Laplacian's signal falls below batch norm's eps and the block learns nothing.
    Distances measured in units of tau sqrt(E) (``WIDTH_SCALE_TAU``) keep every distance kernel's signal at
    one level from 16 to 2048 channels: the power kernels are the paper's with lambda (tau sqrt(E))^(n+-2s),
    the log kernel's gamma is shifted by -log(tau^2 E). The gaussian diffusion kernel, which sharpens as E
    grows, gets exp(lam theta.phi / sqrt(E)) (E^(1/4) on each side) as scaled dot-product attention; the dot
    diffusion kernel is linear in lambda, which batch norm absorbs, and stays the paper's (1).

    Why this form: a fixed factor adds no state, costs nothing (it is folded into the constants), traces and
    exports as the paper's kernel and equals it with a closed-form lambda. The row-sum normalizer also
    cancels lambda (pre-BN signal 1.2-1.5 at every width) but changes the operator, and with the dot kernel
    its near-zero row sums blow the embeddings' gradients up (relative gradient of theta 3e3 - 8e3); a
    data-dependent RMS distance would need a running buffer for evaluation and new state in checkpoints.
    """
    operator = resolve_operator(operator)
    if operator != 'diffusion':
        return WIDTH_SCALE_TAU[operator] * math.sqrt(embed_channels)
    return embed_channels ** 0.25 if kernel == 'gaussian' else 1.0


def embed_scale_for(kernel_scale: Union[str, float], operator: str, kernel: str, embed_channels: int) -> float:
    """``embed_scale`` for a block's ``kernel_scale``: ``'paper'`` 1, ``'width'`` :func:`width_scale`, a number
    itself."""
    if kernel_scale == 'paper':
        return 1.0
    if kernel_scale == 'width':
        return width_scale(operator, kernel, embed_channels)
    if isinstance(kernel_scale, Real) and not isinstance(kernel_scale, bool) and 0 < kernel_scale < math.inf:
        return float(kernel_scale)
    raise ValueError(f'kernel_scale must be one of {KERNEL_SCALES} or a positive number, got {kernel_scale!r}')


def _fp32_backends() -> list:
    # torch >= 2.9 sets matmul precision per backend; 'none' defers to the global setting.
    return [b for b in (getattr(torch.backends.cuda, 'matmul', None), getattr(torch.backends.mkldnn, 'matmul', None))
            if hasattr(b, 'fp32_precision')]


@contextmanager
def ieee_fp32_matmul():
    """Float32 matrix products in IEEE float32 inside the block, whatever the user chose globally
    (``torch.set_float32_matmul_precision('high'/'medium')``, TF32 on NVIDIA GPUs, bf16 on oneDNN CPUs):
    |a|^2 - 2 a.b + |b|^2 cancels, and a TF32 or bf16 product of a.b leaves errors of 1e-3 relative.

    The setting is process-wide: matmuls of other threads that run meanwhile are exact too. Restored on
    exit, also after an exception. A no-op while torch.compile or torch.export traces (the setting in force
    when the compiled program runs applies there).
    """
    if _is_compiling():
        yield
        return
    backends = _fp32_backends()
    if backends:
        saved = [b.fp32_precision for b in backends]
        try:
            for b in backends:
                b.fp32_precision = 'ieee'
            yield
        finally:
            for b, v in zip(backends, saved):
                b.fp32_precision = v
        return
    saved = torch.get_float32_matmul_precision()  # torch < 2.9
    try:
        torch.set_float32_matmul_precision('highest')
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, 'is_compiling', None)  # torch >= 2.3
    return bool(is_compiling and is_compiling()) or torch.jit.is_tracing()


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # Half-precision kernels overflow (|d|^-3) or lose the cancellation in |a|^2 - 2ab + |b|^2.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _autocast_off(t: Tensor):
    """Autocast disabled on ``t``'s device; a no-op where the device has no autocast (meta: shape-only runs)."""
    kind = t.device.type
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else nullcontext()


def _squared_distance(theta: Tensor, phi: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distances (B, N, M) between theta (B, E, N) and phi (B, E, M), and the coincidence mask."""
    tt = theta.pow(2).sum(1)  # (B, N)
    pp = phi.pow(2).sum(1)  # (B, M)
    scale = tt.unsqueeze(2) + pp.unsqueeze(1)
    d2 = scale - 2 * torch.bmm(theta.transpose(1, 2), phi)
    eps = _COINCIDENT_EPS * torch.finfo(d2.dtype).eps
    # Coincident pairs contribute nothing (the paper's safe divide); the tiny floor keeps all-zero
    # embeddings coincident.
    apart = d2 > eps * scale + torch.finfo(d2.dtype).tiny
    # Masked entries get 1 so that neither the value nor its gradient is evaluated at 0.
    return torch.where(apart, d2, torch.ones_like(d2)), apart


def pide_kernel(
        theta: Tensor,
        phi: Tensor,
        *,
        operator: str,
        s: Optional[float] = None,
        n: int = 2,
        lam: float = 1.0,
        kernel: str = 'dot',
        embed_scale: float = 1.0,
) -> Tensor:
    """The dense kernel (B, N, M): lam times the operator's constant times omega(theta_i, phi_j).

    For ``'diffusion'`` omega is the dot product (``kernel='dot'``) or its exponential
    (``'gaussian'``); for the other operators it is |theta_i - phi_j|^-(n+2s), |.|^-(n-2s) or
    -2 log|.| - gamma, and exactly zero where theta_i and phi_j coincide. ``embed_scale`` sigma evaluates
    the kernel at theta / sigma, phi / sigma (see :func:`width_scale`); 1 is the paper's kernel.
    Computed in float32 (float64 if an input is float64) with IEEE float32 matrix products, whatever the
    autocast state and the global matmul precision.
    """
    operator, s = check_kernel_args(operator, s, n, kernel, embed_scale)
    return evaluate_kernel(theta, phi, operator=operator, s=s, n=n, lam=lam, kernel=kernel, embed_scale=embed_scale)


def evaluate_kernel(theta: Tensor, phi: Tensor, *, operator: str, s: Optional[float], n: int, lam: float,
                    kernel: str, embed_scale: float) -> Tensor:
    """:func:`pide_kernel` for callers that validated its arguments (canonical operator, resolved s)."""
    spec = _KernelSpec(operator, s, n, lam, kernel, embed_scale)
    dtype = _compute_dtype(theta, phi)
    with _autocast_off(theta):
        return _full_precision(partial(_dense_kernel, spec), theta.to(dtype), phi.to(dtype))


def _dense_kernel(spec: _KernelSpec, theta: Tensor, phi: Tensor) -> Tensor:
    if not spec.distance:
        dot = torch.bmm(theta.transpose(1, 2), phi)
        return spec.a * dot if spec.kind == 'dot' else torch.exp(spec.lam * dot)
    d2, apart = _squared_distance(theta, phi)
    if spec.kind == 'log':
        values = spec.a * (-torch.log(d2) - spec.shift)  # -2 log|d| = -log |d|^2
    else:
        values = spec.a * _inverse_power(d2, spec.power)
    return torch.where(apart, values, torch.zeros_like(values))


class _NestedGraph(torch.autograd.Function):
    """``fn(*tensors)`` with its forward and backward run under :func:`ieee_fp32_matmul` (autograd would run
    the backward under the user's global precision). Differentiable once."""

    @staticmethod
    def forward(ctx, fn, *tensors):
        with torch.enable_grad(), ieee_fp32_matmul():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
            out = fn(*inputs)
        ctx.graph = (inputs, out)
        return out.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        inputs, out = ctx.graph
        del ctx.graph
        wanted = [t for t in inputs if t.requires_grad]
        with _autocast_off(grad), ieee_fp32_matmul():
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None,) + tuple(next(grads) if t.requires_grad else None for t in inputs)


def _full_precision(fn, *tensors: Tensor) -> Tensor:
    """``fn(*tensors)`` with IEEE float32 products in the forward and the backward pass. Where they are so
    already (the default), or nothing needs a gradient, plain autograd (twice differentiable) runs it."""
    if _matmul_is_ieee() or not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        with ieee_fp32_matmul():
            return fn(*tensors)
    return _NestedGraph.apply(fn, *tensors)


def _matmul_is_ieee() -> bool:
    backends = _fp32_backends()
    if backends and any(b.fp32_precision != 'none' for b in backends):
        return all(b.fp32_precision in ('ieee', 'none') for b in backends) and _global_precision_is_highest()
    return _global_precision_is_highest()


def _global_precision_is_highest() -> bool:
    try:
        return torch.get_float32_matmul_precision() == 'highest'
    except RuntimeError:  # legacy and per-backend settings mixed
        return False


def _guarded_rowsum(rowsum: Tensor) -> Tensor:
    # sum_j w_ij can be zero or negative (dot and log kernels): keep its sign, bound it away from 0.
    sign = torch.where(rowsum < 0, -torch.ones_like(rowsum), torch.ones_like(rowsum))
    return sign * rowsum.abs().clamp_min(_ROWSUM_EPS)


def _normalize(agg: Tensor, rowsum: Tensor, normalizer: Union[str, float], m: int, n_query: int) -> Tensor:
    if normalizer == 'key':
        return agg / m
    if normalizer == 'query':
        return agg / n_query
    if normalizer == 'rowsum':
        return agg / _guarded_rowsum(rowsum).unsqueeze(1)
    return agg / normalizer


def apply_kernel(
        kern: Tensor,
        v_query: Tensor,
        v_key: Tensor,
        *,
        operator: str,
        normalizer: Union[str, float, None] = None,
        rowsum: Optional[Tensor] = None,
) -> Tensor:
    """Aggregate (B, C, N) of values with a dense kernel ``kern`` (B, N, M) from :func:`pide_kernel`.

    ``rowsum`` (B, N), the kernel's row sums, may be passed when the kernel is applied repeatedly;
    it is only computed where the operator or the normalizer needs it.
    """
    return _apply_dense(kern, v_query, v_key, resolve_operator(operator), check_normalizer(normalizer), rowsum)


def _apply_dense(kern: Tensor, v_query: Tensor, v_key: Tensor, operator: str, normalizer: Union[str, float],
                 rowsum: Optional[Tensor] = None) -> Tensor:
    dtype = kern.dtype
    tensors = (kern, v_query.to(dtype), v_key.to(dtype)) + (() if rowsum is None else (rowsum,))
    with _autocast_off(kern):
        return _full_precision(partial(_dense_aggregate, operator, normalizer), *tensors)


def _dense_aggregate(operator: str, normalizer: Union[str, float], kern: Tensor, vq: Tensor, vk: Tensor,
                     rowsum: Optional[Tensor] = None) -> Tensor:
    agg = torch.bmm(vk, kern.transpose(1, 2))  # (B, C, N): sum_j w_ij V_j
    if rowsum is None and (operator in ('diffusion', 'frac_laplacian') or normalizer == 'rowsum'):
        rowsum = kern.sum(2)  # (B, N)
    if operator == 'diffusion':
        agg = agg - vq * rowsum.unsqueeze(1)
    elif operator == 'frac_laplacian':
        agg = vq * rowsum.unsqueeze(1) - agg
    return _normalize(agg, rowsum, normalizer, kern.shape[2], kern.shape[1])


def check_normalizer(normalizer: Union[str, float, None]) -> Union[str, float]:
    """Validate ``normalizer``; None means ``'key'``."""
    if normalizer is None:
        return 'key'
    if isinstance(normalizer, str):
        if normalizer not in NORMALIZERS:
            raise ValueError(f'normalizer must be one of {NORMALIZERS}, a positive number or None, got {normalizer!r}')
        return normalizer
    if isinstance(normalizer, Real) and not isinstance(normalizer, bool) and normalizer > 0:
        return float(normalizer)
    raise ValueError(f'normalizer must be one of {NORMALIZERS}, a positive number or None, got {normalizer!r}')


def check_tile_size(tile_size: Optional[int]) -> Optional[int]:
    """Validate ``tile_size``: a positive int, or None for the automatic size."""
    if tile_size is not None and (not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < 1):
        raise ValueError(f'tile_size must be a positive int or None, got {tile_size!r}')
    return tile_size


def query_tile(batch: int, keys: int, tile_size: Optional[int] = None, device: Union[str, torch.device] = 'cpu') -> int:
    """Query positions per tile of the fused path: ``tile_size``, or as many as keep a tile near
    2^21 elements on CPU and 2^24 on other devices, but at least 64 while a tile stays within 2^25."""
    if check_tile_size(tile_size):
        return tile_size
    budget = _TILE_ELEMENTS.get(torch.device(device).type, _TILE_ELEMENTS_DEFAULT)
    per_query = max(1, batch * keys)
    tile = budget // per_query
    if tile < _TILE_MIN_QUERIES:
        tile = min(_TILE_MIN_QUERIES, max(budget, _TILE_MAX_ELEMENTS) // per_query)
    return max(1, tile)


def resolve_method(method: str, operator: str, kernel: str) -> str:
    """The evaluation path ``method`` stands for: ``'auto'`` is low rank for the dot diffusion kernel,
    else fused; ``'tiled'`` is ``'fused'``."""
    method = METHOD_ALIASES.get(method, method) if isinstance(method, str) else method
    if method not in METHODS:
        raise ValueError(f'method must be one of {METHODS} (or the alias {sorted(METHOD_ALIASES)}), got {method!r}')
    low_rank_ok = resolve_operator(operator) == 'diffusion' and kernel == 'dot'
    if method == 'auto':
        return 'lowrank' if low_rank_ok else 'fused'
    if method == 'lowrank' and not low_rank_ok:
        raise ValueError(
            f"method='lowrank' needs operator='diffusion' with kernel='dot'; got {operator!r}, {kernel!r}")
    return method


def _check_shapes(theta: Tensor, phi: Tensor, v_query: Tensor, v_key: Tensor) -> None:
    for name, t in (('theta', theta), ('phi', phi), ('v_query', v_query), ('v_key', v_key)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f'{name} must be a 3-D tensor (batch, channels, positions), got {got}')
    b, e, n = theta.shape
    if phi.shape[:2] != (b, e):
        raise ValueError(f'phi must have batch and embedding sizes {(b, e)} like theta, got {tuple(phi.shape)}')
    if v_query.shape[0] != b or v_query.shape[2] != n:
        raise ValueError(f'v_query must be (B={b}, C, N={n}) to match theta, got {tuple(v_query.shape)}')
    if v_key.shape != (b, v_query.shape[1], phi.shape[2]):
        raise ValueError(
            f'v_key must be (B={b}, C={v_query.shape[1]}, M={phi.shape[2]}) to match v_query and phi, '
            f'got {tuple(v_key.shape)}')


def _lowrank_parts(theta: Tensor, phi: Tensor, v_key: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """Phi V^T (B, E, C), sum_j phi_j (B, E) and the row sums r_i = lam theta_i . sum_j phi_j (B, N)."""
    pv = torch.bmm(phi, v_key.transpose(1, 2))
    phi_sum = phi.sum(2)
    rowsum = lam * torch.bmm(phi_sum.unsqueeze(1), theta).squeeze(1)
    return pv, phi_sum, rowsum


def _lowrank_combine(theta: Tensor, v_query: Tensor, pv: Tensor, rowsum: Tensor, lam: float, scale: float) -> Tensor:
    """scale (lam theta_i^T (Phi V^T) - V_i r_i), in place on one (B, C, N) buffer; not for autograd.
    The constants go on the small factors, so the full-size buffer is written twice only."""
    out = torch.bmm(pv.transpose(1, 2).mul(lam * scale), theta)
    return out.addcmul_(v_query, rowsum.mul(-scale).unsqueeze(1))


class _LowRankDiffusion(torch.autograd.Function):
    """The low-rank diffusion aggregate with a fixed normalisation ``scale`` and a hand-written backward.

    Autograd through the plain ops would keep or create several (B, C, N) temporaries; this keeps only
    the inputs and the small products, and its backward needs one (B, C, N) buffer besides its outputs.
    """

    @staticmethod
    def forward(ctx, theta, phi, v_query, v_key, lam, scale):
        pv, phi_sum, rowsum = _lowrank_parts(theta, phi, v_key, lam)
        ctx.save_for_backward(theta, phi, v_query, v_key, pv, phi_sum, rowsum)
        ctx.lam, ctx.scale = lam, scale
        return _lowrank_combine(theta, v_query, pv, rowsum, lam, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        with _autocast_off(grad):  # backward() may be called inside an autocast region
            return _lowrank_backward(ctx, grad)


def _lowrank_backward(ctx, grad) -> tuple:
    theta, phi, v_query, v_key, pv, phi_sum, rowsum = ctx.saved_tensors
    a = ctx.lam * ctx.scale
    need_theta, need_phi, need_vq, need_vk = ctx.needs_input_grad[:4]
    g_theta = g_phi = g_vq = g_vk = None
    buf = None
    if need_theta or need_phi or need_vk:
        g_pv = torch.bmm(theta, grad.transpose(1, 2)).mul_(a)  # (B, E, C)
    if need_theta or need_phi:
        buf = grad * v_query
        q = buf.sum(1)  # sum_c V_ci g_ci, (B, N)
        if need_theta:  # a (Phi V^T g - sum_j phi_j q^T)
            g_theta = torch.bmm(pv.mul(a), grad).addcmul_(phi_sum.mul(-a).unsqueeze(2), q.unsqueeze(1))
        if need_phi:
            g_sum = torch.bmm(theta, q.unsqueeze(2)).mul_(-a)  # (B, E, 1)
            g_phi = torch.bmm(g_pv, v_key).add_(g_sum)
    if need_vq:
        g_vq = torch.mul(grad, rowsum.mul(-ctx.scale).unsqueeze(1), out=buf)
    if need_vk:
        g_vk = torch.bmm(g_pv.transpose(1, 2), phi)
    return g_theta, g_phi, g_vq, g_vk, None, None


def _lowrank_diffusion(theta: Tensor, phi: Tensor, v_query: Tensor, v_key: Tensor, lam: float,
                       normalizer: Union[str, float]) -> Tensor:
    """sum_j lam (theta_i . phi_j)(V_j - V_i) as lam theta_i^T (Phi V^T) - V_i lam theta_i^T sum_j phi_j."""
    dtype = _compute_dtype(theta, phi, v_query, v_key)
    with _autocast_off(theta):
        theta, phi, vq, vk = (t.to(dtype) for t in (theta, phi, v_query, v_key))
        m, n_query = phi.shape[2], theta.shape[2]
        if normalizer == 'rowsum':  # the normalisation depends on theta: plain autograd
            pv, _, rowsum = _lowrank_parts(theta, phi, vk, lam)
            agg = lam * torch.bmm(pv.transpose(1, 2), theta) - vq * rowsum.unsqueeze(1)
            return _normalize(agg, rowsum, normalizer, m, n_query)
        scale = 1.0 / (m if normalizer == 'key' else n_query if normalizer == 'query' else normalizer)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (theta, phi, vq, vk)):
            return _LowRankDiffusion.apply(theta, phi, vq, vk, lam, scale)
        pv, _, rowsum = _lowrank_parts(theta, phi, vk, lam)
        return _lowrank_combine(theta, vq, pv, rowsum, lam, scale)


# --------------------------------------------------------------------------------------------------
# Fused tiled evaluation of kernels that are not low rank.
#
# w_ij = a * W(x_ij), with x_ij = |theta_i - phi_j|^2 (distance kernels) or theta_i . phi_j (diffusion
# kernels); a folds lam and the operator's constant so that a tile holds the bare W. The aggregate is
#   out_i = sigma (s1 sum_j w_ij V_j + s2 V_i r_i) / D_i,   r_i = sum_j w_ij,
# with (s1, s2) = (1, -1) diffusion, (-1, 1) fractional Laplacian, (1, 0) inverse fractional and log;
# D_i = 1 and sigma = 1/normalizer, or D_i the guarded row sum with sigma = 1.

class _KernelSpec:
    """How one operator's tile is formed and differentiated: W(x) and dW/dx = b * Wd(x).

    ``embed_scale`` sigma (the kernel of theta / sigma, phi / sigma) is folded into the constants, so the tiles
    keep the unscaled x: a gains sigma^power for the power kernels, the log kernel's gamma loses log sigma^2,
    and lam / sigma^2 multiplies the dot products.
    """

    def __init__(self, operator: str, s: Optional[float], n: int, lam: float, kernel: str,
                 embed_scale: float = 1.0):
        self.distance = operator != 'diffusion'
        self.shift = EULER_GAMMA - 2 * math.log(embed_scale)  # exact for embed_scale 1, as every fold here
        if operator == 'diffusion':
            lam = lam / embed_scale ** 2
            self.kind = 'exp' if kernel == 'gaussian' else 'dot'
            self.a, self.b = (1.0, lam) if kernel == 'gaussian' else (lam, 1.0)
            self.lam = lam
        elif operator == 'log':
            self.kind, self.a, self.b = 'log', lam * pide_constant(operator, s, n), -1.0
        else:
            self.kind = 'power'
            self.power = (n + 2 * s) if operator == 'frac_laplacian' else (n - 2 * s)
            self.a, self.b = lam * pide_constant(operator, s, n) * embed_scale ** self.power, -self.power / 2
        self.s1, self.s2 = {'diffusion': (1.0, -1.0), 'frac_laplacian': (-1.0, 1.0)}.get(operator, (1.0, 0.0))

    def tile(self, theta_t: Tensor, phi: Tensor, stats: tuple[Tensor, Tensor, Tensor], rows: slice,
             derivative: bool) -> tuple[Tensor, Optional[Tensor]]:
        """W (B, T, M) for the queries ``rows`` and, if ``derivative``, Wd (None where it is 1)."""
        if not self.distance:
            x = torch.bmm(theta_t.transpose(1, 2), phi)
            if self.kind == 'dot':
                return x, None
            w = x.mul_(self.lam).exp_()
            return w, (w if derivative else None)
        tt, pp, floor = stats
        # |theta_i|^2 + |phi_j|^2 - 2 theta_i . phi_j, and coincident pairs as in _squared_distance.
        d2 = torch.baddbmm(pp.unsqueeze(1), theta_t.transpose(1, 2), phi, alpha=-2).add_(tt[:, rows].unsqueeze(2))
        coincident = d2 <= torch.add(floor[:, rows].unsqueeze(2), pp.unsqueeze(1), alpha=_eps(d2.dtype))
        d2.masked_fill_(coincident, 1.0)
        inv = d2.reciprocal() if derivative else None  # 1/d2, before d2 is overwritten below
        if self.kind == 'log':
            w = d2.log_().neg_().sub_(self.shift)
        else:
            w = _inverse_power(d2, self.power, inplace=True)
        w.masked_fill_(coincident, 0.0)
        if not derivative:
            return w, None
        if self.kind == 'power':
            inv.mul_(w)  # d/dx x^(-p/2) = -(p/2) x^(-p/2) / x
        return w, inv.masked_fill_(coincident, 0.0)


def _eps(dtype: torch.dtype) -> float:
    return _COINCIDENT_EPS * torch.finfo(dtype).eps


def _inverse_power(d2: Tensor, power: float, inplace: bool = False) -> Tensor:
    """d2^(-power/2) = |d|^-power, with rsqrt and integer powers where the exponent allows."""
    if float(power).is_integer():
        p = int(power)
        base = (d2.rsqrt_() if inplace else d2.rsqrt()) if p % 2 else (d2.reciprocal_() if inplace else d2.reciprocal())
        e = p if p % 2 else p // 2
        return base if e == 1 else (base.pow_(e) if inplace else base.pow(e))
    return d2.pow_(-power / 2) if inplace else d2.pow(-power / 2)


def _distance_stats(theta: Tensor, phi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """|theta_i|^2 (B, N), |phi_j|^2 (B, M) and the coincidence floor eps |theta_i|^2 + tiny (B, N)."""
    tt, pp = theta.pow(2).sum(1), phi.pow(2).sum(1)
    return tt, pp, tt * _eps(tt.dtype) + torch.finfo(tt.dtype).tiny


def _fused_forward(spec: _KernelSpec, theta: Tensor, phi: Tensor, v_query: Tensor, v_key: Tensor,
                   normalizer: Union[str, float], tile: int) -> tuple[Tensor, Optional[Tensor]]:
    """The aggregate (B, C, N) and the row sums r (B, N) where the operator or normalizer uses them."""
    b, _, n_query = theta.shape
    stats = _distance_stats(theta, phi) if spec.distance else None
    need_r = spec.s2 != 0 or normalizer == 'rowsum'
    out = v_query.new_empty(v_query.shape)
    rowsum = theta.new_empty(b, n_query) if need_r else None
    for start in range(0, n_query, tile):
        rows = slice(start, start + tile)
        w, _ = spec.tile(theta[:, :, rows], phi, stats, rows, derivative=False)
        out[:, :, rows] = torch.bmm(v_key, w.transpose(1, 2))
        if need_r:
            torch.sum(w, 2, out=rowsum[:, rows])
    a = spec.a
    out.mul_(a * spec.s1)
    if need_r:
        rowsum.mul_(a)
        if spec.s2:
            out.addcmul_(v_query, rowsum.unsqueeze(1), value=spec.s2)
    return _normalize(out, rowsum, normalizer, phi.shape[2], n_query), rowsum


class _FusedAggregate(torch.autograd.Function):
    """Tiled kernel aggregate with a hand-written backward.

    Saves only the inputs and O(B N) row statistics (plus the output for the row-sum normalizer) and
    evaluates each kernel tile once more in the backward pass, where all gradients follow from it:
    with g_hat_i = sigma g_i / D_i and q_i = dL/dr_i, the kernel gradient is
    G_ij = s1 g_hat_i . V_j + q_i, then dL/dx_ij = G_ij dW/dx_ij, and
    x = |theta_i - phi_j|^2 gives dtheta_i = 2 (theta_i sum_j S_ij - sum_j S_ij phi_j) (phi likewise).
    """

    @staticmethod
    def forward(ctx, theta, phi, v_query, v_key, spec, normalizer, tile):
        out, rowsum = _fused_forward(spec, theta, phi, v_query, v_key, normalizer, tile)
        ctx.spec, ctx.normalizer, ctx.tile = spec, normalizer, tile
        ctx.save_for_backward(theta, phi, v_query, v_key, rowsum, out if normalizer == 'rowsum' else None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        with _autocast_off(grad), ieee_fp32_matmul():  # backward() may be called inside an autocast region
            return _fused_backward(ctx, grad)


def _fused_backward(ctx, grad) -> tuple:
    theta, phi, v_query, v_key, rowsum, out = ctx.saved_tensors
    spec, normalizer, tile = ctx.spec, ctx.normalizer, ctx.tile
    need_theta, need_phi, need_vq, need_vk = ctx.needs_input_grad[:4]
    m, n_query = phi.shape[2], theta.shape[2]
    q = None  # dL/dr_i
    if normalizer == 'rowsum':
        denom = _guarded_rowsum(rowsum)
        g_hat = grad / denom.unsqueeze(1)
        q = (grad * out).sum(1).div_(denom).mul_(rowsum.abs() >= _ROWSUM_EPS).neg_()
    else:
        g_hat = grad * (1.0 / (m if normalizer == 'key' else n_query if normalizer == 'query' else normalizer))
    if spec.s2:
        qv = (g_hat * v_query).sum(1).mul_(spec.s2)
        q = qv if q is None else q.add_(qv)
    g_vq = g_hat * rowsum.mul(spec.s2).unsqueeze(1) if need_vq and spec.s2 else None
    need_kernel_grad = need_theta or need_phi
    g_theta = g_phi = g_vk = None
    if not (need_kernel_grad or need_vk):
        return g_theta, g_phi, g_vq, g_vk, None, None, None
    stats = _distance_stats(theta, phi) if spec.distance else None
    if need_vk:
        g_vk = torch.zeros_like(v_key)
    if need_theta:
        g_theta = torch.empty_like(theta)
    if need_phi:
        g_phi = torch.zeros_like(phi)
        col = phi.new_zeros(phi.shape[0], 1, m)  # sum_i S_ij
    # dL/dx_ij = scale * S_ij with S = (s1 g_hat_i . V_j + q_i) Wd_ij (s1 folded into scale when q = 0).
    scale = spec.a * spec.b * (1.0 if q is not None else spec.s1) * (2.0 if spec.distance else 1.0)
    for start in range(0, n_query, tile):
        rows = slice(start, start + tile)
        theta_t, g_t = theta[:, :, rows], g_hat[:, :, rows]
        w, wd = spec.tile(theta_t, phi, stats, rows, derivative=need_kernel_grad)
        if need_vk:
            g_vk.baddbmm_(g_t, w, alpha=spec.a * spec.s1)
        if not need_kernel_grad:
            continue
        sg = torch.bmm(g_t.transpose(1, 2), v_key)
        if q is not None:
            sg.mul_(spec.s1).add_(q[:, rows].unsqueeze(2))
        if wd is not None:
            sg.mul_(wd)
        if need_theta:
            if spec.distance:  # theta_i sum_j S_ij - sum_j S_ij phi_j
                g = torch.baddbmm(theta_t * sg.sum(2).unsqueeze(1), phi, sg.transpose(1, 2), alpha=-1)
            else:
                g = torch.bmm(phi, sg.transpose(1, 2))
            g_theta[:, :, rows] = g.mul_(scale)
        if need_phi:
            if spec.distance:  # phi_j sum_i S_ij - sum_i S_ij theta_i
                col.add_(sg.sum(1, keepdim=True))
                g_phi.baddbmm_(theta_t, sg, alpha=-1)
            else:
                g_phi.baddbmm_(theta_t, sg)
    if need_phi:
        if spec.distance:
            g_phi.addcmul_(phi, col)
        g_phi.mul_(scale)
    return g_theta, g_phi, g_vq, g_vk, None, None, None


def _fused_aggregate(theta: Tensor, phi: Tensor, v_query: Tensor, v_key: Tensor, spec: _KernelSpec,
                     normalizer: Union[str, float], tile: int) -> Tensor:
    dtype = _compute_dtype(theta, phi, v_query, v_key)
    with _autocast_off(theta), ieee_fp32_matmul():
        theta, phi, vq, vk = (t.to(dtype) for t in (theta, phi, v_query, v_key))
        if torch.is_grad_enabled() and any(t.requires_grad for t in (theta, phi, vq, vk)):
            return _FusedAggregate.apply(theta, phi, vq, vk, spec, normalizer, tile)
        return _fused_forward(spec, theta, phi, vq, vk, normalizer, tile)[0]


def nonlocal_aggregate(
        theta: Tensor,
        phi: Tensor,
        v_query: Tensor,
        v_key: Tensor,
        *,
        operator: str,
        s: Optional[float] = None,
        n: int = 2,
        lam: float = 1.0,
        kernel: str = 'dot',
        embed_scale: float = 1.0,
        normalizer: Union[str, float, None] = None,
        method: str = 'auto',
        tile_size: Optional[int] = None,
) -> Tensor:
    """The bracket of one nonlocal stage, before the 1x1 conv K_k (eqs. 4.1, 4.4-4.6).

    Args:
        theta: query embeddings theta(X), (B, E, N).
        phi: key embeddings phi(X) at the (pooled) key positions, (B, E, M).
        v_query: values at the query positions, (B, C, N).
        v_key: values at the key positions, (B, C, M).
        operator: ``'diffusion'``, ``'frac_laplacian'``, ``'inv_frac_laplacian'``, ``'log'``
            or an alias from ``OPERATOR_ALIASES``.
        s: order of the fractional operators (defaults 1/2, 1/2, n/2).
        n: dimension of the domain in the constants c_{n,s} (2 for images).
        lam: kernel scaling lambda.
        kernel: ``'dot'`` (lam theta.phi) or ``'gaussian'`` (exp(lam theta.phi)), diffusion only.
        embed_scale: sigma > 0: the kernel is evaluated at theta / sigma and phi / sigma, folded into its
            constants at no cost (1: the paper's kernel; :func:`width_scale` gives the width-aware one).
        normalizer: the paper's N: ``'key'`` (M, default, as the authors' code), ``'query'`` (N),
            ``'rowsum'`` (sum_j w_ij, the un-simplified form) or a positive number.
        method: ``'auto'``, ``'lowrank'``, ``'fused'`` (alias ``'tiled'``) or ``'dense'`` (see the module
            docstring).
        tile_size: query positions per tile for ``'fused'``; default keeps a tile near 2^21 elements on CPU
            and 2^24 on GPUs.

    Returns:
        (B, C, N) aggregate, in the dtype of ``v_query`` (computed in float32 or float64, with IEEE float32
        matrix products whatever the global matmul precision).
    """
    _check_shapes(theta, phi, v_query, v_key)
    operator, s = check_kernel_args(operator, s, n, kernel, embed_scale)
    return evaluate_aggregate(theta, phi, v_query, v_key, operator=operator, s=s, n=n, lam=lam, kernel=kernel,
                              embed_scale=embed_scale, normalizer=check_normalizer(normalizer),
                              method=resolve_method(method, operator, kernel), tile_size=check_tile_size(tile_size))


def evaluate_aggregate(theta: Tensor, phi: Tensor, v_query: Tensor, v_key: Tensor, kern: Optional[Tensor] = None,
                       rowsum: Optional[Tensor] = None, *, operator: str, s: Optional[float], n: int, lam: float,
                       kernel: str, embed_scale: float, normalizer: Union[str, float], method: str,
                       tile_size: Optional[int]) -> Tensor:
    """:func:`nonlocal_aggregate` for callers that validated its arguments (canonical operator, resolved s,
    normalizer and method). ``kern``, a dense kernel from :func:`evaluate_kernel`, is applied as it is, with its
    row sums ``rowsum`` where given."""
    if kern is not None:
        out = _apply_dense(kern, v_query, v_key, operator, normalizer, rowsum)
    elif method == 'lowrank':
        out = _lowrank_diffusion(theta, phi, v_query, v_key, lam / embed_scale ** 2, normalizer)
    elif method == 'dense':
        kern = evaluate_kernel(theta, phi, operator=operator, s=s, n=n, lam=lam, kernel=kernel,
                               embed_scale=embed_scale)
        out = _apply_dense(kern, v_query, v_key, operator, normalizer)
    else:
        spec = _KernelSpec(operator, s, n, lam, kernel, embed_scale)
        tile = query_tile(theta.shape[0], phi.shape[2], tile_size, theta.device)
        out = _fused_aggregate(theta, phi, v_query, v_key, spec, normalizer, tile)
    return out.to(v_query.dtype)
