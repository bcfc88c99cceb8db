"""The fused path: any kernel over tiles of query positions, by an autograd function with a hand-written
backward that saves only the inputs and O(B N) row sums and evaluates each tile once more to form every
gradient, so memory stays O(tile M) beyond the inputs.

w_ij = a W(x_ij), with x_ij = |theta_i - phi_j|^2 (distance kernels) or theta_i . phi_j (diffusion
kernels); a folds lam and the operator's constant so that a tile holds the bare W. The aggregate is
  out_i = sigma (s1 sum_j w_ij V_j + s2 V_i r_i) / D_i,   r_i = sum_j w_ij,
with (s1, s2) the operator's form; D_i = 1 and sigma = 1/normalizer, or D_i the guarded row sum with sigma = 1.
The automatic tile size is measured in benchmarks/bench_nonlocal.py (docs: benchmarks).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dense import COINCIDENT_EPS, ROWSUM_EPS, guarded_rowsum, normalize
from .precision import autocast_off, compute_dtype, ieee_fp32_matmul, is_compiling
from .table import BoundKernel

__all__ = ['fused_aggregate', 'query_tile', 'check_tile_size']

# Elements of one kernel tile (B * tile * M) when tile_size is not given: about 2^21 on CPU, where the caches
# and the allocator reuse a tile, 2^24 on GPUs; with many keys at least 64 queries while a tile stays within
# 2^25, since every tile streams all keys once (measured: docs/benchmarks.md, "The fused path's tile size").
_TILE_ELEMENTS = {'cpu': 1 << 21}
_TILE_ELEMENTS_DEFAULT = 1 << 24
_TILE_MIN_QUERIES = 64
_TILE_MAX_ELEMENTS = 1 << 25


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


def _tile(k: BoundKernel, theta_t: Tensor, phi: Tensor, stats: Optional[tuple[Tensor, Tensor, Tensor]], rows: slice,
          derivative: bool) -> tuple[Tensor, Optional[Tensor]]:
    """W (B, T, M) for the queries ``rows`` and, if ``derivative``, Wd (None where it is 1)."""
    if not derivative and is_compiling():
        return _tile_out_of_place(k, theta_t, phi, stats, rows), None
    if not k.distance:
        return k.pair(torch.bmm(theta_t.transpose(1, 2), phi), derivative)
    tt, pp, floor = stats
    # |theta_i|^2 + |phi_j|^2 - 2 theta_i . phi_j
    d2 = torch.baddbmm(pp.unsqueeze(1), theta_t.transpose(1, 2), phi, alpha=-2).add_(tt[:, rows].unsqueeze(2))
    if not k.singular:
        return k.pair(d2.clamp_min_(0.0), derivative)
    # Coincident pairs as in the dense path: they contribute nothing, and W is not evaluated at 0.
    coincident = d2 <= torch.add(floor[:, rows].unsqueeze(2), pp.unsqueeze(1), alpha=_eps(d2.dtype))
    w, wd = k.pair(d2.masked_fill_(coincident, 1.0), derivative)
    w.masked_fill_(coincident, 0.0)
    return w, (wd.masked_fill_(coincident, 0.0) if wd is not None else None)


def _tile_out_of_place(k: BoundKernel, theta_t: Tensor, phi: Tensor, stats: Optional[tuple[Tensor, Tensor, Tensor]],
                       rows: slice) -> Tensor:
    """W as :func:`_tile` forms it, without in-place operations: torch.export records the forward pass, and an
    exported program may run under autograd, which in-place updates of saved tensors would break."""
    if not k.distance:
        return k.value(torch.bmm(theta_t.transpose(1, 2), phi))
    tt, pp, floor = stats
    d2 = torch.baddbmm(pp.unsqueeze(1), theta_t.transpose(1, 2), phi, alpha=-2) + tt[:, rows].unsqueeze(2)
    if not k.singular:
        return k.value(d2.clamp_min(0.0))
    coincident = d2 <= torch.add(floor[:, rows].unsqueeze(2), pp.unsqueeze(1), alpha=_eps(d2.dtype))
    return k.value(d2.masked_fill(coincident, 1.0)).masked_fill(coincident, 0.0)


def _eps(dtype: torch.dtype) -> float:
    return COINCIDENT_EPS * torch.finfo(dtype).eps


def _distance_stats(theta: Tensor, phi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """|theta_i|^2 (B, N), |phi_j|^2 (B, M) and the coincidence floor eps |theta_i|^2 + tiny (B, N)."""
    tt, pp = theta.pow(2).sum(1), phi.pow(2).sum(1)
    return tt, pp, tt * _eps(tt.dtype) + torch.finfo(tt.dtype).tiny


def _fused_forward(k: BoundKernel, theta: Tensor, phi: Tensor, v_query: Tensor, v_key: Tensor,
                   normalizer: Union[str, float], tile: int) -> tuple[Tensor, Optional[Tensor]]:
    """The aggregate (B, C, N) and the row sums r (B, N) where the operator or normalizer uses them."""
    b, _, n_query = theta.shape
    stats = _distance_stats(theta, phi) if k.distance else None
    need_r = k.s2 != 0 or normalizer == 'rowsum'
    out = v_query.new_empty(v_query.shape)
    rowsum = theta.new_empty(b, n_query) if need_r else None
    for start in range(0, n_query, tile):
        rows = slice(start, start + tile)
        w, _ = _tile(k, theta[:, :, rows], phi, stats, rows, derivative=False)
        out[:, :, rows] = torch.bmm(v_key, w.transpose(1, 2))
        if need_r:
            rowsum[:, rows] = w.sum(2)  # no out=: an exported program may run with autograd
    a = k.a
    out.mul_(a * k.s1)
    if need_r:
        rowsum.mul_(a)
        if k.s2:
            out.addcmul_(v_query, rowsum.unsqueeze(1), value=k.s2)
    return normalize(out, rowsum, normalizer, phi.shape[2], n_query), rowsum


class _FusedAggregate(torch.autograd.Function):
    """Tiled kernel aggregate with a hand-written backward.

    Saves only the inputs and O(B N) row statistics (plus the output for the row-sum normalizer) and
    evaluates each kernel tile once more in the backward pass, where all gradients follow from it:
    with g_hat_i = sigma g_i / D_i and q_i = dL/dr_i, the kernel gradient is
    G_ij = s1 g_hat_i . V_j + q_i, then dL/dx_ij = G_ij dW/dx_ij, and
    x = |theta_i - phi_j|^2 gives dtheta_i = 2 (theta_i sum_j S_ij - sum_j S_ij phi_j) (phi likewise).
    """

    @staticmethod
    def forward(ctx, theta, phi, v_query, v_key, k, normalizer, tile):
        out, rowsum = _fused_forward(k, theta, phi, v_query, v_key, normalizer, tile)
        ctx.k, ctx.normalizer, ctx.tile = k, normalizer, tile
        ctx.save_for_backward(theta, phi, v_query, v_key, rowsum, out if normalizer == 'rowsum' else None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        with autocast_off(grad), ieee_fp32_matmul():  # backward() may be called inside an autocast region
            return _fused_backward(ctx, grad)


def _fused_backward(ctx, grad) -> tuple:
    theta, phi, v_query, v_key, rowsum, out = ctx.saved_tensors
    k, normalizer, tile = ctx.k, ctx.normalizer, ctx.tile
    need_theta, need_phi, need_vq, need_vk = ctx.needs_input_grad[:4]
    m, n_query = phi.shape[2], theta.shape[2]
    q = None  # dL/dr_i
    if normalizer == 'rowsum':
        denom = guarded_rowsum(rowsum)
        g_hat = grad / denom.unsqueeze(1)
        q = (grad * out).sum(1).div_(denom).mul_(rowsum.abs() >= ROWSUM_EPS).neg_()
    else:
        g_hat = grad * (1.0 / (m if normalizer == 'key' else n_query if normalizer == 'query' else normalizer))
    if k.s2:
        qv = (g_hat * v_query).sum(1).mul_(k.s2)
        q = qv if q is None else q.add_(qv)
    g_vq = g_hat * rowsum.mul(k.s2).unsqueeze(1) if need_vq and k.s2 else None
    need_kernel_grad = need_theta or need_phi
    g_theta = g_phi = g_vk = None
    if not (need_kernel_grad or need_vk):
        return g_theta, g_phi, g_vq, g_vk, None, None, None
    stats = _distance_stats(theta, phi) if k.distance else None
    if need_vk:
        g_vk = torch.zeros_like(v_key)
    if need_theta:
        g_theta = torch.empty_like(theta)
    if need_phi:
        g_phi = torch.zeros_like(phi)
        col = phi.new_zeros(phi.shape[0], 1, m)  # sum_i S_ij
    # dL/dx_ij = scale * S_ij with S = (s1 g_hat_i . V_j + q_i) Wd_ij (s1 folded into scale when q = 0).
    scale = k.a * k.b * (1.0 if q is not None else k.s1) * (2.0 if k.distance else 1.0)
    for start in range(0, n_query, tile):
        rows = slice(start, start + tile)
        theta_t, g_t = theta[:, :, rows], g_hat[:, :, rows]
        w, wd = _tile(k, theta_t, phi, stats, rows, derivative=need_kernel_grad)
        if need_vk:
            g_vk.baddbmm_(g_t, w, alpha=k.a * k.s1)
        if not need_kernel_grad:
            continue
        sg = torch.bmm(g_t.transpose(1, 2), v_key)
        if q is not None:
            sg.mul_(k.s1).add_(q[:, rows].unsqueeze(2))
        if wd is not None:
            sg.mul_(wd)
        if need_theta:
            if k.distance:  # theta_i sum_j S_ij - sum_j S_ij phi_j
                g = torch.baddbmm(theta_t * sg.sum(2).unsqueeze(1), phi, sg.transpose(1, 2), alpha=-1)
            else:
                g = torch.bmm(phi, sg.transpose(1, 2))
            g_theta[:, :, rows] = g.mul_(scale)
        if need_phi:
            if k.distance:  # phi_j sum_i S_ij - sum_i S_ij theta_i
                col.add_(sg.sum(1, keepdim=True))
                g_phi.baddbmm_(theta_t, sg, alpha=-1)
            else:
                g_phi.baddbmm_(theta_t, sg)
    if need_phi:
        if k.distance:
            g_phi.addcmul_(phi, col)
        g_phi.mul_(scale)
    return g_theta, g_phi, g_vq, g_vk, None, None, None


def fused_aggregate(theta: Tensor, phi: Tensor, v_query: Tensor, v_key: Tensor, k: BoundKernel,
                     normalizer: Union[str, float], tile: int) -> Tensor:
    dtype = compute_dtype(theta, phi, v_query, v_key)
    with autocast_off(theta), ieee_fp32_matmul():
        theta, phi, vq, vk = (t.to(dtype) for t in (theta, phi, v_query, v_key))
        if torch.is_grad_enabled() and any(t.requires_grad for t in (theta, phi, vq, vk)):
            return _FusedAggregate.apply(theta, phi, vq, vk, k, normalizer, tile)
        return _fused_forward(k, theta, phi, vq, vk, normalizer, tile)[0]
