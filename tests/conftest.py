"""The tests mirror the package (layers, models, seg, tools, docs); the shared references (``reference.py``,
``authors_reference.py``) live here and a few test modules share helpers, so every folder is importable. So are
the modules of the repository's tools/ (the BDD100K converter, the paper's tables), as the tools import them.

GPU tests are marked ``cuda`` and take the ``device`` fixture: ``pytest -m cuda`` on a GPU runs them
(tools/gpu_check.py does), and on the CPU they are collected and skipped."""
import os.path as osp
import sys

import pytest
import torch

HERE = osp.dirname(osp.abspath(__file__))
for folder in ('', 'layers', 'models', 'seg', 'tools', 'docs'):
    path = osp.join(HERE, folder)
    if path not in sys.path:
        sys.path.insert(0, path)
TOOLS = osp.join(osp.dirname(HERE), 'tools')
if TOOLS not in sys.path:
    sys.path.append(TOOLS)  # last: tools/test.py must not shadow the standard library's test package

NO_CUDA = 'needs CUDA: torch.cuda.is_available() is False (on a GPU: pytest -m cuda, or tools/gpu_check.py)'


@pytest.fixture
def device(request) -> torch.device:
    """A test's device: its indirect parameter ('cpu' or 'cuda'), else 'cuda'; skips the test without a GPU.
    A CUDA case is marked: ``pytest.param('cuda', marks=pytest.mark.cuda)``, or the test ``@pytest.mark.cuda``."""
    name = getattr(request, 'param', 'cuda')
    if name == 'cuda' and not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    return torch.device(name)
