"""The benchmark scripts (benchmarks/) at their --quick sizes: each runs, writes its tables as JSON, fails clearly."""
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / 'benchmarks'
sys.path.insert(0, str(BENCHMARKS))

import bench_demo  # noqa: E402
import bench_heads  # noqa: E402
import bench_init  # noqa: E402
import bench_mixing  # noqa: E402
import bench_network  # noqa: E402
import bench_nonlocal  # noqa: E402
import bench_reversible  # noqa: E402
import bench_roofline  # noqa: E402
import bench_scaling  # noqa: E402
import harness  # noqa: E402

QUICK = ['--quick', '--device', 'cpu', '--threads', '1', '--repeats', '1', '--warmup', '0']


def load(path, rows):
    """The JSON table at ``path``, checked against the schema, with ``rows`` rows of ``len(columns)`` values."""
    data = json.loads(Path(path).read_text())
    assert {'name', 'title', 'command', 'environment', 'columns', 'rows'} <= set(data)
    assert {'cpu', 'threads', 'torch', 'device', 'date'} <= set(data['environment'])
    assert data['environment']['threads'] == 1 and data['command'].startswith('python benchmarks/bench_')
    assert len(data['rows']) == rows and all(len(r) == len(data['columns']) for r in data['rows'])
    return [dict(zip(data['columns'], r)) for r in data['rows']]


def test_time_interleaved_alternates_steps_and_keeps_going_past_a_failure():
    import torch

    calls = []

    def boom():
        calls.append('b')
        raise RuntimeError('boom\nsecond line')

    ms = harness.time_interleaved({'a': lambda: calls.append('a'), 'b': boom, 'c': lambda: calls.append('c')},
                                  torch.device('cpu'), repeats=2, warmup=1)
    assert calls == ['a', 'b', 'c', 'a', 'c', 'a', 'c']
    assert ms['b'] == 'RuntimeError: boom' and ms['a'] >= 0 and ms['c'] >= 0


@pytest.mark.skipif(not Path('/proc/self/clear_refs').exists(), reason='reads Linux /proc')
def test_peak_mb_counts_the_step_even_after_a_larger_freed_allocation():
    import torch

    big = torch.ones(64 * 2 ** 20 // 4) + 1  # freed memory the allocator may keep must not hide the step's
    del big
    assert 30 <= harness.peak_mb(lambda: torch.ones(16 * 2 ** 20 // 4) + 1, torch.device('cpu')) <= 40  # 2 x 16 MiB


def test_a_failing_write_leaves_the_earlier_json_intact(tmp_path):
    import argparse

    path = tmp_path / 't.json'
    args = argparse.Namespace(command='c', device='cpu')
    kw = dict(args=args, name='t', title='t', columns=['a'])
    harness.write_table(path, rows=[[1]], **kw)
    with pytest.raises(TypeError):
        harness.write_table(path, rows=[[object()]], **kw)
    assert json.loads(path.read_text())['rows'] == [[1]] and [p.name for p in tmp_path.iterdir()] == ['t.json']


def test_bench_nonlocal_operators_and_blocks_agree_with_dense(tmp_path):
    bench_nonlocal.main(QUICK + ['--tables', 'operators,blocks', '--operators', 'diffusion,frac_laplacian',
                                 '--out', str(tmp_path / 'nl.json')])
    for table in ('operators', 'blocks'):
        rows = load(tmp_path / f'nl_{table}.json', 4)  # 2 cases x 2 operators
        # tiny cases may reuse memory the process already holds: their peak growth can be 0
        assert all(r['dense ms'] > 0 and r['efficient MB'] >= 0 for r in rows)
        assert {r['path'] for r in rows} == {'lowrank', 'fused'}
    assert all(r['max rel diff'] < 1e-4 for r in load(tmp_path / 'nl_operators.json', 4))


def test_bench_nonlocal_peers(tmp_path):
    bench_nonlocal.main(QUICK + ['--tables', 'peers', '--out', str(tmp_path / 'nl.json')])
    rows = load(tmp_path / 'nl_peers.json', 7)  # 4 PIDE blocks, 3 peers
    assert all(isinstance(r['ms'], float) for r in rows if r['block'].startswith(('PIDE', 'timm')))


def test_flex_aggregate_matches_the_dense_path(capsys, tmp_path):
    """FlexAttention's score_mod and log-sum-exp give the PIDE aggregate (forward: CPU flex has no backward)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from pide_zoo.layers import nonlocal_aggregate

    torch.manual_seed(0)
    theta, phi, vq, vk = torch.randn(2, 8, 40), torch.randn(2, 8, 12), torch.randn(2, 6, 40), torch.randn(2, 6, 12)
    for op in bench_nonlocal.FLEX_OPERATORS:
        with torch.no_grad():
            got = bench_nonlocal.flex_aggregate(theta, phi, vq, vk, op, flex_attention)
        want = nonlocal_aggregate(theta, phi, vq, vk, operator=op, lam=bench_nonlocal.LAM, method='dense')
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    bench_nonlocal.main(QUICK + ['--tables', 'flex', '--out', str(tmp_path / 'nl.json')])
    assert 'flex table skipped: ' in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_an_interrupted_run_keeps_the_tables_written_before(tmp_path, monkeypatch):
    out = tmp_path / 'nl.json'
    (tmp_path / 'nl_blocks.json').write_text('{"earlier": true}')

    def fail(kind, *args):
        if kind == 'block':
            raise KeyboardInterrupt
        return []

    monkeypatch.setattr(bench_nonlocal, 'versus_dense', fail)
    with pytest.raises(KeyboardInterrupt):
        bench_nonlocal.main(QUICK + ['--tables', 'operators,blocks', '--out', str(out)])
    assert load(tmp_path / 'nl_operators.json', 0) == []
    assert json.loads((tmp_path / 'nl_blocks.json').read_text()) == {'earlier': True}


def test_bench_network_compares_with_the_first_model(tmp_path):
    bench_network.main(QUICK + ['--models', 'resnet44_cifar,preresnet20_cifar', '--out', str(tmp_path / 'n.json')])
    rows = load(tmp_path / 'n.json', 2)
    assert rows[0]['time / resnet44_cifar'] == 1.0 and rows[1]['step ms'] > 0 and rows[1]['params (M)'] > 0.5


def test_bench_demo_times_the_demo_iteration_per_operator(tmp_path):
    """The demo's train_step per network, relative to diffusion's; the compiled tiles' compile time in the notes."""
    pytest.importorskip('mmseg')
    out = tmp_path / 'd.json'
    bench_demo.main(QUICK + ['--operators', 'local,diffusion,log', '--out', str(out)])
    rows = load(out, 3)
    assert [r['network'] for r in rows] == ['local', 'diffusion', 'log']
    assert rows[1]['time / diffusion'] == 1.0 and all(r['iteration ms'] > 0 for r in rows)
    assert rows[0]['params'] < rows[1]['params'] == rows[2]['params']
    with pytest.raises(SystemExit):
        bench_demo.main(QUICK + ['--operators', 'gaussian', '--out', str(out)])


def test_bench_heads(tmp_path):
    pytest.importorskip('mmseg')
    bench_heads.main(QUICK + ['--heads', 'PIDEHead,NLHead,FCNHead', '--operators', 'diffusion', '--modes', 'train',
                              '--out', str(tmp_path / 'h.json')])
    rows = load(tmp_path / 'h.json', 3)
    assert [r['head'] for r in rows] == ['PIDEHead diffusion', 'NLHead', 'FCNHead']
    assert all(r['train ms'] > 0 and r['test ms'] is None and r['GFLOPs (train size, 1 image)'] > 0 for r in rows)


def test_bench_scaling_stops_a_series_at_its_budget_and_draws_the_figure(tmp_path):
    pytest.importorskip('matplotlib', reason='the figure needs the analysis extra: pip install -e .[analysis]')
    out = tmp_path / 's.json'
    # diffusion: its first point runs; the second is predicted from it, over one of the budgets. dense: its N x M
    # kernel copies (6 x 1 KB at 8x8) are over the memory budget before it runs.
    bench_scaling.main(QUICK + ['--series', 'diffusion,dense_frac_laplacian', '--max-gb', '1e-7',
                                '--max-case-s', '1e-9', '--out', str(out)])
    rows = load(out, 3)
    assert [r['status'] for r in rows[:1] + rows[2:]] == ['ok', bench_scaling.OVER_MEMORY]
    assert rows[1]['status'] in (bench_scaling.OVER_MEMORY, bench_scaling.OVER_TIME) and rows[2]['predicted MB'] > 0
    assert out.with_suffix('.png').stat().st_size > 10_000
    out.with_suffix('.png').unlink()
    bench_scaling.main(['--plot-only', str(out)])
    assert out.with_suffix('.png').stat().st_size > 10_000


def test_bench_scaling_extrapolation():
    assert bench_scaling.extrapolate([(1, 1.0), (2, 4.0)], 4, 1.0) == pytest.approx(16.0)  # slope 2
    assert bench_scaling.extrapolate([(1, 1.0), (2, 1.0)], 4, 1.0) == pytest.approx(2.0)  # the floor
    assert bench_scaling.extrapolate([], 4, 1.0) is None


def test_bench_init(tmp_path):
    bench_init.main(QUICK + ['--operators', 'diffusion,frac_laplacian', '--out', str(tmp_path / 'i.json')])
    import inspect

    from pide_zoo.layers import PIDEBlock

    forms = 2 if 'kernel_scale' in inspect.signature(PIDEBlock).parameters else 1
    rows = load(tmp_path / 'i.json', 2 * 2 * forms)  # operators x widths (16, 32) x forms
    # the mixing defaults start as the identity and learn after one step
    assert all(r['pre-BN std'] > 0 and r['‖B−X‖/‖X‖ start'] == 0 and r['‖dL/dγ‖'] > 0 for r in rows)
    assert all(r['grad K_1 after one step'] > 0 and 0 < r['‖B−X‖/‖X‖ after one step'] < 1 for r in rows)
    bench_init.main(QUICK + ['--operators', 'log', '--widths-of', 'paper', '--out', str(tmp_path / 'p.json')])
    rows = load(tmp_path / 'p.json', 2 * forms)
    assert all(r['‖dL/dγ‖'] is None and r['grad K_1 step 0'] > 0 and r['‖B−X‖/‖X‖ step 0'] > 0 for r in rows)


def test_bench_roofline_against_its_gemms_and_a_baseline_checkout(tmp_path):
    """The fused path beside its own GEMMs and beside another checkout's ops package (here: this one's)."""
    root = Path(__file__).resolve().parents[2]
    bench_roofline.main(QUICK + ['--operators', 'frac_laplacian,log', '--baseline', str(root),
                                 '--out', str(tmp_path / 'r.json')])
    rows = load(tmp_path / 'r.json', 2 + 2 * 2)  # the two GEMM references, then fused and baseline per operator
    gemm, reused = rows[:2]
    assert gemm['variant'] == 'GEMMs' and gemm['rate / GEMMs'] == 1.0 and gemm['GFLOP/s'] > 0
    assert reused['variant'] == 'GEMMs, outputs reused' and reused['rate / GEMMs reused'] == 1.0
    assert gemm['rate / GEMMs reused'] > 0 and reused['rate / GEMMs'] > 0
    fused = [r for r in rows if r['variant'] == 'fused']
    assert len(fused) == 2 and all(0 < r['rate / GEMMs'] and 0 < r['rate / GEMMs reused'] and r['non-GEMM share'] < 1
                                   for r in fused)
    assert all(r['speed-up vs baseline'] > 0 for r in fused)
    with pytest.raises(SystemExit, match='no pide_zoo/layers/ops package'):
        bench_roofline.main(QUICK + ['--baseline', str(tmp_path), '--out', str(tmp_path / 'x.json')])


def test_bench_mixing_prints_the_cost_against_non_local_attn(tmp_path):
    bench_mixing.main(QUICK + ['--operators', 'frac_laplacian', '--out', str(tmp_path / 'm.json')])
    rows = load(tmp_path / 'm.json', 3 + 2 + 2 + 5)  # resnet50 x3, convnext x2, mobilenetv3 x2, paper networks
    by = {(r['model'], r['variant']): r for r in rows}
    pide, nl = by['resnet50', 'PIDEBlock frac_laplacian'], by['resnet50', 'NonLocalAttn']
    assert pide['params'] <= nl['params'] and pide['params ratio'] <= 1 and pide['GFLOPs ratio'] <= 1.5
    assert all(r['unsupported in PIDE'] == 'none' for r in rows)
    assert by['nl_hamiltonian74.cifar10', 'paper widths']['params'] == 563_402  # Table 1's network, unchanged


def test_bench_reversible_saves_less_for_the_backward(tmp_path):
    bench_reversible.main(QUICK + ['--out', str(tmp_path / 'r.json')])
    rows = load(tmp_path / 'r.json', 2)  # depths 1 and 2
    assert all(r['reversible saved MB'] < r['stored saved MB'] and r['reversible ms'] > 0 for r in rows)


@pytest.mark.parametrize('script, args', [
    (bench_nonlocal, ['--device', 'tpu']),
    (bench_nonlocal, ['--tables', 'operators,everything']),
    (bench_nonlocal, ['--repeats', '0']),
    (bench_network, ['--models', 'resnet44_cifar,resnet44_cifar']),
    (bench_network, ['--models', 'no_such_model']),
    (bench_init, ['--widths', '1']),
    (bench_scaling, ['--plot-only', '/nonexistent.json']),
    (bench_heads, ['--heads', 'PSPHead']),
    (bench_reversible, ['--depths', '2,0']),
])
def test_bad_arguments_exit_with_a_message(script, args, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(args)
    assert exc.value.code == 2 and 'error:' in capsys.readouterr().err
