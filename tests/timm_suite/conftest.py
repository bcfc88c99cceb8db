"""Runs timm's own ``tests/test_models.py`` on pide_zoo's models (see ``test_models.py`` here).

Registers timm's pytest markers (read from the cached timm ``pyproject.toml``; the project runs with
``--strict-markers``) and adds one line to the terminal summary with the suite's own counts.
"""
import os
import os.path as osp
import re

import timm
from timm_source import pide_models, timm_source_dir

HERE = osp.dirname(osp.abspath(__file__))


def pytest_configure(config):
    pyproject = osp.join(timm_source_dir(), 'pyproject.toml')
    names = set()
    if osp.isfile(pyproject):
        with open(pyproject) as f:
            block = re.search(r'^markers\s*=\s*\[(.*?)\]', f.read(), re.M | re.S)
        names = set(re.findall(r'"(\w+):', block.group(1))) if block else set()
    if not config.pluginmanager.hasplugin('timeout'):
        names.add('timeout')  # pytest-timeout's marker; timm's per-test limits are not enforced here
    for name in sorted(names):
        config.addinivalue_line('markers', f'{name}: timm test-suite marker')


_SUITE = {}  # this folder's collected test ids and the models they cover, for the summary line


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if str(item.path).startswith(HERE + os.sep)]
    if mine:
        _SUITE.update(ids={item.nodeid for item in mine}, models=pide_models())


def pytest_terminal_summary(terminalreporter):
    if not _SUITE:
        return
    counts = {}
    for outcome in ('passed', 'failed', 'skipped', 'error'):
        ids = {r.nodeid for r in terminalreporter.stats.get(outcome, []) if getattr(r, 'nodeid', '') in _SUITE['ids']}
        if ids:
            counts[outcome] = len(ids)
    terminalreporter.write_line(
        f"timm {timm.__version__} tests/test_models.py on pide_zoo's {len(_SUITE['models'])} models: "
        + ', '.join(f'{n} {k}' for k, n in counts.items()) + ' (torchscript tests left out)')
