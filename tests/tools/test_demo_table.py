"""tools/demo_table.py: the demo's work dirs to a benchmark JSON table."""
import json
import os
import os.path as osp
import sys

import pytest

pytest.importorskip('mmengine', reason='reads mmengine config copies: pip install -e .[seg]')

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.join(ROOT, 'tools'))
import demo_table  # noqa: E402

LOG = """12/05 21:40:01 - mmengine - INFO - per class results:
12/05 21:40:01 - mmengine - INFO -
+--------------+-------+-------+
|    Class     |  IoU  |  Acc  |
+--------------+-------+-------+
|  background  | 99.99 | 99.99 |
|  red region  | 99.81 |  99.9 |
| green region |  99.9 | 99.95 |
| blue region  | 99.62 | 99.71 |
+--------------+-------+-------+
"""


def _work_dir(root, name, block_cfg, finished=True):
    wd = root / name
    run = wd / '20261205_210233'
    (run / 'vis_data').mkdir(parents=True)
    cfg = f"model = dict(backbone=dict(widths=(16, 32, 256), block_cfg={block_cfg!r}))\n"
    (wd / 'demo_longrange.py').write_text(cfg)
    lines = [{'lr': 0.05, 'time': 1.0, 'iter': 50}, {'lr': 0.05, 'time': 2.0, 'iter': 100}]
    if finished:
        lines.append({'aAcc': 99.99, 'mIoU': 99.83, 'mAcc': 99.9, 'step': 600})
    (run / 'vis_data' / 'scalars.json').write_text(''.join(json.dumps(r) + '\n' for r in lines))
    (run / '20261205_210233.log').write_text(LOG)
    return str(wd)


def test_rows_from_work_dirs(tmp_path):
    a = _work_dir(tmp_path, 'frac', dict(operator='frac_laplacian', kernel_scale='width'))
    b = _work_dir(tmp_path, 'local', None)
    c = _work_dir(tmp_path, 'compiled', dict(operator='log', compile_tiles=True))
    out = tmp_path / 'demo.json'
    assert demo_table.main([a, b, c, '--out', str(out)]) == 0
    data = json.loads(out.read_text())
    assert data['columns'] == demo_table.COLUMNS and data['environment']['device'] == 'cpu'
    assert data['rows'][0] == ['demo_longrange.py', 'frac_laplacian', 'width', '16/32/256', 99.99, 99.83,
                               '99.99 / 99.81 / 99.9 / 99.62', 1.5]
    assert data['rows'][1][1:3] == ['– (local)', '–']
    assert data['rows'][2][1] == 'log (compiled tiles)'


def test_every_bad_work_dir_is_named_and_nothing_is_written(tmp_path, capsys):
    good = _work_dir(tmp_path, 'good', dict(operator='log'))
    unfinished = _work_dir(tmp_path, 'unfinished', dict(operator='log'), finished=False)
    empty = tmp_path / 'empty'
    os.makedirs(empty)
    out = tmp_path / 'demo.json'
    assert demo_table.main([good, unfinished, str(empty), '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert 'did the run finish' in err and str(empty) in err
    assert not out.exists()
