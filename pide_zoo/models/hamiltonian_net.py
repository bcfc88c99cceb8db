"""Hamiltonian and nonlocal Hamiltonian networks.

Papers:
    Deep Neural Networks and PIDE discretizations - Bohn, Griebel & Kannan, 2021
    Reversible Architectures for Arbitrarily Deep Residual Neural Networks - Chang et al., AAAI 2018

Hamiltonian-74 (12m + 2 layers, m = 6): a 3x3 stem, three Units of m Verlet blocks with widths
32/64/112 joined by 2x2 average pooling and a 1x1 conv + ReLU, and the paper's head: average pooling
(2 for 32 px, 8 for 96 px), flatten, fully connected. The nonlocal variants put one PIDE block after
the 2nd block of every Unit.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ..layers.block_cfg import block_cfg_from_old_names, check_block_cfg
from ..layers.hamiltonian import HamiltonianUnit
from ..layers.nonlocal_block import PAPER_WIDTHS, PIDEBlock
from ..layers.ops import resolve_operator
from ._paper_norm import BatchNormRecordMixin, paper_norm_layer
from ._staged import StagedFeaturesMixin

__all__ = ['HamiltonianNet', 'CIFAR10_MEAN', 'CIFAR100_MEAN', 'STL10_MEAN', 'paper_geometry']

# Train-set channel means of images scaled to [0, 1]; the paper subtracts the mean and does not scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
STL10_MEAN = (0.4467, 0.4398, 0.4066)
UNIT_STD = (1.0, 1.0, 1.0)

GLOBAL_POOLS = ('flatten', 'avg', '')


def _check_input(x: Tensor, in_chans: int, need: int) -> None:
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f'x must be (B, in_chans={in_chans}, H, W), got {tuple(x.shape)}')
    if x.shape[2] < need or x.shape[3] < need:
        raise ValueError(f'x spatial size {tuple(x.shape[2:])} is smaller than the network pooling allows '
                         f'(at least {need} px)')


def _check_head_features(x: Tensor, expected: int, img_size: Tuple[int, int]) -> None:
    if x.dim() == 2 and x.shape[1] != expected:
        raise ValueError(
            f"the 'flatten' head was built for img_size={img_size} ({expected} features), got {x.shape[1]}; "
            f"pass img_size= or use global_pool='avg' for other sizes")


# Shape checks are leaves of torch.fx graphs.
torch.fx.wrap('_check_input')
torch.fx.wrap('_check_head_features')


def paper_geometry(img_size: int) -> Tuple[int, int]:
    """The paper's head pool and nonlocal subsampling for an input size: (2, 2) at 32 px, (8, 4) at 96 px."""
    return (2, 2) if img_size <= 64 else (8, 4)


class Transition(nn.Sequential):
    """Between Units: average pooling (optional) then a 1x1 conv with bias and ReLU to the next width."""

    def __init__(self, in_chs: int, out_chs: int, pool: int = 2, act_layer: Callable[..., nn.Module] = nn.ReLU,
                 device=None, dtype=None):
        layers = OrderedDict()
        if pool > 1:
            layers['pool'] = nn.AvgPool2d(pool)
        layers['conv'] = nn.Conv2d(in_chs, out_chs, 1, device=device, dtype=dtype)
        layers['act'] = act_layer()
        super().__init__(layers)


class HamiltonianNet(BatchNormRecordMixin, StagedFeaturesMixin, nn.Module):
    """Hamiltonian CNN with optional PIDE nonlocal blocks (Bohn, Griebel & Kannan 2021).

    Built as the authors' code builds it: every batch norm, the PIDE blocks' included, with Keras's defaults
    (eps 1e-3, momentum 0.01; ``bn_tf=False`` for PyTorch's), and the network's ``h`` in its Hamiltonian and
    its PIDE blocks.

    Args:
        num_classes: classifier outputs (0 for no classifier).
        in_chans: input channels.
        img_size: input size the flatten head is built for (int or (H, W)).
        depths: Hamiltonian blocks m per Unit.
        widths: channels per Unit.
        h: step size of the Hamiltonian blocks and of the PIDE blocks (unless ``block_cfg`` sets another).
        stem_chs: stem width (default: first Unit width).
        downsample: average-pool between Units (False keeps the spatial size, the segmentation layout).
        block_cfg: :class:`PIDEBlock` arguments of the nonlocal blocks, e.g. ``dict(operator='frac_laplacian')``;
            None builds the purely local network. Unset keys take the paper's values: ``operator='diffusion'``,
            ``stages=2``, ``subsample`` from ``img_size`` (2 at 32 px, 4 at 96 px), ``kernel_scale='paper'`` (its
            exact kernel; ``'width'`` keeps the distance kernels' signal above batch norm's eps at any width),
            the network's ``h`` and ``norm_layer``; every other key reaches the block unchanged.
        nonlocal_units: Units that get nonlocal blocks.
        nonlocal_after: position in each Unit (number of Hamiltonian blocks before it).
        nonlocal_operator, nonlocal_stages, nonlocal_subsample, nonlocal_kwargs: deprecated spellings of
            ``block_cfg`` entries (``operator``, ``stages``, ``subsample``, the rest), removed in pide_zoo 0.4.
        head_pool: average pool before the flatten head (default from ``img_size``: 2 at 32 px, 8 at 96 px).
        global_pool: ``'flatten'`` (the paper's pool + flatten), ``'avg'`` (global average) or ``''`` (none).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the Hamiltonian blocks (timm's ``--drop-path``), rising linearly
            from 0 at the first block to this rate at the last (each sample skips a whole Verlet step); it
            cannot be combined with reversible back-propagation.
        reversible: recompute Hamiltonian activations in the backward pass instead of storing them.
        bn_tf: batch norm with the authors' (Keras's) eps = 1e-3 and momentum 0.01 (True, default), or
            PyTorch's eps = 1e-5 and momentum 0.1 (False, the paper networks of pide_zoo 0.2 and earlier).
        norm_layer: normalisation layer of the whole network, PIDE blocks included (default: batch norm as
            ``bn_tf`` says; given, it wins over ``bn_tf``).
        act_layer: activation.
        transpose_bias: add the conv bias again after K^T (the authors' code).
    """

    legacy_kwargs = 'bn_tf=False'  # how to build a network as pide_zoo 0.2 did

    def __init__(
            self,
            num_classes: int = 10,
            in_chans: int = 3,
            img_size: Union[int, Tuple[int, int]] = 32,
            depths: Sequence[int] = (6, 6, 6),
            widths: Sequence[int] = (32, 64, 112),
            h: float = 0.06,
            stem_chs: Optional[int] = None,
            downsample: bool = True,
            block_cfg: Optional[Dict[str, Any]] = None,
            nonlocal_units: Sequence[int] = (0, 1, 2),
            nonlocal_after: int = 2,
            head_pool: Optional[int] = None,
            global_pool: str = 'flatten',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            reversible: bool = False,
            bn_tf: bool = True,
            norm_layer: Optional[Callable[..., nn.Module]] = None,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
            transpose_bias: bool = True,
            device=None,
            dtype=None,
            nonlocal_operator: Optional[str] = None,
            nonlocal_stages: Optional[int] = None,
            nonlocal_subsample: Optional[int] = None,
            nonlocal_kwargs: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        block_cfg = block_cfg_from_old_names(block_cfg, 'HamiltonianNet', dict(
            nonlocal_operator=nonlocal_operator, nonlocal_stages=nonlocal_stages,
            nonlocal_subsample=nonlocal_subsample, nonlocal_kwargs=nonlocal_kwargs))
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f'in_chans must be a positive int, got {in_chans!r}')
        if len(depths) != len(widths) or not len(widths):
            raise ValueError(f'depths and widths must have the same non-zero length, got {depths} and {widths}')
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f'global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}')
        dd = dict(device=device, dtype=dtype)
        if not isinstance(drop_path_rate, (int, float)) or not 0 <= drop_path_rate < 1:
            raise ValueError(f'drop_path_rate must be in [0, 1), got {drop_path_rate!r}')
        if drop_path_rate and reversible:
            raise ValueError('drop_path_rate cannot be combined with reversible=True: a step that stochastic depth '
                             'dropped at random cannot be recomputed from its output')
        norm_layer = paper_norm_layer(norm_layer, bn_tf)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)
        self.drop_rate = drop_rate
        self.downsample = downsample
        geom_head, geom_nl = paper_geometry(min(self.img_size))
        if head_pool is not None and (not isinstance(head_pool, int) or isinstance(head_pool, bool) or head_pool < 1):
            raise ValueError(f'head_pool must be a positive int (the average pool before the flatten head) or None '
                             f'for the paper\'s (2 at 32 px, 8 at 96 px), got {head_pool!r}')
        self.head_pool = head_pool if head_pool is not None else geom_head
        for u in nonlocal_units:
            if not isinstance(u, int) or not 0 <= u < len(widths):
                raise ValueError(f'nonlocal_units must hold Unit indices in [0, {len(widths)}), got {nonlocal_units}')
        nl_layer = self._nonlocal_layer(block_cfg, subsample=geom_nl, h=h, norm_layer=norm_layer)
        stem_chs = stem_chs or widths[0]
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_chans, stem_chs, 3, padding=1, **dd),
            bn=norm_layer(stem_chs, **dd),
            act=act_layer(),
        ))
        block_kwargs = dict(norm_layer=norm_layer, act_layer=act_layer, transpose_bias=transpose_bias)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist() if drop_path_rate else [0.0] * sum(depths)
        block_kwargs['drop_path'] = iter(rates)
        self._build_stages(stem_chs, depths, widths, h, nl_layer, nonlocal_units, nonlocal_after, reversible,
                           act_layer, block_kwargs, dd)
        self.global_pool_type = global_pool
        self._build_head(num_classes, global_pool, **dd)
        self._init_weights()
        self._record_bn_settings()

    def _nonlocal_layer(self, block_cfg: Optional[Dict[str, Any]], **paper) -> Optional[Callable[..., nn.Module]]:
        """The PIDE block constructor of ``block_cfg`` over the paper's values (None: no blocks)."""
        self.nonlocal_operator = None
        if block_cfg is None:
            return None
        # The paper's blocks; the authors pass the network's h and batch norm to them too.
        cfg = dict(operator='diffusion', stages=2, kernel_scale='paper', **PAPER_WIDTHS, **paper)
        cfg.update(check_block_cfg(block_cfg, 'HamiltonianNet'))
        self.nonlocal_operator = resolve_operator(cfg['operator'])
        return partial(PIDEBlock, **cfg)

    def _build_stages(self, stem_chs, depths, widths, h, nl_layer, nonlocal_units, nonlocal_after, reversible,
                      act_layer, block_kwargs, dd) -> None:
        block_kwargs = dict(block_kwargs)
        rates = block_kwargs.pop('drop_path')  # the blocks' stochastic depth, in order
        stages, prev, reduction = [], stem_chs, 1
        self.feature_info = []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            stage = OrderedDict()
            pool = 2 if (self.downsample and i > 0) else 1
            if i > 0 or prev != width:
                stage['transition'] = Transition(prev, width, pool=pool, act_layer=act_layer, **dd)
            reduction *= pool
            stage['unit'] = HamiltonianUnit(
                width, depth, h, nonlocal_layer=nl_layer if i in nonlocal_units else None,
                nonlocal_after=(min(nonlocal_after, depth),), reversible=reversible,
                drop_path=[next(rates) for _ in range(depth)], **block_kwargs, **dd)
            stages.append(nn.Sequential(stage))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f'stages.{i}'))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.final_reduction = reduction

    def _head_features(self, global_pool: str) -> int:
        if global_pool != 'flatten':
            return self.num_features
        h, w = (s // self.final_reduction // self.head_pool for s in self.img_size)
        if h < 1 or w < 1:
            raise ValueError(
                f'img_size={self.img_size} is too small: after reduction {self.final_reduction} and head_pool='
                f'{self.head_pool} nothing is left; use a larger image or a smaller head_pool')
        return self.num_features * h * w

    def _build_head(self, num_classes: int, global_pool: str, device=None, dtype=None) -> None:
        self.global_pool_type = global_pool
        if global_pool == 'flatten':
            self.global_pool = nn.Sequential(nn.AvgPool2d(self.head_pool), nn.Flatten(1))
        elif global_pool == 'avg':
            self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        else:
            self.global_pool = nn.Identity()
        self.head_hidden_size = self._head_features(global_pool)
        self.head_drop = nn.Dropout(self.drop_rate)
        self.fc = nn.Linear(self.head_hidden_size, num_classes, device=device, dtype=dtype) if num_classes > 0 \
            else nn.Identity()
        for m in (self.global_pool, self.head_drop, self.fc):  # a new head keeps the model's train/eval mode
            m.train(self.training)

    def _init_weights(self) -> None:
        # He-normal for the stem and transitions (the blocks initialise themselves), as the authors' code.
        for m in (self.stem.conv, *(s.transition.conv for s in self.stages if hasattr(s, 'transition'))):
            nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # Numeric ordinals in forward order: transition, then block j as (j, 1); nonlocal block k runs after k
        # Hamiltonian blocks, so (k, 0) puts it between blocks k - 1 and k.
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.transition', None),
            (r'^stages\.(\d+)\.unit\.blocks\.(\d+)', (1,)),
            (r'^stages\.(\d+)\.unit\.nonlocals\.(\d+)', (0,)),
        ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # Reversible blocks are the memory-saving mechanism of this family.
        for s in self.stages:
            s.unit.reversible = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None and global_pool not in GLOBAL_POOLS:
            raise ValueError(f'global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}')
        self.num_classes = num_classes
        p = next(self.parameters())
        self._build_head(num_classes, global_pool if global_pool is not None else self.global_pool_type,
                         device=p.device, dtype=p.dtype)

    def forward_features(self, x: Tensor) -> Tensor:
        need = self.final_reduction * (self.head_pool if self.global_pool_type == 'flatten' else 1)
        _check_input(x, self.in_chans, need)
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)
        if self.global_pool_type == 'flatten':
            _check_head_features(x, self.head_hidden_size, self.img_size)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _create_hamiltonian_net(variant: str, pretrained: bool = False, **kwargs) -> HamiltonianNet:
    return build_model_with_cfg(
        HamiltonianNet, variant, pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2)),
        **kwargs,
    )


def _merge(model_args: Dict[str, Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The model's arguments updated by the user's; a user's ``block_cfg`` updates the model's block (None: none)."""
    merged = dict(model_args, **kwargs)
    if 'block_cfg' in model_args and kwargs.get('block_cfg', {}) is not None:
        merged['block_cfg'] = {**model_args['block_cfg'], **check_block_cfg(kwargs.get('block_cfg'), 'block_cfg')}
    return merged


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'fixed_input_size': True,
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': CIFAR10_MEAN, 'std': UNIT_STD,
        'first_conv': 'stem.conv', 'classifier': 'fc', 'license': 'apache-2.0',
        'paper_ids': 'INS Preprint No. 2102', 'paper_name': 'Deep Neural Networks and PIDE discretizations',
        **kwargs,
    }


def _dataset_cfgs(name: str) -> Dict[str, Dict[str, Any]]:
    return {
        f'{name}.cifar10': _cfg(),
        f'{name}.cifar100': _cfg(num_classes=100, mean=CIFAR100_MEAN),
        f'{name}.stl10': _cfg(input_size=(3, 96, 96), pool_size=(24, 24), mean=STL10_MEAN),
    }


default_cfgs = generate_default_cfgs({
    **_dataset_cfgs('hamiltonian74'),
    **_dataset_cfgs('nl_hamiltonian74'),
    **_dataset_cfgs('nl_hamiltonian74_frac'),
    **_dataset_cfgs('nl_hamiltonian74_invfrac'),
    **_dataset_cfgs('nl_hamiltonian74_log'),
    **_dataset_cfgs('nl_hamiltonian74_4stage'),
})


@register_model
def hamiltonian74(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Hamiltonian-74: 3 Units x 6 Verlet blocks, widths 32/64/112."""
    model_args = dict(depths=(6, 6, 6), widths=(32, 64, 112))
    return _create_hamiltonian_net('hamiltonian74', pretrained, **_merge(model_args, kwargs))


@register_model
def nl_hamiltonian74(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Hamiltonian-74 with nonlocal diffusion L blocks (eq. 4.1)."""
    model_args = dict(depths=(6, 6, 6), widths=(32, 64, 112), block_cfg=dict(operator='diffusion'))
    return _create_hamiltonian_net('nl_hamiltonian74', pretrained, **_merge(model_args, kwargs))


@register_model
def nl_hamiltonian74_frac(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Hamiltonian-74 with fractional Laplacian (-Delta)^{1/2} blocks (eq. 4.4)."""
    model_args = dict(depths=(6, 6, 6), widths=(32, 64, 112), block_cfg=dict(operator='frac_laplacian'))
    return _create_hamiltonian_net('nl_hamiltonian74_frac', pretrained, **_merge(model_args, kwargs))


@register_model
def nl_hamiltonian74_invfrac(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Hamiltonian-74 with inverse fractional Laplacian (-Delta)^{-1/2} blocks (eq. 4.5)."""
    model_args = dict(depths=(6, 6, 6), widths=(32, 64, 112), block_cfg=dict(operator='inv_frac_laplacian'))
    return _create_hamiltonian_net('nl_hamiltonian74_invfrac', pretrained, **_merge(model_args, kwargs))


@register_model
def nl_hamiltonian74_log(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Hamiltonian-74 with log-kernel (-Delta)^{-1} blocks (eq. 4.6)."""
    model_args = dict(depths=(6, 6, 6), widths=(32, 64, 112), block_cfg=dict(operator='log'))
    return _create_hamiltonian_net('nl_hamiltonian74_log', pretrained, **_merge(model_args, kwargs))


@register_model
def nl_hamiltonian74_4stage(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Nonlocal diffusion network with 4-stage nonlocal blocks (Table 2)."""
    model_args = dict(depths=(6, 6, 6), widths=(32, 64, 112), block_cfg=dict(operator='diffusion', stages=4))
    return _create_hamiltonian_net('nl_hamiltonian74_4stage', pretrained, **_merge(model_args, kwargs))
