"""CIFAR ResNets, the baselines of Bohn, Griebel & Kannan (2021), Tables 1, 3 and 4.

Papers:
    Deep Residual Learning for Image Recognition - He et al., CVPR 2016 (ResNet v1, CIFAR layout)
    Identity Mappings in Deep Residual Networks - He et al., ECCV 2016 (ResNet v2, pre-activation)

Layouts of the widely used Keras CIFAR recipes: ``resnet44_cifar`` is ResNet v1 of depth 6n + 2 = 44
(16/32/64 channels, 0.66 M parameters), ``preresnet20_cifar`` ResNet v2 of depth 9n + 2 = 20 with
pre-activation bottlenecks (64/128/256 output channels, 0.57 M). Downsampling shortcuts are 1x1
convolutions without normalisation; the head is global average pooling and a linear classifier. As the
authors' Keras code: batch norm with eps 1e-3, momentum 0.01 and TensorFlow's 'same' padding (on an even
size a stride-2 3x3 convolution pads 0 before and 1 after).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from torch import Tensor, nn

from ._paper_norm import BatchNormRecordMixin, paper_norm_layer
from ._staged import StagedFeaturesMixin
from .hamiltonian_net import CIFAR10_MEAN, CIFAR100_MEAN, STL10_MEAN, UNIT_STD, _check_input

__all__ = ['CifarResNet', 'BasicBlockV1', 'PreActBottleneck', 'TFSameConv2d']



def _pad_same(x: Tensor, kernel_size: Tuple[int, int], stride: Tuple[int, int],
              dilation: Tuple[int, int]) -> Tensor:
    """TensorFlow's 'same' padding (the extra row/column after), in integer arithmetic that torch.export can
    serialise with a dynamic size (timm's ``pad_same`` uses ``math.ceil``, which it cannot)."""
    pads = []
    for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(kernel_size), reversed(stride), reversed(dilation)):
        total = ((size + s - 1) // s - 1) * s + (k - 1) * d + 1 - size  # >= 0 as k >= s here
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


# Leaves of traced graphs: the input check, and the size-dependent 'same' padding.
torch.fx.wrap('_check_input')
torch.fx.wrap('_pad_same')


class TFSameConv2d(Conv2dSame):
    """timm's TensorFlow-'same' convolution, its padding a leaf of ``torch.fx`` graphs that exports."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if any(k < s for k, s in zip(self.kernel_size, self.stride)):
            raise ValueError(f'TFSameConv2d needs kernel_size >= stride, got {self.kernel_size} and {self.stride}')

    def forward(self, x: Tensor) -> Tensor:
        x = _pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BasicBlockV1(nn.Module):
    """conv-BN-ReLU, conv-BN, add, ReLU (ResNet v1).

    ``pad_type='same'`` pads the first convolution as TensorFlow's 'same' (asymmetric at stride 2 on even
    sizes); ``''`` pads 1 on every side.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, norm_layer=nn.BatchNorm2d,
                 act_layer=nn.ReLU, pad_type: str = '', device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        # At stride 1 'same' is 1 on every side.
        self.conv1 = TFSameConv2d(in_chs, out_chs, 3, stride, **dd) if pad_type == 'same' and stride > 1 \
            else nn.Conv2d(in_chs, out_chs, 3, stride, 1, **dd)
        self.bn1 = norm_layer(out_chs, **dd)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, **dd)
        self.bn2 = norm_layer(out_chs, **dd)
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride, **dd) if stride != 1 or in_chs != out_chs \
            else nn.Identity()
        self.act2 = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act2(y + self.shortcut(x))


class PreActBottleneck(nn.Module):
    """[BN-ReLU]-1x1 conv, BN-ReLU-3x3 conv, BN-ReLU-1x1 conv, add (ResNet v2).

    The very first block of the network skips the leading BN-ReLU, which the stem just applied.
    """

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, stride: int = 1, preact: bool = True,
                 norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.pre = nn.Sequential(norm_layer(in_chs, **dd), act_layer()) if preact else nn.Identity()
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, stride, **dd)
        self.norm2 = nn.Sequential(norm_layer(mid_chs, **dd), act_layer())
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, 1, 1, **dd)
        self.norm3 = nn.Sequential(norm_layer(mid_chs, **dd), act_layer())
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, **dd)
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride, **dd) if stride != 1 or in_chs != out_chs \
            else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv1(self.pre(x))
        y = self.conv2(self.norm2(y))
        y = self.conv3(self.norm3(y))
        return y + self.shortcut(x)


class CifarResNet(BatchNormRecordMixin, StagedFeaturesMixin, nn.Module):
    """ResNet v1 (basic blocks) or v2 (pre-activation bottlenecks) for small images.

    Args:
        num_classes: classifier outputs (0 for none).
        in_chans: input channels.
        depth: 6n + 2 (v1) or 9n + 2 (v2).
        version: 1 or 2.
        base_width: stem width (16).
        downsample: stride 2 at the first block of Units 2 and 3 (False: segmentation layout).
        global_pool: ``'avg'`` or ``''``.
        drop_rate: dropout before the classifier.
        bn_tf: batch norm with the authors' (Keras's) eps = 1e-3 and momentum 0.01 (True, default), or
            PyTorch's eps = 1e-5 and momentum 0.1 (False, pide_zoo 0.2 and earlier).
        pad_type: ``'same'`` (default) pads the stride-2 3x3 convolutions as TensorFlow's 'same', as the
            authors' Keras code; ``''`` pads 1 on every side (pide_zoo 0.2 and earlier). Parameters and FLOPs
            are the same.
        norm_layer: normalisation layer (default: batch norm as ``bn_tf`` says; given, it wins over ``bn_tf``).
        act_layer: activation.
    """

    legacy_kwargs = "bn_tf=False, pad_type=''"  # how to build a network as pide_zoo 0.2 did

    def __init__(
            self,
            num_classes: int = 10,
            in_chans: int = 3,
            depth: int = 44,
            version: int = 1,
            base_width: int = 16,
            downsample: bool = True,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            bn_tf: bool = True,
            pad_type: str = 'same',
            norm_layer: Optional[Callable[..., nn.Module]] = None,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        norm_layer = paper_norm_layer(norm_layer, bn_tf)
        if pad_type not in ('same', ''):
            raise ValueError(f"pad_type must be 'same' (TensorFlow's, the authors') or '' (1 on every side), "
                             f"got {pad_type!r}")
        if version not in (1, 2):
            raise ValueError(f'version must be 1 or 2, got {version!r}')
        per = 6 if version == 1 else 9
        if not isinstance(depth, int) or depth < per + 2 or (depth - 2) % per:
            raise ValueError(f'depth must be {per}n + 2 for version {version}, got {depth!r}')
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        dd = dict(device=device, dtype=dtype)
        n = (depth - 2) // per
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.grad_checkpointing = False
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_chans, base_width, 3, 1, 1, **dd), bn=norm_layer(base_width, **dd), act=act_layer()))
        stages, self.feature_info = [], []
        prev, reduction = base_width, 1
        for i in range(3):
            stride = 2 if (downsample and i > 0) else 1
            reduction *= stride
            blocks = []
            if version == 1:
                width = base_width * 2 ** i
                for j in range(n):
                    blocks.append(BasicBlockV1(prev, width, stride if j == 0 else 1, norm_layer, act_layer,
                                               pad_type=pad_type, **dd))
                    prev = width
            else:
                mid = base_width * 2 ** (i + 1) if i > 0 else base_width
                width = mid * (4 if i == 0 else 2)
                for j in range(n):
                    blocks.append(PreActBottleneck(prev, mid, width, stride if j == 0 else 1,
                                                   preact=not (i == 0 and j == 0), norm_layer=norm_layer,
                                                   act_layer=act_layer, **dd))
                    prev = width
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=prev, reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        # v2 ends with the BN-ReLU that its pre-activation blocks leave out.
        self.final_norm = nn.Sequential(norm_layer(prev, **dd), act_layer()) if version == 2 else nn.Identity()
        self.num_features = self.head_hidden_size = prev
        self.reset_classifier(num_classes, global_pool)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
                nn.init.zeros_(m.bias)
        self._record_bn_settings()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)) if global_pool \
                else nn.Identity()
        self.num_classes = num_classes
        self.head_drop = nn.Dropout(self.drop_rate)
        p = next(self.stem.parameters())
        self.fc = nn.Linear(self.num_features, num_classes, device=p.device, dtype=p.dtype) if num_classes > 0 \
            else nn.Identity()
        for m in (self.global_pool, self.head_drop, self.fc):  # a new head keeps the model's train/eval mode
            m.train(self.training)

    def forward_features(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_chans, 1)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)  # each block's activations recomputed in the backward pass
        else:
            x = self.stages(x)
        return self.final_norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained,
                                feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2)), **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': CIFAR10_MEAN, 'std': UNIT_STD, 'first_conv': 'stem.conv',
        'classifier': 'fc', 'license': 'apache-2.0', **kwargs,
    }


def _dataset_cfgs(name: str) -> Dict[str, Dict[str, Any]]:
    return {
        f'{name}.cifar10': _cfg(),
        f'{name}.cifar100': _cfg(num_classes=100, mean=CIFAR100_MEAN),
        f'{name}.stl10': _cfg(input_size=(3, 96, 96), pool_size=(24, 24), mean=STL10_MEAN),
    }


default_cfgs = generate_default_cfgs({**_dataset_cfgs('resnet44_cifar'), **_dataset_cfgs('preresnet20_cifar')})


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet v1, depth 44, 16/32/64 channels (the paper's "ResNet-44")."""
    model_args = dict(depth=44, version=1)
    return _create_cifar_resnet('resnet44_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def preresnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet v2 (pre-activation bottlenecks), depth 20 (the paper's "PreResNet-20")."""
    model_args = dict(depth=20, version=2)
    return _create_cifar_resnet('preresnet20_cifar', pretrained, **dict(model_args, **kwargs))
