"""Deprecated: the classification data moved to :mod:`pide_zoo.cls.data` in pide_zoo 0.3.

The names here forward there with a FutureWarning and will be removed in pide_zoo 0.4.
"""
from .._moved import forward_moved

__getattr__, __dir__ = forward_moved(__name__, dict.fromkeys((
    'DATASETS', 'SPLITS', 'DatasetInfo', 'DatasetNotFoundError', 'DatasetCorruptError', 'ClassificationDataset',
    'PadCropFlip', 'dataset_info', 'load_split', 'load_digits_split', 'per_pixel_mean', 'build_dataset',
    'missing_message'), 'pide_zoo.cls.data'), '0.4')
