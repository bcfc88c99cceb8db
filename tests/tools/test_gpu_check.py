"""tools/gpu_check.py, the prepared GPU run, by its CPU dry run: every section runs and reports a status."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ('env', 'tests', 'cuda_check', 'mmseg', 'bench_nonlocal', 'timm_models')


def _dry_run(out: Path, *options: str, fail: str = '', hang: str = '', timeout: float = 400) -> tuple:
    env = dict(os.environ, OMP_NUM_THREADS='1', GPU_CHECK_FAIL=fail, GPU_CHECK_HANG=hang)
    env.pop('OUT', None)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), env.get('PYTHONPATH')) if p)
    proc = subprocess.run([sys.executable, 'tools/gpu_check.py', '--dry-run', '--out', str(out), *options],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    path = out / 'gpu_check.json'
    assert path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(path.read_text())


@pytest.mark.slow
def test_dry_run_reports_every_section(tmp_path):
    proc, report = _dry_run(tmp_path)
    assert report['dry_run'] is True
    assert list(report['summary']) == list(SECTIONS)
    for name, entry in report['summary'].items():
        assert entry['status'] in ('ok', 'failed', 'skipped'), name
        assert entry['status'] == report['sections'][name]['status']
    # The driver's own sections pass on the CPU; the benchmark and mmseg only need a status here.
    for name in ('env', 'tests', 'timm_models'):
        assert report['summary'][name]['status'] == 'ok', (name, report['summary'][name], proc.stdout[-3000:])
    # Every comparison ran and gave a number; float32 agrees with float64. Whether bf16 autocast stays within
    # its tolerance is what the check reports (on the GPU it decides), not what this test of the script pins.
    checks = report['sections']['cuda_check']['data']
    assert checks['errors'] == [], checks['errors']
    assert {row['mode'] for row in checks['rows']} == {'fp32', 'bf16'}
    assert len(checks["rows"]) == 2 * 32  # 17 aggregate, 6 coincident-point and 9 block cases per mode
    assert all(row['ok'] for row in checks['rows'] if row['mode'] == 'fp32'), checks['failures']
    models = report['sections']['timm_models']['data']['models']
    assert all(res['eager']['finite'] and res['compiled']['finite'] for res in models.values())
    assert proc.returncode == (1 if report['failed'] else 0)
    assert report['failed'] == [n for n in SECTIONS if report['summary'][n]['status'] == 'failed']


def test_failing_section_does_not_hide_the_others(tmp_path):
    proc, report = _dry_run(tmp_path, '--sections', 'env,mmseg', fail='env', timeout=120)
    assert proc.returncode == 1
    assert report['failed'] == ['env']
    assert 'GPU_CHECK_FAIL' in report['summary']['env']['reason']
    assert report['summary']['mmseg']['status'] in ('ok', 'skipped')  # ran after the failure
    assert report['summary']['tests']['status'] == 'skipped'  # not selected, still listed


def test_section_timeout_is_a_failure_with_a_reason(tmp_path):
    proc, report = _dry_run(tmp_path, '--sections', 'env', '--budget', '4', hang='env', timeout=120)
    assert proc.returncode == 1
    assert report['summary']['env']['status'] == 'failed'
    assert 'timed out' in report['summary']['env']['reason']
    assert report['summary']['env']['seconds'] < 30
