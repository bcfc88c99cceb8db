"""Module-level forwarding of names that moved: ``__getattr__`` and ``__dir__`` for an old module."""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Dict, Iterable, Tuple


def forward_moved(old: str, moved: Dict[str, str], removal: str, silent: Iterable[str] = (),
                  silent_home: str = '') -> Tuple[Callable[[str], Any], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for module ``old``: each name of ``moved`` comes from its new module with a
    FutureWarning naming it and the release ``removal``; ``silent`` names come from ``silent_home`` without one
    (they warn themselves)."""
    silent = tuple(silent)

    def __getattr__(name: str) -> Any:
        if name in silent:
            return getattr(importlib.import_module(silent_home), name)
        if name not in moved:
            raise AttributeError(f'module {old!r} has no attribute {name!r}')
        warnings.warn(f'{old}.{name} moved to {moved[name]}.{name}; {old} will be removed in pide_zoo {removal}',
                      FutureWarning, stacklevel=2)
        return getattr(importlib.import_module(moved[name]), name)

    def __dir__() -> list:
        return sorted(set(moved) | set(silent))

    return __getattr__, __dir__
