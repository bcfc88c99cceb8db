"""The GPU checks of pide_zoo as one prepared call: the test suite's ``cuda`` tests and the benchmarks on the device.

Sections (``--sections``), each in child processes with a time budget:

* ``env``: versions, the device, the TF32 defaults, whether ``import pide_zoo`` stays light;
* ``tests``: ``pytest -m cuda`` over tests/**/test_cuda*.py (correctness against float64, the mmseg head, the
  timm models eager and compiled); its JUnit XML becomes counts, failures, skip reasons and the tests' numbers;
* ``cpu_tests``: the device-independent test files with ``-m 'not cuda'`` on the CPU, beside the other sections;
* ``bench``: every benchmarks/bench_*.py (all take ``--device``) with ``--device cuda --quick``, tables in the JSON.

A timeout keeps what a section wrote (pytest is interrupted and writes its report); a failing section never hides
the others; the exit code is 1 when any failed. ``--dry-run`` runs the same on the CPU at tiny sizes, where the cuda
tests are collected and skip: reported as 'skipped'. Results: ``<out>/gpu_check.json`` and a log per section.

    python tools/gpu_check.py --dry-run --out /tmp/gpu_check     # here, on the CPU
    bash tools/gpu_check.sh                                       # on the GPU machine (see its header)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ('env', 'tests', 'cpu_tests', 'bench')
# Wall-clock budgets (s): on one H100 the run stays within 6 minutes (cpu_tests runs beside the others).
BUDGETS = {'gpu': dict(total=350, env=20, tests=210, cpu_tests=300, bench=120),
           'dry': dict(total=300, env=60, tests=90, cpu_tests=90, bench=150)}
# The models' file last: its compiles are the slowest tests, the ones a timeout should cut.
CUDA_TESTS = [str(p.relative_to(REPO)) for p in sorted(REPO.glob('tests/**/test_cuda*.py'),
                                                        key=lambda p: (p.parent.name == 'models', p))]
# Device-independent files that need neither mmseg nor fvcore; test_flops.py joins them where fvcore imports.
CPU_TESTS = ['tests/layers/test_pide_ops.py', 'tests/layers/test_nonlocal_block.py', 'tests/layers/test_hamiltonian.py',
             'tests/models/test_timm_models.py']
ENV = r'''
import importlib.util, json, platform, sys, torch, timm, pide_zoo
info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda, timm=timm.__version__,
            pide_zoo=pide_zoo.__version__, pide_zoo_file=pide_zoo.__file__, cuda_available=torch.cuda.is_available(),
            import_pulls_in=sorted({m.split('.')[0] for m in sys.modules} & {'mmengine', 'mmseg', 'mmcv', 'fvcore'}),
            float32_matmul_precision=torch.get_float32_matmul_precision(),
            cuda_matmul_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_tf32=torch.backends.cudnn.allow_tf32)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f'{p.major}.{p.minor}', memory_gib=round(p.total_memory / 2 ** 30, 1))
info.update({'has_' + m: importlib.util.find_spec(m) is not None for m in ('triton', 'mmseg', 'fvcore', 'xdist')})
print(json.dumps(info))
'''
RUNNING: set = set()  # child processes, ended on SIGTERM/SIGINT


def run(cmd: list[str], log: Path, timeout: float, env: Optional[dict] = None) -> tuple[int, bool, str]:
    """``cmd`` in its own process group, its output appended to ``log``: exit code, timed out, output. A timeout
    sends SIGINT (pytest then writes its report, a benchmark keeps its finished tables), SIGKILL 15 s later."""
    start = log.stat().st_size if log.exists() else 0
    with open(log, 'a') as f:
        f.write(f'\n$ {shlex.join(cmd)}\n')
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, preexec_fn=os.setpgrp)
    RUNNING.add(proc)
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(proc, signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _kill(proc, signal.SIGKILL)
            proc.wait()
    RUNNING.discard(proc)
    with open(log, errors='replace') as f:
        f.seek(start)
        return proc.returncode, timed_out, f.read()


def _kill(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # ended meanwhile
        os.killpg(proc.pid, sig)


def section_env(args, budget: float, work: Path) -> dict:
    rc, timed_out, text = run([sys.executable, '-c', ENV], work / 'env.log', budget)
    if rc or timed_out:
        return dict(status='failed', reason=f'exit code {rc}' + ' (timed out)' * timed_out + ': ' + text[-400:])
    info = json.loads(text.strip().splitlines()[-1])
    ok = args.dry_run or info['cuda_available']
    return dict(status='ok' if ok else 'failed', data=info, reason='' if ok else 'torch.cuda.is_available() is False',
                summary=f"torch {info['torch']} (CUDA {info['cuda']}), timm {info['timm']}, {info.get('device', 'cpu')}"
                        f", matmul precision {info['float32_matmul_precision']}, cuDNN TF32 {info['cudnn_tf32']}")


def pytest_run(name: str, selection: list[str], args, budget: float, work: Path, env: Optional[dict] = None) -> dict:
    """pytest in a child process; its JUnit XML (xunit1: with the tests' recorded properties) becomes the result."""
    junit = work / f'{name}.xml'
    cmd = [sys.executable, '-m', 'pytest', '-q', '-rfE', '-p', 'no:cacheprovider', '-o', 'junit_family=xunit1',
           f'--junitxml={junit}', *(['--timeout', '150'] * _has('pytest_timeout')), *selection]
    rc, timed_out, text = run(cmd, Path(args.out) / f'{name}.log', budget, env)
    passed, failed, skipped, numbers = 0, [], Counter(), {}
    for case in ET.parse(junit).getroot().iter('testcase') if junit.is_file() else ():
        if case.get('name') is None:  # the test an interrupt stopped
            continue
        test = f"{case.get('classname')}::{case.get('name')}"
        bad, skip = next((e for e in case if e.tag in ('failure', 'error')), None), case.find('skipped')
        if bad is not None:
            failed.append(f"{test}: {bad.get('message', '')}"[:400])
        elif skip is not None:
            skipped[skip.get('message', '')] += 1
        else:
            passed += 1
        if case.find('properties') is not None:  # record_property: the tests' numbers (errors, step times)
            numbers[test] = {p.get('name'): p.get('value') for p in case.iter('property')}
    data = dict(command=shlex.join(['pytest', *selection]), exit_code=rc, passed=passed, failed=failed,
                skipped=dict(skipped.most_common()), numbers=numbers)
    result = dict(status='ok', summary=f'{passed} passed, {len(failed)} failed, {sum(skipped.values())} skipped',
                  data=data)
    if timed_out or failed or rc not in (0, 5):  # 5: no test collected
        why = f'timed out after {budget:.0f} s (partial results kept)' if timed_out else f'pytest exit code {rc}'
        return dict(result, status='failed', reason=f'{why}: ' + (' | '.join(failed[:3]) or text[-300:]))
    if passed == 0:  # the cuda tests on a machine without CUDA
        return dict(result, status='skipped', reason=next(iter(skipped), 'no test collected'))
    return result


def section_tests(args, budget: float, work: Path) -> dict:
    selection = shlex.split(args.pytest) if args.pytest else ['-m', 'cuda', *CUDA_TESTS]
    return pytest_run('tests', selection, args, budget, work)


def section_cpu_tests(args, budget: float, work: Path) -> dict:
    # The dry run: the cuda files' own CPU cases (seconds); on the GPU machine the device-independent files too, on
    # half its CPUs (the other half drives the GPU).
    files = CUDA_TESTS + ([] if args.dry_run else CPU_TESTS + ['tests/tools/test_flops.py'] * _has('fvcore'))
    workers = 0 if args.dry_run else max(1, (os.cpu_count() or 2) // 2)
    xdist = ['-n', str(workers)] if workers > 1 and _has('xdist') else []
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS=str(1 if xdist or not workers else workers))
    return pytest_run('cpu_tests', ['-m', 'not cuda', *xdist, *files], args, budget, work, env)


def section_bench(args, budget: float, work: Path) -> dict:
    """Each benchmark script with --device: ok, failed, or skipped where an optional package is missing."""
    scripts = [p for p in sorted((REPO / 'benchmarks').glob('bench_*.py'), key=lambda p: p.stem != 'bench_nonlocal')
               if re.search(r"make_parser\(|'--device'", p.read_text()) and (not args.bench or p.stem in args.bench)]
    common = (['--device', 'cpu', '--quick', '--threads', '1', '--repeats', '1', '--warmup', '0'] if args.dry_run
              else ['--device', 'cuda', '--quick'])
    (work / 'bench').mkdir(exist_ok=True)
    end, runs = time.monotonic() + budget, {}
    weights = [3 if p.stem == 'bench_nonlocal' else 1 for p in scripts]  # its flex table compiles
    for i, script in enumerate(scripts):
        limit = (end - time.monotonic()) * weights[i] / sum(weights[i:])
        cmd = [sys.executable, str(script), *common, '--out', str(work / 'bench' / f'{script.stem}.json')]
        rc, timed_out, text = run(cmd, Path(args.out) / 'bench.log', limit)
        missing = re.findall(r"ModuleNotFoundError: No module named '(\w+)", text)
        if rc and not timed_out and missing and not missing[-1].startswith(('pide_zoo', 'harness', 'bench_')):
            runs[script.stem] = f'skipped: {missing[-1]} not installed'
        elif rc or timed_out:
            runs[script.stem] = f'failed: timed out ({limit:.0f} s)' if timed_out else f'failed: exit code {rc}'
        else:
            runs[script.stem] = 'ok'
    tables = {p.name: json.loads(p.read_text()) for p in sorted((work / 'bench').glob('*.json'))}
    states = Counter(state.split(':')[0] for state in runs.values())
    status = 'failed' if states['failed'] or not runs else 'skipped' if states['skipped'] == len(runs) else 'ok'
    return dict(status=status, data=dict(arguments=shlex.join(common), runs=runs, tables=tables),
                summary=', '.join(f'{n} {s}' for s, n in states.items()) + f' ({len(tables)} tables)',
                reason='; '.join(f'{k} {v}' for k, v in runs.items() if v != 'ok') if runs else 'no benchmark selected')


def _has(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dry-run', action='store_true', default=os.environ.get('DRY_RUN', '') not in ('', '0'),
                        help='the same sections on the CPU at tiny sizes (also DRY_RUN=1)')
    parser.add_argument('--out', default=os.environ.get('OUT') or str(REPO / 'outputs' / 'gpu_check'),
                        help='folder of gpu_check.json and the logs (default: $OUT, else outputs/gpu_check)')
    parser.add_argument('--sections', default=','.join(SECTIONS), type=lambda v: [s for s in v.split(',') if s],
                        help=f'subset of {",".join(SECTIONS)}')
    parser.add_argument('--budget', type=float, default=None, help='total wall-clock budget (s)')
    parser.add_argument('--pytest', default='', help="the tests section's pytest arguments instead of -m cuda "
                                                     "tests/**/test_cuda*.py (e.g. '-m cuda -k bdd tests/layers')")
    parser.add_argument('--bench', default='', type=lambda v: [f'bench_{s}' for s in v.split(',') if s],
                        help='benchmarks to run, e.g. nonlocal,init (default: every one with --device)')
    args = parser.parse_args(argv)
    if set(args.sections) - set(SECTIONS):
        parser.error(f'unknown section(s) {sorted(set(args.sections) - set(SECTIONS))}; choose from {SECTIONS}')
    profile = BUDGETS['dry' if args.dry_run else 'gpu']
    if args.dry_run:  # the CPU also where there is a GPU
        os.environ['CUDA_VISIBLE_DEVICES'] = ''
    total, out, work = args.budget or profile['total'], Path(args.out), Path(tempfile.mkdtemp(prefix='gpu_check_'))
    out.mkdir(parents=True, exist_ok=True)
    for name in ('tests', 'cpu_tests', 'bench'):
        (out / f'{name}.log').unlink(missing_ok=True)
    t0 = time.monotonic()
    results: dict[str, Any] = {n: dict(status='skipped', reason='not selected (--sections)') for n in SECTIONS}
    results.update({n: dict(status='failed', reason='did not finish') for n in args.sections})
    lock = threading.RLock()  # cpu_tests reports from its thread; a signal may come while reporting

    def report() -> int:
        failed = [n for n in SECTIONS if results[n]['status'] == 'failed']
        with lock:
            summary = {n: {k: r.get(k, '') for k in ('status', 'seconds', 'summary', 'reason')}
                       for n, r in results.items()}
            tmp = out / 'gpu_check.json.tmp'
            tmp.write_text(json.dumps(dict(
                tool='tools/gpu_check.py', dry_run=args.dry_run, date=time.strftime('%F %T %Z'), budget_s=total,
                seconds=round(time.monotonic() - t0, 1), ok=not failed, failed=failed, summary=summary,
                sections=results), indent=1, default=str))
            tmp.replace(out / 'gpu_check.json')  # a reader never sees half a file
        return 1 if failed else 0

    def section(name: str, budget: float) -> None:
        print(f'=== [{time.strftime("%T")}] {name} (budget {budget:.0f} s)', flush=True)
        start = time.monotonic()
        try:
            if name in os.environ.get('GPU_CHECK_FAIL', '').split(','):  # the failure path, for the tests
                raise RuntimeError(f'{name} failed on purpose (GPU_CHECK_FAIL)')
            result = globals()[f'section_{name}'](args, budget, work)
        except Exception as exc:
            result = dict(status='failed', reason=f'{type(exc).__name__}: {exc}'[:500])
        with lock:
            results[name] = dict(result, seconds=round(time.monotonic() - start, 1))
        print(f'=== {name}: {result["status"]} in {results[name]["seconds"]} s {result.get("summary", "")}', flush=True)
        report()

    def interrupted(signum, frame) -> None:  # gpu_check.sh's timeout, Ctrl-C: end the children, keep the JSON
        for proc in list(RUNNING):
            _kill(proc, signal.SIGKILL)
        report()
        os._exit(128 + signum)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    beside = threading.Thread(target=section, args=('cpu_tests', min(profile['cpu_tests'], total)), daemon=True)
    if 'cpu_tests' in args.sections:
        beside.start()
    for name in (n for n in SECTIONS if n in args.sections and n != 'cpu_tests'):
        left = t0 + total - time.monotonic()
        if left < 3:
            results[name] = dict(status='skipped', reason='total budget spent', seconds=0)
        else:
            section(name, min(profile[name], left))
    if 'cpu_tests' in args.sections:
        beside.join()
    code = report()
    shutil.rmtree(work, ignore_errors=True)  # its JUnit reports and tables are in the JSON now
    where = 'dry run, CPU' if args.dry_run else 'cuda'
    print('=' * 100 + f'\ngpu_check ({where}; {time.monotonic() - t0:.0f} s of {total:.0f} s): {out}/gpu_check.json')
    for name, r in results.items():
        print(f'  {name:10s} {r["status"]:8s} {r.get("seconds") or 0:6.1f} s  {r.get("summary") or r["reason"]}')
        if r['status'] != 'ok' and r.get('summary') and r.get('reason'):
            print(f'  {"":28s}{r["reason"][:300]}')
    print('=' * 100, flush=True)
    return code


if __name__ == '__main__':
    sys.exit(main())
