"""The PIDE nonlocal block (Bohn, Griebel & Kannan 2021, Section 4.2-4.4, Figure 3).

One module serves as a plain ``nn.Module``, as timm's ``attn_layer`` (``cls(channels, **kwargs)``)
and as an mmcv/mmseg plugin (``cls(in_channels=..., **cfg)``).
"""
from __future__ import annotations

import warnings
from numbers import Real
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._block_state import (
    PAPER_WIDTHS,
    RECORDED,
    _warned_forms,  # noqa: F401  (tests reset it)
    check_loaded,
    record_settings,
    reduced_width,
    settings,
)
from .fast_paths import pointwise_conv
from .ops import (
    bind_kernel,
    check_compile_tiles,
    check_normalizer,
    check_tile_size,
    embed_scale_for,
    nonlocal_aggregate,
    pide_kernel,
    resolve_method,
)

__all__ = ['PIDEBlock', 'PAPER_WIDTHS', 'RECORDED']

# Leaves for torch.fx: shape-dependent Python (validation, tiling, the CPU path choice) stays out of graphs.
torch.fx.wrap('_check_input')
torch.fx.wrap('pointwise_conv')
torch.fx.wrap('pide_kernel')
torch.fx.wrap('nonlocal_aggregate')

def _check_input(x: Tensor, channels: int, subsample: int) -> None:
    if x.dim() != 4:
        raise ValueError(f'x must be a 4-D tensor (B, C, H, W), got shape {tuple(x.shape)}')
    if x.shape[1] != channels:
        raise ValueError(f'x must have channels={channels} channels, got {x.shape[1]}')
    if x.shape[2] < subsample or x.shape[3] < subsample:
        raise ValueError(
            f'x spatial size {tuple(x.shape[2:])} must be at least subsample={subsample} in each dimension')


def _positive(name: str, value, kind: type = Real):
    if not isinstance(value, kind) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive {'int' if kind is int else 'number'}, got {value!r}")
    return value


def _embed_width(channels: int, embed_ratio, rd_ratio, rd_channels, rd_divisor) -> int:
    if embed_ratio is not None:
        warnings.warn('PIDEBlock: embed_ratio is deprecated and will be removed in pide_zoo 0.4; use rd_ratio '
                      '(with rd_divisor=1 for the same width)', FutureWarning, stacklevel=3)
        return reduced_width(channels, _positive('embed_ratio', embed_ratio), 1)
    if rd_channels is not None:
        return _positive('rd_channels', rd_channels, int)
    return reduced_width(channels, _positive('rd_ratio', rd_ratio), _positive('rd_divisor', rd_divisor, int))


def _value_width(channels: int, value_ratio, value_channels, rd_divisor) -> int:
    if value_channels is not None:
        if _positive('value_channels', value_channels, int) > channels:
            raise ValueError(f'value_channels must be at most channels={channels}, got {value_channels}')
        return value_channels
    if value_ratio is None:
        return channels
    if not 0 < _positive('value_ratio', value_ratio) <= 1:
        raise ValueError(f'value_ratio must lie in (0, 1] (None: full width), got {value_ratio!r}')
    return min(channels, reduced_width(channels, value_ratio, rd_divisor))


class PIDEBlock(nn.Module):
    """Multi-stage nonlocal block discretising a PIDE operator.

    With B_0 = X and k = 1..``stages``:  B_k = X + h * ReLU(BN(K_k A(P B_{k-1}))), and the output
    X + gamma * (B_S - X), where A is the nonlocal aggregate of ``operator`` (see :func:`nonlocal_aggregate`) whose
    kernel omega(theta(X_i), phi(X_j)) is computed once from X, P a bias-free 1x1 projection to ``value_channels``
    shared by the stages (none at full width), K_k a 1x1 convolution back to C and gamma a per-channel scale of
    the block's update (timm's layer scale; none with ``ls_init_value=None``). Keys (phi(X) and the values at key
    positions) are max-pooled by ``subsample``. The output has the shape of the input.

    The defaults are those of a block mixed into another network, at the cost of timm's ``NonLocalAttn``:
    theta and phi at C/8 (``rd_ratio``, ``rd_divisor`` as timm's attention layers), values aggregated at
    C/16, and a zero-initialised update scale, so a fresh block is the identity (in training and inference
    mode): at step 0 only gamma has a gradient, after one step every parameter has one. The paper's block
    (and every PIDEBlock before pide_zoo 0.3) has theta and phi at C/2, full-width values and no scale:
    ``PIDEBlock(C, **PAPER_WIDTHS)``, i.e. ``rd_ratio=0.5, rd_divisor=1, value_ratio=None,
    ls_init_value=None``; the paper's networks, ``PIDEHead`` (with a zero update scale) and the long-range
    demos build theirs so.

    Args:
        channels: number of input (= output) channels C.
        operator: ``'diffusion'`` (L, eq. 4.1), ``'frac_laplacian'`` ((-Delta)^s, 4.4),
            ``'inv_frac_laplacian'`` ((-Delta)^-s, 4.5), ``'log'`` ((-Delta)^-1, 4.6), an alias, or an operator
            added with :func:`~pide_zoo.layers.register_operator`.
        s: order of the fractional operators (default 1/2, 1/2, n/2).
        n: dimension in the constants c_{n,s}.
        stages: number of stages S (the paper: 2; Table 2: 4).
        h: step size h.
        lam: kernel scaling lambda.
        embed_ratio: deprecated spelling of ``rd_ratio`` with ``rd_divisor=1`` (removed in pide_zoo 0.4).
        subsample: max-pool size on the key side (1 = off).
        kernel: ``'dot'`` or ``'embedded_gaussian'`` (diffusion only; ``'gaussian'``, its former name, is
            deprecated).
        kernel_params: the operator's own parameters, for a registered operator (e.g. a time or a bandwidth).
        symmetric: use theta on both sides of the kernel (no phi).
        normalizer: ``'key'`` (M, default), ``'query'``, ``'rowsum'`` or a number.
        method: ``'auto'`` (low rank for the dot diffusion kernel, else fused), ``'lowrank'``, ``'fused'``
            (alias ``'tiled'``: query tiles with a hand-written backward, memory linear in N) or ``'dense'``
            (the N x M kernel formed once for all stages, as the paper).
        tile_size: query positions per tile of the fused path (default: automatic, see ``query_tile``).
        kernel_scale: ``'width'`` (default): distances in units of tau sqrt(E) and the gaussian kernel's dot
            product over sqrt(E) (see :func:`~pide_zoo.layers.pide_ops.width_scale`), so every operator's
            signal stays above batch norm's eps at any width and the block learns; ``'paper'``: the paper's
            exact kernel (Tables 1-4; the fractional Laplacian's signal vanishes as E grows); or a number
            sigma, the kernel evaluated at theta / sigma, phi / sigma.
        norm_layer: normalisation after each K_k.
        act_layer: activation after the normalisation.
        rd_ratio: width E of theta and phi relative to C (default 1/8), rounded by timm's ``make_divisible``
            to a multiple of ``rd_divisor`` (default 8; 1: rounded to the nearest integer).
        rd_channels: E itself (overrides ``rd_ratio``).
        value_ratio: width of the aggregated values relative to C (default 1/16, rounded as E); None: the
            values at full width with no projection (the paper's form).
        value_channels: that width itself (overrides ``value_ratio``; ``channels``: full width).
        ls_init_value: initial value of the per-channel update scale gamma (default 0: the block starts as the
            identity); None: no scale (the paper's form).
        compile_tiles: the fused path's tiles of a distance kernel with their elementwise work under
            ``torch.compile`` (opt-in; see :func:`nonlocal_aggregate`).
        in_channels: alias of ``channels`` for mmcv's plugin builder.
    """

    # 4: the value width recorded too; 3: the block's settings recorded in the state dict's metadata (2: the kernel
    # form only; 1: release 0.1, the paper's form).
    _version = 4

    def __init__(
            self,
            channels: Optional[int] = None,
            operator: str = 'diffusion',
            s: Optional[float] = None,
            n: int = 2,
            stages: int = 2,
            h: float = 0.06,
            lam: float = 0.1,
            embed_ratio: Optional[float] = None,
            subsample: int = 2,
            kernel: str = 'dot',
            kernel_params: Optional[dict] = None,
            symmetric: bool = False,
            normalizer: Union[str, float, None] = None,
            method: str = 'auto',
            tile_size: Optional[int] = None,
            kernel_scale: Union[str, float] = 'width',
            norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
            *,
            rd_ratio: float = 1 / 8,
            rd_channels: Optional[int] = None,
            rd_divisor: int = 8,
            value_ratio: Optional[float] = 1 / 16,
            value_channels: Optional[int] = None,
            ls_init_value: Optional[float] = 0.0,
            compile_tiles: bool = False,
            in_channels: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if channels is None:
            channels = in_channels
        elif in_channels is not None and in_channels != channels:
            raise ValueError(f'channels ({channels}) and in_channels ({in_channels}) disagree; pass one of them')
        self.channels = _positive('channels', channels, int)
        bound = bind_kernel(operator, s, n, 1.0, kernel, 1.0, kernel_params)  # the arguments' one check
        self.operator, self.s, self.kernel = bound.operator, bound.s, bound.kernel
        self.kernel_params = dict(bound.params)
        self.n = n
        self.stages = _positive('stages', stages, int)
        self.h, self.lam = float(_positive('h', h)), float(_positive('lam', lam))
        self.subsample = _positive('subsample', subsample, int)
        self.symmetric = bool(symmetric)
        self.normalizer = check_normalizer(normalizer)
        self.method = resolve_method(method, self.operator, self.kernel)
        self.tile_size = check_tile_size(tile_size)
        self.compile_tiles = check_compile_tiles(compile_tiles, self.method, bound.distance)
        self.embed_channels = _embed_width(self.channels, embed_ratio, rd_ratio, rd_channels, rd_divisor)
        self.value_channels = _value_width(self.channels, value_ratio, value_channels, rd_divisor)
        self.kernel_scale = kernel_scale
        self.embed_scale = embed_scale_for(kernel_scale, self.operator, self.kernel, self.embed_channels)
        self._needs_rowsum = bound.op.needs_rowsum(self.normalizer)

        dd = dict(device=device, dtype=dtype)
        c = self.channels
        self.theta = nn.Conv2d(c, self.embed_channels, 1, **dd)
        self.phi = None if self.symmetric else nn.Conv2d(c, self.embed_channels, 1, **dd)
        v = self.value_channels
        # Values in a reduced space: the aggregate is linear and per channel, so it commutes with this projection.
        self.value_proj = nn.Conv2d(c, v, 1, bias=False, **dd) if v < c else None
        self.convs = nn.ModuleList([nn.Conv2d(v, c, 1, **dd) for _ in range(self.stages)])
        self.norms = nn.ModuleList([norm_layer(c, **dd) for _ in range(self.stages)])
        self.act = act_layer()
        self.ls_init_value = ls_init_value
        # The block's update B_S - X scaled per channel (timm's layer scale); zero at the start makes the block the
        # identity, and after one step every parameter has a gradient (a zero last batch norm would stay stuck).
        self.gamma = None if ls_init_value is None else nn.Parameter(torch.empty(c, **dd))
        self.register_state_dict_post_hook(record_settings)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # He-normal convolutions, as the authors' code.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.gamma is not None:
            nn.init.constant_(self.gamma, self.ls_init_value)

    def extra_repr(self) -> str:
        s = f', s={self.s}' if self.s is not None else ''
        return (f'channels={self.channels}, operator={self.operator!r}{s}, stages={self.stages}, h={self.h}, '
                f'embed_channels={self.embed_channels}, value_channels={self.value_channels}, '
                f'lam={self.lam}, subsample={self.subsample}, kernel={self.kernel!r}, method={self.method!r}, '
                f'kernel_scale={self.kernel_scale!r}')

    def _pool(self, t: Tensor) -> Tensor:
        return F.max_pool2d(t, self.subsample) if self.subsample > 1 else t

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Query and (pooled) key embeddings, (B, E, N) and (B, E, M)."""
        if self.phi is None:
            theta = phi = pointwise_conv(x, self.theta.weight, self.theta.bias)
        else:
            # theta and phi as one 1x1 convolution: x is read once, in the forward and the backward pass.
            weight = torch.cat((self.theta.weight, self.phi.weight))
            bias = torch.cat((self.theta.bias, self.phi.bias))
            theta, phi = pointwise_conv(x, weight, bias).split(self.embed_channels, 1)
        return theta.flatten(2), self._pool(phi).flatten(2)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.channels, self.subsample)
        theta, phi = self.embed(x)
        kw = dict(operator=self.operator, s=self.s, n=self.n, lam=self.lam, kernel=self.kernel,
                  embed_scale=self.embed_scale, kernel_params=self.kernel_params)
        kern = rowsum = None
        if self.method == 'dense':  # the kernel and its row sums once from X for every stage, as the paper
            kern = pide_kernel(theta, phi, **kw)
            if self._needs_rowsum:
                rowsum = kern.sum(2)
        out = x
        for k, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            v = out if self.value_proj is None else pointwise_conv(out, self.value_proj.weight, None)
            agg = nonlocal_aggregate(theta, phi, v.flatten(2), self._pool(v).flatten(2), **kw,
                                     normalizer=self.normalizer, method=self.method, tile_size=self.tile_size,
                                     kernel_matrix=kern, rowsum=rowsum, compile_tiles=self.compile_tiles)
            update = self.act(norm(pointwise_conv(agg.view_as(v), conv.weight, conv.bias)))
            if self.gamma is not None and k == self.stages - 1:
                update = update * self.gamma.view(1, -1, 1, 1)
            out = torch.add(x, update, alpha=self.h)
        return out

    def settings(self) -> dict:
        """What the block's outputs depend on beyond its weights, as its state dict's metadata records it."""
        return settings(self)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        check_loaded(self, state_dict, prefix, local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
