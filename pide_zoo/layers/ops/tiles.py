"""What the fused path's tiles share: the tile size, buffers reused across a call's tiles, and the squared
distances of a tile in one product of augmented factors.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .dense import COINCIDENT_EPS
from .precision import is_compiling

__all__ = ['query_tile', 'check_tile_size', 'Workspace', 'workspace', 'product', 'Distances', 'with_ones']

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


class Workspace:
    """Flat buffers that every tile of one call reuses: allocating a fresh tile-sized tensor (its pages faulted in
    anew) costs more than a pass over it."""

    def __init__(self, like: Tensor):
        self.like, self.buffers = like, {}

    def get(self, name: str, *shape: int) -> Tensor:
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = self.buffers[name] = self.like.new_empty(n)
        return buf[:n].view(shape)


def workspace(like: Tensor) -> Optional[Workspace]:
    """A workspace; None while a program is being traced, which records no out= products."""
    return None if is_compiling() else Workspace(like)


def product(a: Tensor, b: Tensor, ws: Optional[Workspace], name: str) -> Tensor:
    """bmm(a, b), into the workspace buffer ``name`` where there is one."""
    if ws is None:
        return torch.bmm(a, b)
    return torch.bmm(a, b, out=ws.get(name, a.shape[0], a.shape[1], b.shape[2]))


class Distances:
    """What the tiles of one call share: the squared norms, the coincidence floor and the augmented factors
    [theta; |theta|^2; 1] and [-2 phi; 1; |phi|^2], whose one product is the squared distance of every pair:
    no broadcast copy of the norms feeds the GEMM and no pass over the tile adds them; ``compiled``: the kernel's
    compiled tile functions where ``compile_tiles`` asks for them."""

    def __init__(self, theta: Tensor, phi: Tensor, compiled=None):
        self.compiled, self.eps = compiled, coincident_eps(theta.dtype)
        b, e, n = theta.shape
        self.theta_aug = theta.new_empty(b, e + 2, n)  # filled in place: no intermediate copies of theta
        self.theta_aug[:, :e] = theta
        self.theta_aug[:, e] = theta.pow(2).sum(1)
        self.theta_aug[:, e + 1] = 1.0
        tt = self.theta_aug[:, e]
        self.pp = phi.pow(2).sum(1)
        self.floor = tt * self.eps + torch.finfo(tt.dtype).tiny
        self.phi_aug = torch.cat((phi * -2.0, phi.new_ones(phi.shape[0], 1, phi.shape[2]), self.pp.unsqueeze(1)), 1)
        self._pp_bound: Optional[float] = None

    def squared(self, rows: slice, ws: Optional[Workspace] = None) -> Tensor:
        """|theta_i|^2 + |phi_j|^2 - 2 theta_i . phi_j (B, T, M) of the queries ``rows``, in one product."""
        return product(self.theta_aug[:, :, rows].transpose(1, 2), self.phi_aug, ws, 'x')

    def coincident(self, d2: Tensor, rows: slice) -> Tensor:
        """The pairs closer than the squared distance's rounding, as the dense path counts them."""
        return d2 <= torch.add(self.floor[:, rows].unsqueeze(2), self.pp.unsqueeze(1), alpha=self.eps)

    def no_coincident_pair(self, d2: Tensor, rows: slice) -> bool:
        """Whether a tile's smallest squared distance lies above the largest coincidence threshold of its rows:
        then it holds no coincident pair and needs no mask (one reduction instead of four passes over it)."""
        if not d2.numel():
            return True
        if torch.jit.is_tracing() or d2.device.type == 'meta':  # a traced branch would hold for every input
            return False
        if self._pp_bound is None:
            self._pp_bound = float(self.pp.amax()) * self.eps
        return float(d2.amin()) > float(self.floor[:, rows].amax()) + self._pp_bound


def coincident_eps(dtype: torch.dtype) -> float:
    return COINCIDENT_EPS * torch.finfo(dtype).eps


def with_ones(t: Tensor) -> Tensor:
    """(B, D, L) -> (B, D + 1, L) with a last row of ones."""
    return torch.cat((t, t.new_ones(t.shape[0], 1, t.shape[2])), 1)
