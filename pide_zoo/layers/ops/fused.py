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

from .compiled import CompiledTiles
from .dense import ROWSUM_EPS, guarded_rowsum
from .precision import autocast_off, compute_dtype, ieee_fp32_matmul, is_compiling
from .table import BoundKernel
from .tiles import Distances, Workspace, product, with_ones, workspace

__all__ = ['fused_aggregate']


def _tile(k: BoundKernel, theta_t: Tensor, phi: Tensor, stats: Optional[Distances], rows: slice,
          derivative: bool, ws: Optional[Workspace] = None) -> tuple[Tensor, Optional[Tensor]]:
    """W (B, T, M) for the queries ``rows`` and, if ``derivative``, Wd (None where it is 1); in the workspace's
    buffers 'x' and 'wd' where there is one."""
    if not derivative and is_compiling():
        return _tile_out_of_place(k, theta_t, phi, stats, rows), None
    if stats is not None and stats.compiled is not None and not derivative:
        return stats.compiled.weights(stats, rows, stats.squared(rows, ws)), None
    wd_out = ws.get('wd', theta_t.shape[0], theta_t.shape[2], phi.shape[2]) if ws is not None and derivative else None
    if not k.distance:
        return k.pair(product(theta_t.transpose(1, 2), phi, ws, 'x'), derivative, wd_out)
    d2 = stats.squared(rows, ws)
    if not k.singular:
        return k.pair(d2.clamp_min_(0.0), derivative, wd_out)
    if stats.no_coincident_pair(d2, rows):
        return k.pair(d2, derivative, wd_out)
    # Coincident pairs as in the dense path: they contribute nothing, and W is not evaluated at 0.
    coincident = stats.coincident(d2, rows)
    w, wd = k.pair(d2.masked_fill_(coincident, 1.0), derivative, wd_out)
    w.masked_fill_(coincident, 0.0)
    return w, (wd.masked_fill_(coincident, 0.0) if wd is not None else None)


def _tile_out_of_place(k: BoundKernel, theta_t: Tensor, phi: Tensor, stats: Optional[Distances],
                       rows: slice) -> Tensor:
    """W as :func:`_tile` forms it, without in-place operations: torch.export records the forward pass, and an
    exported program may run under autograd, which in-place updates of saved tensors would break."""
    if not k.distance:
        return k.value(torch.bmm(theta_t.transpose(1, 2), phi))
    d2 = stats.squared(rows)
    if not k.singular:
        return k.value(d2.clamp_min(0.0))
    coincident = stats.coincident(d2, rows)
    return k.value(d2.masked_fill(coincident, 1.0)).masked_fill(coincident, 0.0)


def _distances(k: BoundKernel, theta: Tensor, phi: Tensor, compile_tiles: bool) -> Optional[Distances]:
    if not k.distance:
        return None
    return Distances(theta, phi, CompiledTiles.of(k) if compile_tiles and not is_compiling() else None)


def _sigma(normalizer: Union[str, float], m: int, n_query: int) -> float:
    """sigma of the fixed normalizers; 1 for 'rowsum', whose D_i is applied apart."""
    if normalizer == 'rowsum':
        return 1.0
    return 1.0 / (m if normalizer == 'key' else n_query if normalizer == 'query' else normalizer)


def _fused_forward(k: BoundKernel, theta: Tensor, phi: Tensor, v_query: Tensor, v_key: Tensor,
                   normalizer: Union[str, float], tile: int, compile_tiles: bool = False
                   ) -> tuple[Tensor, Optional[Tensor]]:
    """The aggregate (B, C, N) and the row sums r (B, N) where the operator or normalizer uses them."""
    b, _, n_query = theta.shape
    stats = _distances(k, theta, phi, compile_tiles)
    need_r = k.s2 != 0 or normalizer == 'rowsum'
    out = v_query.new_empty(v_query.shape)
    rowsum = theta.new_empty(b, n_query) if need_r else None
    # A row of ones under the values: the aggregate's product yields the row sums too, no pass over the tile.
    # Only for the difference forms' distance kernels, whose weights are positive: sums that may cancel (dot
    # products, the log kernel) keep torch's more accurate reduction.
    fold = need_r and k.distance and k.s2 != 0
    values = with_ones(v_key) if fold else v_key
    ws = workspace(theta)
    for start in range(0, n_query, tile):
        rows = slice(start, start + tile)
        w, _ = _tile(k, theta[:, :, rows], phi, stats, rows, False, ws)
        agg = product(values, w.transpose(1, 2), ws, 'p')
        if fold:
            out[:, :, rows] = agg[:, :-1]
            rowsum[:, rows] = agg[:, -1]  # no out=: an exported program may run with autograd
        else:
            out[:, :, rows] = agg
            if need_r:
                rowsum[:, rows] = w.sum(2)
    a, sigma = k.a, _sigma(normalizer, phi.shape[2], n_query)
    out.mul_(a * k.s1 * sigma)
    if need_r:
        rowsum.mul_(a)
        if k.s2:
            out.addcmul_(v_query, rowsum.unsqueeze(1), value=k.s2 * sigma)
    if normalizer == 'rowsum':
        out.div_(guarded_rowsum(rowsum).unsqueeze(1))
    return out, rowsum


class _FusedAggregate(torch.autograd.Function):
    """Tiled kernel aggregate with a hand-written backward.

    Saves only the inputs and O(B N) row statistics (plus the output for the row-sum normalizer) and
    evaluates each kernel tile once more in the backward pass, where all gradients follow from it:
    with g_hat_i = sigma g_i / D_i and q_i = dL/dr_i, the kernel gradient is
    G_ij = s1 g_hat_i . V_j + q_i, then dL/dx_ij = G_ij dW/dx_ij, and
    x = |theta_i - phi_j|^2 gives dtheta_i = 2 (theta_i sum_j S_ij - sum_j S_ij phi_j) (phi likewise).
    """

    @staticmethod
    def forward(ctx, theta, phi, v_query, v_key, k, normalizer, tile, compile_tiles):
        out, rowsum = _fused_forward(k, theta, phi, v_query, v_key, normalizer, tile, compile_tiles)
        ctx.k, ctx.normalizer, ctx.tile, ctx.compile_tiles = k, normalizer, tile, compile_tiles
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
    (b, c, n_query), m = grad.shape, phi.shape[2]
    q = None  # dL/dr_i
    # The distance kernels' gradient takes g_hat and q from one product: [g_hat; s1 q] in one buffer.
    fold = k.distance and (need_theta or need_phi) and (normalizer == 'rowsum' or k.s2 != 0)
    g_rows = grad.new_empty(b, c + 1, n_query) if fold else None
    g_hat = g_rows[:, :c] if fold else None
    if normalizer == 'rowsum':
        denom = guarded_rowsum(rowsum)
        g_hat = torch.div(grad, denom.unsqueeze(1), out=g_hat)
        q = (grad * out).sum(1).div_(denom).mul_(rowsum.abs() >= ROWSUM_EPS).neg_()
    else:
        g_hat = torch.mul(grad, _sigma(normalizer, m, n_query), out=g_hat)
    if k.s2:
        qv = (g_hat * v_query).sum(1).mul_(k.s2)
        q = qv if q is None else q.add_(qv)
    g_vq = g_hat * rowsum.mul(k.s2).unsqueeze(1) if need_vq and k.s2 else None
    need_kernel_grad = need_theta or need_phi
    g_theta = g_phi = g_vk = None
    if not (need_kernel_grad or need_vk):
        return g_theta, g_phi, g_vq, g_vk, None, None, None, None
    stats = _distances(k, theta, phi, ctx.compile_tiles)
    if need_vk:
        g_vk = torch.zeros_like(v_key)
    if k.distance and need_kernel_grad:
        return _distance_backward(k, theta, phi, v_key, g_hat, q, g_rows, stats, tile, need_theta, need_phi, g_vk,
                                  g_vq)
    if need_theta:
        g_theta = torch.empty_like(theta)
    if need_phi:
        g_phi = torch.zeros_like(phi)
    # dL/dx_ij = scale * S_ij with S = (s1 g_hat_i . V_j + q_i) Wd_ij (s1 folded into scale when q = 0).
    scale = k.a * k.b * (1.0 if q is not None else k.s1)
    ws = workspace(theta)
    for start in range(0, n_query, tile):
        rows = slice(start, start + tile)
        theta_t, g_t = theta[:, :, rows], g_hat[:, :, rows]
        w, wd = _tile(k, theta_t, phi, stats, rows, need_kernel_grad, ws)
        if need_vk:
            g_vk.baddbmm_(g_t, w, alpha=k.a * k.s1)
        if not need_kernel_grad:
            continue
        sg = product(g_t.transpose(1, 2), v_key, ws, 'sg')
        if q is not None:
            sg.mul_(k.s1).add_(q[:, rows].unsqueeze(2))
        if wd is not None:
            sg.mul_(wd)
        if need_theta:
            g_theta[:, :, rows] = torch.bmm(phi, sg.transpose(1, 2)).mul_(scale)
        if need_phi:
            g_phi.baddbmm_(theta_t, sg)
    if need_phi:
        g_phi.mul_(scale)
    return g_theta, g_phi, g_vq, g_vk, None, None, None, None


def _distance_backward(k: BoundKernel, theta: Tensor, phi: Tensor, v_key: Tensor, g_hat: Tensor,
                       q: Optional[Tensor], g_rows: Optional[Tensor], stats: Distances, tile: int, need_theta: bool,
                       need_phi: bool, g_vk: Optional[Tensor], g_vq: Optional[Tensor]) -> tuple:
    """The distance kernels' gradients, every per-pair sum inside a product: with x = |theta_i - phi_j|^2,
    dtheta_i = 2 (theta_i sum_j S_ij - sum_j S_ij phi_j), where [-2 phi; 1] S^T gives both sums at once, and
    dphi_j = 2 (phi_j sum_i S_ij - sum_i S_ij theta_i) from [theta; |theta|^2; 1] S; the kernel gradient
    s1 g_hat_i . V_j + q_i is one product of [s1 g_hat; q] with [V; 1]."""
    e, n_query = theta.shape[1], theta.shape[2]
    # With s1 = +-1, s1 g_hat . V + q = s1 (g_hat . V + s1 q): s1 goes into the scale.
    scale, values = k.a * k.b * k.s1 * 2.0, v_key
    if q is None:
        g_rows = g_hat
    else:
        torch.mul(q, k.s1, out=g_rows[:, -1])
        values = with_ones(v_key)
    g_theta = torch.empty_like(theta) if need_theta else None
    sums = phi.new_zeros(phi.shape[0], e + 2, phi.shape[2]) if need_phi else None  # [theta; |theta|^2; 1] S
    phi_rows = stats.phi_aug[:, :e + 1]  # [-2 phi; 1]
    ws = workspace(theta)
    for start in range(0, n_query, tile):
        rows = slice(start, start + tile)
        if stats.compiled is not None:
            d2, sg = stats.squared(rows, ws), product(g_rows[:, :, rows].transpose(1, 2), values, ws, 'sg')
            w = stats.compiled.weights_and_gradient(stats, rows, d2, sg)
        else:
            w, wd = _tile(k, theta[:, :, rows], phi, stats, rows, True, ws)
            sg = product(g_rows[:, :, rows].transpose(1, 2), values, ws, 'sg')
            if wd is not None:
                sg.mul_(wd)
        if g_vk is not None:
            g_vk.baddbmm_(g_hat[:, :, rows], w, alpha=k.a * k.s1)
        if need_theta:
            p = torch.bmm(phi_rows, sg.transpose(1, 2))  # (B, E + 1, T): -2 sum_j S_ij phi_j, sum_j S_ij
            g_theta[:, :, rows] = torch.addcmul(p[:, :e], theta[:, :, rows], p[:, e:], value=2.0).mul_(scale / 2)
        if need_phi:
            sums.baddbmm_(stats.theta_aug[:, :, rows], sg)
    g_phi = None
    if need_phi:
        g_phi = torch.addcmul(sums[:, :e].neg_(), phi, sums[:, e + 1:]).mul_(scale)
    return g_theta, g_phi, g_vq, g_vk, None, None, None, None


def fused_aggregate(theta: Tensor, phi: Tensor, v_query: Tensor, v_key: Tensor, k: BoundKernel,
                     normalizer: Union[str, float], tile: int, compile_tiles: bool = False) -> Tensor:
    dtype = compute_dtype(theta, phi, v_query, v_key)
    with autocast_off(theta), ieee_fp32_matmul():
        theta, phi, vq, vk = (t.to(dtype) for t in (theta, phi, v_query, v_key))
        if torch.is_grad_enabled() and any(t.requires_grad for t in (theta, phi, vq, vk)):
            return _FusedAggregate.apply(theta, phi, vq, vk, k, normalizer, tile, compile_tiles)
        return _fused_forward(k, theta, phi, vq, vk, normalizer, tile, compile_tiles)[0]
