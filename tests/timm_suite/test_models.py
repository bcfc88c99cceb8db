"""timm's own model tests on pide_zoo's models: ``tests/test_models.py`` of the installed timm version.

``tools/install.sh`` unpacks that file from timm's source distribution on the package registry into the cache
(``~/.cache/pide_zoo/timm-<version>/``, ``PIDE_ZOO_CACHE`` moves it) and records that folder in the venv
(``PIDE_ZOO_TIMM_TESTS`` points elsewhere); it is never part of this repository.
Its tests are imported unchanged and selected the way ``-k`` would: the parametrisations over model names
keep the models pide_zoo registers (with their cfg tags) and drop timm's own, and the TorchScript tests are
left out (``torch.jit.script`` is deprecated in torch 2.14; ``tools/export.py`` uses ``torch.export``).
"""
import importlib.util
import os
import os.path as osp

import pytest
import timm
from timm_source import pide_models, timm_source_dir

PIDE_MODELS = pide_models()
TIMM_TESTS = osp.join(timm_source_dir(), 'tests', 'test_models.py')
if not osp.isfile(TIMM_TESTS):
    _missing = (f"timm's own tests not found: {TIMM_TESTS} (`bash tools/install.sh` fetches them from the source "
                f'distribution of timm {timm.__version__})')
    if os.environ.get('CI', '').lower() in ('true', '1'):  # CI must not pass with the suite silently gone
        pytest.fail(f'CI={os.environ["CI"]}: {_missing}', pytrace=False)
    pytest.skip(_missing, allow_module_level=True)


def _select(func):
    """The test with its model names narrowed to pide_zoo's, or None where none is left (or it is TorchScript)."""
    if 'torchscript' in func.__name__:
        return None
    marks, kept = [], 0
    for mark in getattr(func, 'pytestmark', []):
        if mark.name == 'parametrize' and mark.args[0] == 'model_name':
            names = [n for n in mark.args[1] if isinstance(n, str) and n.split('.')[0] in PIDE_MODELS]
            kept += len(names)
            mark = pytest.mark.parametrize('model_name', names).mark
        marks.append(mark)
    if not kept:
        return None
    func.pytestmark = marks  # a private import of timm's module: nothing else sees the change
    return func


_spec = importlib.util.spec_from_file_location('timm_tests_test_models', TIMM_TESTS)
_timm_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_timm_tests)
_tests = {name: _select(obj) for name, obj in vars(_timm_tests).items() if name.startswith('test_') and callable(obj)}
# timm's helpers and fixtures (cfg_device), then the selected tests
globals().update({k: v for k, v in vars(_timm_tests).items() if not k.startswith(('__', 'test_'))})
globals().update({k: v for k, v in _tests.items() if v is not None})
_covered = {n.split('.')[0] for f in _tests.values() if f is not None for m in f.pytestmark
            if m.name == 'parametrize' and m.args[0] == 'model_name' for n in m.args[1]}
assert PIDE_MODELS and _covered == set(PIDE_MODELS), f'timm tests select {sorted(_covered)} of {PIDE_MODELS}'
