"""PIDE blocks after any backbone."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn

from ..layers.block_cfg import check_block_cfg
from ..layers.nonlocal_block import PIDEBlock

__all__ = ['PIDENeck']


@MODELS.register_module()
class PIDENeck(BaseModule):
    """Apply a :class:`PIDEBlock` to chosen backbone outputs, pass the others through.

    Args:
        in_channels: channels of every backbone output.
        indices: which outputs get a nonlocal block (default: all).
        block_cfg: :class:`PIDEBlock` arguments shared by the blocks (``operator``, ``subsample``, ...), as in
            the backbone ``PIDEHamiltonianNet``; unset keys take the block's defaults (None: all of them).
        init_cfg: mmengine initialisation config.
    """

    def __init__(self, in_channels: Sequence[int], indices: Optional[Sequence[int]] = None,
                 block_cfg: Optional[Dict[str, Any]] = None, init_cfg: Optional[Dict[str, Any]] = None):
        super().__init__(init_cfg)
        self.in_channels = list(in_channels)
        indices = range(len(self.in_channels)) if indices is None else indices
        for i in indices:
            if not isinstance(i, int) or not 0 <= i < len(self.in_channels):
                raise ValueError(f'indices must lie in [0, {len(self.in_channels)}) (one per input), got {i!r}')
        block_cfg = check_block_cfg(block_cfg, 'PIDENeck')
        self.blocks = nn.ModuleDict({str(i): PIDEBlock(self.in_channels[i], **block_cfg) for i in indices})

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f'expected {len(self.in_channels)} inputs (in_channels), got {len(inputs)}')
        return tuple(self.blocks[str(i)](x) if str(i) in self.blocks else x for i, x in enumerate(inputs))
