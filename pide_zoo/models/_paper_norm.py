"""The authors' batch norm for the paper's networks, and its record in state dicts.

The authors' Keras code builds every ``BatchNormalization()`` with Keras's defaults, eps = 1e-3 and momentum
0.99 (the weight of the running value, PyTorch momentum 0.01). The paper's networks here do the same by
default, as timm's ports of TensorFlow networks do; ``bn_tf=False`` gives PyTorch's eps = 1e-5, momentum 0.1.
At the paper's kernel scale eps sets the gain of the distance blocks, so a state dict records the settings it
was trained with and loading it into a model with other settings warns.
"""
from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Callable, Dict, Optional

from torch import nn

__all__ = ['BN_EPS_TF_DEFAULT', 'BN_MOMENTUM_TF_DEFAULT', 'paper_norm_layer', 'bn_settings', 'check_bn_settings',
           'BatchNormRecordMixin']

BN_EPS_TF_DEFAULT = 1e-3
BN_MOMENTUM_TF_DEFAULT = 1 - 0.99
_TORCH_DEFAULTS = dict(eps=1e-5, momentum=0.1)

_warned: set = set()


def paper_norm_layer(norm_layer: Optional[Callable[..., nn.Module]], bn_tf: bool) -> Callable[..., nn.Module]:
    """``norm_layer`` if given, else ``BatchNorm2d`` with the authors' (``bn_tf``) or PyTorch's settings."""
    if norm_layer is not None:
        return norm_layer
    if not isinstance(bn_tf, bool):
        raise TypeError(f'bn_tf must be True (the authors\' batch norm, eps=1e-3, momentum=0.01) or False '
                        f'(PyTorch\'s, eps=1e-5, momentum=0.1), got {bn_tf!r}')
    return partial(nn.BatchNorm2d, eps=BN_EPS_TF_DEFAULT, momentum=BN_MOMENTUM_TF_DEFAULT) if bn_tf \
        else nn.BatchNorm2d


def bn_settings(model: nn.Module) -> Optional[Dict[str, Optional[float]]]:
    """``dict(eps=..., momentum=...)`` of the first batch norm in ``model``, or None if it has none."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return dict(eps=float(m.eps), momentum=None if m.momentum is None else float(m.momentum))
    return None


def _same(a: Dict[str, Optional[float]], b: Dict[str, Optional[float]]) -> bool:
    def close(x, y):
        return x is None and y is None or x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9)
    return close(a.get('eps'), b.get('eps')) and close(a.get('momentum'), b.get('momentum'))


def _fmt(s: Dict[str, Optional[float]]) -> str:
    m = s.get('momentum')
    return f"eps={s.get('eps'):g}, momentum={m if m is None else format(m, '.6g')}"


def _is_tf(s: Dict[str, Optional[float]]) -> bool:
    return _same(s, dict(eps=BN_EPS_TF_DEFAULT, momentum=BN_MOMENTUM_TF_DEFAULT))


def check_bn_settings(model: nn.Module, trained: Optional[Dict[str, Optional[float]]], where: str,
                      recorded: bool = True) -> None:
    """Warn once if a state dict's batch-norm settings ``trained`` differ from ``model``'s.

    ``recorded=False`` means the checkpoint predates the record (pide_zoo <= 0.2, whose paper networks used
    PyTorch's settings): that warns only when the model uses the authors' settings.
    """
    ours = bn_settings(model)
    if ours is None:
        return
    hint = getattr(model, 'legacy_kwargs', 'bn_tf=False')
    if not recorded:
        if not _is_tf(ours):
            return
        key = ('legacy', _fmt(ours))
        msg = (f"{where}: this state dict records no batch-norm settings: it was saved by pide_zoo 0.2 or earlier, "
               f"whose paper networks used PyTorch's {_fmt(_TORCH_DEFAULTS)}; this model uses the authors' "
               f"{_fmt(ours)}, which changes its outputs. Build it with {hint} to get the outputs it was "
               f"trained for")
    else:
        if trained is None or _same(trained, ours):
            return
        key = ('differ', _fmt(trained), _fmt(ours))
        fix = 'bn_tf=True' if _is_tf(trained) else hint if _same(trained, _TORCH_DEFAULTS) \
            else f"norm_layer=partial(nn.BatchNorm2d, {_fmt(trained)})"
        msg = (f'{where}: this state dict was trained with batch norm {_fmt(trained)} but the model uses '
               f'{_fmt(ours)}; build it with {fix} to get the outputs it was trained for')
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, UserWarning, stacklevel=3)


class BatchNormRecordMixin:
    """Records the network's batch-norm eps and momentum in its state dict's metadata (``bn_eps``,
    ``bn_momentum`` under the network's prefix) and checks them on load (see :func:`check_bn_settings`).

    Call ``self._record_bn_settings()`` at the end of ``__init__``.
    """

    def _record_bn_settings(self) -> None:
        self.register_state_dict_post_hook(_record)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # Metadata-free state dicts (timm's loaders strip it) say nothing; the project's checkpoint files
        # record the settings at their top level too.
        if local_metadata:
            trained = None
            if 'bn_eps' in local_metadata:
                trained = dict(eps=local_metadata['bn_eps'], momentum=local_metadata.get('bn_momentum'))
            check_bn_settings(self, trained, prefix[:-1] or type(self).__name__, recorded='bn_eps' in local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def _record(module: nn.Module, state_dict, prefix: str, local_metadata: dict) -> None:
    settings = bn_settings(module)
    if settings is not None:
        local_metadata['bn_eps'] = settings['eps']
        local_metadata['bn_momentum'] = settings['momentum']
