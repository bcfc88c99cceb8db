"""Shared measurement harness of the benchmarks in this folder.

What every benchmark here needs, once:

* :func:`run_isolated`: one measurement in a fresh spawned process, so that allocator caches and
  high-water marks of one measurement cannot hide or inflate the next;
* :func:`measure_step`: median wall time of a step (forward+backward, or a forward) after warm-up runs,
  with fewer timed runs (at least the warm-up) where they would exceed a time budget, and its peak
  memory through :class:`PeakMeter`: growth of the resident high-water mark VmHWM, reset through
  /proc/self/clear_refs (fallback: ru_maxrss minus the resident size at the start; torch's CPU
  allocations are invisible to tracemalloc), or ``torch.cuda.max_memory_allocated`` on CUDA;
* :class:`CpuContention` and :func:`wait_for_idle`: how busy other processes kept the CPUs during a
  measurement, and waiting for quiet before one (on a shared machine other processes' load inflates
  the times many-fold as the math libraries' threads contend for the cores);
* :func:`add_harness_args` / :func:`setup`: the command-line options these imply, and
  :func:`environment_lines` / :func:`print_table` / ``fmt_*``: the report.

Import it from a script in this folder (``from harness import ...``): the scripts are run as
``python benchmarks/<script>.py``, which puts this folder on ``sys.path``.
"""
from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

try:
    import resource
except ImportError:  # not on Windows; only the fallback memory reading needs it
    resource = None

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20
GIB = 2 ** 30
# CPU share taken by other processes during a measurement above which its time is flagged.
CONTENTION_WARN = 0.1


def ensure_repo_on_path() -> None:
    """Make ``pide_zoo`` importable without installing it (spawned children inherit ``sys.path``)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


# ---------------------------------------------------------------------------------------------
# Memory and CPU readings
# ---------------------------------------------------------------------------------------------

def status_bytes(field: str) -> Optional[int]:
    """A kB field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is no /proc."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def maxrss_bytes() -> int:
    if resource is None:
        return 0
    # ru_maxrss is in kB on Linux and in bytes on macOS.
    scale = 1 if sys.platform == 'darwin' else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class CpuContention:
    """Share of the machine's CPUs that other processes used since construction (Linux; None elsewhere).

    A median time is only meaningful on an otherwise idle machine; this says whether it was.
    """

    def __init__(self) -> None:
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> Optional[tuple[int, float, float]]:
        try:
            with open('/proc/stat') as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        own = os.times()
        busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait, summed over CPUs
        return busy, (own.user + own.system) * os.sysconf('SC_CLK_TCK'), time.monotonic()

    def fraction(self) -> Optional[float]:
        end = self._snapshot()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        capacity = (end[2] - self.start[2]) * os.sysconf('SC_CLK_TCK') * (os.cpu_count() or 1)
        # Clock ticks are coarse (usually 10 ms): over a few ticks the estimate can leave [0, 1].
        return min(1.0, max(0.0, ((end[0] - self.start[0]) - (end[1] - self.start[1])) / capacity))


class PeakMeter:
    """Peak memory growth from construction on, for the CPU (resident memory) or a CUDA device."""

    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = device.type == 'cuda'
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            self.device = device
            self.base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.how = 'torch.cuda.max_memory_allocated'
            return
        rss = status_bytes('VmRSS')
        self.hwm_reset = False
        if rss is not None:
            try:
                # Writing 5 resets the peak resident size (Linux >= 4.0), so earlier peaks
                # (imports, input construction) cannot mask this measurement's.
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')
                self.hwm_reset = True
            except OSError:
                pass
        self.base = rss if rss is not None else maxrss_bytes()
        self.how = 'VmHWM after clear_refs' if self.hwm_reset else 'ru_maxrss - baseline RSS'

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        hwm = status_bytes('VmHWM') if self.hwm_reset else None
        return max(0, (hwm if hwm is not None else maxrss_bytes()) - self.base)


def available_memory_gb(device: str) -> Optional[float]:
    """Memory free for a new measurement now: CUDA free memory, or MemAvailable of /proc/meminfo."""
    if device.startswith('cuda'):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free / GIB
    try:
        with open('/proc/meminfo') as f:
            info = {line.split(':')[0]: int(line.split()[1]) for line in f}
        return info['MemAvailable'] * 1024 / GIB
    except (OSError, KeyError, ValueError):
        return None


def default_memory_budget_gb(device: str) -> float:
    """Half of the memory available now: a case predicted beyond that would swap or be killed."""
    free = available_memory_gb(device)
    return 4.0 if free is None else free / 2


# ---------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------

def measure_step(step: Callable[[], Any], device: Any, *, warmup: int, repeats: int,
                 budget_s: float) -> dict[str, Any]:
    """Time ``step`` and read the peak memory growth it causes.

    The meter starts here, so build the model and inputs (and run any one-off warm-up on a tiny input)
    before calling. ``warmup`` untimed runs come first; then ``repeats`` timed runs, fewer where they
    would exceed ``budget_s`` by the fastest warm-up run. A warm-up longer than the whole budget is
    itself the measurement: its one-off costs (milliseconds) vanish next to a run of minutes, and a
    second run would double the benchmark's length.

    Returns:
        ``ms`` (median), ``runs`` (count, or ``'1w'`` for the warm-up alone), ``peak`` (bytes),
        ``memory_how``, ``others`` (CPU share of other processes, or None), ``warmup_ms`` and
        ``out`` (the last step's return value, for comparisons; drop it before sending the result on).
    """
    import torch

    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    def timed(count: int) -> tuple[list[float], Any]:
        out, times = None, []
        for _ in range(count):
            out = None  # drop the previous output before the next step allocates its own
            sync()
            t0 = time.perf_counter()
            out = step()
            sync()
            times.append(time.perf_counter() - t0)
        return times, out

    meter = PeakMeter(device)
    warm_contention = CpuContention()
    warm_times, out = timed(warmup)
    warm_contention = warm_contention.fraction()
    per_run = min(warm_times) if warm_times else 0.0
    runs = repeats if per_run == 0.0 else min(repeats, int(budget_s // max(per_run, 1e-6)))
    contention = CpuContention()
    if runs:
        out = None
        times, out = timed(runs)
    else:
        times = warm_times[-1:]
    peak = meter.peak()
    others = contention.fraction() if runs else warm_contention
    return {'ms': 1e3 * statistics.median(times), 'runs': str(runs) if runs else '1w', 'peak': peak,
            'memory_how': meter.how, 'others': others, 'warmup_ms': [1e3 * t for t in warm_times], 'out': out}


def _error(exc: BaseException) -> dict[str, Any]:
    return {'error': (f'{type(exc).__name__}: {exc}'.splitlines() or [''])[0][:100]}


def _child(fn: Callable[..., dict[str, Any]], args: tuple, conn: Any) -> None:
    try:
        result = fn(*args)
    except Exception as exc:  # reported in the table instead of ending the whole benchmark
        result = _error(exc)
    conn.send(result)
    conn.close()


def run_isolated(fn: Callable[..., dict[str, Any]], *args: Any, in_process: bool = False) -> dict[str, Any]:
    """``fn(*args)`` in a fresh spawned process (or here, with ``in_process``); exceptions become ``{'error'}``.

    ``fn`` must be a module-level function and ``args`` picklable. A child that dies (killed for memory,
    a crash in native code) is reported the same way.
    """
    if in_process:
        try:
            return fn(*args)
        except Exception as exc:
            return _error(exc)
    ctx = mp.get_context('spawn')  # fork would share the parent's heap and high-water mark
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, sender))
    proc.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:
        result = None
    proc.join()
    if result is None:
        why = ' (killed: out of memory?)' if proc.exitcode == -9 else ''
        result = {'error': f'child process died, exit code {proc.exitcode}{why}'}
    return result


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_for_idle(max_wait_s: float) -> None:
    """Wait (at most ``max_wait_s``) until other processes leave the CPUs idle."""
    if max_wait_s <= 0:
        return
    deadline = time.monotonic() + max_wait_s
    announced = False
    while True:
        probe = CpuContention()
        time.sleep(2.0)
        busy = probe.fraction()
        if busy is None or busy <= CONTENTION_WARN or time.monotonic() >= deadline:
            if announced:
                progress(f'    CPUs {"idle" if busy is not None and busy <= CONTENTION_WARN else "still busy"}, '
                         'going on')
            return
        if not announced:
            progress(f'    other processes use {100 * busy:.0f}% of the CPUs; waiting up to {max_wait_s:.0f} s')
            announced = True
        time.sleep(8.0)


# ---------------------------------------------------------------------------------------------
# Command line and report
# ---------------------------------------------------------------------------------------------

def add_harness_args(parser: argparse.ArgumentParser, *, repeats: int = 5, case_budget_s: float = 30.0) -> None:
    """The options every benchmark here shares; :func:`setup` checks and applies them."""
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:i]')
    parser.add_argument('--quick', action='store_true', help='tiny sizes, in-process: a smoke test in seconds')
    parser.add_argument('--repeats', type=int, default=repeats, help='timed runs per measurement (median reported)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs before the timed ones')
    parser.add_argument('--case-budget-s', type=float, default=case_budget_s,
                        help='cap on the timed runs of one measurement; at least one run is always made')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--malloc-mmap-threshold', type=int, default=None, metavar='BYTES',
                        help='set glibc MALLOC_MMAP_THRESHOLD_ in the measuring processes, so that freed blocks '
                             'above it go back to the OS and the resident peak tracks live tensors rather than '
                             'what the allocator keeps (default: the allocator as users get it)')
    parser.add_argument('--wait-idle-s', type=float, default=0.0,
                        help='before each measurement wait up to this long for other processes to leave the CPUs '
                             'idle (for shared machines; the CPU others column shows what was left)')
    parser.add_argument('--in-process', action='store_true',
                        help='measure in this process (faster; peaks can be masked by freed-but-kept memory)')


def setup(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the shared options and apply them to this process (and the children it will spawn)."""
    if args.repeats < 1 or args.warmup < 0:
        parser.error('--repeats must be >= 1 and --warmup >= 0')
    args.in_process = args.in_process or args.quick
    if args.malloc_mmap_threshold is not None:
        if args.in_process:
            parser.error('--malloc-mmap-threshold needs fresh processes: not with --in-process or --quick')
        os.environ['MALLOC_MMAP_THRESHOLD_'] = str(args.malloc_mmap_threshold)  # read by glibc at child start-up
    ensure_repo_on_path()
    import torch

    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('--device cuda given but torch.cuda.is_available() is False')
    if args.threads:
        torch.set_num_threads(args.threads)


def environment_lines(args: argparse.Namespace, budget_note: str = '') -> list[str]:
    """Date, command, versions, device, threads and how the measurements were isolated."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    except OSError:
        pass
    dev = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith('cuda') else cpu
    threads = args.threads or torch.get_num_threads()
    malloc = os.environ.get('MALLOC_MMAP_THRESHOLD_')
    malloc = f'MALLOC_MMAP_THRESHOLD_={malloc}' if malloc else 'default malloc settings'
    isolation = ('in-process (peak MB unreliable: memory freed by earlier cases is reused unseen)' if args.in_process
                 else 'one spawned process per measurement')
    return [
        f'- date: {time.strftime("%Y-%m-%d %H:%M:%S")}; command: `{" ".join([Path(sys.argv[0]).name] + sys.argv[1:])}`',
        f'- torch {torch.__version__}, python {platform.python_version()}, device {args.device} ({dev}), '
        f'{threads} CPU threads, {os.cpu_count()} CPUs',
        f'- repeats {args.repeats} (median) after {args.warmup} warm-up, at most {args.case_budget_s:g} s of timed '
        f'runs per measurement; {budget_note + "; " if budget_note else ""}{isolation}; {malloc}',
    ]


def fmt_num(value: Optional[float], digits: int = 1) -> str:
    return '—' if value is None else f'{value:,.{digits}f}'


def fmt_pct(value: Optional[float]) -> str:
    return '—' if value is None else f'{100 * value:.0f}%' + (' (!)' if value > CONTENTION_WARN else '')


def fmt_duration(seconds: float) -> str:
    return f'~{seconds:.0f} s' if seconds < 120 else f'~{seconds / 60:.0f} min' if seconds < 7200 else \
        f'~{seconds / 3600:.1f} h'


def fmt_ratio(value: Optional[float]) -> str:
    return '—' if value is None else f'{value:.2f}x' if value < 10 else f'{value:.1f}x'


def verdict(ok: Optional[bool]) -> str:
    return 'not measured' if ok is None else 'PASS' if ok else 'FAIL'


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> None:
    """A Markdown table; the first ``left`` columns are left-aligned, the others (numbers) right-aligned."""
    rows = [list(r) + [''] * (len(header) - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in [list(header)] + rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return '| ' + ' | '.join(c.ljust(w) if i < left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + ' |'

    print(line(header))
    print('|' + '|'.join(('-' * (w + 2)) if i < left else ('-' * (w + 1) + ':') for i, w in enumerate(widths)) + '|')
    for r in rows:
        print(line(r))
