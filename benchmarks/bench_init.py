"""What a freshly initialised PIDEBlock passes on, for every operator and width: does it start able to learn?

For each operator, width C and kernel form (``kernel_scale`` 'paper': the paper's exact kernel; 'width': the
default, distances in units that follow the embedding width), ``PIDEBlock(C, operator=..., kernel_scale=...)`` in
training mode gets x = ReLU(N(0, 1)) of shape (4, C, 16, 16) and a fixed random linear loss L = sum(out * R):

* ``pre-BN std``: std of K_1 A, the first batch norm's input (far below its sqrt(eps) it passes ~nothing; the block
  alone has PyTorch's eps = 1e-5, sqrt 3.2e-3; the paper's networks the authors' eps = 1e-3, sqrt 3.2e-2);
* ``‖B−X‖/‖X‖``: how far the block moves its input (Frobenius norms);
* ``grad theta``, ``grad K_1``: ||dL/dW|| / ||W|| of the theta embedding's and the first stage's 1x1 conv weights.

Each value is the median over ``--repeats`` seeds (default 1: seed 0); ``--warmup`` is unused (nothing is timed).

    python benchmarks/bench_init.py --quick
    python benchmarks/bench_init.py                      # 4 operators x 8 widths x 2 forms, about a minute
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


def init_stats(operator: str, channels: int, form: str, seed: int, device: Any) -> list[float]:
    """pre-BN std, ‖B−X‖/‖X‖, grad theta, grad K_1 of one block."""
    from pide_zoo.layers import PIDEBlock

    torch.manual_seed(seed)
    block = PIDEBlock(channels, operator=operator, kernel_scale=form).to(device).train()
    x = torch.randn(4, channels, 16, 16, device=device).relu()
    r = torch.randn(4, channels, 16, 16, device=device)
    pre_bn = []
    block.norms[0].register_forward_hook(lambda module, inputs, output: pre_bn.append(inputs[0].detach()))
    out = block(x)
    (out * r).sum().backward()
    theta, k1 = block.theta.weight, block.convs[0].weight
    with torch.no_grad():
        return [(t[0] / t[1]).item() for t in ((pre_bn[0].std(), 1), ((out - x).norm(), x.norm()),
                                               (theta.grad.norm(), theta.norm()), (k1.grad.norm(), k1.norm()))]


def main(argv: Optional[list[str]] = None) -> None:
    parser = harness.make_parser(__file__, __doc__, 'block_init', repeats=1, warmup=0)
    harness.add_choices(parser, '--operators', OPERATORS)
    parser.add_argument('--widths', type=lambda v: tuple(int(c) for c in v.split(',')), default=WIDTHS,
                        help='comma-separated channel counts C (embeddings C/2)')
    args, device = harness.parse(parser, argv)
    if any(c < 2 for c in args.widths):
        parser.error(f'--widths must all be >= 2, got {args.widths}')
    widths = (16, 32) if args.quick else args.widths
    rows = []
    for op in args.operators:
        for c in widths:
            for form in FORMS:
                harness.progress(f'{op} C={c} {form}')
                stats = [init_stats(op, c, form, seed, device) for seed in range(args.repeats)]
                rows.append([op, c, form] + [float(f'{statistics.median(s):.3g}') for s in zip(*stats)])
    harness.write_table(
        args.out, args, 'block_init', 'PIDEBlock at initialisation: x = ReLU(N(0,1)), (4, C, 16, 16), training mode',
        ['operator', 'C', 'kernel_scale', 'pre-BN std', '‖B−X‖/‖X‖', 'grad theta', 'grad K_1'], rows,
        f"median over {args.repeats} seed(s); pre-BN std: std of K_1 A, the first batch norm's input (a "
        f"PIDEBlock's, eps = {EPS:g}, sqrt(eps) = {EPS ** 0.5:.2g}); grad: ||dL/dW|| / ||W||, L = sum(out * R)")


if __name__ == '__main__':
    main()
