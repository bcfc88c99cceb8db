"""Hamiltonian (Verlet) blocks, reversible back-propagation and the weight-smoothness penalty.

Block (2.6) of Bohn, Griebel & Kannan (2021), after Chang et al. (2018): the input is split
channel-wise into Y and Z and advanced by one Verlet step

    Y <- Y + h * (K1^T ReLU(BN(K1 Z + b1)) + b1)
    Z <- Z - h * (K2^T ReLU(BN(K2 Y + b2)) + b2)      (with the new Y)

where K^T is the transposed convolution sharing K's weight. The step is exactly invertible, which
:func:`reversible_chain` uses to recompute activations in the backward pass instead of storing them.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['HamiltonianBlock', 'HamiltonianUnit', 'reversible_chain', 'hamiltonian_units', 'smoothness_penalty']


def _check_block_input(x: Tensor, channels: int) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f'x must be (B, {channels}, H, W), got {tuple(x.shape)}')


torch.fx.wrap('_check_block_input')  # shape checks are leaves of traced graphs


class HamiltonianBlock(nn.Module):
    """One Verlet step of the Hamiltonian network (eq. 2.6).

    Args:
        channels: C, even; Y and Z have C/2 channels each.
        h: step size h.
        kernel_size: size of K (odd; zero padding keeps the spatial size).
        norm_layer: normalisation between K and the activation (None: none, as the paper's eq. 2.6).
        act_layer: the activation sigma.
        transpose_bias: add the conv's bias again after K^T (the authors' code).
        drop_path: stochastic depth: in training, the probability that a sample skips this step (both half
            steps, one draw per sample, the kept ones scaled by 1 / (1 - p) as timm's ``DropPath``).
    """

    def __init__(
            self,
            channels: int,
            h: float = 0.06,
            kernel_size: int = 3,
            norm_layer: Optional[Callable[..., nn.Module]] = nn.BatchNorm2d,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
            transpose_bias: bool = True,
            drop_path: float = 0.0,
            *,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 2 or channels % 2:
            raise ValueError(f'channels must be an even int >= 2 (split into Y and Z), got {channels!r}')
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be a positive odd int, got {kernel_size!r}')
        if not h > 0:
            raise ValueError(f'h must be a positive number, got {h!r}')
        if not 0 <= drop_path < 1:
            raise ValueError(f'drop_path must be in [0, 1), got {drop_path!r}')
        self.drop_path = float(drop_path)
        dd = dict(device=device, dtype=dtype)
        half = channels // 2
        self.channels = channels
        self.h = float(h)
        self.padding = kernel_size // 2
        self.transpose_bias = transpose_bias
        self.conv1 = nn.Conv2d(half, half, kernel_size, padding=self.padding, **dd)
        self.conv2 = nn.Conv2d(half, half, kernel_size, padding=self.padding, **dd)
        self.bn1 = norm_layer(half, **dd) if norm_layer is not None else nn.Identity()
        self.bn2 = norm_layer(half, **dd) if norm_layer is not None else nn.Identity()
        self.act = act_layer()
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode='fan_in', nonlinearity='relu')
            nn.init.zeros_(conv.bias)

    def extra_repr(self) -> str:
        return f'channels={self.channels}, h={self.h}'

    def _norm(self, bn: nn.Module, t: Tensor, update_stats: bool) -> Tensor:
        if update_stats or not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.training:
            return bn(t)
        # Recomputation: the forward pass's batch statistics, without a second running-stat update.
        return F.batch_norm(t, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)

    def force(self, x: Tensor, conv: nn.Conv2d, bn: nn.Module, update_stats: bool = True) -> Tensor:
        """K^T sigma(BN(K x + b)) (+ b): the right-hand side of one half step."""
        t = self.act(self._norm(bn, conv(x), update_stats))
        t = F.conv_transpose2d(t, conv.weight, padding=self.padding)
        if self.transpose_bias:
            t = t + conv.bias.view(1, -1, 1, 1)
        return t

    def forward(self, x: Tensor, update_stats: bool = True) -> Tensor:
        _check_block_input(x, self.channels)
        y, z = x.chunk(2, dim=1)
        mask = None
        if self.drop_path and self.training:  # one draw per sample for both half steps: the step is skipped
            keep = 1.0 - self.drop_path
            mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep).div_(keep)
        y = y + self.h * _dropped(self.force(z, self.conv1, self.bn1, update_stats), mask)
        z = z - self.h * _dropped(self.force(y, self.conv2, self.bn2, update_stats), mask)
        return torch.cat([y, z], dim=1)

    @torch.no_grad()
    def inverse(self, out: Tensor) -> Tensor:
        """The block input that produced ``out`` (uses batch statistics without updating them)."""
        y, z = out.chunk(2, dim=1)
        z = z + self.h * self.force(y, self.conv2, self.bn2, update_stats=False)
        y = y - self.h * self.force(z, self.conv1, self.bn1, update_stats=False)
        return torch.cat([y, z], dim=1)


def _dropped(t: Tensor, mask: Optional[Tensor]) -> Tensor:
    return t if mask is None else t * mask


class _ReversibleFunction(torch.autograd.Function):
    """Runs blocks without storing activations; the backward pass walks them in reverse,
    reconstructing each block's input from its output."""

    @staticmethod
    def forward(ctx, x: Tensor, blocks: Sequence[HamiltonianBlock], *params: Tensor) -> Tensor:
        with torch.no_grad():
            for block in blocks:
                x = block(x)
        ctx.blocks = blocks
        ctx.save_for_backward(x.detach())
        return x

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (out,) = ctx.saved_tensors
        param_grads = []
        for block in reversed(ctx.blocks):
            x = block.inverse(out)
            with torch.enable_grad():
                x_req = x.detach().requires_grad_(True)
                params = [p for p in block.parameters() if p.requires_grad]
                y = block(x_req, update_stats=False)
                grads = torch.autograd.grad(y, [x_req] + params, grad_out, allow_unused=True)
            grad_out = grads[0]
            param_grads.append(list(grads[1:]))
            out = x
        # Match the order of *params in forward: blocks in order, each block's parameters in order.
        flat = [g for block_grads in reversed(param_grads) for g in block_grads]
        return (grad_out, None, *flat)


def reversible_chain(blocks: Sequence[HamiltonianBlock], x: Tensor) -> Tensor:
    """Apply ``blocks`` in order without storing their activations for the backward pass.

    Training memory no longer grows with the number of blocks; gradients equal those of the plain
    chain up to the rounding of the reconstructed inputs.
    """
    if any(b.drop_path and b.training for b in blocks):
        raise ValueError('reversible back-propagation cannot recompute a step that stochastic depth dropped at random; '
                         'train with drop_path_rate=0 or without reversible / set_grad_checkpointing')
    params = [p for b in blocks for p in b.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (x.requires_grad or params):
        return _ReversibleFunction.apply(x, list(blocks), *params)
    for block in blocks:
        x = block(x)
    return x


class HamiltonianUnit(nn.Module):
    """A Unit: ``depth`` Hamiltonian blocks of one width, optionally with nonlocal blocks between them.

    Args:
        channels: width C of the Unit.
        depth: number m of Hamiltonian blocks.
        h: step size of the blocks.
        nonlocal_layer: constructor called as ``nonlocal_layer(channels)`` (e.g. a ``partial`` of
            :class:`PIDEBlock`), or None for a purely local Unit.
        nonlocal_after: positions (number of Hamiltonian blocks before it) of the nonlocal blocks;
            the paper puts one after the 2nd block.
        reversible: recompute block activations in the backward pass instead of storing them.
        drop_path: stochastic depth of each Hamiltonian block (a sequence of ``depth`` rates), or None.
        **block_kwargs: passed to :class:`HamiltonianBlock` (``norm_layer``, ``act_layer``, ...).
    """

    def __init__(
            self,
            channels: int,
            depth: int,
            h: float = 0.06,
            nonlocal_layer: Optional[Callable[..., nn.Module]] = None,
            nonlocal_after: Sequence[int] = (2,),
            reversible: bool = False,
            drop_path: Optional[Sequence[float]] = None,
            *,
            device=None,
            dtype=None,
            **block_kwargs,
    ):
        super().__init__()
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f'depth must be a non-negative int, got {depth!r}')
        dd = dict(device=device, dtype=dtype)
        self.channels = channels
        self.reversible = reversible
        rates = list(drop_path) if drop_path is not None else [0.0] * depth
        if len(rates) != depth:
            raise ValueError(f'drop_path must hold one rate per block ({depth}), got {len(rates)}')
        self.blocks = nn.ModuleList([HamiltonianBlock(channels, h, drop_path=r, **block_kwargs, **dd) for r in rates])
        self.nonlocals = nn.ModuleDict()
        if nonlocal_layer is not None:
            for pos in sorted(set(nonlocal_after)):
                if not isinstance(pos, int) or not 0 <= pos <= depth:
                    raise ValueError(f'nonlocal_after positions must be ints in [0, depth={depth}], got {pos!r}')
                self.nonlocals[str(pos)] = nonlocal_layer(channels, **dd)

    def forward(self, x: Tensor) -> Tensor:
        start = 0
        for pos in list(range(len(self.blocks))) + [len(self.blocks)]:
            key = str(pos)
            if key in self.nonlocals or pos == len(self.blocks):
                segment = self.blocks[start:pos]
                if self.reversible and len(segment):
                    x = reversible_chain(segment, x)
                else:
                    for block in segment:
                        x = block(x)
                if key in self.nonlocals:
                    x = self.nonlocals[key](x)
                start = pos
        return x


def hamiltonian_units(model: nn.Module) -> list[list[HamiltonianBlock]]:
    """The Hamiltonian blocks of each Unit of ``model``, in order, for the smoothness penalty.

    A :class:`HamiltonianUnit` is one Unit (its nonlocal blocks are skipped). Elsewhere, runs of
    equal-width :class:`HamiltonianBlock` children of one container count as Units.
    """
    units, seen = [], set()
    for m in model.modules():
        if isinstance(m, HamiltonianUnit):
            units.append(list(m.blocks))
            seen.update(id(b) for b in m.blocks)
    for parent in model.modules():
        run: list[HamiltonianBlock] = []
        for child in parent.children():
            if isinstance(child, HamiltonianBlock) and id(child) not in seen:
                if run and run[-1].channels != child.channels:
                    units.append(run)
                    run = []
                run.append(child)
        units.append(run)
    return [u for u in units if len(u) > 1]


def smoothness_penalty(model: nn.Module, alpha: float = 1e-8) -> Tensor:
    """Weight-smoothness decay (4.8): alpha * h * sum_j sum_k ||(K_{j,k} - K_{j+1,k}) / h||_F^2.

    Sums over consecutive Hamiltonian blocks j, j+1 of each Unit and both convolutions k of a
    block, with h the step of block j; nonlocal blocks are not included. Add it to the loss.
    """
    total = None
    for unit in hamiltonian_units(model):
        for a, b in zip(unit[:-1], unit[1:]):
            for ka, kb in ((a.conv1.weight, b.conv1.weight), (a.conv2.weight, b.conv2.weight)):
                term = (ka - kb).pow(2).sum() / a.h
                total = term if total is None else total + term
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return alpha * total
