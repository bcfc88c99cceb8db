"""Insert PIDE nonlocal blocks into any timm model that exposes ``feature_info``, without editing its code."""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from ..layers.nonlocal_block import PIDEBlock

__all__ = ['insert_pide_blocks']


class _ApplyBlock:
    """Forward hook replacing a module's output by ``block(output)``; a class so models stay picklable."""

    def __init__(self, owner: nn.Module, key: str):
        self.owner, self.key = owner, key

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return self.owner.pide_blocks[self.key](output)


def insert_pide_blocks(model: nn.Module, indices: Sequence[int] = (-1,), **block_kwargs) -> nn.Module:
    """Apply a :class:`PIDEBlock` to the output of the feature stages ``indices`` of ``model``.

    The blocks are registered as ``model.pide_blocks[str(index)]`` (existing parameter names and
    pretrained weights are untouched) and run through forward hooks on the stage modules named by
    ``model.feature_info``. ``block_kwargs`` go to :class:`PIDEBlock` (``operator``, ``subsample``, ...).
    Returns ``model`` for chaining.
    """
    from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet

    if isinstance(model, (FeatureDictNet, FeatureHookNet, FeatureGetterNet)):
        raise ValueError(f'insert_pide_blocks: {type(model).__name__} is a features_only model, whose forward runs '
                         'every child module in turn; insert the blocks into the full model and take its features '
                         'with forward_intermediates(), or build features_only=True from a registered factory')
    if getattr(model, 'num_prefix_tokens', None) is not None or hasattr(model, 'patch_embed'):
        raise ValueError(f'insert_pide_blocks: {type(model).__name__} is a token model: its stages output '
                         '(B, tokens, C) sequences, not the (B, C, H, W) maps a PIDE block integrates over; '
                         'insert blocks into convolutional stages (ResNet, ConvNeXt, EfficientNet, MobileNet, ...)')
    info = getattr(model, 'feature_info', None)
    if not info:
        raise ValueError(f'model must expose feature_info (timm models do); {type(model).__name__} has none')
    info = list(info.info) if hasattr(info, 'info') else list(info)
    if hasattr(model, 'pide_blocks'):
        raise ValueError('model already has pide_blocks; insert all blocks in one call')
    model.pide_blocks = nn.ModuleDict()
    for index in indices:
        if not -len(info) <= index < len(info):
            raise ValueError(f'indices must lie in [-{len(info)}, {len(info)}) for this model, got {index}')
        entry = info[index]
        key = str(index % len(info))
        param = next(model.parameters(), None)
        model.pide_blocks[key] = PIDEBlock(entry['num_chs'], device=param.device if param is not None else None,
                                           dtype=param.dtype if param is not None else None, **block_kwargs)
        model.get_submodule(entry['module']).register_forward_hook(_ApplyBlock(model, key))
    return model
