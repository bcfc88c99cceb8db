"""The benchmark harness (benchmarks/harness.py) and the benchmark scripts' smoke modes at tiny sizes."""
import json
import os
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCHMARKS))

import bench_network  # noqa: E402
import bench_nonlocal  # noqa: E402
import bench_scaling  # noqa: E402
import harness  # noqa: E402


def test_print_table_aligns_text_left_and_numbers_right(capsys):
    harness.print_table(['name', 'ms'], [['a', '1.0'], ['long name', '123.4']])
    assert capsys.readouterr().out.splitlines() == [
        '| name      |    ms |',
        '|-----------|------:|',
        '| a         |   1.0 |',
        '| long name | 123.4 |',
    ]


def test_formatters():
    assert harness.fmt_ratio(2.5) == '2.50x' and harness.fmt_ratio(18.44) == '18.4x' and harness.fmt_ratio(None) == '—'
    assert harness.fmt_pct(0.05) == '5%' and harness.fmt_pct(0.5) == '50% (!)'
    assert harness.fmt_duration(30) == '~30 s' and harness.fmt_duration(600) == '~10 min'
    assert harness.fmt_duration(3 * 3600) == '~3.0 h'


@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='needs Linux /proc')
def test_peak_meter_sees_a_touched_allocation_after_an_earlier_larger_peak():
    import torch

    big = torch.ones(96 * 2 ** 20 // 4)  # an earlier, larger peak that the reset must hide
    del big
    meter = harness.PeakMeter(torch.device('cpu'))
    assert meter.how == 'VmHWM after clear_refs'
    x = torch.ones(48 * 2 ** 20 // 4)  # 48 MiB, every page written
    peak = meter.peak()
    del x
    assert 40 * 2 ** 20 <= peak <= 90 * 2 ** 20


def test_measure_step_counts_warmup_and_timed_runs():
    import torch

    calls = []
    r = harness.measure_step(lambda: calls.append(1) or len(calls), torch.device('cpu'), warmup=2, repeats=3,
                             budget_s=60.0)
    assert len(calls) == 5 and r['runs'] == '3' and r['out'] == 5 and len(r['warmup_ms']) == 2


def test_measure_step_keeps_the_warmup_alone_beyond_the_budget():
    import torch

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)

    r = harness.measure_step(slow, torch.device('cpu'), warmup=1, repeats=5, budget_s=0.01)
    assert len(calls) == 1 and r['runs'] == '1w' and r['ms'] >= 50


def _boom():
    raise ValueError('boom\nsecond line')


def test_run_isolated_reports_errors_and_dead_children():
    assert harness.run_isolated(_boom, in_process=True) == {'error': 'ValueError: boom'}
    assert harness.run_isolated(os.getpid) != os.getpid()  # ran in another process
    assert harness.run_isolated(os._exit, 3) == {'error': 'child process died, exit code 3'}


def test_bench_nonlocal_quick_agrees_with_dense(capsys):
    bench_nonlocal.main(['--quick', '--cases', 'cifar', '--operators', 'diffusion,frac_laplacian',
                         '--repeats', '1', '--warmup', '0'])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith('| tiny 8x8')]
    assert len(rows) == 4  # two operators x (auto, dense)
    diffs = [float(r.split('|')[9]) for r in rows if '| dense ' in r]
    assert len(diffs) == 2 and max(diffs) < 1e-4


def test_bench_nonlocal_rejects_unknown_case_groups():
    with pytest.raises(SystemExit):
        bench_nonlocal.main(['--cases', 'bdd,cifar100'])


def test_scaling_extrapolation():
    # slope of the last two points (2 here) when above the floor, else the floor
    assert bench_scaling.extrapolate([(1, 1.0), (2, 4.0)], 4, 1.0) == pytest.approx(16.0)
    assert bench_scaling.extrapolate([(1, 1.0), (2, 1.0)], 4, 1.0) == pytest.approx(2.0)
    assert bench_scaling.extrapolate([], 4, 1.0) is None


def _scaling_statuses(out, *args):
    bench_scaling.main(['--quick', '--repeats', '1', '--warmup', '0', '--output', str(out), *args])
    data = json.loads(out.with_suffix('.json').read_text())
    return [(p['series'], p['status']) for p in data['results']]


def test_scaling_quick_skips_cases_over_the_budgets(tmp_path, capsys):
    # diffusion runs its first size; the next one's time, extrapolated from it, is over the time budget
    fig = tmp_path / 'time.png'
    assert _scaling_statuses(fig, '--series', 'diffusion', '--max-case-s', '1e-9') == [
        ('diffusion', 'ok'), ('diffusion', bench_scaling.OVER_TIME)]
    assert fig.stat().st_size > 10_000
    assert 'out of time budget' in capsys.readouterr().out
    # dense is predicted over the memory budget from its kernel size (6 x 1 KB at 8x8) before it runs
    assert _scaling_statuses(tmp_path / 'memory.png', '--series', 'dense_frac_laplacian', '--max-gb', '1e-6') == [
        ('dense_frac_laplacian', bench_scaling.OVER_MEMORY)]


def test_bench_network_quick_reports_each_model_against_the_reference(capsys):
    bench_network.main(['--quick', '--models', 'resnet44_cifar,preresnet20_cifar'])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith('| resnet44') or line.startswith('| preresnet20')]
    assert len(rows) == 2 and rows[0].rstrip(' |').endswith('1.000x')
    with pytest.raises(SystemExit):
        bench_network.main(['--quick', '--models', 'resnet44_cifar'])
    with pytest.raises(SystemExit):
        bench_network.main(['--quick', '--models', 'resnet44_cifar,preresnet20_cifar,resnet44_cifar'])


def test_bench_network_pairs_each_model_with_the_reference_in_its_own_process(capsys):
    bench_network.main(['--models', 'preresnet20_cifar,resnet44_cifar,hamiltonian74', '--batch', '2',
                        '--repeats', '1', '--warmup', '0', '--threads', '1'])
    out = capsys.readouterr().out
    assert ', 1 CPU threads,' in out  # read back from the spawned processes
    assert 'each model interleaved with preresnet20_cifar in a fresh process' in out
    assert 'one spawned process per measurement' in out
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
            for line in out.splitlines() if line.startswith('| ') and not line.startswith('| model')}
    assert list(rows) == ['preresnet20_cifar', 'resnet44_cifar', 'hamiltonian74']
    for params, step_ms, ref_ms, ratio in rows.values():
        t, r = float(step_ms), float(ref_ms)
        assert float(params) > 0 and t > 0 and r > 0
        # the ratio is taken within its own process (the printed times are rounded to 0.1 ms)
        assert float(ratio.rstrip('x')) == pytest.approx(t / r, abs=0.05 * (1 + t / r) / r + 1e-3)
    assert rows['preresnet20_cifar'][3] == '1.000x'


def test_bench_network_compile_names_the_backend_and_keeps_compiling_steps_apart(capsys):
    bench_network.main(['--quick', '--models', 'resnet44_cifar,preresnet20_cifar', '--compile', 'eager'])
    out = capsys.readouterr().out
    assert "torch.compile(backend='eager')" in out
    assert 'first two (compiling) steps, untimed above: resnet44_cifar ' in out
    assert len([line for line in out.splitlines() if line.startswith('| preresnet20')]) == 1


def test_cut_pide_blocks_keeps_only_the_stages_norm_activation_residual_and_conv():
    import torch
    from torch import nn

    from pide_zoo.layers import PIDEBlock

    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    for keep_conv in (False, True):
        block = PIDEBlock(8, stages=2, h=0.3).eval()
        for norm in block.norms:  # non-trivial running statistics and affine parameters
            norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
            norm.weight.data.uniform_(0.5, 2), norm.bias.data.uniform_(-1, 1)
        model = nn.Sequential(nn.Identity(), block)
        bench_network.cut_pide_blocks(model, keep_conv=keep_conv)
        assert not any(isinstance(m, PIDEBlock) for m in model.modules())
        out = x
        for conv, norm in zip(block.convs, block.norms):
            t = conv(out) if keep_conv else out
            out = x + 0.3 * torch.relu(norm(t))
        torch.testing.assert_close(model(x), out)


def test_bench_network_floors_add_the_cut_down_models(capsys):
    bench_network.main(['--quick', '--models', 'hamiltonian74,nl_hamiltonian74', '--floors'])
    rows = [line.split('|')[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith('| ')]
    assert rows[1:] == ['hamiltonian74', 'nl_hamiltonian74', 'nl_hamiltonian74[stages]',
                        'nl_hamiltonian74[stages+conv]']
