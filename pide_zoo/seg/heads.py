"""PIDE nonlocal blocks as an mmseg decode head, in place of the NonLocal head (``NLHead``)."""
from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmseg.models.decode_heads.fcn_head import FCNHead
from mmseg.registry import MODELS
from torch import Tensor, nn

from ..layers.block_cfg import check_block_cfg
from ..layers.nonlocal_block import PAPER_WIDTHS, PIDEBlock

__all__ = ['PIDEHead']

# PIDEBlock arguments PIDEHead took directly before 0.3.
_BLOCK_ARGS = ('operator', 's', 'n', 'stages', 'h', 'lam', 'embed_ratio', 'subsample', 'kernel', 'kernel_params',
               'symmetric', 'normalizer', 'method', 'tile_size', 'kernel_scale')


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
        block_cfg: :class:`PIDEBlock` arguments (``operator``, ``s``, ``stages``, ``h``, ``lam``, ``subsample``,
            ``kernel``, ``kernel_params``, ``normalizer``, ``method``, ``kernel_scale``, ...), e.g.
            ``dict(operator='frac_laplacian', subsample=2)``; unset keys take the paper's widths (``PAPER_WIDTHS``:
            embeddings at half the width, full-width values) with a zero-initialised update scale, so the fresh head
            is NLHead's cost and starts with the identity in the block's place, and otherwise the block's defaults
            (diffusion, ``kernel_scale='width'``, keys pooled by 2); its norm and activation the head's
            ``norm_cfg``/``act_cfg``.
        **kwargs: :class:`~mmseg.models.decode_heads.FCNHead` arguments (``in_channels``, ``channels``,
            ``num_classes``, ``concat_input``, ``norm_cfg``, ``act_cfg``, ...; ``num_convs`` is 2). The block's
            arguments given here directly (``operator=...``, the spelling before 0.3) still work, with a
            FutureWarning; they are removed in pide_zoo 0.4.

    Examples:
        >>> import torch
        >>> from pide_zoo.seg.heads import PIDEHead
        >>> head = PIDEHead(in_channels=64, channels=16, num_classes=19, norm_cfg=dict(type='BN'),
        ...                 block_cfg=dict(operator='frac_laplacian', subsample=2))
        >>> head.pide_block.operator, head.pide_block.s, head.pide_block.subsample
        ('frac_laplacian', 0.5, 2)
        >>> head([torch.rand(2, 64, 32, 64)]).shape
        torch.Size([2, 19, 32, 64])
    """

    def __init__(self, block_cfg: Optional[Dict[str, Any]] = None, **kwargs: Any):
        old = {k: kwargs.pop(k) for k in list(kwargs) if k in _BLOCK_ARGS}
        if old:
            if block_cfg is not None:
                raise ValueError(f'PIDEHead: got block_cfg and the block arguments {sorted(old)}; move them into '
                                 'block_cfg')
            warnings.warn(f'PIDEHead: the block arguments {sorted(old)} are deprecated and will be removed in '
                          f'pide_zoo 0.4; pass them as block_cfg=dict({", ".join(f"{k}=..." for k in old)})',
                          FutureWarning, stacklevel=2)
            block_cfg = old
        # The head's block keeps the paper's widths (NLHead's cost) and starts as the identity, as NLHead's.
        cfg = {**PAPER_WIDTHS, 'ls_init_value': 0.0, **check_block_cfg(block_cfg, 'PIDEHead')}
        for key in ('norm_layer', 'act_layer'):
            if key in cfg:
                raise ValueError(f"PIDEHead: block_cfg must not set {key!r}; the head's norm_cfg and act_cfg give them")
        super().__init__(num_convs=2, **kwargs)
        norm_layer: Callable[..., nn.Module] = partial(_build_norm, self.norm_cfg) if self.norm_cfg else nn.Identity
        act_layer: Callable[..., nn.Module] = (
            partial(build_activation_layer, self.act_cfg) if self.act_cfg else nn.Identity)
        self.pide_block = PIDEBlock(self.channels, norm_layer=norm_layer, act_layer=act_layer, **cfg)

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
