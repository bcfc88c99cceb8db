"""The first GPU run of pide_zoo, as one prepared call: every section runs, one summary, JSON results.

Sections, in the order they run (``tests`` runs beside the others, on its own CPUs, without the GPU):

* ``env``: versions (python, torch, timm, CUDA), the device, TF32 and matmul-precision defaults,
  whether ``import pide_zoo`` stays light (no mmengine/mmseg) and whether FlexAttention is there;
* ``tests``: the project's CPU test files under this machine's torch (they take no device argument:
  CUDA correctness is ``cuda_check``'s), with pytest-xdist where installed;
* ``cuda_check``: ``nonlocal_aggregate`` by its lowrank/fused/dense paths and :class:`PIDEBlock` on the
  device against float64 results on the CPU, values and gradients, in float32 with TF32 off (``fp32``),
  with TF32 on (``tf32``) and under bf16 autocast (``bf16``); coincident points under TF32; on a GPU
  also the fused path at the BDD size against the float64 dense path on the GPU;
* ``mmseg``: a :class:`~pide_zoo.seg.heads.PIDEHead` forward/backward on the device where mmseg and
  mmcv import, else skipped (mmcv's ops are compiled against one torch build; see gpu_check.sh);
* ``bench_nonlocal``: ``benchmarks/bench_nonlocal.py --device cuda --quick`` (operators, blocks and the
  fused/dense/FlexAttention comparison), its JSON written next to this script's;
* ``timm_models``: the registered models trained a few steps under bf16 autocast, eager and under
  ``torch.compile``: finite losses, step times, compile times.

Each section runs in a child process with a time budget (its partial results survive a timeout); a failing
section never hides the others; the exit code is 1 when any failed. ``--dry-run`` runs the same sections on
the CPU at tiny sizes (tests/tools/test_gpu_check.py). Results: ``<out>/gpu_check.json``.

    python tools/gpu_check.py --dry-run --out /tmp/gpu_check     # here, on the CPU
    bash tools/gpu_check.sh                                       # on the GPU machine (see its header)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ('env', 'tests', 'cuda_check', 'mmseg', 'bench_nonlocal', 'timm_models')  # the order they start in
STATUSES = ('ok', 'failed', 'skipped')

# Wall-clock budgets (s) of each section: on the GPU machine the whole run stays within 6 minutes of one
# H100 (tests run beside the others). The dry run takes about a minute of one idle CPU thread; its budgets
# leave room for a machine shared with other work.
BUDGETS = {
    'gpu': dict(total=345, env=40, tests=240, cuda_check=75, mmseg=40, bench_nonlocal=150, timm_models=150),
    'dry': dict(total=300, env=60, tests=150, cuda_check=90, mmseg=60, bench_nonlocal=90, timm_models=90),
}
# Test files that need neither mmseg nor fvcore; test_flops.py joins them where fvcore imports (wheels).
TEST_FILES = ('tests/layers/test_pide_ops.py', 'tests/layers/test_nonlocal_block.py',
              'tests/layers/test_hamiltonian.py', 'tests/models/test_timm_models.py')
DRY_TEST_SELECTION = ('tests/layers/test_pide_ops.py', '-k', 'constants')
MODELS = ('nl_hamiltonian74', 'nl_hamiltonian74_frac', 'hamiltonian74', 'nl_hamiltonian74_invfrac',
          'nl_hamiltonian74_log', 'nl_hamiltonian74_4stage')


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities as strings (json.dump would write invalid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(json.dumps(_finite(data), indent=1, sort_keys=False))
    tmp.replace(path)  # a reader never sees half a file, also after a kill


class Record:
    """A section's result, written to ``path`` at every update so that a timeout keeps what was done."""

    def __init__(self, path: Path) -> None:
        self.path, self.start = path, time.monotonic()
        self.result: dict[str, Any] = dict(status='failed', reason='did not finish', summary='', data={})
        self.save()

    def save(self) -> None:
        _write_json(self.path, self.result)

    def put(self, key: str, value: Any) -> None:
        self.result['data'][key] = value
        self.save()

    def finish(self, status: str, summary: str = '', reason: str = '') -> None:
        assert status in STATUSES, status
        self.result.update(status=status, summary=summary, reason=reason,
                           seconds=round(time.monotonic() - self.start, 1))
        self.save()


def _rel_err(got, ref) -> float:
    """max |got - ref| / max |ref|, in float64 on the CPU."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref.abs().max().item()
    return (got - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def _short(value: Any) -> str:
    return f'{value:.1e}' if isinstance(value, float) else str(value)


def _device(args: argparse.Namespace):
    """The device of the sections: the CPU in a dry run, else GPU_CHECK_DEVICE (default cuda; cpu runs the
    full-size sections on the CPU, to try them out)."""
    import torch
    return torch.device('cpu' if args.dry_run else os.environ.get('GPU_CHECK_DEVICE', 'cuda'))


def _sync(device) -> None:
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Section env
# ---------------------------------------------------------------------------------------------

def section_env(rec: Record, args: argparse.Namespace) -> None:
    import platform

    import torch

    info: dict[str, Any] = dict(python=platform.python_version(), torch=torch.__version__,
                                torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                                cpu_count=os.cpu_count(), dry_run=args.dry_run)
    try:
        import timm
        info['timm'] = timm.__version__
    except ImportError as e:
        info['timm'] = f'missing: {e}'
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability='.'.join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), sm_count=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
    info['float32_matmul_precision'] = torch.get_float32_matmul_precision()
    info['cuda_matmul_allow_tf32'] = torch.backends.cuda.matmul.allow_tf32
    info['cudnn_allow_tf32'] = torch.backends.cudnn.allow_tf32
    info['flex_attention'] = _has_flex()
    code = ('import sys, pide_zoo; print(pide_zoo.__version__, pide_zoo.__file__, sorted({m.split(".")[0] '
            'for m in sys.modules if m.split(".")[0] in ("mmengine", "mmseg", "mmcv", "fvcore")}))')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    if proc.returncode:
        info['pide_zoo'] = proc.stderr.strip().splitlines()[-1:]
        rec.put('info', info)
        rec.finish('failed', reason='import pide_zoo failed: ' + proc.stderr.strip()[-300:])
        return
    version, where, heavy = proc.stdout.strip().split(' ', 2)
    info.update(pide_zoo=version, pide_zoo_file=where, import_pulls_in=heavy)
    for name in ('mmseg', 'mmcv', 'mmengine', 'fvcore', 'xdist'):
        info[f'has_{name}'] = _importable(name)
    rec.put('info', info)
    if not args.dry_run and not torch.cuda.is_available():
        rec.finish('failed', reason='torch.cuda.is_available() is False')
        return
    where_run = info.get('device', 'cpu (dry run)')
    rec.finish('ok', f"torch {info['torch']}, timm {info['timm']}, {where_run}, matmul precision "
                     f"{info['float32_matmul_precision']}, flex_attention {info['flex_attention']}")


def _importable(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------
# Section tests
# ---------------------------------------------------------------------------------------------

def section_tests(rec: Record, args: argparse.Namespace) -> None:
    import xml.etree.ElementTree as ET

    if args.dry_run:
        selection = list(DRY_TEST_SELECTION)
    else:
        selection = list(TEST_FILES) + (['tests/tools/test_flops.py'] if _importable('fvcore') else [])
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *selection]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    if _importable('xdist') and cpus >= 4:
        cmd += ['-n', str(min(cpus, 8))]
    if _importable('pytest_timeout'):
        cmd += ['--timeout', '150']  # one hanging test must not take the section's whole budget
    junit = Path(args.work) / 'tests_junit.xml'
    log = Path(args.out) / 'tests.log'
    cmd += ['--junitxml', str(junit)]
    # The tests run on the CPU: the GPU stays with the timed sections.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    rec.put('command', ' '.join(cmd[1:]))
    rec.put('log', str(log))
    start = time.monotonic()
    with open(log, 'w') as f:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    rec.put('seconds', round(time.monotonic() - start, 1))
    rec.put('returncode', rc)
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed: list[str] = []
    if junit.is_file():
        for suite in ET.parse(junit).getroot().iter('testsuite'):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        for case in ET.parse(junit).getroot().iter('testcase'):
            if case.find('failure') is not None or case.find('error') is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']
    rec.put('counts', dict(counts, passed=passed))
    rec.put('failed', failed[:50])
    tail = log.read_text(errors='replace').strip().splitlines()[-1:] if log.is_file() else []
    summary = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    if rc == 0:
        rec.finish('ok', summary)
    else:
        rec.finish('failed', summary, reason=f'pytest exit code {rc}; ' + ' '.join(tail))


# ---------------------------------------------------------------------------------------------
# Section cuda_check: device paths against float64 on the CPU
# ---------------------------------------------------------------------------------------------

# Largest accepted max|got - ref| / max|ref| per precision mode: float32 sums of a few hundred terms;
# TF32 products keep 10 mantissa bits (1e-3 relative per product); bf16 autocast rounds values to 8 bits.
# A block under bf16 autocast (its 1x1 convolutions, batch norms and ReLUs in bf16) lands further off: up to
# 1.4e-1 for the parameter gradients on the dense path on a CPU (ReLU masks flip, batch-norm sums cancel), so
# its bound of 2.5e-1 guards against gross errors only; the aggregate rows are the precise bf16 check.
TOLERANCE = {'fp32': 1e-4, 'tf32': 2e-2, 'bf16': 4e-2, 'bf16 block': 2.5e-1}
# (operator, kernel, methods) for nonlocal_aggregate; lowrank serves the dot diffusion kernel only.
OP_CASES = (('diffusion', 'dot', ('lowrank', 'fused', 'dense')), ('diffusion', 'embedded_gaussian', ('fused', 'dense')),
            ('frac_laplacian', 'dot', ('fused', 'dense')), ('inv_frac_laplacian', 'dot', ('fused', 'dense')),
            ('log', 'dot', ('fused', 'dense')))


@contextmanager
def precision(mode: str, device):
    """``fp32``: TF32 off; ``tf32``: float32 matmul precision 'high' and cuDNN TF32 on (the usual GPU training
    setting); ``bf16``: TF32 on and bf16 autocast on the device."""
    import torch

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision('highest' if mode == 'fp32' else 'high')
    torch.backends.cudnn.allow_tf32 = mode != 'fp32'
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16) if mode == 'bf16' else nullcontext():
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def _aggregate_errors(inputs, weight, device, mode: str, **kw) -> dict[str, float]:
    """Relative errors of the device result of ``nonlocal_aggregate(**kw)`` (value and the four input
    gradients of sum(out * weight)) against float64 on the CPU from the same (rounded) inputs."""
    import torch

    from pide_zoo.layers import nonlocal_aggregate

    dtype = torch.bfloat16 if mode == 'bf16' else torch.float32
    dev_in = [t.to(device=device, dtype=dtype).requires_grad_() for t in inputs]
    ref_in = [t.detach().to('cpu', torch.float64).requires_grad_() for t in dev_in]
    ref = nonlocal_aggregate(*ref_in, **dict(kw, method='dense'))
    # allow_unused: v_query takes no part in the inverse fractional and log operators.
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_in, allow_unused=True)
    with precision(mode, device):
        out = nonlocal_aggregate(*dev_in, **kw)
        grads = torch.autograd.grad((out.float() * weight.to(device, torch.float32)).sum(), dev_in,
                                    allow_unused=True)
    errs = {'out': _rel_err(out, ref)}
    for name, got, want in zip(('theta', 'phi', 'v_query', 'v_key'), grads, ref_grads):
        if got is None and want is None:
            continue
        errs[f'grad_{name}'] = math.inf if got is None or want is None else _rel_err(got, want)
    return errs


def _block_errors(block, x, weight, device, mode: str) -> dict[str, float]:
    """Relative errors of a PIDEBlock on the device (training mode) against its float64 copy on the CPU:
    output, input gradient and parameter gradients."""
    import copy

    import torch

    ref_block = copy.deepcopy(block).to('cpu', torch.float64).train()
    dev_block = copy.deepcopy(block).to(device).train()
    ref_x = x.detach().double().requires_grad_()
    ref = ref_block(ref_x)
    (ref * weight).sum().backward()
    dev_x = x.detach().to(device).requires_grad_()
    with precision(mode, device):
        out = dev_block(dev_x)
        (out.float() * weight.to(device, torch.float32)).sum().backward()
    params = dict(ref_block.named_parameters())
    # Parameter gradients against the largest one (a bf16 rounding flips ReLU masks and moves sums that cancel,
    # the batch norms' biases), leaving out those that are zero up to float64 rounding: the biases of the
    # convolutions before a norm (it removes a constant), whose bf16 gradient is noise of the size of the others.
    # Each parameter's error relative to its own gradient is kept for reading (a string: not checked).
    top = max(p.grad.abs().max().item() for p in params.values())
    live = {n for n, p in params.items() if p.grad.abs().max().item() > 1e-9 * top}
    diff = {n: (p.grad.double().cpu() - params[n].grad).abs().max().item()
            for n, p in dev_block.named_parameters() if n in live}
    own = {n: d / params[n].grad.abs().max().item() for n, d in diff.items()}
    worst = max(own, key=own.get)
    return {'out': _rel_err(out, ref), 'grad_x': _rel_err(dev_x.grad, ref_x.grad),
            'grad_params': max(diff.values()) / top, 'worst_param_own_scale': f'{worst} {own[worst]:.1e}'}


def section_cuda_check(rec: Record, args: argparse.Namespace) -> None:
    import torch

    from pide_zoo.layers import PIDEBlock

    device = _device(args)
    modes = ('fp32', 'bf16') if args.dry_run else ('fp32', 'tf32', 'bf16')
    rec.put('device', str(torch.cuda.get_device_name(0)) if device.type == 'cuda' else 'cpu')
    rec.put('tolerance', TOLERANCE)
    rec.put('metric', 'max|device - float64 CPU| / max|float64 CPU|, value and every gradient')
    g = torch.Generator().manual_seed(0)
    b, e, c = 2, 16, 8
    hw, pooled = (12, 12) if args.dry_run else (24, 24), (6, 6) if args.dry_run else (12, 12)
    n_q, n_k = hw[0] * hw[1], pooled[0] * pooled[1]
    inputs = [torch.randn(b, k, p, generator=g, dtype=torch.float64)
              for k, p in ((e, n_q), (e, n_k), (c, n_q), (c, n_k))]
    weight = torch.randn(b, c, n_q, generator=g, dtype=torch.float64)
    failures: list[str] = []  # over tolerance
    errors: list[str] = []  # raised
    worst: dict[str, float] = {m: 0.0 for m in modes}

    def check(name: str, errs: dict[str, Any], mode: str) -> None:
        value = max(v if math.isfinite(v) else math.inf for v in errs.values() if isinstance(v, float))
        ok = value <= TOLERANCE[f'{mode} block' if name.startswith('PIDEBlock') and mode == 'bf16' else mode]
        worst[mode] = max(worst[mode], value)
        rows.append(dict(case=name, mode=mode, max_rel_err=value, ok=ok, **errs))
        if not ok:
            failures.append(f'{name} [{mode}] {value:.2e}')

    rows: list[dict[str, Any]] = []
    # nonlocal_aggregate, each path, tiles of 40 queries (several tiles per batch on the fused path).
    for operator, kernel, methods in OP_CASES:
        for normalizer in ('key', 'rowsum') if operator in ('diffusion', 'frac_laplacian') else ('key',):
            for method in methods:
                if method == 'lowrank' and normalizer == 'rowsum':
                    continue
                kw = dict(operator=operator, kernel=kernel, normalizer=normalizer, method=method, lam=0.3,
                          tile_size=40 if method == 'fused' else None)
                for mode in modes:
                    try:
                        check(f'aggregate {operator}/{kernel}/{normalizer} {method}',
                              _aggregate_errors(inputs, weight, device, mode, **kw), mode)
                    except Exception as exc:  # one broken path must not hide the others
                        errors.append(f'aggregate {operator} {method} [{mode}]: {type(exc).__name__}: {exc}')
            rec.put('rows', rows)
    # Coincident points (theta_i == phi_j: kernel exactly zero there) with the matrix products in TF32 and bf16.
    co_inputs = [t.clone() for t in inputs]
    co_inputs[1][:, :, : n_k // 2] = co_inputs[0][:, :, : n_k // 2]
    for operator in ('frac_laplacian', 'inv_frac_laplacian', 'log'):
        for method in ('fused', 'dense'):
            for mode in modes:
                try:
                    check(f'coincident {operator} {method}', _aggregate_errors(
                        co_inputs, weight, device, mode, operator=operator, method=method, tile_size=None), mode)
                except Exception as exc:
                    errors.append(f'coincident {operator} {method} [{mode}]: {type(exc).__name__}: {exc}')
    rec.put('rows', rows)
    # The block (training mode, 2 stages, keys pooled 2x2), every operator and path.
    x = torch.randn(2, 16, *hw, generator=g)
    bw = torch.randn(2, 16, *hw, generator=g, dtype=torch.float64)
    for operator, methods in (('diffusion', ('lowrank', 'fused', 'dense')), ('frac_laplacian', ('fused', 'dense')),
                              ('inv_frac_laplacian', ('fused', 'dense')), ('log', ('fused', 'dense'))):
        for method in methods:
            torch.manual_seed(1)
            block = PIDEBlock(16, operator=operator, method=method, subsample=2)
            for mode in modes:
                try:
                    check(f'PIDEBlock {operator} {method}', _block_errors(block, x, bw, device, mode), mode)
                except Exception as exc:
                    errors.append(f'PIDEBlock {operator} {method} [{mode}]: {type(exc).__name__}: {exc}')
    rec.put('rows', rows)
    if device.type == 'cuda':
        try:
            _bdd_size_check(rec, failures, device)
        except Exception as exc:
            errors.append(f'BDD-size check: {type(exc).__name__}: {exc}')
    rec.put('worst', worst)
    rec.put('failures', failures)
    rec.put('errors', errors)
    summary = f'{len(rows)} checks, worst ' + ', '.join(f'{m} {v:.1e}' for m, v in worst.items())
    if failures or errors:
        rec.finish('failed', summary, reason=f'{len(failures)} over tolerance, {len(errors)} raised: '
                                             + '; '.join((errors + failures)[:5]))
    else:
        rec.finish('ok', summary)


def _bdd_size_check(rec: Record, failures: list[str], device, size=(4, 56, 112, 90 * 160, 30 * 53)) -> None:
    """At the BDD100K 160x90 size (batch 4, E = 56, C = 112, N = 14,400 queries, keys pooled 3x3: M = 1,590):
    the fused path (float32, TF32 on and off) against the dense path in float64 on the GPU."""
    import torch

    from pide_zoo.layers import nonlocal_aggregate

    g = torch.Generator(device=device).manual_seed(0)
    b, e, c, n_q, n_k = size
    inputs = [torch.randn(b, k, p, generator=g, device=device, dtype=torch.float64)
              for k, p in ((e, n_q), (e, n_k), (c, n_q), (c, n_k))]
    weight = torch.randn(b, c, n_q, generator=g, device=device, dtype=torch.float64)
    rows = []
    for operator in ('frac_laplacian', 'inv_frac_laplacian', 'log'):
        ref_in = [t.clone().requires_grad_() for t in inputs]
        ref = nonlocal_aggregate(*ref_in, operator=operator, method='dense')
        ref_grads = torch.autograd.grad((ref * weight).sum(), ref_in, allow_unused=True)  # v_query: frac only
        for mode in ('fp32', 'tf32'):
            dev_in = [t.float().requires_grad_() for t in inputs]
            with precision(mode, device):
                _sync(device)
                start = time.perf_counter()
                out = nonlocal_aggregate(*dev_in, operator=operator, method='fused')
                grads = torch.autograd.grad((out * weight.float()).sum(), dev_in, allow_unused=True)
                _sync(device)
                seconds = time.perf_counter() - start
            errs = [_rel_err(out, ref)] + [math.inf if (a is None) != (r is None) else _rel_err(a, r)
                                           for a, r in zip(grads, ref_grads) if a is not None or r is not None]
            ok = max(errs) <= TOLERANCE[mode]
            rows.append(dict(operator=operator, mode=mode, max_rel_err=max(errs), ok=ok,
                             first_call_ms=round(seconds * 1e3, 1)))
            if not ok:
                failures.append(f'BDD-size fused {operator} [{mode}] {max(errs):.2e}')
        del ref, ref_grads, ref_in
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    rec.put('bdd_size', dict(shape=dict(batch=b, embed=e, channels=c, queries=n_q, keys=n_k), rows=rows))


# ---------------------------------------------------------------------------------------------
# Section bench_nonlocal: the benchmark script, as its owner wrote it
# ---------------------------------------------------------------------------------------------

# The agreed options of every benchmark script (benchmarks/harness.py) and bench_nonlocal.py's own.
BENCH_FLAGS = ('--device', '--threads', '--quick', '--out', '--repeats', '--warmup', '--tables', '--matmul-precision')


def section_bench_nonlocal(rec: Record, args: argparse.Namespace) -> None:
    """benchmarks/bench_nonlocal.py as its owner wrote it: each table is written as JSON when done
    (``<out stem>_<table>.json``), so a timeout in the last (flex: compiles) keeps the others."""
    script = REPO / 'benchmarks' / 'bench_nonlocal.py'
    if not script.is_file():
        rec.finish('failed', reason=f'{script} is missing')
        return
    helptext = subprocess.run([sys.executable, str(script), '--help'], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
    if helptext.returncode:
        rec.finish('failed', reason='bench_nonlocal.py --help failed: ' + helptext.stderr.strip()[-300:])
        return
    missing = [f for f in BENCH_FLAGS if f not in set(re.findall(r'--[A-Za-z][\w-]*', helptext.stdout))]
    if missing:
        rec.finish('failed', reason=f'bench_nonlocal.py lacks the options {missing} (its CLI changed)')
        return
    out_json = Path(args.out) / 'bench_nonlocal.json'
    if args.dry_run:  # tiny sizes; the flex table runs eager on the CPU
        common = ['--device', 'cpu', '--quick', '--threads', '1', '--repeats', '1', '--warmup', '0']
        runs = [['--tables', 'flex'], ['--tables', 'operators']]
    else:  # the real sizes (CIFAR units, BDD100K 160x90) in IEEE float32
        common = ['--device', 'cuda', '--repeats', '5', '--warmup', '2', '--matmul-precision', 'highest']
        runs = [['--tables', 'flex'], ['--tables', 'operators,blocks,peers']]
    # flex first: the comparison a GPU user asks for first, and the one that compiles (the slow part).
    commands = [common + run + ['--out', str(out_json)] for run in runs]
    rec.put('commands', ['python benchmarks/bench_nonlocal.py ' + ' '.join(c) for c in commands])
    start = time.monotonic()
    tail: list[str] = []
    codes = []
    end = start + args.section_budget - 3
    for i, cmd in enumerate(commands):
        # flex may take 65 % of the budget (it compiles flex_attention for each operator and E), the rest the others.
        limit = (0.65 * args.section_budget if i == 0 else end - time.monotonic())
        with subprocess.Popen([sys.executable, str(script), *cmd], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as proc:
            timer = threading.Timer(max(1.0, limit), proc.kill)
            timer.start()
            for line in proc.stdout:  # streamed, so that the log keeps what it printed, also after a timeout
                print(line, end='', flush=True)
                tail = (tail + [line.rstrip()])[-8:]
            timer.cancel()
        codes.append(proc.returncode)
        if proc.returncode == -signal.SIGKILL:
            tail.append(f'(run {i + 1} ended after {limit:.0f} s, its share of the section budget)')
        rec.put('exit_codes', codes)
    rec.put('seconds', round(time.monotonic() - start, 1))
    tables = {}
    for path in sorted(out_json.parent.glob(f'{out_json.stem}_*.json')):
        data = json.loads(path.read_text())
        tables[path.name] = [dict(zip(data['columns'], row)) for row in data['rows']]
    rec.put('tables', tables)
    flex = next((rows for name, rows in tables.items() if name.endswith('_flex.json')), [])
    summary = f"{len(tables)} tables ({', '.join(n[len(out_json.stem) + 1:-5] for n in tables)})"
    if flex:
        top = max(row['E'] for row in flex)
        summary += '; flex at E=' + str(top) + ': ' + ', '.join(
            f"{row['operator']} fused/dense/flex {row['fused ms']}/{row['dense ms']}/{row['flex ms']} ms "
            f"(flex rel diff {_short(row['flex max rel diff'])})"
            for row in flex if row['E'] == top)
    if any(codes):
        rec.finish('failed', summary, reason=f'exit codes {codes}: ' + ' | '.join(tail)[-600:])
    elif not tables:
        rec.finish('failed', reason=f'no JSON written beside {out_json}')
    else:
        rec.finish('ok', summary)


# ---------------------------------------------------------------------------------------------
# Section timm_models: a few training steps, bf16 autocast, eager and torch.compile
# ---------------------------------------------------------------------------------------------

def _train_steps(model, opt, x, y, steps: int, device, autocast: bool) -> tuple[list[float], float]:
    """``steps`` SGD steps; the losses and the median step time (s)."""
    import statistics

    import torch
    import torch.nn.functional as F

    losses, times = [], []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, statistics.median(times)


def _step_stats(losses: list[float], step_s: float, **extra: Any) -> dict[str, Any]:
    return dict(extra, step_ms=round(step_s * 1e3, 2), losses=[round(v, 4) for v in losses],
                finite=all(math.isfinite(v) for v in losses))


def section_timm_models(rec: Record, args: argparse.Namespace) -> None:
    import timm
    import torch

    import pide_zoo  # noqa: F401  (registers the models)

    device = _device(args)
    deadline = time.monotonic() + args.section_budget - 5
    if args.dry_run:
        models, batch, kwargs, steps = MODELS[:2], 4, dict(depths=(1, 1, 1), widths=(8, 8, 8)), 2
        backend = os.environ.get('GPU_CHECK_COMPILE_BACKEND', 'eager')
    else:
        models, batch, kwargs, steps = MODELS, 128, {}, 5
        backend = os.environ.get('GPU_CHECK_COMPILE_BACKEND', 'inductor')
        torch.set_float32_matmul_precision('high')  # TF32, as GPU training runs
    rec.put('setup', dict(batch=batch, img_size=32, num_classes=10, steps=steps, autocast='bf16',
                          optimizer='SGD(lr=0.02, momentum=0.9)', compile_backend=backend, model_kwargs=kwargs,
                          float32_matmul_precision=torch.get_float32_matmul_precision(),
                          note='step_ms: median of the timed steps after one warm-up step; compiled first_step_s '
                               'includes compiling the forward and backward graphs'))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    results: dict[str, Any] = {name: {} for name in models}
    failures: list[str] = []

    def fresh(name: str):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, **kwargs).to(device).train()
        return model, torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def guarded(name: str, what: str, fn: Callable[[], dict[str, Any]]) -> None:
        try:
            res = results[name][what] = fn()
            if not res['finite']:
                failures.append(f'{name} {what}: loss not finite')
        except Exception as exc:  # one model's failure must not hide the others
            results[name][what] = dict(error=f'{type(exc).__name__}: {exc}'[:2000])
            failures.append(f'{name} {what}: {type(exc).__name__}: {str(exc)[:200]}')
            traceback.print_exc()
        rec.put('models', results)

    def eager(name: str) -> dict[str, Any]:
        model, opt = fresh(name)
        results[name]['params_m'] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
        _train_steps(model, opt, x, y, 1, device, True)  # warm-up
        return _step_stats(*_train_steps(model, opt, x, y, steps, device, True))

    def compiled(name: str) -> dict[str, Any]:
        model, opt = fresh(name)
        torch._dynamo.reset()  # each model compiles from scratch (same code objects, other modules)
        model = torch.compile(model, backend=backend)
        start = time.monotonic()
        first, _ = _train_steps(model, opt, x, y, 1, device, True)
        first_s = time.monotonic() - start
        losses, step_s = _train_steps(model, opt, x, y, steps, device, True)
        return _step_stats(first + losses, step_s, first_step_s=round(first_s, 1))

    # Eager steps of every model first (seconds), then compiles in the order of MODELS while the budget lasts:
    # a compile is taken to cost what the last one did (the first one is guessed).
    for name in models:
        guarded(name, 'eager', lambda n=name: eager(n))
    last, skipped = (20.0 if args.dry_run else 45.0), []
    for name in models:
        if time.monotonic() + 1.3 * last > deadline:
            results[name]['compiled'] = 'skipped: section budget'
            skipped.append(name)
            continue
        start = time.monotonic()
        guarded(name, 'compiled', lambda n=name: compiled(n))
        last = time.monotonic() - start
    rec.put('failures', failures)

    def ms(res: Any) -> Any:
        return res.get('step_ms') if isinstance(res, dict) else None

    summary = 'eager/compiled ms per step: ' + ', '.join(
        f"{name} {ms(res.get('eager'))}/{ms(res.get('compiled'))}" for name, res in results.items())
    if skipped:
        summary += f' (compile skipped for {len(skipped)}: budget)'
    if failures:
        rec.finish('failed', summary, reason='; '.join(failures[:4]))
    else:
        rec.finish('ok', summary)


# ---------------------------------------------------------------------------------------------
# Section mmseg: only where mmseg and mmcv import
# ---------------------------------------------------------------------------------------------

def section_mmseg(rec: Record, args: argparse.Namespace) -> None:
    missing = [name for name in ('mmengine', 'mmcv', 'mmseg') if not _importable(name)]
    if missing:
        rec.finish('skipped', reason=f'{", ".join(missing)} not installed: mmcv 2.1 needs its compiled ops '
                                     '(mmcv.ops), built against one torch; no wheel for this torch travels')
        return
    import torch

    try:
        import mmcv.ops  # noqa: F401

        from pide_zoo.layers import OPERATORS
        from pide_zoo.seg.heads import PIDEHead
    except Exception as exc:  # an mmcv without ops, or ops built for another torch
        rec.finish('skipped', reason=f'mmseg stack does not import here: {type(exc).__name__}: {str(exc)[:300]}')
        return
    device = _device(args)
    size, batch = ((32, 64), 2) if args.dry_run else ((90, 160), 8)
    rows = {}
    failures = []
    for operator in OPERATORS:
        try:
            torch.manual_seed(0)
            head = PIDEHead(in_channels=64, channels=32, num_classes=19, block_cfg=dict(operator=operator, subsample=2),
                            norm_cfg=dict(type='BN')).to(device).train()
            x = torch.randn(batch, 64, *size, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = head([x])
            loss = out.float().square().mean()
            loss.backward()
            _sync(device)
            rows[operator] = dict(shape=list(out.shape), loss=loss.item(), finite=math.isfinite(loss.item()))
            if not rows[operator]['finite']:
                failures.append(f'{operator}: loss not finite')
        except Exception as exc:
            rows[operator] = dict(error=f'{type(exc).__name__}: {exc}'[:1000])
            failures.append(f'{operator}: {type(exc).__name__}')
    rec.put('pide_head', rows)
    if failures:
        rec.finish('failed', reason='; '.join(failures))
    else:
        rec.finish('ok', f'PIDEHead fwd+bwd (bf16 autocast) for {len(rows)} operators')


SECTION_FUNCS: dict[str, Callable[[Record, argparse.Namespace], None]] = {
    'env': section_env, 'tests': section_tests, 'cuda_check': section_cuda_check,
    'bench_nonlocal': section_bench_nonlocal, 'timm_models': section_timm_models, 'mmseg': section_mmseg,
}


def run_child(args: argparse.Namespace) -> int:
    """One section, in this (child) process: its result at ``args.result``."""
    if args.cpus and hasattr(os, 'sched_setaffinity'):
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(',')})
    sys.path.insert(0, str(REPO))
    rec = Record(Path(args.result))
    try:
        # GPU_CHECK_FAIL / GPU_CHECK_HANG=name,...: those sections raise at once / never end (the failure and
        # timeout paths, for tests/tools/test_gpu_check.py).
        if args.run_section in os.environ.get('GPU_CHECK_FAIL', '').split(','):
            raise RuntimeError(f'{args.run_section} failed on purpose (GPU_CHECK_FAIL)')
        if args.run_section in os.environ.get('GPU_CHECK_HANG', '').split(','):
            time.sleep(3600)
        SECTION_FUNCS[args.run_section](rec, args)
    except Exception as exc:
        traceback.print_exc()
        rec.finish('failed', reason=f'{type(exc).__name__}: {str(exc)[:500]}')
    return 0


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------

class Child:
    """A section's child process in its own process group (so a timeout ends its pytest/compile workers too)."""

    def __init__(self, name: str, args: argparse.Namespace, work: Path, budget: float, cpus: Optional[list[int]]):
        self.name, self.budget = name, budget
        self.result_path = work / f'{name}.json'
        cmd = [sys.executable, str(Path(__file__).resolve()), '--run-section', name, '--result', str(self.result_path),
               '--out', str(args.out), '--work', str(work), '--section-budget', f'{budget:.0f}']
        if args.dry_run:
            cmd.append('--dry-run')
        if cpus:
            cmd += ['--cpus', ','.join(map(str, cpus))]
        print(f'\n=== [{time.strftime("%H:%M:%S")}] {name} (budget {budget:.0f} s) ===', flush=True)
        self.start = time.monotonic()
        # Its own process group (not session: a machine's clean-up still finds it), ended by kill().
        self.proc = subprocess.Popen(cmd, cwd=REPO, preexec_fn=os.setpgrp)
        RUNNING.append(self)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def wait(self, deadline: float) -> dict[str, Any]:
        timeout = max(1.0, min(self.start + self.budget, deadline) - time.monotonic())
        timed_out = False
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
        seconds = round(time.monotonic() - self.start, 1)
        try:
            result = json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            result = dict(status='failed', summary='', data={})
            result['reason'] = f'child exited with {self.proc.returncode} and no result'
        if timed_out:
            result.update(status='failed', reason=f'timed out after {seconds:.0f} s (partial data kept)')
        elif self.proc.returncode and result.get('status') != 'failed':
            result.update(status='failed', reason=f'child exited with {self.proc.returncode}')
        # The section's own time where it finished (the tests may have ended long before they were waited for).
        result['seconds'] = result.get('seconds') if not timed_out and result.get('seconds') else seconds
        print(f'=== {self.name}: {result["status"]} in {seconds:.1f} s {result.get("summary", "")}', flush=True)
        return result


RUNNING: list[Child] = []


def _end_children(signum, frame) -> None:
    """On SIGTERM/SIGINT (the shell script's timeout, Ctrl-C): end the sections' process groups, then exit."""
    for child in RUNNING:
        child.kill()
    sys.exit(128 + signum)


def _cpu_split() -> tuple[Optional[list[int]], Optional[list[int]]]:
    """CPUs for the tests and for everything else: halves on a machine of 8 or more, else shared."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []
    if len(cpus) < 8:
        return None, None
    half = len(cpus) // 2
    return cpus[half:], cpus[:half]


def orchestrate(args: argparse.Namespace) -> int:
    profile = BUDGETS['dry' if args.dry_run else 'gpu']
    signal.signal(signal.SIGTERM, _end_children)
    signal.signal(signal.SIGINT, _end_children)
    total = args.budget or profile['total']
    sections = [s for s in SECTIONS if s in args.sections]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix='gpu_check_'))
    t0 = time.monotonic()
    deadline = t0 + total
    test_cpus, other_cpus = _cpu_split()
    if other_cpus and hasattr(os, 'sched_setaffinity'):
        os.sched_setaffinity(0, set(other_cpus))  # inherited by the sections started from here
    results: dict[str, Any] = {}
    tests = None
    if 'tests' in sections:  # beside the others: CPU only, on its own CPUs where there are enough
        tests = Child('tests', args, work, min(profile['tests'], total), test_cpus)
    for name in sections:
        if name == 'tests':
            continue
        if time.monotonic() >= deadline - 2:
            results[name] = dict(status='skipped', reason='total budget spent', summary='', data={}, seconds=0)
            continue
        # The section's child knows its budget: it plans within it (compiles) and is ended when it is spent.
        budget = min(profile[name], deadline - time.monotonic())
        results[name] = Child(name, args, work, budget, None).wait(deadline)
    if tests is not None:
        results['tests'] = tests.wait(deadline + 15)
    results = {name: results[name] for name in sections}
    for name in SECTIONS:
        if name not in results:
            results[name] = dict(status='skipped', reason='not selected (--sections)', summary='', data={}, seconds=0)
    failed = [n for n, r in results.items() if r['status'] == 'failed']
    report = dict(
        tool='tools/gpu_check.py', dry_run=args.dry_run, date=time.strftime('%Y-%m-%d %H:%M:%S %Z'),
        seconds=round(time.monotonic() - t0, 1), budget_s=total, cpus=dict(tests=test_cpus, others=other_cpus),
        ok=not failed, failed=failed,
        summary={n: dict(status=r['status'], seconds=r.get('seconds'), summary=r.get('summary', ''),
                         reason=r.get('reason', '')) for n, r in results.items()},
        sections=results,
    )
    _write_json(out / 'gpu_check.json', report)
    shutil.rmtree(work, ignore_errors=True)
    print('\n' + '=' * 100)
    where = 'dry run, CPU' if args.dry_run else os.environ.get('GPU_CHECK_DEVICE', 'cuda')
    print(f'gpu_check summary ({where}; {report["seconds"]:.0f} s of '
          f'{total} s budget; {out / "gpu_check.json"})')
    for name, r in results.items():
        print(f'  {name:15s} {r["status"]:8s} {r.get("seconds") or 0:6.1f} s  {r.get("summary", "")}')
        if r['status'] != 'ok' and r.get('reason'):
            print(f'  {"":15s} {"":8s} {"":8s}  {r["reason"][:300]}')
    print('=' * 100, flush=True)
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dry-run', action='store_true', default=os.environ.get('DRY_RUN', '') not in ('', '0'),
                        help='the same sections on the CPU at tiny sizes (also DRY_RUN=1)')
    parser.add_argument('--out', default=os.environ.get('OUT') or str(REPO / 'outputs' / 'gpu_check'),
                        help='folder of the JSON results (default: $OUT, else outputs/gpu_check)')
    parser.add_argument('--sections', default=','.join(SECTIONS),
                        type=lambda v: [s for s in v.split(',') if s], help=f'subset of {",".join(SECTIONS)}')
    parser.add_argument('--budget', type=float, default=None, help='total wall-clock budget (s)')
    # Internal: one section in a child process.
    parser.add_argument('--run-section', choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument('--result', help=argparse.SUPPRESS)
    parser.add_argument('--work', help=argparse.SUPPRESS)
    parser.add_argument('--cpus', help=argparse.SUPPRESS)
    parser.add_argument('--section-budget', type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f'unknown section(s) {unknown}; choose from {SECTIONS}')
    if args.run_section:
        return run_child(args)
    return orchestrate(args)


if __name__ == '__main__':
    sys.exit(main())
