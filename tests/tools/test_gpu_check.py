"""tools/gpu_check.py, the runner of the GPU checks, on the CPU: its dry run, a failing section, a timeout, the JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ['env', 'tests', 'cpu_tests', 'bench']


def _gpu_check(out: Path, *options: str, fail: str = '', timeout: float = 300) -> tuple:
    env = dict(os.environ, OMP_NUM_THREADS='1', GPU_CHECK_FAIL=fail)
    env.pop('OUT', None)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), env.get('PYTHONPATH')) if p)
    proc = subprocess.run([sys.executable, 'tools/gpu_check.py', '--dry-run', '--out', str(out), *options],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    path = out / 'gpu_check.json'
    assert path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(path.read_text())
    assert list(report['summary']) == SECTIONS and list(report['sections']) == SECTIONS
    assert report['failed'] == [n for n in SECTIONS if report['summary'][n]['status'] == 'failed']
    assert report['ok'] == (not report['failed']) and proc.returncode == (1 if report['failed'] else 0)
    assert all(report['summary'][n]['status'] == report['sections'][n]['status'] for n in SECTIONS)
    return proc, report


def _test_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / 'probe' / 'test_probe.py'
    path.parent.mkdir()
    path.write_text('import time\n\n\n' + body)
    return path


@pytest.mark.slow
def test_dry_run_reports_the_cuda_tests_as_skipped(tmp_path):
    proc, report = _gpu_check(tmp_path, '--bench', 'nonlocal')
    summary, sections = report['summary'], report['sections']
    assert report['dry_run'] is True and report['ok'], proc.stdout[-3000:]
    assert summary['env']['status'] == 'ok' and sections['env']['data']['import_pulls_in'] == []
    # Collected and skipped on the CPU: 'skipped' with pytest's reason, not 'ok'.
    tests = sections['tests']
    assert tests['status'] == 'skipped' and 'needs CUDA' in tests['reason'], tests
    assert tests['data']['passed'] == 0 and sum(tests['data']['skipped'].values()) > 100
    # The cuda test files' CPU cases ran, and their recorded errors reached the JSON.
    cpu = sections['cpu_tests']
    assert cpu['status'] == 'ok' and cpu['data']['passed'] > 30 and not cpu['data']['failed'], cpu
    errors = [float(v['max_rel_err']) for v in cpu['data']['numbers'].values() if 'max_rel_err' in v]
    assert len(errors) >= 32 and max(errors) <= 1e-4
    bench = sections['bench']
    assert bench['data']['runs'] == {'bench_nonlocal': 'ok'}, bench
    assert {'bench_nonlocal_operators.json', 'bench_nonlocal_blocks.json'} <= set(bench['data']['tables'])
    assert {p.name for p in tmp_path.iterdir()} == {'gpu_check.json', 'tests.log', 'cpu_tests.log', 'bench.log'}


def test_failing_section_does_not_hide_the_others(tmp_path):
    probe = _test_file(tmp_path, 'def test_ok():\n    pass\n\n\ndef test_bad():\n    assert 1 == 2\n')
    proc, report = _gpu_check(tmp_path / 'out', '--sections', 'env,tests', '--pytest', str(probe), fail='env',
                              timeout=120)
    assert report['failed'] == ['env', 'tests'] and proc.returncode == 1
    assert 'GPU_CHECK_FAIL' in report['summary']['env']['reason']
    tests = report['sections']['tests']  # ran after env failed, and says which test failed
    assert tests['data']['passed'] == 1 and len(tests['data']['failed']) == 1
    assert 'test_bad' in tests['reason'] and 'assert 1 == 2' in tests['reason']
    assert all(report['summary'][n]['reason'] == 'not selected (--sections)' for n in ('cpu_tests', 'bench'))


def test_timeout_keeps_the_partial_results(tmp_path):
    probe = _test_file(tmp_path, 'def test_quick():\n    pass\n\n\ndef test_hangs():\n    time.sleep(600)\n')
    proc, report = _gpu_check(tmp_path / 'out', '--sections', 'tests', '--pytest', str(probe), '--budget', '15',
                              timeout=120)
    tests = report['sections']['tests']
    assert tests['status'] == 'failed' and 'timed out' in tests['reason'], tests
    assert tests['data']['passed'] == 1  # the test that finished before the budget ran out
    assert tests['seconds'] < 40
