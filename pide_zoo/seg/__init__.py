"""mmsegmentation 1.x face of pide_zoo, loaded by configs through ``custom_imports``.

Registers in mmseg's registries: the backbone ``PIDEHamiltonianNet``, the neck ``PIDENeck``, the decode head
``PIDEHead`` (mmseg's ``NLHead`` with a PIDE block), the plugin
``PIDEBlock`` (for ResNet ``plugins=[...]``), the segmentor ``PIDEEncoderDecoder`` (adds the
weight-smoothness loss), the data preprocessor ``PixelMeanSegDataPreProcessor`` with the hook
``PixelMeanHook`` that gives it the data's mean image, the metric ``SoftIoUMetric``, the datasets
``BDD100KPaperDataset`` and ``LongRangeDemoDataset`` and the transform ``VoidAsClass``. The paper's
baselines run through mmseg's ``TIMMBackbone`` with the timm models ``resnet44_cifar`` and
``preresnet20_cifar``.

Importing it also allow-lists the types in mmengine checkpoints for ``torch.load(weights_only=True)``
(:mod:`pide_zoo.seg.compat`).
"""
from . import compat as _compat
from .backbones import PIDEHamiltonianNet
from .data_preprocessor import PixelMeanSegDataPreProcessor
from .datasets import BDD100KPaperDataset, LongRangeDemoDataset, VoidAsClass
from .heads import PIDEHead
from .hooks import PixelMeanHook
from .metrics import SoftIoUMetric
from .necks import PIDENeck
from .segmentors import PIDEEncoderDecoder

__all__ = ['PIDEHamiltonianNet', 'PixelMeanSegDataPreProcessor', 'BDD100KPaperDataset', 'LongRangeDemoDataset',
           'VoidAsClass', 'PIDENeck', 'PIDEEncoderDecoder', 'PixelMeanHook', 'SoftIoUMetric', 'PIDEHead']

_compat.allow_mmengine_checkpoints()
