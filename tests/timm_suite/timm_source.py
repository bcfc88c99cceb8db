"""Where the installed timm version's own tests are, and which timm models pide_zoo registers."""
import os
import os.path as osp
import pkgutil
from typing import List

import timm


def timm_source_dir() -> str:
    """Where ``tools/install.sh`` unpacks timm's source distribution (its ``tests/`` and ``pyproject.toml``)."""
    cache = os.environ.get('PIDE_ZOO_CACHE') or osp.join(
        os.environ.get('XDG_CACHE_HOME') or osp.expanduser('~/.cache'), 'pide_zoo')
    return osp.join(cache, f'timm-{timm.__version__}')


def pide_models() -> List[str]:
    """``timm.list_models(module=...)`` of pide_zoo's model modules (only entry points defined in pide_zoo)."""
    import pide_zoo.models

    modules = [m.name for m in pkgutil.iter_modules(pide_zoo.models.__path__)]
    return sorted(n for n in timm.list_models(module=modules)
                  if timm.models.model_entrypoint(n).__module__.startswith('pide_zoo.'))
