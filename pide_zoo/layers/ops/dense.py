"""The dense path: the N x M kernel at once, as the paper computed it (for benchmarks and FLOP counts)."""
from __future__ import annotations

from functools import partial
from typing import Optional, Union

import torch
from torch import Tensor

from .precision import autocast_off, compute_dtype, full_precision
from .table import BoundKernel

__all__ = ['dense_kernel', 'dense_aggregate', 'normalize', 'guarded_rowsum', 'COINCIDENT_EPS', 'ROWSUM_EPS']

# Below this multiple of the machine epsilon (relative to |theta_i|^2 + |phi_j|^2) a squared
# distance obtained from |a|^2 - 2 a.b + |b|^2 is rounding noise: the pair counts as coincident.
COINCIDENT_EPS = 64.0
ROWSUM_EPS = 1e-6


def _squared_distance(theta: Tensor, phi: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distances (B, N, M) between theta (B, E, N) and phi (B, E, M), and the coincidence mask."""
    tt = theta.pow(2).sum(1)  # (B, N)
    pp = phi.pow(2).sum(1)  # (B, M)
    scale = tt.unsqueeze(2) + pp.unsqueeze(1)
    d2 = scale - 2 * torch.bmm(theta.transpose(1, 2), phi)
    eps = COINCIDENT_EPS * torch.finfo(d2.dtype).eps
    # Coincident pairs contribute nothing (the paper's safe divide); the tiny floor keeps all-zero
    # embeddings coincident.
    apart = d2 > eps * scale + torch.finfo(d2.dtype).tiny
    # Masked entries get 1 so that neither the value nor its gradient is evaluated at 0.
    return torch.where(apart, d2, torch.ones_like(d2)), apart


def _kernel(k: BoundKernel, theta: Tensor, phi: Tensor) -> Tensor:
    if not k.distance:
        return k.a * k.value(torch.bmm(theta.transpose(1, 2), phi))
    d2, apart = _squared_distance(theta, phi)
    if not k.singular:  # rounding can leave tiny negative squared distances
        return k.a * k.value(torch.where(apart, d2, torch.zeros_like(d2)))
    values = k.a * k.value(d2)
    return torch.where(apart, values, torch.zeros_like(values))


def dense_kernel(k: BoundKernel, theta: Tensor, phi: Tensor) -> Tensor:
    """The (B, N, M) kernel lam c W(x_ij), in float32 (float64 for float64 inputs) with IEEE products."""
    dtype = compute_dtype(theta, phi)
    with autocast_off(theta):
        return full_precision(partial(_kernel, k), theta.to(dtype), phi.to(dtype))


def guarded_rowsum(rowsum: Tensor) -> Tensor:
    """sum_j w_ij can be zero or negative (dot and log kernels): keep its sign, bound it away from 0."""
    sign = torch.where(rowsum < 0, -torch.ones_like(rowsum), torch.ones_like(rowsum))
    return sign * rowsum.abs().clamp_min(ROWSUM_EPS)


def normalize(agg: Tensor, rowsum: Tensor, normalizer: Union[str, float], m: int, n_query: int) -> Tensor:
    if normalizer == 'key':
        return agg / m
    if normalizer == 'query':
        return agg / n_query
    if normalizer == 'rowsum':
        return agg / guarded_rowsum(rowsum).unsqueeze(1)
    return agg / normalizer


def _aggregate(s1: float, s2: float, normalizer: Union[str, float], kern: Tensor, vq: Tensor, vk: Tensor,
               rowsum: Optional[Tensor] = None) -> Tensor:
    agg = torch.bmm(vk, kern.transpose(1, 2))  # (B, C, N): sum_j w_ij V_j
    if rowsum is None and (s2 != 0 or normalizer == 'rowsum'):
        rowsum = kern.sum(2)  # (B, N)
    if s2 != 0:  # the difference forms: s1 sum_j w_ij V_j + s2 V_i r_i
        agg = agg - vq * rowsum.unsqueeze(1) if s1 > 0 else vq * rowsum.unsqueeze(1) - agg
    return normalize(agg, rowsum, normalizer, kern.shape[2], kern.shape[1])


def dense_aggregate(k: BoundKernel, kern: Tensor, v_query: Tensor, v_key: Tensor, normalizer: Union[str, float],
                    rowsum: Optional[Tensor] = None) -> Tensor:
    """Aggregate (B, C, N) of values with a dense kernel ``kern`` (B, N, M); ``rowsum`` (B, N) may be given
    when one kernel serves several stages."""
    dtype = kern.dtype
    tensors = (kern, v_query.to(dtype), v_key.to(dtype)) + (() if rowsum is None else (rowsum,))
    with autocast_off(kern):
        return full_precision(partial(_aggregate, k.s1, k.s2, normalizer), *tensors)
