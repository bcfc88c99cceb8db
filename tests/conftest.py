"""The tests mirror the package (layers, models, seg, tools, docs); the shared references (``reference.py``,
``authors_reference.py``) live here and a few test modules share helpers, so every folder is importable. So are
the modules of the repository's tools/ (the BDD100K converter, the paper's tables), as the tools import them."""
import os.path as osp
import sys

HERE = osp.dirname(osp.abspath(__file__))
for folder in ('', 'layers', 'models', 'seg', 'tools', 'docs'):
    path = osp.join(HERE, folder)
    if path not in sys.path:
        sys.path.insert(0, path)
TOOLS = osp.join(osp.dirname(HERE), 'tools')
if TOOLS not in sys.path:
    sys.path.append(TOOLS)  # last: tools/test.py must not shadow the standard library's test package
