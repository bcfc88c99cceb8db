"""``block_cfg``: the one spelling of PIDE block arguments in networks, necks and heads."""
from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Optional

__all__ = ['check_block_cfg', 'block_cfg_from_old_names']

# Spellings before 0.3 and the block_cfg key each became (nonlocal_kwargs: the rest of block_cfg).
OLD_BLOCK_ARGS = dict(nonlocal_operator='operator', nonlocal_stages='stages', nonlocal_subsample='subsample')


def check_block_cfg(block_cfg: Optional[Mapping[str, Any]], owner: str) -> Dict[str, Any]:
    """A copy of ``block_cfg`` (``{}`` for None), or an error naming ``owner``'s argument."""
    if block_cfg is None:
        return {}
    if not isinstance(block_cfg, Mapping):
        raise TypeError(f'{owner}: block_cfg must be a dict of PIDEBlock arguments or None, '
                        f'got {type(block_cfg).__name__}')
    for key in ('channels', 'in_channels'):
        if key in block_cfg:
            raise ValueError(f'{owner}: block_cfg must not set {key!r}; the block takes the width of its input')
    return dict(block_cfg)


def block_cfg_from_old_names(block_cfg: Optional[Mapping[str, Any]], owner: str,
                             old: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """``block_cfg`` with the pre-0.3 arguments ``old`` merged in (they win), and a FutureWarning naming each.

    Without ``block_cfg`` and without an operator the old arguments build no blocks, as before.
    """
    given = {k: v for k, v in old.items() if v is not None}
    if not given:
        return None if block_cfg is None else check_block_cfg(block_cfg, owner)
    new = ', '.join(f'{k} -> block_cfg.{OLD_BLOCK_ARGS[k]}' if k in OLD_BLOCK_ARGS else f'{k} -> block_cfg'
                    for k in given)
    warnings.warn(f'{owner}: {sorted(given)} are deprecated and will be removed in pide_zoo 0.4; use one block_cfg '
                  f'dict ({new})', FutureWarning, stacklevel=4)
    if block_cfg is None and 'nonlocal_operator' not in given:
        return None
    cfg = check_block_cfg(block_cfg, owner)
    cfg.update(check_block_cfg(given.pop('nonlocal_kwargs', None), owner))
    cfg.update({OLD_BLOCK_ARGS[k]: v for k, v in given.items()})
    return cfg
