"""The low-rank path: the dot-product diffusion kernel has rank E, so sum_j w_ij V_j = lam theta_i^T (Phi V^T)
costs O(N E C) and never forms the N x M kernel."""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dense import normalize
from .precision import autocast_off, compute_dtype

__all__ = ['lowrank_diffusion']


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
        with autocast_off(grad):  # backward() may be called inside an autocast region
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


def lowrank_diffusion(theta: Tensor, phi: Tensor, v_query: Tensor, v_key: Tensor, lam: float,
                       normalizer: Union[str, float]) -> Tensor:
    """sum_j lam (theta_i . phi_j)(V_j - V_i) as lam theta_i^T (Phi V^T) - V_i lam theta_i^T sum_j phi_j."""
    dtype = compute_dtype(theta, phi, v_query, v_key)
    with autocast_off(theta):
        theta, phi, vq, vk = (t.to(dtype) for t in (theta, phi, v_query, v_key))
        m, n_query = phi.shape[2], theta.shape[2]
        if normalizer == 'rowsum':  # the normalisation depends on theta: plain autograd
            pv, _, rowsum = _lowrank_parts(theta, phi, vk, lam)
            agg = lam * torch.bmm(pv.transpose(1, 2), theta) - vq * rowsum.unsqueeze(1)
            return normalize(agg, rowsum, normalizer, m, n_query)
        scale = 1.0 / (m if normalizer == 'key' else n_query if normalizer == 'query' else normalizer)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (theta, phi, vq, vk)):
            return _LowRankDiffusion.apply(theta, phi, vq, vk, lam, scale)
        pv, _, rowsum = _lowrank_parts(theta, phi, vk, lam)
        return _lowrank_combine(theta, vq, pv, rowsum, lam, scale)
