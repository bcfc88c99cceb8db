"""FLOPs and parameters of every network beside the paper's Tables 1-4 (Bohn, Griebel & Kannan 2021).

    python tools/flops.py                              # Table 4 with the paper's dense nonlocal kernel
    python tools/flops.py --nonlocal-method both       # ... and this project's efficient path
    python tools/flops.py --markdown > flops.md        # GitHub tables

FLOPs are fvcore's multiply-adds (see :mod:`pide_zoo.flops`); the paper's (``paper_tables.py`` beside this tool)
are TensorFlow profiler flops / 2, which also count pointwise ops at 1/2 and weight initializers, hence the small
differences.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

try:
    import pide_zoo  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paper_tables import ALL_MODELS, COLUMNS, PAPER_NAMES, PAPER_PARAMS, PAPER_SEG_PARAMS, PAPER_TABLE4
from tqdm import tqdm

from pide_zoo.flops import DATASETS, count_flops, count_params, create_paper_model, segmentation_params

DATASET_NAMES = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100', 'stl10': 'STL-10'}


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """Rows as a GitHub markdown table or as plain text with aligned columns."""
    if markdown:
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
        lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
        return '\n'.join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    # Names left-aligned, numbers right-aligned.
    fmt = lambda row: '  '.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return '\n'.join([fmt(header), '  '.join('-' * w for w in widths)] + [fmt(r) for r in rows])


def _rel(ours: float, paper: Optional[float]) -> str:
    return f'{100 * (ours / paper - 1):+.2f}%' if paper else '-'


def _paper(value: Optional[float], digits: int) -> str:
    return f'{value:.{digits}f}' if value is not None else '-'


def flops_table(flops: Dict[Tuple[str, str], float], models: Sequence[str], datasets: Sequence[str],
                markdown: bool) -> str:
    header = ['network', 'model']
    for d in datasets:
        header += [DATASET_NAMES[d], 'paper', 'diff']
    rows = []
    for name in models:
        row = [PAPER_NAMES.get(name, name), name]
        for d in datasets:
            ours = flops[name, d] / 1e6
            paper = PAPER_TABLE4[name][COLUMNS.index(d)] if name in PAPER_TABLE4 else None
            row += [f'{ours:.1f}', _paper(paper, 1), _rel(ours, paper)]
        rows.append(row)
    return format_table(header, rows, markdown)


def params_table(params: Dict[Tuple[str, str], int], models: Sequence[str], datasets: Sequence[str],
                 markdown: bool) -> str:
    header = ['network', 'model']
    for d in list(datasets) + ['bdd100k']:
        header += [DATASET_NAMES.get(d, 'BDD100K'), 'paper']
    rows = []
    for name in models:
        row = [PAPER_NAMES.get(name, name), name]
        for d in datasets:
            row += [f'{params[name, d] / 1e6:.3f}', _paper(PAPER_PARAMS.get(name, (None,) * 3)[COLUMNS.index(d)], 2)]
        row += [f'{params[name, "bdd100k"] / 1e6:.3f}', _paper(PAPER_SEG_PARAMS.get(name), 2)]
        rows.append(row)
    return format_table(header, rows, markdown)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--nonlocal-method', choices=('dense', 'auto', 'both'), default='dense',
                        help="PIDE block evaluation for the FLOP count: 'dense' (the paper's N x M kernel), "
                             "'auto' (this project's low-rank / tiled path) or both")
    parser.add_argument('--markdown', action='store_true', help='print GitHub markdown tables')
    parser.add_argument('--models', nargs='+', default=list(ALL_MODELS), choices=ALL_MODELS, metavar='MODEL',
                        help='registered models (default: all)')
    parser.add_argument('--datasets', nargs='+', default=list(DATASETS), choices=DATASETS, metavar='DATASET',
                        help='dataset cfgs (default: cifar10 cifar100 stl10)')
    parser.add_argument('--elementwise', type=float, default=0.0, metavar='COST',
                        help='flops per output element of pointwise ops (default 0: fvcore convention; '
                             'TensorFlow profiler flops / 2, as in the paper: 0.5)')
    parser.add_argument('--no-params', action='store_true', help='skip the parameter tables')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    methods = ('dense', 'auto') if args.nonlocal_method == 'both' else (args.nonlocal_method,)
    jobs = [(name, d) for name in args.models for d in args.datasets]
    flops: Dict[str, Dict[Tuple[str, str], float]] = {m: {} for m in methods}
    params: Dict[Tuple[str, str], int] = {}
    bar = tqdm(total=len(jobs) * len(methods) + (0 if args.no_params else len(args.models)),
               disable=args.no_progress, file=sys.stderr, unit='count')
    for name, d in jobs:
        model, input_size = create_paper_model(name, d)
        params[name, d] = count_params(model)
        for m in methods:
            bar.set_description(f'{name}.{d} ({m})')
            flops[m][name, d] = count_flops(model, input_size, nonlocal_method=m, elementwise=args.elementwise)
            bar.update()
    if not args.no_params:
        for name in args.models:
            bar.set_description(f'{name} (BDD100K layout)')
            params[name, 'bdd100k'] = segmentation_params(name)
            bar.update()
    bar.close()

    convention = 'fvcore convention' + (f', pointwise ops {args.elementwise:g} per element' if args.elementwise else '')
    sections = []
    for m in methods:
        title = (f'Table 4: FLOPs (M multiply-adds, batch 1, {convention}), nonlocal method {m!r}; '
                 f'diff = ours / paper - 1')
        sections.append((title, flops_table(flops[m], args.models, args.datasets, args.markdown)))
    if not args.no_params:
        title = ('Tables 1-3: parameters (M; the paper truncates to 2 decimals); BDD100K = Table 3 layout '
                 '(no pooling, nonlocal subsample 3, 1x1 conv head to 20 classes)')
        sections.append((title, params_table(params, args.models, args.datasets, args.markdown)))
    for title, table in sections:
        print(f'### {title}\n' if args.markdown else f'{title}\n', flush=True)
        print(table + '\n')


if __name__ == '__main__':
    main()
