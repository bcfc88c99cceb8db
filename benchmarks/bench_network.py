"""Training step of whole timm networks side by side: what the PIDE blocks cost inside a network.

One step: forward, cross-entropy, backward and an SGD update on a fixed random batch, training mode. The models'
steps are interleaved in one process, each row timed relative to the first model. ``--compile [BACKEND]`` runs
every model under ``torch.compile``; the compiling steps are reported in the notes, never timed.

    python benchmarks/bench_network.py --quick
    python benchmarks/bench_network.py --models hamiltonian74,nl_hamiltonian74,nl_hamiltonian74_frac
    python benchmarks/bench_network.py --device cuda --batch 128 --compile
"""
from __future__ import annotations

import time
from typing import Optional

import harness
import torch


def main(argv: Optional[list[str]] = None) -> None:
    parser = harness.make_parser(__file__, __doc__, 'network_step', repeats=20)
    parser.add_argument('--models', default='hamiltonian74,nl_hamiltonian74',
                        help='comma-separated timm model names, each once; the first is the reference')
    parser.add_argument('--batch', type=harness.positive_int, default=32)
    parser.add_argument('--img-size', type=harness.positive_int, default=32)
    parser.add_argument('--num-classes', type=harness.positive_int, default=10)
    parser.add_argument('--compile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                        help='torch.compile every model with BACKEND (inductor when given bare)')
    args, device = harness.parse(parser, argv)
    names = [m.strip() for m in args.models.split(',') if m.strip()]
    if not names or len(set(names)) != len(names):
        parser.error(f'--models names each model once, got {args.models!r}')
    import timm

    import pide_zoo  # noqa: F401  (registers the models)

    if any(not timm.is_model(n) for n in names):
        parser.error(f'unknown timm model(s) {[n for n in names if not timm.is_model(n)]}')
    if args.quick:
        args.batch = 2
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    models, steps, params = {}, {}, {}
    for name in names:
        model = timm.create_model(name, num_classes=args.num_classes).to(device).train()
        params[name] = sum(p.numel() for p in model.parameters()) / 1e6
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        models[name] = torch.compile(model, backend=args.compile) if args.compile else model

        def step(model=models[name], opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        steps[name] = step
    compiling = {}
    if args.compile:  # the first step compiles forward and backward, a second may recompile
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(), step()
            compiling[name] = time.perf_counter() - t0
    harness.progress(f'{", ".join(names)}: {args.warmup} + {args.repeats} interleaved rounds')
    ms = harness.time_interleaved(steps, device, repeats=args.repeats, warmup=args.warmup)
    rows = []
    for name in names:
        mb = harness.peak_mb(steps[name], device) if not isinstance(ms[name], str) else None
        rows.append([name, round(params[name], 3), ms[name], mb, harness.ratio(ms[name], ms[names[0]])])
    how = f'; torch.compile(backend={args.compile!r}), untimed compiling steps: ' + ', '.join(
        f'{n} {t:.1f} s' for n, t in compiling.items()) if args.compile else ''
    harness.write_table(
        args.out, args, 'network_step',
        f'Training step (forward, loss, backward, SGD), batch {args.batch}, {args.img_size}x{args.img_size}',
        ['model', 'params (M)', 'step ms', 'peak MB', f'time / {names[0]}'], rows,
        f'median of {args.repeats} interleaved rounds after {args.warmup}; peak MB: growth during one step (2^20 '
        f'bytes){how}')


if __name__ == '__main__':
    main()
