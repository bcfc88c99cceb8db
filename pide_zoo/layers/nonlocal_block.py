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

from .fast_paths import pointwise_conv
from .ops import (
    bind_kernel,
    check_normalizer,
    check_tile_size,
    embed_scale_for,
    nonlocal_aggregate,
    pide_kernel,
    resolve_method,
)

__all__ = ['PIDEBlock']

# Leaves for torch.fx: shape-dependent Python (validation, tiling, the CPU path choice) stays out of graphs.
torch.fx.wrap('_check_input')
torch.fx.wrap('pointwise_conv')
torch.fx.wrap('pide_kernel')
torch.fx.wrap('nonlocal_aggregate')

_warned_forms: set = set()


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
            ``'inv_frac_laplacian'`` ((-Delta)^-s, 4.5), ``'log'`` ((-Delta)^-1, 4.6), an alias, or an operator
            added with :func:`~pide_zoo.layers.register_operator`.
        s: order of the fractional operators (default 1/2, 1/2, n/2).
        n: dimension in the constants c_{n,s}.
        stages: number of stages S (the paper: 2; Table 2: 4).
        h: step size h.
        lam: kernel scaling lambda.
        embed_ratio: width of theta and phi relative to C.
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
        in_channels: alias of ``channels`` for mmcv's plugin builder.
    """

    # 3: the block's settings are recorded in the state dict's metadata (2: the kernel form only; 1: release 0.1,
    # the paper's form).
    _version = 3

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
            kernel_params: Optional[dict] = None,
            symmetric: bool = False,
            normalizer: Union[str, float, None] = None,
            method: str = 'auto',
            tile_size: Optional[int] = None,
            kernel_scale: Union[str, float] = 'width',
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
        self.embed_channels = max(1, int(round(self.channels * _positive('embed_ratio', embed_ratio))))
        self.kernel_scale = kernel_scale
        self.embed_scale = embed_scale_for(kernel_scale, self.operator, self.kernel, self.embed_channels)
        self._needs_rowsum = bound.op.needs_rowsum(self.normalizer)

        dd = dict(device=device, dtype=dtype)
        c = self.channels
        self.theta = nn.Conv2d(c, self.embed_channels, 1, **dd)
        self.phi = None if self.symmetric else nn.Conv2d(c, self.embed_channels, 1, **dd)
        self.convs = nn.ModuleList([nn.Conv2d(c, c, 1, **dd) for _ in range(self.stages)])
        self.norms = nn.ModuleList([norm_layer(c, **dd) for _ in range(self.stages)])
        self.act = act_layer()
        self.register_state_dict_post_hook(_record_settings)
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
        for conv, norm in zip(self.convs, self.norms):
            agg = nonlocal_aggregate(theta, phi, out.flatten(2), self._pool(out).flatten(2), **kw,
                                     normalizer=self.normalizer, method=self.method, tile_size=self.tile_size,
                                     kernel_matrix=kern, rowsum=rowsum)
            out = torch.add(x, self.act(norm(pointwise_conv(agg.view_as(x), conv.weight, conv.bias))), alpha=self.h)
        return out

    def settings(self) -> dict:
        """What the block's outputs depend on beyond its weights, as its state dict's metadata records it."""
        out = {k: getattr(self, k) for k in RECORDED}
        bn = next((m for m in self.norms if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
        if bn is not None:
            out.update(bn_eps=float(bn.eps), bn_momentum=None if bn.momentum is None else float(bn.momentum))
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        version = local_metadata.get('version')
        where = prefix[:-1] or 'PIDEBlock'
        if version is not None and version >= 3:
            ours = self.settings()
            # kernel_scale names the form; embed_scale is what the outputs depend on ('width' is 'paper' for some).
            # The batch norm is recorded, and compared by the paper's networks, which own it (one warning).
            diffs = [(k, local_metadata[k], ours[k]) for k in RECORDED if k in local_metadata and k != 'kernel_scale'
                     and not _same(local_metadata[k], ours[k])]
            if any(k == 'embed_scale' for k, _, _ in diffs):
                diffs.insert(0, ('kernel_scale', local_metadata.get('kernel_scale'), ours['kernel_scale']))
            key = repr(diffs)  # kernel_params are dicts: not hashable
            if diffs and key not in _warned_forms:  # shapes that differ fail in torch's loader, as ever
                _warned_forms.add(key)
                warnings.warn(
                    f'{where}: this state dict was saved from a block with '
                    f'{", ".join(f"{k}={a!r}" for k, a, _ in diffs)}, but this block has '
                    f'{", ".join(f"{k}={b!r}" for k, _, b in diffs)}; build it with the saved settings (its '
                    f'block_cfg) to get the outputs it was trained for', UserWarning, stacklevel=2)
        else:
            self._check_kernel_form(version, where, local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def _check_kernel_form(self, version, where: str, local_metadata: dict) -> None:
        # Release 0.1 computed the paper's kernel; 0.2 recorded the kernel form only; metadata-free state dicts
        # (timm's loaders strip it) say nothing.
        trained = 1.0 if version == 1 else local_metadata.get('embed_scale')
        if trained is None or abs(trained - self.embed_scale) <= 1e-6 * self.embed_scale:
            return
        form = 'paper' if version == 1 else local_metadata.get('kernel_scale')
        key = (self.operator, trained, self.embed_scale)
        if key in _warned_forms:
            return
        _warned_forms.add(key)
        if form == self.kernel_scale:  # same form, other scale: the operator or the width differ (0.2 did not say)
            advice = ('the operator or the embedding width differ from those it was saved with (pide_zoo 0.2 '
                      'recorded neither); build the block as it was saved')
        else:
            advice = f'pass kernel_scale={form!r} to the block (its block_cfg) to get the outputs it was trained for'
        warnings.warn(
            f'{where}: this state dict was trained with kernel_scale={form!r} (embed_scale {trained:g}'
            f'{", pide_zoo 0.1" if version == 1 else ""}) but the block computes kernel_scale={self.kernel_scale!r} '
            f'(embed_scale {self.embed_scale:g}); {advice}', UserWarning, stacklevel=3)


# The settings a state dict records (besides the batch norm's eps and momentum).
RECORDED = ('operator', 's', 'n', 'lam', 'kernel', 'kernel_params', 'kernel_scale', 'embed_scale', 'channels',
            'embed_channels', 'stages', 'subsample', 'normalizer', 'symmetric', 'h')


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * max(abs(a), abs(b))
    return a == b


def _record_settings(module: PIDEBlock, state_dict, prefix: str, local_metadata: dict) -> None:
    local_metadata.update(module.settings())
