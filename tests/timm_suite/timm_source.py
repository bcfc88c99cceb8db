"""Where the installed timm version's own tests are, and which timm models pide_zoo registers."""
import os
import os.path as osp
import pkgutil
import sys
from typing import List

import timm

RECORD = '.pide_zoo_timm_tests'  # in the venv, written by tools/install.sh


def timm_source_dir(prefix: str = sys.prefix) -> str:
    """Where timm's source distribution (its ``tests/`` and ``pyproject.toml``) is: ``PIDE_ZOO_TIMM_TESTS`` if set,
    else the folder ``tools/install.sh`` recorded in the venv (``prefix``), else the cache it would use."""
    if os.environ.get('PIDE_ZOO_TIMM_TESTS'):
        return os.environ['PIDE_ZOO_TIMM_TESTS']
    record = osp.join(prefix, RECORD)
    if osp.isfile(record):
        with open(record) as f:
            return f.read().strip()
    cache = os.environ.get('PIDE_ZOO_CACHE') or osp.join(
        os.environ.get('XDG_CACHE_HOME') or osp.expanduser('~/.cache'), 'pide_zoo')
    return osp.join(cache, f'timm-{timm.__version__}')


def pide_models() -> List[str]:
    """``timm.list_models(module=...)`` of pide_zoo's model modules (only entry points defined in pide_zoo)."""
    import pide_zoo.models

    modules = [m.name for m in pkgutil.iter_modules(pide_zoo.models.__path__)]
    return sorted(n for n in timm.list_models(module=modules)
                  if timm.models.model_entrypoint(n).__module__.startswith('pide_zoo.'))
