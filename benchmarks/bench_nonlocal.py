"""Speed and memory of the PIDE nonlocal block: the efficient paths against the paper's dense kernel.

For each operator (diffusion, fractional Laplacian, inverse fractional Laplacian, log kernel) and
feature-map sizes from Bohn, Griebel & Kannan (2021), this times one forward+backward pass of a
:class:`pide_zoo.layers.PIDEBlock` (two stages, default hyper-parameters, training mode) and
measures its peak memory, with ``method='auto'`` (low rank for the diffusion dot kernel; query
tiles with activation checkpointing for the distance kernels, or one kernel for both stages where a
single tile holds it) and with ``method='dense'`` (the full
N x M kernel, as the paper computed it), side by side in the same run. ``--level operator`` times
one call of the functional core ``nonlocal_aggregate`` instead (embeddings fixed projections of the
input, no convolution, batch norm or activation): the part of the block the two paths differ in.
Cases:

* CIFAR-10 ResNet units: 32x32 C=32, 16x16 C=64, 8x8 C=112, key subsample 2, batch ``--cifar-batch``
  (default 8: on CPU a training batch would take minutes per case);
* BDD100K 160x90 (W x H) C=112, batch ``--bdd-batch`` (default 8), subsample 3;
* BDD100K 160x90 C=112, batch 8, subsample 1, distance kernels only: dense needs several copies of a
  B*N*M float32 kernel (6.6 GB each) and runs only within ``--max-dense-gb``;
* BDD100K at full resolution 1280x720, batch 1, C=112, subsample 3, efficient path only, for the
  operators in ``--full-res-ops`` (default diffusion; the tiled distance kernels are slow on a CPU).

How it measures:

* each (case, operator, method) runs in a fresh spawned process, so that allocator caches and
  high-water marks of one measurement cannot hide or inflate the next (``--in-process`` trades that
  for speed; ``--quick`` implies it);
* time: median wall time of forward+backward over ``--repeats`` runs after ``--warmup`` runs; fewer
  runs (at least one) where they would exceed ``--case-budget-s``; the ``runs`` column says how many;
* peak memory: growth over what the block, the input and the output gradient already hold, that is
  activations, kernels and gradients of one training step. CPU: the resident high-water mark VmHWM,
  reset through /proc/self/clear_refs once the inputs are built (fallback: ru_maxrss minus the
  resident size then); torch's CPU allocations are invisible to tracemalloc. CUDA:
  torch.cuda.max_memory_allocated after reset_peak_memory_stats. MB means 2**20 bytes;
* agreement: output and input gradient of the two methods (same seed, same weights) are compared, as
  max |efficient - dense| / max |dense|.

Run from the repository root:

    PYTHONPATH=. python benchmarks/bench_nonlocal.py --quick            # smoke test, tiny sizes
    PYTHONPATH=. python benchmarks/bench_nonlocal.py | tee bench.txt    # full sizes on CPU
    PYTHONPATH=. python benchmarks/bench_nonlocal.py --level operator --cases bdd,full_res
    PYTHONPATH=. python benchmarks/bench_nonlocal.py --device cuda --cifar-batch 128 --full-res-ops all
    PYTHONPATH=. python benchmarks/bench_nonlocal.py --cases bdd --operators diffusion --wait-idle-s 300

The table goes to stdout, progress lines to stderr. On a shared machine, other processes' load inflates
the times many-fold (the math libraries' threads contend for the cores): the ``CPU others`` column says
how busy the CPUs were, and ``--wait-idle-s`` waits for quiet before each measurement.
"""
from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

try:
    import resource
except ImportError:  # not on Windows; only the fallback memory reading needs it
    resource = None

REPO_ROOT = Path(__file__).resolve().parents[1]
OPERATORS = ('diffusion', 'frac_laplacian', 'inv_frac_laplacian', 'log')
DISTANCE_OPERATORS = OPERATORS[1:]
# Case groups for --cases: CIFAR units, BDD100K 160x90 (sub 3 and sub 1), BDD100K at 1280x720.
CASE_GROUPS = ('cifar', 'bdd', 'bdd_sub1', 'full_res')
MIB = 2 ** 20
GIB = 2 ** 30
# Live B x N x M float32 tensors at the dense path's peak, measured with this script at 40x40, B=8:
# about 3.8 (diffusion) and 5-6 (distance kernels: squared distance, mask, kernel and their gradients).
DENSE_KERNEL_COPIES = {'diffusion': 4, 'frac_laplacian': 6, 'inv_frac_laplacian': 6, 'log': 6}
# CPU share taken by other processes during the timed runs above which the row's time is flagged.
CONTENTION_WARN = 0.1
TARGET_SPEEDUP = 10.0
TARGET_MEMORY_RATIO = 10.0
TARGET_TILED_PEAK_MB = 4096.0


@dataclass(frozen=True)
class Case:
    """One feature-map size; ``role`` is its group in ``--cases`` and ties it to a target."""

    label: str
    batch: int
    channels: int
    height: int
    width: int
    subsample: int
    operators: tuple[str, ...]
    dense: bool = True
    role: str = 'cifar'

    @property
    def queries(self) -> int:
        return self.height * self.width

    @property
    def keys(self) -> int:
        # MaxPool2d(subsample) floors each side.
        return (self.height // self.subsample) * (self.width // self.subsample)

    def kernel_bytes(self) -> int:
        """Bytes of one float32 B x N x M kernel."""
        return 4 * self.batch * self.queries * self.keys


@dataclass(frozen=True)
class Spec:
    """One measurement, sent to a child process."""

    case: Case
    operator: str
    method: str
    device: str
    repeats: int
    warmup: int
    budget_s: float
    threads: Optional[int]
    save_path: Optional[str]
    level: str = 'block'


# ---------------------------------------------------------------------------------------------
# Measurement (runs in the child process)
# ---------------------------------------------------------------------------------------------

def _status_bytes(field: str) -> Optional[int]:
    """A kB field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is no /proc."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    if resource is None:
        return 0
    # ru_maxrss is in kB on Linux and in bytes on macOS.
    scale = 1 if sys.platform == 'darwin' else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class CpuContention:
    """Share of the machine's CPUs that other processes used since construction (Linux; None elsewhere).

    The median time is only meaningful on an otherwise idle machine; this says whether it was.
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
        return max(0.0, ((end[0] - self.start[0]) - (end[1] - self.start[1])) / capacity)


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
        rss = _status_bytes('VmRSS')
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
        self.base = rss if rss is not None else _maxrss_bytes()
        self.how = 'VmHWM after clear_refs' if self.hwm_reset else 'ru_maxrss - baseline RSS'

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        hwm = _status_bytes('VmHWM') if self.hwm_reset else None
        return max(0, (hwm if hwm is not None else _maxrss_bytes()) - self.base)


def operator_stage(case: Case, *, operator: str, method: str) -> Any:
    """The functional core alone: ``nonlocal_aggregate(theta, phi, X, pool(X))`` with the embeddings as leaves.

    theta (B, C/2, N) and phi (B, C/2, M) are parameters, so forward+backward computes the gradients the
    block would send into its embeddings and values, but no convolution, batch norm or activation of
    the block is timed or held.
    """
    import torch
    import torch.nn.functional as F

    from pide_zoo.layers.pide_ops import nonlocal_aggregate

    class OperatorStage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            e = case.channels // 2
            self.theta = torch.nn.Parameter(torch.randn(case.batch, e, case.queries))
            self.phi = torch.nn.Parameter(torch.randn(case.batch, e, case.keys))

        def forward(self, x):
            keys = F.max_pool2d(x, case.subsample) if case.subsample > 1 else x
            theta, phi = self.theta, self.phi
            if x.shape[2:] != (case.height, case.width):  # the warm-up's tiny input: embeddings of its size
                e = theta.shape[1]
                theta = torch.randn(x.shape[0], e, x.shape[2] * x.shape[3], device=x.device)
                phi = torch.randn(x.shape[0], e, keys.shape[2] * keys.shape[3], device=x.device)
            return nonlocal_aggregate(theta, phi, x.flatten(2), keys.flatten(2), operator=operator, lam=0.1,
                                      method=method).view_as(x)

    return OperatorStage()


def measure(spec: Spec) -> dict[str, Any]:
    """Time forward+backward of one PIDEBlock and read its peak memory; see the module docstring."""
    import torch

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from pide_zoo.layers.nonlocal_block import PIDEBlock
    from pide_zoo.layers.pide_ops import resolve_method

    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    c = spec.case
    torch.manual_seed(0)  # same weights and inputs for both methods, so their outputs can be compared
    if spec.level == 'block':
        block = PIDEBlock(c.channels, operator=spec.operator, subsample=c.subsample, method=spec.method).to(device)
        block.train()
        resolved = block.method
    else:
        block = operator_stage(c, operator=spec.operator, method=spec.method).to(device)
        resolved = resolve_method(spec.method, spec.operator, 'dot')
    x = torch.randn(c.batch, c.channels, c.height, c.width, device=device, requires_grad=True)
    # A random cotangent: out.sum() would send almost nothing back through the batch norms.
    grad_out = torch.randn_like(x)

    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    def step() -> Any:
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = block(x)
        out.backward(grad_out)
        return out

    # One pass on a minimal input first: the one-off lazy set-up of the math libraries (thread pools,
    # kernel caches) would otherwise be charged to whichever measurement comes first.
    tiny = torch.randn(2, c.channels, 2 * c.subsample, 2 * c.subsample, device=device, requires_grad=True)
    block(tiny).sum().backward()
    block.zero_grad(set_to_none=True)
    del tiny
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
    warm_times, out = timed(spec.warmup)
    warm_contention = warm_contention.fraction()
    per_run = min(warm_times) if warm_times else 0.0
    runs = spec.repeats if per_run == 0.0 else min(spec.repeats, int(spec.budget_s // max(per_run, 1e-6)))
    # A warm-up longer than the whole budget is itself the measurement: its one-off costs (milliseconds)
    # vanish next to a run of minutes, and a second run would double the benchmark's length.
    contention = CpuContention()
    if runs:
        out = None
        times, out = timed(runs)
    else:
        times = warm_times[-1:]
    peak = meter.peak()
    others = contention.fraction() if runs else warm_contention
    if spec.save_path:
        torch.save({'out': out.detach().cpu(), 'grad': x.grad.detach().cpu()}, spec.save_path)
    return {'ms': 1e3 * statistics.median(times), 'runs': str(runs) if runs else '1w', 'peak': peak,
            'resolved': resolved, 'memory_how': meter.how, 'others': others,
            'warmup_ms': [1e3 * t for t in warm_times]}


def _child(spec: Spec, conn: Any) -> None:
    try:
        result = measure(spec)
    except Exception as exc:  # reported in the table instead of ending the whole benchmark
        result = {'error': f'{type(exc).__name__}: {exc}'.splitlines()[0][:100]}
    conn.send(result)
    conn.close()


def run_spec(spec: Spec, in_process: bool) -> dict[str, Any]:
    if in_process:
        try:
            return measure(spec)
        except Exception as exc:
            return {'error': f'{type(exc).__name__}: {exc}'.splitlines()[0][:100]}
    ctx = mp.get_context('spawn')  # fork would share the parent's heap and high-water mark
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(spec, sender))
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


def max_rel_diff(path_a: str, path_b: str) -> float:
    import torch

    a, b = torch.load(path_a), torch.load(path_b)
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in ('out', 'grad'))


# ---------------------------------------------------------------------------------------------
# Cases, table and targets (parent process)
# ---------------------------------------------------------------------------------------------

def build_cases(args: argparse.Namespace) -> list[Case]:
    ops = tuple(args.operators)
    dist = tuple(o for o in ops if o in DISTANCE_OPERATORS)
    cb, bb = args.cifar_batch, args.bdd_batch
    if args.quick:
        return [
            Case(f'tiny 8x8 B={cb} C=8 sub 2', cb, 8, 8, 8, 2, ops, role='cifar'),
            Case(f'tiny 20x12 B={bb} C=16 sub 3', bb, 16, 12, 20, 3, ops, role='bdd'),
            Case(f'tiny 20x12 B={bb} C=16 sub 1', bb, 16, 12, 20, 1, dist, role='bdd_sub1'),
            Case('tiny 64x36 B=1 C=16 sub 3', 1, 16, 36, 64, 3, ops, dense=False, role='full_res'),
        ]
    return [
        Case(f'CIFAR 32x32 B={cb} C=32 sub 2', cb, 32, 32, 32, 2, ops, role='cifar'),
        Case(f'CIFAR 16x16 B={cb} C=64 sub 2', cb, 64, 16, 16, 2, ops, role='cifar'),
        Case(f'CIFAR 8x8 B={cb} C=112 sub 2', cb, 112, 8, 8, 2, ops, role='cifar'),
        Case(f'BDD 160x90 B={bb} C=112 sub 3', bb, 112, 90, 160, 3, ops, role='bdd'),
        Case(f'BDD 160x90 B={bb} C=112 sub 1', bb, 112, 90, 160, 1, dist, role='bdd_sub1'),
        Case('BDD 1280x720 B=1 C=112 sub 3', 1, 112, 720, 1280, 3, ops, dense=False, role='full_res'),
    ]


def default_dense_budget_gb(device: str) -> float:
    """Half of the memory available now: dense beyond that would swap or be killed."""
    if device.startswith('cuda'):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free / GIB / 2
    try:
        with open('/proc/meminfo') as f:
            info = {line.split(':')[0]: int(line.split()[1]) for line in f}
        return info['MemAvailable'] * 1024 / GIB / 2
    except (OSError, KeyError, ValueError):
        return 4.0


def environment_lines(args: argparse.Namespace) -> list[str]:
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
        f'runs per measurement; dense only within {args.max_dense_gb:.1f} GB (estimated); '
        f'{isolation}; {malloc}',
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


def print_table(rows: list[list[str]]) -> None:
    header = ['case', 'operator', 'method', 'runs', 'fwd+bwd ms', 'peak MB', 'time dense/eff', 'mem dense/eff',
              'max rel diff', 'CPU others']
    right = {3, 4, 5, 6, 7, 8, 9}
    rows = [r + [''] * (len(header) - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return '| ' + ' | '.join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + ' |'

    print(line(header))
    print('|' + '|'.join(('-' * (w + 1) + ':') if i in right else ('-' * (w + 2))
                         for i, w in enumerate(widths)) + '|')
    for r in rows:
        print(line(r))


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_for_idle(max_wait_s: float) -> None:
    """Wait (at most ``max_wait_s``) until other processes leave the CPUs idle: on a shared machine a
    concurrent job inflates the timings far beyond its share, as the math libraries' threads contend."""
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


def run_all(args: argparse.Namespace, cases: list[Case]) -> tuple[list[list[str]], dict[tuple[str, str, str], Any]]:
    """Measure every case; returns the table rows and the results keyed by (role, operator, method)."""
    rows: list[list[str]] = []
    results: dict[tuple[str, str, str], Any] = {}
    tiled_ms_per_entry: dict[str, float] = {}  # measured tiled speed, to estimate skipped full-res cases
    tmp = tempfile.TemporaryDirectory(prefix='bench_nonlocal_')
    base = dict(device=args.device, repeats=args.repeats, warmup=args.warmup, budget_s=args.case_budget_s,
                threads=args.threads, level=args.level)
    for case in cases:
        for op in OPERATORS:
            if op not in args.operators:
                continue
            if op not in case.operators:
                if case.role == 'full_res':
                    est = tiled_ms_per_entry.get(op)
                    est_s = '' if est is None else f', est. {fmt_duration(est * case.kernel_bytes() / 4e3)} fwd+bwd'
                    rows.append([case.label, op, 'auto', '', f'skipped (not in --full-res-ops{est_s})',
                                 '', '', '', ''])
                continue
            save = case.dense
            eff_path = os.path.join(tmp.name, 'eff.pt') if save else None
            spec = Spec(case=case, operator=op, method='auto', save_path=eff_path, **base)
            progress(f'{case.label} | {op} | auto ...')
            wait_for_idle(args.wait_idle_s)
            eff = run_spec(spec, args.in_process)
            results[(case.role, op, 'auto')] = eff
            if 'error' in eff:
                rows.append([case.label, op, 'auto', '', f'failed: {eff["error"]}', '', '', '', ''])
                progress(f'    failed: {eff["error"]}')
            else:
                rows.append([case.label, op, f'auto ({eff["resolved"]})', eff['runs'], fmt_num(eff['ms']),
                             fmt_num(eff['peak'] / MIB), '', '', '', fmt_pct(eff['others'])])
                progress(f'    {eff["ms"]:.1f} ms, {eff["peak"] / MIB:.1f} MB ({eff["runs"]} runs, '
                         f'warm-up {", ".join(f"{t:.0f}" for t in eff["warmup_ms"])} ms)')
                if eff['resolved'] == 'tiled':
                    tiled_ms_per_entry[op] = eff['ms'] / (case.kernel_bytes() / 4)
            need_gb = DENSE_KERNEL_COPIES[op] * case.kernel_bytes() / GIB
            need = f'~{need_gb:.1f} GB: ~{DENSE_KERNEL_COPIES[op]} x {case.kernel_bytes() / GIB:.2f} GB kernel'
            if not case.dense:
                rows.append([case.label, op, 'dense', '', f'not run (would need {need})', '', '', '', ''])
                continue
            if need_gb > args.max_dense_gb:
                rows.append([case.label, op, 'dense', '', f'skipped (would need {need})', '', '', '', ''])
                progress(f'{case.label} | {op} | dense skipped (would need {need})')
                continue
            dense_path = os.path.join(tmp.name, 'dense.pt')
            progress(f'{case.label} | {op} | dense ...')
            wait_for_idle(args.wait_idle_s)
            dense = run_spec(replace(spec, method='dense', save_path=dense_path), args.in_process)
            results[(case.role, op, 'dense')] = dense
            if 'error' in dense:
                rows.append([case.label, op, 'dense', '', f'failed: {dense["error"]}', '', '', '', ''])
                progress(f'    failed: {dense["error"]}')
                continue
            progress(f'    {dense["ms"]:.1f} ms, {dense["peak"] / MIB:.1f} MB ({dense["runs"]} runs)')
            ok = 'error' not in eff
            t_ratio = dense['ms'] / eff['ms'] if ok else None
            m_ratio = dense['peak'] / max(eff['peak'], 1) if ok else None
            diff = f'{max_rel_diff(eff_path, dense_path):.1e}' if ok else '—'
            rows.append([case.label, op, 'dense', dense['runs'], fmt_num(dense['ms']),
                         fmt_num(dense['peak'] / MIB), fmt_ratio(t_ratio), fmt_ratio(m_ratio), diff,
                         fmt_pct(dense['others'])])
    tmp.cleanup()
    return rows, results


def target_lines(results: dict[tuple[str, str, str], Any], quick: bool) -> list[str]:
    def verdict(ok: Optional[bool]) -> str:
        return 'not measured' if ok is None else 'PASS' if ok else 'FAIL'

    lines = []
    eff, dense = results.get(('bdd', 'diffusion', 'auto')), results.get(('bdd', 'diffusion', 'dense'))
    if eff and dense and 'error' not in eff and 'error' not in dense:
        t, m = dense['ms'] / eff['ms'], dense['peak'] / max(eff['peak'], 1)
        busy = any((r['others'] or 0) > CONTENTION_WARN for r in (eff, dense))
        lines.append(f'- diffusion 160x90: speed-up {t:.1f}x (target >= {TARGET_SPEEDUP:g}x): '
                     f'{verdict(t >= TARGET_SPEEDUP)}{" (timed under CPU contention)" if busy else ""}; '
                     f'memory dense/eff {m:.1f}x (target >= {TARGET_MEMORY_RATIO:g}x): '
                     f'{verdict(m >= TARGET_MEMORY_RATIO)}')
    else:
        lines.append('- diffusion 160x90: not measured')
    full = results.get(('full_res', 'diffusion', 'auto'))
    if full and 'error' not in full:
        lines.append(f'- diffusion 1280x720 B=1: runs, {full["ms"] / 1e3:.2f} s fwd+bwd, {full["peak"] / GIB:.2f} GB '
                     f'peak: PASS')
    else:
        lines.append(f'- diffusion 1280x720 B=1: {"FAIL: " + full["error"] if full else "not measured"}')
    for op in DISTANCE_OPERATORS:
        r = results.get(('bdd_sub1', op, 'auto'))
        if r and 'error' not in r:
            mb = r['peak'] / MIB
            lines.append(f'- {op} 160x90 sub 1, tiled: peak {mb:,.0f} MB (target <= {TARGET_TILED_PEAK_MB:,.0f} MB): '
                         f'{verdict(mb <= TARGET_TILED_PEAK_MB)}')
        else:
            lines.append(f'- {op} 160x90 sub 1, tiled: {"FAIL: " + r["error"] if r else "not measured"}')
    if quick:
        lines.append('- (--quick: tiny stand-ins for the target sizes, so these verdicts mean nothing)')
    return lines


def parse_cases(value: str) -> tuple[str, ...]:
    groups = CASE_GROUPS if value == 'all' else tuple(v.strip() for v in value.split(',') if v.strip())
    bad = [g for g in groups if g not in CASE_GROUPS]
    if bad:
        raise argparse.ArgumentTypeError(f'unknown case group(s) {bad}; choose from {CASE_GROUPS} or all')
    return groups


def parse_operators(value: str) -> tuple[str, ...]:
    if value == 'all':
        return OPERATORS
    if value == 'none':
        return ()
    ops = tuple(v.strip() for v in value.split(',') if v.strip())
    bad = [o for o in ops if o not in OPERATORS]
    if bad:
        raise argparse.ArgumentTypeError(f'unknown operator(s) {bad}; choose from {OPERATORS}, all or none')
    return ops


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:i]')
    parser.add_argument('--quick', action='store_true', help='tiny sizes, in-process: a smoke test in seconds')
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per measurement (median reported)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs before the timed ones')
    parser.add_argument('--case-budget-s', type=float, default=30.0,
                        help='cap on the timed runs of one measurement; at least one run is always made')
    parser.add_argument('--cifar-batch', type=int, default=8, help='batch of the CIFAR cases')
    parser.add_argument('--bdd-batch', type=int, default=8, help='batch of the 160x90 BDD100K cases')
    parser.add_argument('--max-dense-gb', type=float, default=None,
                        help='run dense only where its estimated peak fits (default: half the free memory)')
    parser.add_argument('--operators', type=parse_operators, default=OPERATORS,
                        help='comma-separated operators to benchmark, or all')
    parser.add_argument('--full-res-ops', type=parse_operators, default=('diffusion',),
                        help='operators to run at 1280x720 (comma-separated, all or none)')
    parser.add_argument('--cases', type=parse_cases, default=CASE_GROUPS,
                        help=f'comma-separated case groups out of {",".join(CASE_GROUPS)}, or all')
    parser.add_argument('--level', choices=('block', 'operator'), default='block',
                        help='block: a whole PIDEBlock (embeddings, 2 stages, 1x1 convs, batch norms); operator: '
                             'one nonlocal_aggregate call, the part the efficient paths replace')
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
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error('--repeats must be >= 1 and --warmup >= 0')
    args.in_process = args.in_process or args.quick
    if args.malloc_mmap_threshold is not None:
        if args.in_process:
            parser.error('--malloc-mmap-threshold needs fresh processes: not with --in-process or --quick')
        os.environ['MALLOC_MMAP_THRESHOLD_'] = str(args.malloc_mmap_threshold)  # read by glibc at child start-up
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # spawned children inherit sys.path
    import torch

    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('--device cuda given but torch.cuda.is_available() is False')
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_dense_gb is None:
        args.max_dense_gb = default_dense_budget_gb(args.device)

    cases = [c for c in build_cases(args) if c.role in args.cases]
    cases = [replace(c, operators=tuple(o for o in c.operators if o in args.full_res_ops))
             if c.role == 'full_res' else c for c in cases]
    start = time.perf_counter()
    rows, results = run_all(args, cases)
    elapsed = time.perf_counter() - start

    what = 'PIDEBlock' if args.level == 'block' else 'nonlocal_aggregate (one stage of the functional core)'
    print(f'# {what} forward+backward: efficient path (auto) vs dense kernel\n')
    print('\n'.join(environment_lines(args)))
    print('- sizes are W x H; N = W*H queries, M = keys after max-pool by `sub`; embed C/2; '
          + ('2 stages, train mode' if args.level == 'block' else 'one aggregate, no conv/BN/ReLU'))
    print(f'- CPU others: share of all CPUs busy with other processes during the timed runs; (!) above '
          f'{100 * CONTENTION_WARN:.0f}%: that time is inflated by contention')
    print('- runs: timed runs (median reported); 1w: the warm-up alone, as it exceeded --case-budget-s')
    print(f'- fwd+bwd ms: median wall time; peak MB: memory growth over {args.level} + input + output grad '
          '(2^20 bytes);')
    print('  ratios are dense/efficient (higher = efficient path better); max rel diff compares output and '
          'input gradient\n')
    print_table(rows)
    print(f'\nTargets: diffusion (dot) at 160x90, batch 8, C=112: >= {TARGET_SPEEDUP:g}x faster than dense '
          f'forward+backward on CPU and <= 1/{TARGET_MEMORY_RATIO:g} of its peak memory; runs at 1280x720 batch 1 '
          f'on CPU. Distance kernels at 160x90 batch 8 subsample 1 within {TARGET_TILED_PEAK_MB / 1024:g} GB peak '
          'with the tiled path.')
    print('\n'.join(target_lines(results, args.quick)))
    mem_how = next((r['memory_how'] for r in results.values() if 'memory_how' in r), 'n/a')
    print(f'\nPeak memory read with {mem_how}. Total benchmark time {elapsed / 60:.1f} min.')


if __name__ == '__main__':
    main()
