"""What the benchmarks in this folder share: options, interleaved timing, peak memory, tables written as JSON.

Every script takes ``--device {cpu,cuda}``, ``--threads``, ``--quick`` (tiny sizes, seconds), ``--out``,
``--repeats``, ``--warmup``, prints Markdown tables and writes each as JSON: ``{"name", "title", "command",
"environment": {"cpu", "threads", "torch", "device", "date"}, "columns", "rows", "notes"}``. The variants of a
table run interleaved (A, B, A, B, ...) in one process, so a noisy machine slows them alike and ratios hold.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20
GIB = 2 ** 30


def make_parser(script: str, doc: str, name: str, *, repeats: int = 3, warmup: int = 1) -> argparse.ArgumentParser:
    """A parser with the options every script shares; ``name`` gives the default ``--out``."""
    parser = argparse.ArgumentParser(prog=Path(script).name, description=doc.split('\n\n')[0])
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                        help='cuda: timed with torch.cuda.synchronize, memory from torch.cuda.max_memory_allocated')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--quick', action='store_true', help='tiny sizes, finishes in seconds (tests, dry runs)')
    parser.add_argument('--out', type=Path, default=REPO_ROOT / 'docs' / 'benchmarks' / f'{name}.json',
                        help='JSON of the table (a script with several tables writes <stem>_<table>.json beside it)')
    parser.add_argument('--repeats', type=int, default=repeats, help='timed rounds (the median is reported)')
    parser.add_argument('--warmup', type=int, default=warmup, help='untimed rounds before the timed ones')
    return parser


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, Any]:
    """Parse and check the shared options, apply ``--threads``, note the command line; returns the device too."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f'--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}')
    if args.threads is not None and args.threads < 1:
        parser.error(f'--threads must be >= 1, got {args.threads}')
    if str(REPO_ROOT) not in sys.path:  # pide_zoo importable without installing it
        sys.path.insert(0, str(REPO_ROOT))
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda given but torch.cuda.is_available() is False')
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, 'max_gb', 0) is None:  # half the memory free now: a case predicted beyond it would swap
        free = torch.cuda.mem_get_info()[0] if args.device == 'cuda' else _proc_bytes('/proc/meminfo', 'MemAvailable')
        args.max_gb = (free or 8 * GIB) / GIB / 2
    args.command = ' '.join(['python', f'benchmarks/{parser.prog}', *map(shlex.quote, argv)])
    return args, torch.device(args.device)


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {value!r}')
    return int(value)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sync(device: Any) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict[str, Callable[[], Any]], device: Any, *, repeats: int,
                     warmup: int) -> dict[str, Any]:
    """Median milliseconds of each step, run in turn each round; a step that raises gets its error text instead."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    errors: dict[str, str] = {}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            if name in errors:
                continue
            try:
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
            except Exception as exc:  # reported in the table, the other variants go on
                errors[name] = error_text(exc)
                progress(f'    {name} failed: {errors[name]}')
                continue
            if i >= warmup:
                times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: errors.get(name) or statistics.median(times[name]) for name in steps}


def error_text(exc: BaseException) -> str:
    return (f'{type(exc).__name__}: {exc}'.splitlines() or [''])[0][:160]


def peak_mb(step: Callable[[], Any], device: Any) -> Optional[float]:
    """Peak memory growth in MiB while ``step`` runs once (None where it cannot be read).

    CUDA: ``torch.cuda.max_memory_allocated`` over what was allocated before. CPU (Linux): growth of the resident
    high-water mark, reset through /proc/self/clear_refs after ``malloc_trim`` handed freed memory back to the
    system, so that memory an earlier case freed but the allocator kept cannot hide this one's.
    """
    if device.type == 'cuda':
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / MIB
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except (OSError, AttributeError):  # not Linux with glibc
        return None
    base = _proc_bytes('/proc/self/status', 'VmRSS')
    step()
    return (_proc_bytes('/proc/self/status', 'VmHWM') - base) / MIB


def _proc_bytes(path: str, field: str) -> Optional[int]:
    """A kB field of a /proc file in bytes (None without /proc)."""
    try:
        with open(path) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))
    except OSError:
        return None


def environment(args: argparse.Namespace) -> dict[str, Any]:
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'
    return {'cpu': f'{cpu} ({os.cpu_count()} CPUs)', 'threads': torch.get_num_threads(), 'torch': torch.__version__,
            'device': device, 'date': time.strftime('%Y-%m-%d %H:%M:%S')}


def add_choices(parser: argparse.ArgumentParser, flag: str, allowed: tuple[str, ...]) -> None:
    """An option taking comma-separated items of ``allowed`` (default: all of them)."""
    def parse(value: str) -> tuple[str, ...]:
        items = allowed if value == 'all' else tuple(v.strip() for v in value.split(',') if v.strip())
        bad = [i for i in items if i not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f'unknown {bad or value!r}; choose from {",".join(allowed)} or all')
        return items
    parser.add_argument(flag, type=parse, default=allowed, help=f'comma-separated, out of {",".join(allowed)}')


def write_table(path: Path, args: argparse.Namespace, name: str, title: str, columns: Sequence[str],
                rows: Sequence[Sequence[Any]], notes: str = '') -> None:
    """Print the table and write it as JSON atomically (a temporary file replaces the old one only when whole)."""
    print_table(title, columns, rows)
    print(f'\n{notes}')
    data = {'name': name, 'title': title, 'command': args.command, 'environment': environment(args),
            'columns': list(columns), 'rows': [[_round(v) for v in r] for r in rows], 'notes': notes}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    tmp.write_text(json.dumps(data, indent=1) + '\n')
    os.replace(tmp, path)
    progress(f'wrote {path}')


def _round(value: Any) -> Any:
    return float(f'{value:.4g}') if isinstance(value, float) and math.isfinite(value) else value


def fmt(value: Any) -> str:
    if value is None:
        return '—'
    if isinstance(value, float):
        return f'{value:.2e}' if value != 0 and (abs(value) < 0.01 or abs(value) >= 1e6) else f'{value:,.2f}'
    return f'{value:,}' if isinstance(value, int) else str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table: text left-aligned, numbers right-aligned."""
    cells = [[fmt(v) for v in r] for r in rows]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
               for i in range(len(columns))]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return '| ' + ' | '.join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + ' |'

    print(f'\n## {title}\n')
    print(line(columns))
    print('|' + '|'.join('-' * (w + 1) + ':' if num else '-' * (w + 2) for w, num in zip(widths, numeric)) + '|')
    for r in cells:
        print(line(r))


def ratio(a: Any, b: Any) -> Optional[float]:
    """a / b where both are measured numbers (not an error text or None)."""
    ok = all(isinstance(v, (int, float)) for v in (a, b)) and b
    return round(a / b, 3) if ok else None
