"""Configs written for pide_zoo 0.1 say ``custom_imports=dict(imports=['pide_zoo'])``: the mmseg face then
lived in the package. ``import pide_zoo`` stays free of OpenMMLab modules, so the face (:mod:`pide_zoo.seg`,
with the checkpoint allow-list) is imported when mmseg's models are, whichever of the two comes first: at once
where ``mmseg.models`` is already imported, otherwise right after it is (mmengine's registries import it before
they build the first model, so a config's types are found in either order).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ['install']

_TRIGGER = 'mmseg.models'


def _import_face() -> None:
    try:
        importlib.import_module('pide_zoo.seg')
    except Exception as e:  # noqa: BLE001  (the user's own import of mmseg must not fail because of pide_zoo)
        warnings.warn(f"pide_zoo's mmseg modules are not registered: importing pide_zoo.seg failed with "
                      f'{type(e).__name__}: {e}', RuntimeWarning, stacklevel=2)


class _AfterMMSegModels(importlib.abc.MetaPathFinder):
    """Finds nothing itself: lets the other finders find ``mmseg.models`` and imports the face after it ran."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, 'find_spec', lambda *a: None)(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, 'exec_module'):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_import_face(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _import_face()

        spec.loader.exec_module = exec_then_import_face
        return spec


def install() -> None:
    """Import :mod:`pide_zoo.seg` now or after ``mmseg.models``; nothing where mmseg is not installed."""
    if _TRIGGER in sys.modules:
        _import_face()
    elif importlib.util.find_spec('mmseg') is not None and not any(
            isinstance(f, _AfterMMSegModels) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterMMSegModels())
