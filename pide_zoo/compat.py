"""Deprecated: the mmengine checkpoint allow-list moved to :mod:`pide_zoo.seg.compat` in pide_zoo 0.2.

``import pide_zoo`` no longer imports mmengine; ``import pide_zoo.seg`` applies the allow-list. The names here
forward to :mod:`pide_zoo.seg.compat` and will be removed in pide_zoo 0.3.
"""
import warnings

_FORWARDED = ('mmengine_checkpoint_globals', 'allow_mmengine_checkpoints')


def __getattr__(name: str):
    if name not in _FORWARDED:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    warnings.warn(f'pide_zoo.compat.{name} is deprecated and will be removed in pide_zoo 0.3; use '
                  f'pide_zoo.seg.compat.{name} (applied by import pide_zoo.seg)', FutureWarning, stacklevel=2)
    from .seg import compat

    return getattr(compat, name)
