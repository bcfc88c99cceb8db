"""Deprecated: the classification data moved to :mod:`pide_zoo.cls.data` in pide_zoo 0.3.

The names here forward there with a FutureWarning and will be removed in pide_zoo 0.4.
"""
import warnings

_MOVED = (
    'DATASETS', 'SPLITS', 'DatasetInfo', 'DatasetNotFoundError', 'DatasetCorruptError', 'ClassificationDataset',
    'PadCropFlip', 'dataset_info', 'load_split', 'load_digits_split', 'per_pixel_mean', 'build_dataset',
    'missing_message',
)


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    warnings.warn(f'pide_zoo.data.classification.{name} moved to pide_zoo.cls.data.{name}; '
                  'pide_zoo.data.classification will be removed in pide_zoo 0.4', FutureWarning, stacklevel=2)
    from ..cls import data

    return getattr(data, name)


def __dir__():
    return sorted(list(globals()) + list(_MOVED))
