"""Opt-in (``compile_tiles=True``): the elementwise work of the fused tiles of a distance kernel under
``torch.compile``.

The matrix products stay the eager path's; what follows each tile's squared distances (the coincidence mask, the
kernel W and, backward, its derivative times the kernel gradient) is one compiled function, which inductor fuses
into one loop over the tile (on a GPU, one kernel for the device) that writes W over the squared distances and S
over the kernel gradient. Each bound kernel gets functions of its own code object, because dynamo keeps compiled
entries, and counts recompilations against its limit, per code object: many operators, orders and widths in one
process never push a kernel back to eager.
"""
from __future__ import annotations

import types
from typing import Callable, Optional

import torch
from torch import Tensor

from .table import BoundKernel

__all__ = ['CompiledTiles']

BACKEND = 'inductor'  # torch.compile's backend for the tiles


def _weights(pair: Callable, singular: bool, eps: float, d2: Tensor, floor_rows: Tensor, pp: Tensor,
             derivative: bool) -> tuple[Tensor, Optional[Tensor]]:
    """W and Wd of a tile as the eager tile forms them (out of place: the compiler fuses them)."""
    if not singular:
        return pair(d2.clamp_min(0.0), derivative)
    coincident = d2 <= floor_rows.unsqueeze(2) + eps * pp.unsqueeze(1)
    w, wd = pair(d2.masked_fill(coincident, 1.0), derivative)
    return w.masked_fill(coincident, 0.0), (None if wd is None else wd.masked_fill(coincident, 0.0))


def _forward_tile(pair: Callable, singular: bool, eps: float, d2: Tensor, floor_rows: Tensor, pp: Tensor) -> None:
    """W over the squared distances ``d2``."""
    w, _ = _weights(pair, singular, eps, d2, floor_rows, pp, False)
    d2.copy_(w)


def _backward_tile(pair: Callable, singular: bool, eps: float, d2: Tensor, sg: Tensor, floor_rows: Tensor,
                   pp: Tensor) -> None:
    """W over ``d2`` and S = G Wd over the kernel gradient ``sg``."""
    w, wd = _weights(pair, singular, eps, d2, floor_rows, pp, True)
    if wd is not None:
        sg.mul_(wd)
    d2.copy_(w)


def _own_code(fn: Callable, tag: int) -> Callable:
    """``fn`` with a code object of its own."""
    code = fn.__code__.replace(co_name=f'{fn.__name__}_{tag}')
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class CompiledTiles:
    """The compiled tile functions of one bound kernel, made on first use and kept with it."""

    def __init__(self, k: BoundKernel):
        self.k, tag = k, id(k)
        self.forward = torch.compile(_own_code(_forward_tile, tag), fullgraph=True, backend=BACKEND)
        self.backward = torch.compile(_own_code(_backward_tile, tag), fullgraph=True, backend=BACKEND)

    @classmethod
    def of(cls, k: BoundKernel) -> CompiledTiles:
        tiles = getattr(k, '_compiled_tiles', None)
        if tiles is None:
            tiles = k._compiled_tiles = cls(k)
        return tiles

    def weights(self, stats, rows: slice, d2: Tensor) -> Tensor:
        """W of the tile ``rows`` (``stats``: the call's :class:`~.tiles.Distances`), in ``d2``'s buffer."""
        self.forward(self.k.pair, self.k.singular, stats.eps, d2, stats.floor[:, rows], stats.pp)
        return d2

    def weights_and_gradient(self, stats, rows: slice, d2: Tensor, sg: Tensor) -> Tensor:
        """W of the tile in ``d2``'s buffer, and ``sg`` times Wd in place."""
        self.backward(self.k.pair, self.k.singular, stats.eps, d2, sg, stats.floor[:, rows], stats.pp)
        return d2
