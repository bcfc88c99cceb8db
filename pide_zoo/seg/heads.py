"""PIDE nonlocal blocks as an mmseg decode head, in place of the NonLocal head (``NLHead``)."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmseg.models.decode_heads.fcn_head import FCNHead
from mmseg.registry import MODELS
from torch import Tensor, nn

from ..layers.nonlocal_block import PIDEBlock

__all__ = ['PIDEHead']


def _build_norm(norm_cfg: Dict[str, Any], num_features: int, device=None, dtype=None) -> nn.Module:
    # PIDEBlock builds its layers with device/dtype (timm's layer convention); mmcv's builder has neither.
    layer = build_norm_layer(norm_cfg, num_features)[1]
    return layer if device is None and dtype is None else layer.to(device=device, dtype=dtype)


@MODELS.register_module()
class PIDEHead(FCNHead):
    """PIDE nonlocal head: mmseg's ``NLHead`` with its non-local block replaced by a :class:`PIDEBlock`.

    conv (3x3, ``in_channels`` -> ``channels``) -> ``PIDEBlock(channels)`` -> conv (3x3) -> optional concat
    with the input and a 3x3 conv (``concat_input``) -> classifier. The block applies ``stages`` steps of
    B_k = X + h * act(norm(K_k A(B_{k-1}))) with the nonlocal aggregate A of ``operator`` (Bohn, Griebel &
    Kannan 2021, Section 4). Its norm and activation come from the head's ``norm_cfg`` and ``act_cfg``
    (none where the cfg is None); its convolutions keep the block's He initialisation.

    Args:
        operator: ``'diffusion'`` (L, eq. 4.1), ``'frac_laplacian'`` ((-Delta)^s, 4.4),
            ``'inv_frac_laplacian'`` ((-Delta)^-s, 4.5), ``'log'`` ((-Delta)^-1, 4.6) or an alias.
        s: order s of the fractional operators (None: the paper's 1/2, 1/2, n/2).
        n: dimension n in the constants c_{n,s}.
        stages: number of stages S.
        h: step size h.
        lam: kernel scaling lambda.
        embed_ratio: width of the theta/phi embeddings relative to ``channels``.
        subsample: max-pool size on the key side (1 = off).
        kernel: ``'dot'`` or ``'embedded_gaussian'`` (diffusion only).
        kernel_params: a registered operator's own parameters (see :func:`~pide_zoo.layers.register_operator`).
        symmetric: theta on both sides of the kernel (no phi).
        normalizer: ``'key'`` (None), ``'query'``, ``'rowsum'`` or a number.
        method: evaluation path of the aggregate (``'auto'``; see :class:`PIDEBlock`).
        tile_size: query positions per tile of the tiled (fused) path.
        kernel_scale: ``'width'`` (the kernel's argument per embedding width, so every operator learns at
            any ``channels``), ``'paper'`` (the paper's exact kernel) or a number (see :class:`PIDEBlock`).
        **kwargs: :class:`~mmseg.models.decode_heads.FCNHead` arguments (``in_channels``, ``channels``,
            ``num_classes``, ``concat_input``, ``norm_cfg``, ``act_cfg``, ...; ``num_convs`` is 2).

    Examples:
        >>> import torch
        >>> from pide_zoo.seg.heads import PIDEHead
        >>> head = PIDEHead(in_channels=64, channels=16, num_classes=19, operator='frac_laplacian',
        ...                 subsample=2, norm_cfg=dict(type='BN'))
        >>> head.pide_block.operator, head.pide_block.s, head.pide_block.subsample
        ('frac_laplacian', 0.5, 2)
        >>> head([torch.rand(2, 64, 32, 64)]).shape
        torch.Size([2, 19, 32, 64])
    """

    def __init__(
            self,
            operator: str = 'diffusion',
            s: Optional[float] = None,
            n: int = 2,
            stages: int = 2,
            h: float = 0.06,
            lam: float = 0.1,
            embed_ratio: float = 0.5,
            subsample: int = 2,
            kernel: str = 'dot',
            kernel_params: Optional[Dict[str, Any]] = None,
            symmetric: bool = False,
            normalizer: Union[str, float, None] = None,
            method: str = 'auto',
            tile_size: Optional[int] = None,
            kernel_scale: Union[str, float] = 'width',
            **kwargs: Any,
    ):
        super().__init__(num_convs=2, **kwargs)
        norm_layer: Callable[..., nn.Module] = partial(_build_norm, self.norm_cfg) if self.norm_cfg else nn.Identity
        act_layer: Callable[..., nn.Module] = (
            partial(build_activation_layer, self.act_cfg) if self.act_cfg else nn.Identity)
        self.pide_block = PIDEBlock(
            self.channels, operator=operator, s=s, n=n, stages=stages, h=h, lam=lam, embed_ratio=embed_ratio,
            subsample=subsample, kernel=kernel, kernel_params=kernel_params, symmetric=symmetric,
            normalizer=normalizer, method=method,
            tile_size=tile_size, kernel_scale=kernel_scale, norm_layer=norm_layer, act_layer=act_layer)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        x = self._transform_inputs(inputs)
        if isinstance(self.in_channels, int) and x.shape[1] != self.in_channels:
            # torch's conv error would name neither the head nor the config key to change
            raise ValueError(
                f'{type(self).__name__} has in_channels={self.in_channels} but its input (in_index={self.in_index}) '
                f'has {x.shape[1]} channels: set decode_head.in_channels={x.shape[1]} (the backbone\'s width)')
        output = self.convs[0](x)
        output = self.pide_block(output)
        output = self.convs[1](output)
        if self.concat_input:
            output = self.conv_cat(torch.cat([x, output], dim=1))
        return self.cls_seg(output)
