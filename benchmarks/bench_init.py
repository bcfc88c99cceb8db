"""What a freshly initialised PIDEBlock passes on, for every operator and width: does it start able to learn?

For each operator, width C and kernel form (``kernel_scale`` 'paper': the paper's exact kernel; 'width': the
default, distances in units that follow the embedding width), ``PIDEBlock(C, operator=..., kernel_scale=...)`` at
the mixing defaults (embeddings C/8, values C/16, a zero update scale: the block starts as the identity) in
training mode gets x = ReLU(N(0, 1)) of shape (4, C, 16, 16) and a fixed random linear loss L = sum(out * R):

* ``pre-BN std``: std of K_1 A, the first batch norm's input (far below its sqrt(eps) it passes ~nothing; the block
  alone has PyTorch's eps = 1e-5, sqrt 3.2e-3; the paper's networks the authors' eps = 1e-3, sqrt 3.2e-2);
* ``‖B−X‖/‖X‖ start``: how far the fresh block moves its input (0: the identity);
* ``‖dL/dγ‖``: the update scale's gradient at step 0 (the only one; every other parameter's is 0);
* after one SGD step (lr 0.01): ``‖B−X‖/‖X‖``, and ``grad theta``, ``grad K_1``: ||dL/dW|| / ||W|| of the theta
  embedding's and the first stage's 1x1 conv weights.

``--widths-of paper`` measures the paper's block instead (``PAPER_WIDTHS``: embeddings C/2, full-width values, no
scale; the step-0 columns then). Each value is the median over ``--repeats`` seeds (default 1: seed 0);
``--warmup`` is unused (nothing is timed).

    python benchmarks/bench_init.py --quick
    python benchmarks/bench_init.py                      # 4 operators x 8 widths x 2 forms, about two minutes
"""
from __future__ import annotations

import statistics
from typing import Any, Optional

import harness
import torch

from pide_zoo.layers import OPERATORS  # the operator table's paper operators

WIDTHS = (16, 32, 64, 128, 256, 512, 1024, 2048)
FORMS = ('paper', 'width')
EPS = torch.nn.BatchNorm2d(1).eps  # PIDEBlock's default norm_layer


def init_stats(operator: str, channels: int, form: str, seed: int, device: Any, paper: bool) -> list[float]:
    """pre-BN std, ‖B−X‖/‖X‖ at the start, ‖dL/dγ‖, then after one step ‖B−X‖/‖X‖, grad theta, grad K_1."""
    from pide_zoo.layers import PAPER_WIDTHS, PIDEBlock

    torch.manual_seed(seed)
    block = PIDEBlock(channels, operator=operator, kernel_scale=form, **(PAPER_WIDTHS if paper else {}))
    block = block.to(device).train()
    x = torch.randn(4, channels, 16, 16, device=device).relu()
    r = torch.randn(4, channels, 16, 16, device=device)
    pre_bn = []
    block.norms[0].register_forward_hook(lambda module, inputs, output: pre_bn.append(inputs[0].detach()))
    optimizer = torch.optim.SGD(block.parameters(), lr=0.01)
    out = block(x)
    (out * r).sum().backward()
    with torch.no_grad():
        stats = [pre_bn[0].std().item(), ((out - x).norm() / x.norm()).item(),
                 float('nan') if block.gamma is None else block.gamma.grad.norm().item()]
    if not paper:  # the fresh block is the identity: its other gradients come after the first step
        optimizer.step()
        optimizer.zero_grad()
        out = block(x)
        (out * r).sum().backward()
    theta, k1 = block.theta.weight, block.convs[0].weight
    with torch.no_grad():
        return stats + [((out - x).norm() / x.norm()).item(), (theta.grad.norm() / theta.norm()).item(),
                        (k1.grad.norm() / k1.norm()).item()]


def main(argv: Optional[list[str]] = None) -> None:
    parser = harness.make_parser(__file__, __doc__, 'block_init', repeats=1, warmup=0)
    harness.add_choices(parser, '--operators', OPERATORS)
    parser.add_argument('--widths', type=lambda v: tuple(int(c) for c in v.split(',')), default=WIDTHS,
                        help='comma-separated channel counts C')
    parser.add_argument('--widths-of', choices=('mixing', 'paper'), default='mixing',
                        help="the block's defaults (mixing, default) or PAPER_WIDTHS")
    args, device = harness.parse(parser, argv)
    if any(c < 2 for c in args.widths):
        parser.error(f'--widths must all be >= 2, got {args.widths}')
    widths = (16, 32) if args.quick else args.widths
    paper = args.widths_of == 'paper'
    rows = []
    for op in args.operators:
        for c in widths:
            for form in FORMS:
                harness.progress(f'{op} C={c} {form}')
                stats = [init_stats(op, c, form, seed, device, paper) for seed in range(args.repeats)]
                rows.append([op, c, form] + [_median(s) for s in zip(*stats)])
    what = "the paper's widths (PAPER_WIDTHS)" if paper else 'the mixing defaults'
    after = 'step 0' if paper else 'after one step'
    harness.write_table(
        args.out, args, 'block_init', f'PIDEBlock at initialisation, {what}: x = ReLU(N(0,1)), (4, C, 16, 16), '
        'training mode',
        ['operator', 'C', 'kernel_scale', 'pre-BN std', '‖B−X‖/‖X‖ start', '‖dL/dγ‖', f'‖B−X‖/‖X‖ {after}',
         f'grad theta {after}', f'grad K_1 {after}'], rows,
        f"median over {args.repeats} seed(s); pre-BN std: std of K_1 A, the first batch norm's input (a "
        f"PIDEBlock's, eps = {EPS:g}, sqrt(eps) = {EPS ** 0.5:.2g}); grad: ||dL/dW|| / ||W||, L = sum(out * R); "
        "one step: SGD, lr 0.01, every parameter")


def _median(values) -> Optional[float]:
    values = [v for v in values if v == v]  # NaN: the paper's block has no update scale
    return float(f'{statistics.median(values):.3g}') if values else None


if __name__ == '__main__':
    main()
