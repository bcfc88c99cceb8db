"""What a PIDE block costs mixed into a timm network, against timm's ``NonLocalAttn`` in the same place.

Rows (parameters; GFLOPs of one image's forward, fvcore's multiply-adds with the project's handles):

* ``resnet50`` plain, with timm's ``NonLocalAttn`` as ``attn_layer`` in every bottleneck (its defaults), and with
  ``PIDEBlock`` there for each operator (the block's defaults, the mixing defaults);
* ``convnext_tiny`` and ``mobilenetv3_small_100`` plain and with ``insert_pide_blocks`` after the last stage;
* the paper's networks (``nl_hamiltonian74*``), whose widths are pinned: their rows equal Table 4's counts.

The PIDE blocks are counted in their dense form (the N x M kernel formed once, as ``NonLocalAttn`` forms its
attention; ``nonlocal_method='dense'``); ``unsupported in PIDE`` lists any traced op inside a PIDE block that the
counter has no handle for (none expected). Nothing is timed.

    python benchmarks/bench_mixing.py --quick        # 64 px, seconds
    python benchmarks/bench_mixing.py                # 224 px (CIFAR/STL sizes for the paper's networks)
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional

import harness
import timm
import torch

from pide_zoo.layers import OPERATORS  # the operator table's paper operators

PAPER_MODELS = ('hamiltonian74', 'nl_hamiltonian74', 'nl_hamiltonian74_frac', 'nl_hamiltonian74_invfrac',
                'nl_hamiltonian74_log')


def variants(operators: tuple[str, ...]) -> list[tuple[str, str, Any]]:
    """(model, variant, builder) of every row."""
    from timm.layers import NonLocalAttn

    from pide_zoo.layers import PIDEBlock
    from pide_zoo.models import insert_pide_blocks

    rows = [('resnet50', 'plain', lambda: timm.create_model('resnet50')),
            ('resnet50', 'NonLocalAttn', lambda: timm.create_model('resnet50', block_args=dict(
                attn_layer=NonLocalAttn)))]
    rows += [('resnet50', f'PIDEBlock {op}', partial(
        lambda op: timm.create_model('resnet50', block_args=dict(attn_layer=partial(PIDEBlock, operator=op))), op))
        for op in operators]
    for name in ('convnext_tiny', 'mobilenetv3_small_100'):
        rows.append((name, 'plain', partial(timm.create_model, name)))
        rows += [(name, f'insert_pide_blocks {op}', partial(
            lambda name, op: insert_pide_blocks(timm.create_model(name), operator=op), name, op)) for op in operators]
    return rows


def measure(build: Any, input_size: tuple[int, int, int]) -> list[Any]:
    """parameters, GFLOPs, unsupported ops inside PIDE blocks."""
    from pide_zoo.flops import count_params, flop_analysis, pide_block_names

    torch.manual_seed(0)
    model = build().eval()
    fa = flop_analysis(model, input_size, nonlocal_method='dense')
    unsupported: dict[str, int] = {}
    for name in pide_block_names(model):
        for op, n in fa.unsupported_ops(name).items():
            unsupported[op] = unsupported.get(op, 0) + n
    return [count_params(model), fa.total() / 1e9, ', '.join(sorted(unsupported)) or 'none']


def main(argv: Optional[list[str]] = None) -> None:
    parser = harness.make_parser(__file__, __doc__, 'mixing_cost', repeats=1, warmup=0)
    harness.add_choices(parser, '--operators', OPERATORS)
    args, _ = harness.parse(parser, argv)
    size = 64 if args.quick else 224
    rows, base = [], {}
    for model, variant, build in variants(args.operators):
        harness.progress(f'{model} {variant}')
        params, gflops, unsupported = measure(build, (3, size, size))
        base.setdefault(model, (params, gflops))
        ref = base['NonLocalAttn'] if variant.startswith('PIDEBlock') else base[model]
        if variant == 'NonLocalAttn':
            base['NonLocalAttn'] = (params, gflops)
        rows.append([model, variant, params, harness.ratio(params, ref[0]), round(gflops, 3),
                     harness.ratio(gflops, ref[1]), unsupported])
    from pide_zoo.flops import create_paper_model

    paper = ('cifar10',) if args.quick else ('cifar10', 'stl10')
    for name in PAPER_MODELS:
        for tag in paper:
            harness.progress(f'{name}.{tag}')
            model, input_size = create_paper_model(name, tag)
            params, gflops, unsupported = measure(lambda model=model: model, input_size)
            rows.append([f'{name}.{tag}', 'paper widths', params, None, round(gflops, 4), None, unsupported])
    harness.write_table(
        args.out, args, 'mixing_cost', f'PIDE blocks mixed into timm networks at {size} px, against NonLocalAttn',
        ['model', 'variant', 'params', 'params ratio', 'GFLOPs', 'GFLOPs ratio', 'unsupported in PIDE'], rows,
        "ratio: resnet50's PIDE rows to its NonLocalAttn row, every other row to its model's plain row; GFLOPs: "
        "fvcore's multiply-adds of one image, PIDE blocks dense (the N x M kernel, as NonLocalAttn); the paper's "
        "networks at their dataset's size.")


if __name__ == '__main__':
    main()
