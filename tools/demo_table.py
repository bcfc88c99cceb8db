"""The long-range demo's results as a table: one row per work dir of ``tools/train.py``, written as benchmark JSON.

    python tools/train.py configs/demo_longrange.py --work-dir work_dirs/demo_frac \\
        --cfg-options model.backbone.block_cfg.operator=frac_laplacian
    python tools/demo_table.py work_dirs/demo_local work_dirs/demo_frac ... --out docs/benchmarks/demo_longrange.json

Each work dir gives its config (the copy mmengine keeps there), the last validation's aAcc, mIoU and per-class IoU
(from the run's log) and the mean seconds per training iteration (``vis_data/scalars.json``).
"""
import argparse
import glob
import json
import os.path as osp
import re
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
from harness import write_table  # noqa: E402  (the benchmarks' JSON writer)

COLUMNS = ['config', 'operator', 'kernel_scale', 'widths', 'aAcc', 'mIoU', 'IoU background / red / green / blue',
           's / iter']
_CLASS_ROW = re.compile(r'^\|\s*(\w[\w ]*?)\s*\|\s*([\d.]+|nan)\s*\|\s*([\d.]+|nan)\s*\|\s*$')


def read_run(work_dir: str) -> list:
    """One table row from a finished run in ``work_dir``; ValueError naming the file that is missing or bad."""
    from mmengine.config import Config
    configs = sorted(glob.glob(osp.join(work_dir, '*.py')))
    runs = sorted(d for d in glob.glob(osp.join(work_dir, '2*')) if osp.isfile(osp.join(d, 'vis_data', 'scalars.json')))
    if not configs or not runs:
        raise ValueError(f'{work_dir}: no config copy or vis_data/scalars.json: is it a tools/train.py work dir?')
    scalars = osp.join(runs[-1], 'vis_data', 'scalars.json')
    try:
        with open(scalars) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f'{scalars}: {err}') from None
    val = [r for r in records if 'mIoU' in r]
    times = [r['time'] for r in records if 'time' in r and 'mIoU' not in r]
    if not val or not times:
        raise ValueError(f'{scalars}: no validation result or training times: did the run finish?')
    with open(osp.join(runs[-1], osp.basename(runs[-1]) + '.log')) as f:
        lines = f.read().splitlines()
    start = max((i for i, line in enumerate(lines) if 'per class results' in line), default=len(lines))
    ious = [m.group(2) for m in map(_CLASS_ROW.match, lines[start:]) if m]  # the classes in the dataset's order
    backbone = Config.fromfile(configs[-1]).model.backbone
    block = backbone.get('block_cfg') or {}
    operator = block.get('operator', '– (local)') + (' (compiled tiles)' if block.get('compile_tiles') else '')
    return [osp.basename(configs[-1]), operator, block.get('kernel_scale', '–'),
            '/'.join(map(str, backbone.widths)), val[-1]['aAcc'], val[-1]['mIoU'],
            ' / '.join(ious[:4]) if len(ious) >= 4 else '?',
            round(sum(times) / len(times), 3)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('work_dirs', nargs='+', help='tools/train.py work dirs of finished demo runs')
    parser.add_argument('--out', default=osp.join(ROOT, 'docs', 'benchmarks', 'demo_longrange.json'))
    parser.add_argument('--threads', type=int, default=1, help='threads the runs used (recorded)')
    parser.add_argument('--notes', default='', help='how the runs were made (recorded under the table)')
    args = parser.parse_args(argv)
    rows, errors = [], []
    for work_dir in args.work_dirs:
        try:
            rows.append(read_run(work_dir))
        except (ValueError, OSError) as err:
            errors.append(str(err))
    if errors:  # every bad work dir at once; nothing written
        print('\n'.join(f'error: {e}' for e in errors), file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(args.threads)
    command = ('.venv/bin/python tools/train.py configs/<config> --work-dir work_dirs/demo_<run> '
               '[--cfg-options model.backbone.block_cfg.operator=<operator> '
               'model.backbone.block_cfg.kernel_scale=<kernel_scale> [model.backbone.block_cfg.compile_tiles=True]]; '
               f'python tools/demo_table.py {" ".join(shlex.quote(w) for w in args.work_dirs)}')
    write_table(Path(args.out), SimpleNamespace(command=command, device='cpu'),
                'demo_longrange', 'The long-range demo: 600 iterations, batch 8, seed 0, validation at the end',
                COLUMNS, rows, notes=f's / iter: mean over the run, as mmengine logged it. {args.notes}'.strip())
    return 0


if __name__ == '__main__':
    sys.exit(main())
