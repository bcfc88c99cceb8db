"""The Hamiltonian network as an mmseg backbone (no pooling by default, Section 4.6 of the paper)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor

from ..layers.nonlocal_block import PIDEBlock
from ..models.hamiltonian_net import HamiltonianNet

__all__ = ['PIDEHamiltonianNet']

# Usable in mmseg ResNet's plugins=[dict(cfg=dict(type='PIDEBlock', ...), position='after_conv3')].
MODELS.register_module(module=PIDEBlock)


@MODELS.register_module()
class PIDEHamiltonianNet(BaseModule):
    """Hamiltonian-74 (optionally nonlocal) returning the outputs of the Units in ``out_indices``.

    The same :class:`~pide_zoo.models.HamiltonianNet` as the timm models, without its head.

    Args:
        in_channels: image channels.
        depths, widths, h: Units of the network (Hamiltonian-74: (6, 6, 6), (32, 64, 112), 0.06).
        downsample: average-pool between Units (the paper's segmentation network does not).
        nonlocal_operator: PIDE operator of the nonlocal blocks, or None.
        nonlocal_units, nonlocal_after, nonlocal_stages, nonlocal_subsample: placement and shape of
            the nonlocal blocks (the paper: every Unit, after block 2, 2 stages, pool 3 for BDD100K).
        nonlocal_cfg: further :class:`PIDEBlock` arguments.
        reversible: reversible back-propagation through the Hamiltonian blocks.
        out_indices: Units whose outputs are returned.
        init_cfg: mmengine initialisation config (default: the He-normal init of the blocks).
    """

    def __init__(
            self,
            in_channels: int = 3,
            depths: Sequence[int] = (6, 6, 6),
            widths: Sequence[int] = (32, 64, 112),
            h: float = 0.06,
            downsample: bool = False,
            nonlocal_operator: Optional[str] = None,
            nonlocal_units: Sequence[int] = (0, 1, 2),
            nonlocal_after: int = 2,
            nonlocal_stages: int = 2,
            nonlocal_subsample: int = 3,
            nonlocal_cfg: Optional[Dict[str, Any]] = None,
            reversible: bool = False,
            out_indices: Sequence[int] = (2,),
            init_cfg: Optional[Dict[str, Any]] = None,
    ):
        super().__init__(init_cfg)
        for i in out_indices:
            if not isinstance(i, int) or not 0 <= i < len(widths):
                raise ValueError(f'out_indices must hold Unit indices in [0, {len(widths)}), got {out_indices}')
        self.out_indices = tuple(out_indices)
        self.body = HamiltonianNet(
            num_classes=0, in_chans=in_channels, depths=depths, widths=widths, h=h, downsample=downsample,
            nonlocal_operator=nonlocal_operator, nonlocal_units=nonlocal_units, nonlocal_after=nonlocal_after,
            nonlocal_stages=nonlocal_stages, nonlocal_subsample=nonlocal_subsample,
            nonlocal_kwargs=nonlocal_cfg, global_pool='', reversible=reversible)
        self.body.fc = None  # no classifier; keeps checkpoints free of unused parameters
        self.body.global_pool = None
        self.body.head_drop = None

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        return tuple(self.body.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True))
