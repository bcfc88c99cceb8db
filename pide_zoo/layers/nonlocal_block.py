"""The PIDE nonlocal block (Bohn, Griebel & Kannan 2021, Section 4.2-4.4, Figure 3).

One module serves as a plain ``nn.Module``, as timm's ``attn_layer`` (``cls(channels, **kwargs)``)
and as an mmcv/mmseg plugin (``cls(in_channels=..., **cfg)``).
"""
from __future__ import annotations

from numbers import Real
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pide_ops import (
    KERNELS,
    _lowrank_diffusion,
    apply_kernel,
    check_normalizer,
    check_s,
    check_tile_size,
    nonlocal_aggregate,
    pide_kernel,
    resolve_method,
    resolve_operator,
)

__all__ = ['PIDEBlock']

# Leaves for torch.fx: shape-dependent Python (validation, tiling) stays out of traced graphs.
torch.fx.wrap('_check_input')
torch.fx.wrap('_max_pool_keys')
torch.fx.wrap('_pointwise_conv')
torch.fx.wrap('_shared_kernel')
torch.fx.wrap('_shared_rowsum')
torch.fx.wrap('_stage_aggregate')


def _check_input(x: Tensor, channels: int, subsample: int) -> None:
    if x.dim() != 4:
        raise ValueError(f'x must be a 4-D tensor (B, C, H, W), got shape {tuple(x.shape)}')
    if x.shape[1] != channels:
        raise ValueError(f'x must have channels={channels} channels, got {x.shape[1]}')
    if x.shape[2] < subsample or x.shape[3] < subsample:
        raise ValueError(
            f'x spatial size {tuple(x.shape[2:])} must be at least subsample={subsample} in each dimension')


class _PointwiseConv(torch.autograd.Function):
    """A 1x1 convolution of a contiguous (B, C, H, W) tensor as batched matrix products.

    oneDNN, behind ``F.conv2d`` on CPU, converts NCHW tensors to its blocked layout and back around the
    forward pass and both gradients: six full-size copies per 1x1 convolution, more time than the
    products themselves at the block's sizes. These GEMMs read and write NCHW as it is.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        b, c, h, w = x.shape
        w2 = weight.view(weight.shape[0], c).expand(b, -1, -1)
        xf = x.view(b, c, h * w)
        y = torch.bmm(w2, xf) if bias is None else torch.baddbmm(bias.view(1, -1, 1).expand(b, -1, h * w), w2, xf)
        return y.view(b, -1, h, w)

    @staticmethod
    def backward(ctx, grad):  # differentiable torch ops: twice differentiable, as F.conv2d
        x, weight = ctx.saved_tensors
        b, c, h, w = x.shape
        o = weight.shape[0]
        g = grad.reshape(b, o, h * w)
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = torch.bmm(weight.view(o, c).t().expand(b, -1, -1), g).view(b, c, h, w)
        if ctx.needs_input_grad[1]:
            g_w = torch.bmm(g, x.view(b, c, h * w).transpose(1, 2)).sum(0).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g_b = g.sum((0, 2))
        return g_x, g_w, g_b


def _pointwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 ``weight``; by :class:`_PointwiseConv` when training on CPU
    with a contiguous input of the weight's dtype outside autocast, where it is faster."""
    if (x.device.type == 'cpu' and torch.is_grad_enabled() and x.is_contiguous() and x.dtype == weight.dtype
            and not torch.is_autocast_enabled('cpu') and (x.requires_grad or weight.requires_grad)):
        return _PointwiseConv.apply(x, weight, bias)
    return F.conv2d(x, weight, bias)


def _max_pool2x2_indices(x: Tensor) -> tuple[Tensor, Tensor]:
    """``F.max_pool2d(x, 2, return_indices=True)`` from the four strided quarter-planes, without autograd.

    PyTorch's CPU kernel walks every output pixel's window one element at a time and takes about three
    times as long as these vectorised comparisons of whole quarter-planes. Strict comparisons keep the
    first of equal values in row-major order, as the native scan does; with a NaN the native kernel's
    rule (the last NaN) applies, so that case goes to it.
    """
    h, w = x.shape[-2:]
    xc = x[..., :h - h % 2, :w - w % 2]
    p00, p01, p10, p11 = xc[..., 0::2, 0::2], xc[..., 0::2, 1::2], xc[..., 1::2, 0::2], xc[..., 1::2, 1::2]
    top, bottom = torch.maximum(p00, p01), torch.maximum(p10, p11)
    out = torch.maximum(top, bottom)
    if torch.isnan(out.sum()):
        return F.max_pool2d(x, 2, return_indices=True)
    right_top, right_bottom, lower = p01 > p00, p11 > p10, bottom > top
    col = right_top ^ (lower & (right_bottom ^ right_top))
    base = torch.arange(0, h - 1, 2, device=x.device).mul_(w).unsqueeze(1) + torch.arange(0, w - 1, 2, device=x.device)
    return out, lower.long().mul_(w).add_(base).add_(col)


class _MaxPool2x2(torch.autograd.Function):
    """``F.max_pool2d(x, 2)`` by :func:`_max_pool2x2_indices`; equal values, indices and gradient. The
    backward pass scatters into a zero plane, as the native one does."""

    @staticmethod
    def forward(ctx, x):
        out, idx = _max_pool2x2_indices(x)
        ctx.save_for_backward(idx)
        ctx.in_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad):  # differentiable in grad: twice differentiable, as F.max_pool2d
        idx, = ctx.saved_tensors
        b, c, h, w = ctx.in_shape
        return grad.new_zeros(b, c, h * w).scatter_(2, idx.view(b, c, -1), grad.reshape(b, c, -1)).view(b, c, h, w)


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, 'is_compiling', None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


def _quarter_plane_pooling(x: Tensor, subsample: int) -> bool:
    """Whether 2x2 key pooling goes by :func:`_max_pool2x2_indices`: training on CPU with an input whose
    planes are contiguous (the native kernel stays for inference, tracing, compilation and other devices)."""
    return (subsample == 2 and x.device.type == 'cpu' and torch.is_grad_enabled() and x.requires_grad
            and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] and not _is_compiling()
            and not torch.jit.is_tracing())


def _max_pool_keys(x: Tensor, subsample: int) -> Tensor:
    """``F.max_pool2d(x, subsample)``, by :class:`_MaxPool2x2` where :func:`_quarter_plane_pooling` says."""
    if subsample == 1:
        return x
    if _quarter_plane_pooling(x, subsample):
        return _MaxPool2x2.apply(x)
    return F.max_pool2d(x, subsample)


def _shared_kernel(theta: Tensor, phi: Tensor, *, method: str, operator: str, s: Optional[float], n: int,
                   lam: float, kernel: str) -> Tensor:
    """The (B, N, M) kernel all stages reuse on the dense path (the paper's way), or an empty tensor (not
    None: torch.fx traces this call as a leaf, so the caller cannot branch on its result) where each
    stage evaluates its own kernel tiles."""
    if method == 'dense':
        return pide_kernel(theta, phi, operator=operator, s=s, n=n, lam=lam, kernel=kernel)
    return theta.new_zeros(0)


def _shared_rowsum(kern: Tensor, *, operator: str, normalizer: Union[str, float]) -> Tensor:
    """Row sums (B, N) of a shared kernel where the operator or normalizer needs them, else empty."""
    if kern.dim() == 3 and (operator in ('diffusion', 'frac_laplacian') or normalizer == 'rowsum'):
        return kern.sum(2)
    return kern.new_zeros(0)


def _stage_aggregate(theta: Tensor, phi: Tensor, values: Tensor, kern: Optional[Tensor], rowsum: Optional[Tensor],
                     subsample: int, **kw) -> Tensor:
    """One stage's aggregate of ``values`` (B, C, H, W), with keys pooled by ``subsample``: with the shared
    kernel where there is one, else by ``kw['method']``."""
    v_query = values.flatten(2)
    if kw['method'] == 'lowrank' and _quarter_plane_pooling(values, subsample):
        # The keys are entries of the queries: their gradient is added into the queries' in place.
        v_key, index = _max_pool2x2_indices(values.detach())
        return _lowrank_diffusion(theta, phi, v_query, v_key.flatten(2), kw['lam'], kw['normalizer'],
                                  key_index=index.flatten(2)).to(v_query.dtype)
    v_key = _max_pool_keys(values, subsample).flatten(2)
    if kern is not None and kern.dim() == 3:
        return apply_kernel(kern, v_query, v_key, operator=kw['operator'], normalizer=kw['normalizer'],
                            rowsum=rowsum if rowsum.dim() == 2 else None).to(v_query.dtype)
    return nonlocal_aggregate(theta, phi, v_query, v_key, **kw)


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    return value


class PIDEBlock(nn.Module):
    """Multi-stage nonlocal block discretising a PIDE operator.

    With B_0 = X and k = 1..``stages``:  B_k = X + h * ReLU(BN(K_k A(B_{k-1}))),
    where A is the nonlocal aggregate of ``operator`` (see :func:`nonlocal_aggregate`) whose kernel
    omega(theta(X_i), phi(X_j)) is computed once from X, and K_k is a 1x1 convolution.
    Keys (phi(X) and the values at key positions) are max-pooled by ``subsample``.
    The output has the shape of the input.

    Args:
        channels: number of input (= output) channels C.
        operator: ``'diffusion'`` (L, eq. 4.1), ``'frac_laplacian'`` ((-Delta)^s, 4.4),
            ``'inv_frac_laplacian'`` ((-Delta)^-s, 4.5), ``'log'`` ((-Delta)^-1, 4.6) or an alias.
        s: order of the fractional operators (default 1/2, 1/2, n/2).
        n: dimension in the constants c_{n,s}.
        stages: number of stages S (the paper: 2; Table 2: 4).
        h: step size h.
        lam: kernel scaling lambda.
        embed_ratio: width of theta and phi relative to C.
        subsample: max-pool size on the key side (1 = off).
        kernel: ``'dot'`` or ``'gaussian'`` (diffusion only).
        symmetric: use theta on both sides of the kernel (no phi).
        normalizer: ``'key'`` (M, default), ``'query'``, ``'rowsum'`` or a number.
        method: ``'auto'`` (low rank for the dot diffusion kernel, else fused), ``'lowrank'``, ``'fused'``
            (alias ``'tiled'``: query tiles with a hand-written backward, memory linear in N) or ``'dense'``
            (the N x M kernel formed once for all stages, as the paper).
        tile_size: query positions per tile of the fused path (default: automatic, see ``query_tile``).
        norm_layer: normalisation after each K_k.
        act_layer: activation after the normalisation.
        in_channels: alias of ``channels`` for mmcv's plugin builder.
    """

    def __init__(
            self,
            channels: Optional[int] = None,
            operator: str = 'diffusion',
            s: Optional[float] = None,
            n: int = 2,
            stages: int = 2,
            h: float = 0.06,
            lam: float = 0.1,
            embed_ratio: float = 0.5,
            subsample: int = 2,
            kernel: str = 'dot',
            symmetric: bool = False,
            normalizer: Union[str, float, None] = None,
            method: str = 'auto',
            tile_size: Optional[int] = None,
            norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
            *,
            in_channels: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if channels is None:
            channels = in_channels
        elif in_channels is not None and in_channels != channels:
            raise ValueError(f'channels ({channels}) and in_channels ({in_channels}) disagree; pass one of them')
        self.channels = _positive_int('channels', channels)
        self.operator = resolve_operator(operator)
        self.s = check_s(self.operator, s, n)
        self.n = n
        self.stages = _positive_int('stages', stages)
        for name, value in (('h', h), ('lam', lam), ('embed_ratio', embed_ratio)):
            if not isinstance(value, Real) or isinstance(value, bool) or not value > 0:
                raise ValueError(f'{name} must be a positive number, got {value!r}')
        self.h, self.lam = float(h), float(lam)
        self.subsample = _positive_int('subsample', subsample)
        if kernel not in KERNELS:
            raise ValueError(f'kernel must be one of {KERNELS}, got {kernel!r}')
        if kernel != 'dot' and self.operator != 'diffusion':
            raise ValueError(f"kernel={kernel!r} applies to operator 'diffusion' only, got {self.operator!r}")
        self.kernel = kernel
        self.symmetric = bool(symmetric)
        self.normalizer = check_normalizer(normalizer)
        self.method = resolve_method(method, self.operator, kernel)
        self.tile_size = check_tile_size(tile_size)

        dd = dict(device=device, dtype=dtype)
        c = self.channels
        self.embed_channels = max(1, int(round(c * embed_ratio)))
        self.theta = nn.Conv2d(c, self.embed_channels, 1, **dd)
        self.phi = None if self.symmetric else nn.Conv2d(c, self.embed_channels, 1, **dd)
        self.convs = nn.ModuleList([nn.Conv2d(c, c, 1, **dd) for _ in range(self.stages)])
        self.norms = nn.ModuleList([norm_layer(c, **dd) for _ in range(self.stages)])
        self.act = act_layer()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # He-normal convolutions, as the authors' code.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
                nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        s = f', s={self.s}' if self.s is not None else ''
        return (f'channels={self.channels}, operator={self.operator!r}{s}, stages={self.stages}, h={self.h}, '
                f'lam={self.lam}, subsample={self.subsample}, kernel={self.kernel!r}, method={self.method!r}')

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Query and (pooled) key embeddings, (B, E, N) and (B, E, M)."""
        if self.phi is None:
            theta = phi = _pointwise_conv(x, self.theta.weight, self.theta.bias)
        else:
            # theta and phi as one 1x1 convolution: x is read once, in the forward and the backward pass.
            weight = torch.cat((self.theta.weight, self.phi.weight))
            bias = torch.cat((self.theta.bias, self.phi.bias))
            theta, phi = _pointwise_conv(x, weight, bias).split(self.embed_channels, 1)
        return theta.flatten(2), _max_pool_keys(phi, self.subsample).flatten(2)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.channels, self.subsample)
        theta, phi = self.embed(x)
        kernel_kw = dict(operator=self.operator, s=self.s, n=self.n, lam=self.lam, kernel=self.kernel)
        kern = rowsum = None
        if self.method != 'lowrank':
            # The dense path forms the kernel once from X for every stage; the fused path, per stage.
            kern = _shared_kernel(theta, phi, method=self.method, **kernel_kw)
            rowsum = _shared_rowsum(kern, operator=self.operator, normalizer=self.normalizer)
        out = x
        for conv, norm in zip(self.convs, self.norms):
            agg = _stage_aggregate(theta, phi, out, kern, rowsum, self.subsample, normalizer=self.normalizer,
                                   method=self.method, tile_size=self.tile_size, **kernel_kw)
            out = torch.add(x, self.act(norm(_pointwise_conv(agg.view_as(x), conv.weight, conv.bias))), alpha=self.h)
        return out
