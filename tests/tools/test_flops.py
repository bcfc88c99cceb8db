"""FLOP counting (pide_zoo.flops): fvcore handles cover every op, and the dense counts reproduce Table 4."""
import functools

import pytest
import torch
from torch import nn

pytest.importorskip('fvcore', reason='needs the flops extra: pip install -e .[flops]')

from paper_tables import ALL_MODELS, COLUMNS, PAPER_PARAMS, PAPER_SEG_PARAMS, PAPER_TABLE4  # noqa: E402  (tools/)

from pide_zoo.flops import (  # noqa: E402
    FLOP_HANDLES,
    PIDEFlopCountAnalysis,
    count_flops,
    count_params,
    create_paper_model,
    flop_analysis,
    flop_handles,
    segmentation_params,
    set_nonlocal_method,
    truncate,
)
from pide_zoo.layers import PAPER_WIDTHS, PIDEBlock

TOLERANCE = 0.03  # relative, against the paper's Table 4


@functools.cache
def _analyse(name, dataset, method):
    """(total, unsupported ops, flops by operator) of a registered model; cached across tests."""
    model, input_size = create_paper_model(name, dataset)
    fa = flop_analysis(model, input_size, nonlocal_method=method)
    return fa.total(), dict(fa.unsupported_ops()), dict(fa.by_operator())


@pytest.mark.parametrize('name', ALL_MODELS)
def test_no_unsupported_ops_dense(name):
    total, unsupported, _ = _analyse(name, 'cifar10', 'dense')
    assert unsupported == {} and total > 0


# 'auto' is the low-rank path for diffusion and the fused path for the distance kernels; the other
# nonlocal models trace the same ops as one of these.
@pytest.mark.parametrize('name', ['nl_hamiltonian74', 'nl_hamiltonian74_frac', 'nl_hamiltonian74_log'])
def test_no_unsupported_ops_efficient_path(name):
    _, unsupported, _ = _analyse(name, 'cifar10', 'auto')
    assert unsupported == {}


@pytest.mark.slow
def test_no_unsupported_ops_stl10():
    for method in ('dense', 'auto'):
        _, unsupported, by_op = _analyse('nl_hamiltonian74_frac', 'stl10', method)
        assert unsupported == {} and by_op['bmm'] > 0


def _check_table4(dataset):
    col = COLUMNS.index(dataset)
    for name, paper in PAPER_TABLE4.items():
        total, unsupported, _ = _analyse(name, dataset, 'dense')
        assert unsupported == {}
        assert abs(total / 1e6 / paper[col] - 1) <= TOLERANCE, (name, dataset, total / 1e6, paper[col])


def test_dense_flops_match_table4_cifar10():
    _check_table4('cifar10')


@pytest.mark.slow
@pytest.mark.parametrize('dataset', ['cifar100', 'stl10'])
def test_dense_flops_match_table4(dataset):
    _check_table4(dataset)


def test_efficient_path_is_cheaper_for_diffusion():
    dense, _, dense_ops = _analyse('nl_hamiltonian74', 'cifar10', 'dense')
    auto, _, auto_ops = _analyse('nl_hamiltonian74', 'cifar10', 'auto')
    assert auto < dense and auto_ops['bmm'] < dense_ops['bmm']
    # The local network's cost is untouched by the nonlocal method.
    assert _analyse('hamiltonian74', 'cifar10', 'dense')[0] < auto


def _block(operator, **kwargs):
    return PIDEBlock(8, operator=operator, stages=2, subsample=2, **{**PAPER_WIDTHS, **kwargs}).eval()


def test_dense_block_counts_kernel_and_stages():
    # N = 64 queries, M = 16 pooled keys, E = 4 embedding channels, C = 8, S = 2 stages.
    n, m, e, c, s = 64, 16, 4, 8, 2
    fa = flop_analysis(_block('diffusion'), (c, 8, 8), nonlocal_method='dense')
    by_op = fa.by_operator()
    assert fa.unsupported_ops() == {}
    assert by_op['bmm'] == e * n * m + s * c * n * m  # kernel once, applied in every stage
    assert by_op['sum'] == n * m  # the kernel's row sum, once for all stages
    assert by_op['max_pool2d'] == n * e + s * n * c  # phi and the values at the key positions
    assert by_op['conv'] == 2 * n * c * e + s * n * c * c
    assert by_op['batch_norm'] == s * 2 * n * c


def test_lowrank_block_never_forms_the_kernel():
    n, m, e, c, s = 64, 16, 4, 8, 2
    by_op = flop_analysis(_block('diffusion'), (c, 8, 8), nonlocal_method='auto').by_operator()
    # Phi V^T, theta^T (Phi V^T) and the row sums theta^T sum_j phi_j, per stage.
    assert by_op['bmm'] == s * (e * m * c + c * e * n + e * n)


@pytest.mark.parametrize('operator', ['frac_laplacian', 'log'])
def test_fused_block_evaluates_the_kernel_per_stage(operator):
    n, m, e, c, s = 64, 16, 4, 8, 2
    block = _block(operator)
    dense = flop_analysis(block, (c, 8, 8), nonlocal_method='dense').by_operator()
    assert dense['bmm'] == e * n * m + s * c * n * m  # the paper's kernel, formed once
    for tile_size in (None, 64, 16):  # one tile of all queries, and 4 tiles
        block.tile_size = tile_size
        fused = flop_analysis(block, (c, 8, 8), nonlocal_method='fused')
        assert fused.unsupported_ops() == {}
        by_op = fused.by_operator()
        # per stage: squared distances [theta; |theta|^2; 1] . [-2 phi; 1; |phi|^2] (E + 2 terms), then
        # sum_j w_ij V_j, with a row of ones for the row sums where the operator's form needs them (frac)
        rows = c + 1 if operator == 'frac_laplacian' else c
        assert 'baddbmm' not in by_op and by_op['bmm'] == s * (e + 2) * n * m + s * rows * n * m


@pytest.mark.parametrize('kwargs', [dict(operator='diffusion', kernel='embedded_gaussian'),
                                    dict(operator='diffusion', normalizer='rowsum'),
                                    dict(operator='log', normalizer='rowsum', tile_size=16),
                                    dict(operator='inv_frac_laplacian', normalizer='query', symmetric=True)])
@pytest.mark.parametrize('method', ['dense', 'auto'])
@pytest.mark.parametrize('elementwise', [0.0, 1.0])
def test_no_unsupported_ops_block_options(kwargs, method, elementwise):
    fa = flop_analysis(PIDEBlock(8, **kwargs), (8, 8, 8), nonlocal_method=method, elementwise=elementwise)
    assert fa.unsupported_ops() == {} and fa.total() > 0


def test_elementwise_cost_counts_pointwise_ops():
    block = _block('frac_laplacian')
    plain = flop_analysis(block, (8, 8, 8), nonlocal_method='dense')
    counted = flop_analysis(block, (8, 8, 8), nonlocal_method='dense', elementwise=1.0)
    assert 'pow' not in plain.by_operator() and counted.by_operator()['pow'] > 0
    assert counted.total() > plain.total() and counted.unsupported_ops() == {}
    with pytest.raises(ValueError, match='elementwise'):
        flop_handles(-1.0)


def test_pooling_counts_kernel_area_times_outputs():
    x = torch.zeros(1, 3, 8, 8)
    assert PIDEFlopCountAnalysis(nn.MaxPool2d(2), x).total() == 3 * 8 * 8
    assert PIDEFlopCountAnalysis(nn.AvgPool2d(4), x).total() == 3 * 8 * 8
    assert PIDEFlopCountAnalysis(nn.MaxPool2d(3, stride=1, padding=1), x).total() == 9 * 3 * 8 * 8


def test_handles_table():
    assert {'aten::sum', 'aten::max_pool2d', 'aten::avg_pool2d', 'aten::where'} <= set(FLOP_HANDLES)
    assert FLOP_HANDLES['aten::add'] is None  # zero-cost by fvcore's convention
    assert flop_handles(0.5)['aten::add'] is not None


def test_set_nonlocal_method_restores():
    model = create_paper_model('nl_hamiltonian74_log')[0]
    blocks = [m for m in model.modules() if isinstance(m, PIDEBlock)]
    assert len(blocks) == 3 and all(b.method == 'fused' for b in blocks)
    with set_nonlocal_method(model, 'dense'):
        assert all(b.method == 'dense' for b in blocks)
    assert all(b.method == 'fused' for b in blocks)
    with pytest.raises(ValueError, match='lowrank'), set_nonlocal_method(model, 'lowrank'):
        pass
    assert all(b.method == 'fused' for b in blocks)


def test_count_flops_restores_mode_and_is_deterministic():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).train()
    first = count_flops(model, (3, 8, 8))
    assert model.training
    assert first == count_flops(model, (3, 8, 8)) == 27 * 4 * 64 + 2 * 4 * 64


@pytest.mark.parametrize('name', ALL_MODELS)
def test_params_match_tables_1_to_3_exactly(name):
    # The paper truncates to two decimals; with that every count matches exactly.
    for dataset, paper in zip(COLUMNS, PAPER_PARAMS[name]):
        assert truncate(count_params(create_paper_model(name, dataset)[0]) / 1e6, 2) == paper, (name, dataset)
    if name in PAPER_SEG_PARAMS:
        assert truncate(segmentation_params(name) / 1e6, 2) == PAPER_SEG_PARAMS[name]
