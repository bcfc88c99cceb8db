"""The functional core's public entry points: each argument checked once here, then the dispatch to the
low-rank, fused or dense path."""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Mapping, Optional, Tuple, Union

from torch import Tensor

from .dense import dense_aggregate, dense_kernel
from .fused import fused_aggregate
from .lowrank import lowrank_diffusion
from .table import BoundKernel, get_operator, resolve_kernel
from .tiles import check_tile_size, query_tile

__all__ = ['NORMALIZERS', 'METHODS', 'METHOD_ALIASES', 'KERNEL_SCALES', 'bind_kernel', 'check_compile_tiles',
           'check_kernel_args',
           'check_normalizer', 'resolve_method', 'default_s', 'check_s', 'pide_constant', 'width_scale',
           'embed_scale_for', 'pide_kernel', 'nonlocal_aggregate']

NORMALIZERS = ('key', 'query', 'rowsum')
METHODS = ('auto', 'lowrank', 'fused', 'dense')
METHOD_ALIASES = {'tiled': 'fused'}  # earlier name of the fused tiled path, still accepted
KERNEL_SCALES = ('paper', 'width')

Params = Optional[Mapping[str, Any]]


def default_s(operator: str, n: int = 2) -> Optional[float]:
    """The paper's order ``s`` for ``operator``: 1/2, 1/2 and n/2 (log kernel); None without an order."""
    return get_operator(operator).default_s(n)


def check_s(operator: str, s: Optional[float], n: int = 2) -> Optional[float]:
    """Validate the order ``s`` of ``operator`` in dimension ``n``; returns the default when None."""
    return get_operator(operator).check_s(s, n)


def pide_constant(operator: str, s: Optional[float] = None, n: int = 2, kernel_params: Params = None) -> float:
    """The operator's constant: c_{n,s}, c_{n,-s} or c_n (1 for diffusion), from the operator table.

    c_{n,s} = 4^s Gamma(n/2 + s) / (pi^(n/2) |Gamma(-s)|),
    c_{n,-s} = Gamma(n/2 - s) / (4^s pi^(n/2) Gamma(s)),
    c_n = 1 / ((4 pi)^(n/2) Gamma(n/2)).
    """
    op = get_operator(operator)
    return op.pide_constant(op.check_s(s, n), n, op.check_params(kernel_params))


def _check_embed_scale(embed_scale: float) -> float:
    if not isinstance(embed_scale, Real) or isinstance(embed_scale, bool) or not 0 < embed_scale < math.inf:
        raise ValueError(f'embed_scale must be a positive finite number, got {embed_scale!r}')
    return embed_scale


def check_kernel_args(operator: str, s: Optional[float] = None, n: int = 2, kernel: Optional[str] = 'dot',
                      embed_scale: float = 1.0) -> Tuple[str, Optional[float]]:
    """Validate a kernel's arguments; returns the canonical operator name and the order s."""
    op = get_operator(operator)
    s = op.check_s(s, n)
    resolve_kernel(kernel, op)
    _check_embed_scale(embed_scale)
    return op.name, s


def bind_kernel(operator: str, s: Optional[float] = None, n: int = 2, lam: float = 1.0,
                kernel: Optional[str] = 'dot', embed_scale: float = 1.0, kernel_params: Params = None) -> BoundKernel:
    """The operator table's row for ``operator`` with its arguments checked and bound, as the paths use it."""
    try:  # a block calls this every stage with the arguments it checked at construction: look them up first
        raw = (operator, s, n, lam, kernel, embed_scale, tuple(sorted(kernel_params.items())) if kernel_params else ())
        bound = _BOUND.get(raw)
    except TypeError:  # unhashable arguments: the checks below say what is wrong
        raw = bound = None
    if bound is not None:
        return bound
    op = get_operator(operator)
    s = op.check_s(s, n)
    kernel = resolve_kernel(kernel, op)
    key = (op.name, s, n, float(lam), kernel, float(_check_embed_scale(embed_scale)),
           tuple(sorted(op.check_params(kernel_params).items())))
    bound = _BOUND.get(key)
    if bound is None:  # bound once per distinct argument set: a block's every forward reuses it
        bound = _BOUND[key] = BoundKernel(op, *key[1:6], dict(key[6]))
    if raw is not None:
        _BOUND[raw] = bound
    return bound


_BOUND: dict = {}


def width_scale(operator: str, kernel: Optional[str], embed_channels: int) -> float:
    """The ``embed_scale`` of ``kernel_scale='width'`` for embeddings of width E = ``embed_channels``.

    |theta_i - phi_j| grows like sqrt(E), so the paper's power kernels shrink like E^-(n+-2s)/2: from 16
    channels on, the fractional Laplacian's signal falls below batch norm's eps and the block learns nothing.
    Distances measured in units of tau sqrt(E) (the table's ``tau``) keep every distance kernel's signal at
    one level from 16 to 2048 channels: the power kernels are the paper's with lambda (tau sqrt(E))^(n+-2s),
    the log kernel's gamma is shifted by -log(tau^2 E). The embedded Gaussian diffusion kernel, which sharpens
    as E grows, gets exp(lam theta.phi / sqrt(E)) (E^(1/4) on each side) as scaled dot-product attention; the
    dot diffusion kernel is linear in lambda, which batch norm absorbs, and stays the paper's (1).

    Why this form: a fixed factor adds no state, costs nothing (it is folded into the constants), traces and
    exports as the paper's kernel and equals it with a closed-form lambda. The row-sum normalizer also
    cancels lambda but changes the operator, and with the dot kernel its near-zero row sums blow the
    embeddings' gradients up; a data-dependent RMS distance would need a running buffer for evaluation and
    new state in checkpoints (docs: operators, "The width-aware kernel scale").
    """
    op = get_operator(operator)
    return op.width_scale(resolve_kernel(kernel, op), embed_channels)


def embed_scale_for(kernel_scale: Union[str, float], operator: str, kernel: Optional[str],
                    embed_channels: int) -> float:
    """``embed_scale`` for a block's ``kernel_scale``: ``'paper'`` 1, ``'width'`` :func:`width_scale`, a number
    itself."""
    if kernel_scale == 'paper':
        return 1.0
    if kernel_scale == 'width':
        return width_scale(operator, kernel, embed_channels)
    if isinstance(kernel_scale, Real) and not isinstance(kernel_scale, bool) and 0 < kernel_scale < math.inf:
        return float(kernel_scale)
    raise ValueError(f'kernel_scale must be one of {KERNEL_SCALES} or a positive number, got {kernel_scale!r}')


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


def resolve_method(method: str, operator: str, kernel: Optional[str]) -> str:
    """The evaluation path ``method`` stands for: ``'auto'`` is low rank for the dot diffusion kernel,
    else fused; ``'tiled'`` is ``'fused'``."""
    method = METHOD_ALIASES.get(method, method) if isinstance(method, str) else method
    if method not in METHODS:
        raise ValueError(f'method must be one of {METHODS} (or the alias {sorted(METHOD_ALIASES)}), got {method!r}')
    low_rank_ok = get_operator(operator).lowrank and kernel in ('dot', None)
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


def pide_kernel(theta: Tensor, phi: Tensor, *, operator: str, s: Optional[float] = None, n: int = 2,
                lam: float = 1.0, kernel: Optional[str] = 'dot', embed_scale: float = 1.0,
                kernel_params: Params = None) -> Tensor:
    """The dense kernel (B, N, M): lam times the operator's constant times omega(theta_i, phi_j).

    For ``'diffusion'`` omega is the dot product (``kernel='dot'``) or its exponential
    (``'embedded_gaussian'``); for the other operators it is |theta_i - phi_j|^-(n+2s), |.|^-(n-2s) or
    -2 log|.| - gamma, and exactly zero where theta_i and phi_j coincide; a registered operator's W of the
    squared distance. ``embed_scale`` sigma evaluates the kernel at theta / sigma, phi / sigma (see
    :func:`width_scale`); 1 is the paper's kernel. Computed in float32 (float64 if an input is float64) with
    IEEE float32 matrix products, whatever the autocast state and the global matmul precision.
    """
    return dense_kernel(bind_kernel(operator, s, n, lam, kernel, embed_scale, kernel_params), theta, phi)


def check_compile_tiles(compile_tiles: bool, method: str, distance: bool, dense_given: bool = False) -> bool:
    """``compile_tiles`` is a bool, and True only where it applies: the fused path of a distance kernel."""
    if not isinstance(compile_tiles, bool):
        raise ValueError(f'compile_tiles must be True or False, got {compile_tiles!r}')
    if compile_tiles and (method != 'fused' or not distance or dense_given):
        got = f'method={method!r}' + (' with a kernel_matrix' if dense_given else '') + (
            '' if distance else ' and a dot-product kernel')
        raise ValueError("compile_tiles=True applies to the fused path of a distance kernel (method='fused' or "
                         f"'auto' for frac_laplacian, inv_frac_laplacian, log, ...), got {got}")
    return compile_tiles


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
        kernel: Optional[str] = 'dot',
        embed_scale: float = 1.0,
        kernel_params: Params = None,
        normalizer: Union[str, float, None] = None,
        method: str = 'auto',
        tile_size: Optional[int] = None,
        kernel_matrix: Optional[Tensor] = None,
        rowsum: Optional[Tensor] = None,
        compile_tiles: bool = False,
) -> Tensor:
    """The bracket of one nonlocal stage, before the 1x1 conv K_k (eqs. 4.1, 4.4-4.6).

    Args:
        theta: query embeddings theta(X), (B, E, N).
        phi: key embeddings phi(X) at the (pooled) key positions, (B, E, M).
        v_query: values at the query positions, (B, C, N).
        v_key: values at the key positions, (B, C, M).
        operator: a name of the operator table (``'diffusion'``, ``'frac_laplacian'``, ``'inv_frac_laplacian'``,
            ``'log'``, a registered one) or an alias from ``OPERATOR_ALIASES``.
        s: order of the fractional operators (defaults 1/2, 1/2, n/2).
        n: dimension of the domain in the constants c_{n,s} (2 for images).
        lam: kernel scaling lambda.
        kernel: ``'dot'`` (lam theta.phi) or ``'embedded_gaussian'`` (exp(lam theta.phi)), diffusion only.
        embed_scale: sigma > 0: the kernel is evaluated at theta / sigma and phi / sigma, folded into its
            constants at no cost (1: the paper's kernel; :func:`width_scale` gives the width-aware one).
        kernel_params: a registered operator's own parameters (see :func:`register_operator`).
        normalizer: the paper's N: ``'key'`` (M, default, as the authors' code), ``'query'`` (N),
            ``'rowsum'`` (sum_j w_ij, the un-simplified form) or a positive number.
        method: ``'auto'`` (low rank for the dot diffusion kernel, else fused), ``'lowrank'``, ``'fused'``
            (alias ``'tiled'``) or ``'dense'`` (the N x M kernel at once, as the paper).
        tile_size: query positions per tile for ``'fused'``; default keeps a tile near 2^21 elements on CPU
            and 2^24 on GPUs.
        kernel_matrix: a dense kernel from :func:`pide_kernel` to apply as it is (several stages share one),
            with its row sums ``rowsum`` (B, N) where given.
        compile_tiles: the fused path's tiles of a distance kernel with their elementwise work (mask, kernel,
            derivative) under ``torch.compile`` (opt-in; seconds of compilation per kernel and tile shape, once per
            process; no effect inside a program that is being compiled or exported as a whole).

    Returns:
        (B, C, N) aggregate, in the dtype of ``v_query`` (computed in float32 or float64, with IEEE float32
        matrix products whatever the global matmul precision).
    """
    _check_shapes(theta, phi, v_query, v_key)
    k = bind_kernel(operator, s, n, lam, kernel, embed_scale, kernel_params)
    normalizer = check_normalizer(normalizer)
    method = resolve_method(method, k.operator, k.kernel)
    tile_size = check_tile_size(tile_size)
    compile_tiles = check_compile_tiles(compile_tiles, method, k.distance, kernel_matrix is not None)
    if kernel_matrix is not None or method == 'dense':
        kern = dense_kernel(k, theta, phi) if kernel_matrix is None else kernel_matrix
        out = dense_aggregate(k, kern, v_query, v_key, normalizer, rowsum if kernel_matrix is not None else None)
    elif method == 'lowrank':
        out = lowrank_diffusion(theta, phi, v_query, v_key, k.lam / k.embed_scale ** 2, normalizer)
    else:
        tile = query_tile(theta.shape[0], phi.shape[2], tile_size, theta.device)
        out = fused_aggregate(theta, phi, v_query, v_key, k, normalizer, tile, compile_tiles)
    return out.to(v_query.dtype)

