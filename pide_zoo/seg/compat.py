"""Compatibility of mmengine checkpoints with ``torch.load(weights_only=True)`` (torch >= 2.6).

Applied when :mod:`pide_zoo.seg` is imported (by configs through ``custom_imports``, by tools/train.py and
tools/test.py, by :func:`pide_zoo.checkpoint.load_model` for segmentors), so ``import pide_zoo`` needs no mmengine.

mmengine writes its message hub (``HistoryBuffer`` of numpy arrays), numpy scalars and, through
``HistoryBuffer.__getstate__``, ``getattr`` calls into every checkpoint; torch's safe unpickler
rejects them. Instead of switching the safety off, the exact types mmengine writes are added to
torch's allow-list and the buffer pickles its state without the ``getattr`` calls.
"""
from __future__ import annotations

__all__ = ['mmengine_checkpoint_globals', 'allow_mmengine_checkpoints']

_DEFAULT_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_getstate(self) -> dict:
    """``HistoryBuffer`` state without its default statistics methods.

    mmengine pickles them as ``getattr(HistoryBuffer, 'min')``, which would need ``getattr`` itself on the
    allow-list; ``__setstate__`` registers the defaults again anyway. Custom methods are kept.
    """
    state = dict(self.__dict__)
    state.pop('statistics_methods', None)
    custom = {k: v for k, v in self._statistics_methods.items() if k not in _DEFAULT_STATISTICS}
    if custom:
        state['statistics_methods'] = custom
    return state


def mmengine_checkpoint_globals() -> list:
    """The non-tensor types found in mmengine checkpoints."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    try:  # numpy >= 2 keeps the pickling helpers in numpy._core
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    found = [np.ndarray, np.dtype, _reconstruct, scalar]
    # The concrete dtype classes numpy pickles for arrays and scalars (np.dtypes exists for numpy >= 1.25).
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        found += [type(np.dtype(t)) for t in (
            np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
            np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)]
    return found + [HistoryBuffer]


def allow_mmengine_checkpoints() -> None:
    """Allow-list :func:`mmengine_checkpoint_globals` for ``torch.load(weights_only=True)`` and make the
    message hub pickle without ``getattr`` (checkpoints written before this fix still need
    ``weights_only=False``, from a trusted source only)."""
    import torch.serialization
    from mmengine.logging.history_buffer import HistoryBuffer

    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is not None:  # torch < 2.4 loads everything anyway
        add(mmengine_checkpoint_globals())
    HistoryBuffer.__getstate__ = _history_buffer_getstate
