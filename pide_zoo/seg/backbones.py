"""The Hamiltonian network as an mmseg backbone (no pooling by default, Section 4.6 of the paper)."""
from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor

from ..layers.block_cfg import check_block_cfg
from ..layers.nonlocal_block import PIDEBlock
from ..models.hamiltonian_net import HamiltonianNet

__all__ = ['PIDEHamiltonianNet']

# Usable in mmseg ResNet's plugins=[dict(cfg=dict(type='PIDEBlock', ...), position='after_conv3')].
MODELS.register_module(module=PIDEBlock)

# The paper's BDD100K blocks (Section 4.6): 2 stages, keys max-pooled by 3.
_BLOCK_DEFAULTS = dict(stages=2, subsample=3)
# Spellings before 0.2: the old name and the block_cfg key it became.
_OLD_BLOCK_ARGS = dict(nonlocal_operator='operator', nonlocal_stages='stages', nonlocal_subsample='subsample')


def _from_old_names(block_cfg: Optional[Mapping[str, Any]], nonlocal_cfg: Optional[Mapping[str, Any]],
                    old: Dict[str, Any]) -> Optional[Mapping[str, Any]]:
    """``block_cfg`` built from the pre-0.2 arguments, with a FutureWarning naming each of them."""
    given = {k: v for k, v in old.items() if v is not None}
    if nonlocal_cfg is not None:
        given['nonlocal_cfg'] = nonlocal_cfg
    if not given:
        return block_cfg
    new = ', '.join(f'{k} -> block_cfg.{_OLD_BLOCK_ARGS[k]}' if k in _OLD_BLOCK_ARGS else f'{k} -> block_cfg'
                    for k in given)
    if block_cfg is not None:
        raise ValueError(f'PIDEHamiltonianNet: got block_cfg and the old arguments {sorted(given)}; '
                         f'move them into block_cfg ({new})')
    warnings.warn(f'PIDEHamiltonianNet: {sorted(given)} are deprecated and will be removed in pide_zoo 0.3; '
                  f'use one block_cfg dict ({new})', FutureWarning, stacklevel=3)
    if old['nonlocal_operator'] is None:  # as before 0.2: without an operator, no blocks
        return None
    cfg = check_block_cfg(nonlocal_cfg, 'PIDEHamiltonianNet')
    cfg.update({_OLD_BLOCK_ARGS[k]: v for k, v in given.items() if k in _OLD_BLOCK_ARGS})
    return cfg


@MODELS.register_module()
class PIDEHamiltonianNet(BaseModule):
    """Hamiltonian-74 (optionally nonlocal) returning the outputs of the Units in ``out_indices``.

    The same :class:`~pide_zoo.models.HamiltonianNet` as the timm models, without its head.

    Args:
        in_channels: image channels.
        depths, widths, h: Units of the network (Hamiltonian-74: (6, 6, 6), (32, 64, 112), 0.06); ``h`` is the
            step of the Hamiltonian and the nonlocal blocks, as the authors' code (``block_cfg.h`` overrides it
            for the nonlocal blocks).
        downsample: average-pool between Units (the paper's segmentation network does not).
        block_cfg: :class:`~pide_zoo.layers.PIDEBlock` arguments of the nonlocal blocks, e.g.
            ``dict(operator='frac_laplacian')``; None (the default) builds the purely local network.
            Unset keys take the paper's segmentation values (``stages=2``, ``subsample=3``, the paper's widths
            ``PAPER_WIDTHS``) and otherwise the block's defaults (``operator='diffusion'``); every other key reaches
            the block unchanged.
        nonlocal_units: Units that get a nonlocal block (the paper: every Unit).
        nonlocal_after: position in each Unit, as the number of Hamiltonian blocks before it (the paper: 2).
        reversible: reversible back-propagation through the Hamiltonian blocks.
        bn_tf: batch norm with the authors' (Keras's) eps = 1e-3 and momentum 0.01 in every block, the
            nonlocal ones included (True, default); False: PyTorch's eps = 1e-5, momentum 0.1 (pide_zoo 0.2).
        out_indices: Units whose outputs are returned.
        init_cfg: mmengine initialisation config (default: the He-normal init of the blocks).
        nonlocal_operator, nonlocal_stages, nonlocal_subsample, nonlocal_cfg: deprecated spellings of
            ``block_cfg`` entries (``operator``, ``stages``, ``subsample``, the rest), removed in pide_zoo 0.3.

    Examples:
        >>> from pide_zoo.seg.backbones import PIDEHamiltonianNet
        >>> net = PIDEHamiltonianNet(depths=(1, 1, 1), block_cfg=dict(operator='log', subsample=2))
        >>> [(b.operator, b.stages, b.subsample) for b in net.body.modules() if type(b).__name__ == 'PIDEBlock']
        [('log', 2, 2), ('log', 2, 2), ('log', 2, 2)]
    """

    def __init__(
            self,
            in_channels: int = 3,
            depths: Sequence[int] = (6, 6, 6),
            widths: Sequence[int] = (32, 64, 112),
            h: float = 0.06,
            downsample: bool = False,
            block_cfg: Optional[Dict[str, Any]] = None,
            nonlocal_units: Sequence[int] = (0, 1, 2),
            nonlocal_after: int = 2,
            reversible: bool = False,
            bn_tf: bool = True,
            out_indices: Sequence[int] = (2,),
            init_cfg: Optional[Dict[str, Any]] = None,
            nonlocal_operator: Optional[str] = None,
            nonlocal_stages: Optional[int] = None,
            nonlocal_subsample: Optional[int] = None,
            nonlocal_cfg: Optional[Dict[str, Any]] = None,
    ):
        super().__init__(init_cfg)
        for i in out_indices:
            if not isinstance(i, int) or not 0 <= i < len(widths):
                raise ValueError(f'out_indices must hold Unit indices in [0, {len(widths)}), got {out_indices}')
        self.out_indices = tuple(out_indices)
        block_cfg = _from_old_names(block_cfg, nonlocal_cfg, dict(
            nonlocal_operator=nonlocal_operator, nonlocal_stages=nonlocal_stages,
            nonlocal_subsample=nonlocal_subsample))
        if block_cfg is not None:
            block_cfg = {**_BLOCK_DEFAULTS, **check_block_cfg(block_cfg, 'PIDEHamiltonianNet')}
        self.body = HamiltonianNet(
            num_classes=0, in_chans=in_channels, depths=depths, widths=widths, h=h, downsample=downsample,
            nonlocal_units=nonlocal_units, nonlocal_after=nonlocal_after, global_pool='', reversible=reversible,
            bn_tf=bn_tf, block_cfg=block_cfg)
        self.body.fc = None  # no classifier; keeps checkpoints free of unused parameters
        self.body.global_pool = None
        self.body.head_drop = None

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        return tuple(self.body.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True))
