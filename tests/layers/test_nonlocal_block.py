import warnings
from functools import partial
from pathlib import Path

import pytest
import timm
import torch

from pide_zoo.layers import PAPER_WIDTHS, PIDEBlock

import reference

CASES = [('diffusion', 'dot'), ('diffusion', 'embedded_gaussian'), ('frac_laplacian', 'dot'),
         ('inv_frac_laplacian', 'dot'), ('log', 'dot')]


# The paper's widths, and reduced ones (embeddings, values) with update scales, as a mixed-in block's.
WIDTHS = {'paper': PAPER_WIDTHS, 'reduced': dict(rd_channels=2, value_channels=3, ls_init_value=0.5)}


def _randomize_norms(block, seed=0):
    g = torch.Generator().manual_seed(seed)
    for bn in block.norms:
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.data.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
    if block.gamma is not None:  # zero at the start: the reference would compare identities
        block.gamma.data.copy_(torch.rand(block.gamma.shape, generator=g) + 0.5)


@pytest.mark.parametrize('operator,kernel', CASES)
@pytest.mark.parametrize('subsample', [1, 2])
@pytest.mark.parametrize('stages', [2, 4])
@pytest.mark.parametrize('widths', WIDTHS)
def test_block_matches_equations(operator, kernel, subsample, stages, widths):
    torch.manual_seed(0)
    block = PIDEBlock(6, operator=operator, kernel=kernel, subsample=subsample, stages=stages, h=0.5,
                      lam=0.3, dtype=torch.float64, **WIDTHS[widths]).eval()
    _randomize_norms(block)
    x = torch.randn(2, 6, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        got = block(x)
    want = reference.pide_block(block, x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('operator', ['diffusion', 'frac_laplacian', 'log'])
@pytest.mark.parametrize('widths', WIDTHS)
def test_symmetric_and_methods_agree(operator, widths):
    torch.manual_seed(1)
    block = PIDEBlock(4, operator=operator, symmetric=True, dtype=torch.float64, **WIDTHS[widths]).eval()
    _randomize_norms(block)
    assert block.phi is None
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = reference.pide_block(block, x)
        for method in ('dense', 'fused', 'tiled'):
            block.method = method
            torch.testing.assert_close(block(x), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('operator', ['diffusion', 'frac_laplacian', 'inv_frac_laplacian', 'log'])
@pytest.mark.parametrize('autocast', [False, True])
def test_coincident_embeddings_finite_everywhere(operator, autocast):
    """All-equal inputs make every theta_i equal every phi_j (symmetric): distances are exactly 0."""
    torch.manual_seed(2)
    for symmetric in (True, False):
        block = PIDEBlock(8, operator=operator, symmetric=symmetric).train()
        if not symmetric:  # theta_i == phi_j exactly through equal weights
            block.phi.load_state_dict(block.theta.state_dict())
        x = torch.ones(2, 8, 6, 6, requires_grad=True)
        x2 = (torch.ones(2, 8, 6, 6) + 1e-6 * torch.randn(2, 8, 6, 6)).requires_grad_()
        for inp in (x, x2):
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
                out = block(inp)
            assert torch.isfinite(out).all()
            if inp is x:  # every value equal: the aggregate is 0, batch norm (training) of a constant 0: B = X
                torch.testing.assert_close(out.float(), x.detach(), rtol=0, atol=1e-2 if autocast else 1e-6)
            block.zero_grad()
            out.float().square().mean().backward()
            for name, p in block.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert torch.isfinite(inp.grad).all()


def test_timm_attn_layer():
    model = timm.create_model('resnet18', num_classes=5,
                              block_args=dict(attn_layer=partial(PIDEBlock, operator='frac_laplacian')))
    blocks = [m for m in model.modules() if isinstance(m, PIDEBlock)]
    assert len(blocks) == 8 and {b.channels for b in blocks} == {64, 128, 256, 512}
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    out.sum().backward()


def test_plugin_signature_and_device_dtype():
    block = PIDEBlock(in_channels=16, operator='log', subsample=1, dtype=torch.float64, device='cpu')
    assert block.channels == 16 and block.theta.weight.dtype == torch.float64
    assert block.embed_channels == 8 and len(block.convs) == 2


def test_parameter_count_matches_paper_layout():
    # theta, phi: C -> C/2 (+bias); K_k: C -> C (+bias); BN: 2C per stage.
    c = 112
    block = PIDEBlock(c, **PAPER_WIDTHS)
    want = 2 * (c * c // 2 + c // 2) + 2 * (c * c + c + 2 * c)
    assert sum(p.numel() for p in block.parameters()) == want


@pytest.mark.parametrize('c', [256, 512, 1024, 2048])
def test_mixing_defaults_cost_no_more_than_timms_non_local_attn(c):
    """theta, phi: C -> C/8 (+bias, timm's rd_ratio and rd_divisor); values: C -> C/16 once, C/16 -> C per stage
    (+bias): together <= C^2/4 weights; BN: 2C per stage; update scale: C."""
    from timm.layers import NonLocalAttn

    block = PIDEBlock(c)
    e, v = c // 8, c // 16
    assert (block.embed_channels, block.value_channels) == (e, v)
    value_weights = block.value_proj.weight.numel() + sum(conv.weight.numel() for conv in block.convs)
    assert value_weights == 3 * c * v <= c * c / 4
    assert sum(p.numel() for p in block.parameters()) == 2 * (c * e + e) + value_weights + 2 * (c + 2 * c) + c
    assert sum(p.numel() for p in block.parameters()) <= sum(p.numel() for p in NonLocalAttn(c).parameters())


def test_widths_in_timms_words_and_the_deprecated_embed_ratio():
    assert PIDEBlock(64).embed_channels == 8 and PIDEBlock(64, rd_ratio=0.25).embed_channels == 16
    assert PIDEBlock(64, rd_channels=12).embed_channels == 12
    assert PIDEBlock(48, rd_divisor=4).embed_channels == 8  # timm's make_divisible: 6 to a multiple of 4
    assert PIDEBlock(64, value_channels=64).value_proj is None and PIDEBlock(64, value_ratio=None).value_proj is None
    assert PIDEBlock(64, ls_init_value=None).gamma is None
    with pytest.warns(FutureWarning, match='embed_ratio is deprecated.*rd_ratio'):
        assert PIDEBlock(6, embed_ratio=0.5).embed_channels == 3
    for kwargs, match in [(dict(rd_ratio=0), 'rd_ratio must be a positive number'),
                          (dict(rd_channels=2.5), 'rd_channels must be a positive int'),
                          (dict(value_ratio=1.5), r'value_ratio must lie in \(0, 1\]'),
                          (dict(value_channels=65), 'value_channels must be at most channels=64')]:
        with pytest.raises(ValueError, match=match):
            PIDEBlock(64, **kwargs)


@pytest.mark.parametrize('kwargs,match', [
    (dict(channels=8, operator='wave'), 'operator must be one of'),
    (dict(channels=8, operator='frac_laplacian', s=1.5), '0 < s < 1'),
    (dict(channels=0), 'channels must be a positive int'),
    (dict(), 'channels must be a positive int'),
    (dict(channels=8, in_channels=4), 'disagree'),
    (dict(channels=8, stages=0), 'stages must be a positive int'),
    (dict(channels=8, h=-1), 'h must be a positive number'),
    (dict(channels=8, subsample=0), 'subsample must be a positive int'),
    (dict(channels=8, kernel='embedded_gaussian', operator='log'),
     "kernel='embedded_gaussian' applies to operator 'diffusion'"),
    (dict(channels=8, normalizer='max'), 'normalizer must be one of'),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PIDEBlock(**kwargs)


@pytest.mark.parametrize('shape,match', [
    ((8, 6, 6), 'x must be a 4-D tensor'),
    ((1, 4, 6, 6), 'x must have channels=8'),
    ((1, 8, 1, 6), 'must be at least subsample=2'),
])
def test_bad_input(shape, match):
    with pytest.raises(ValueError, match=match):
        PIDEBlock(8)(torch.randn(*shape))


def test_state_dicts_of_release_0_1_load_and_give_the_same_outputs():
    """tests/data/pide_blocks_v0_1.pt holds blocks, inputs and outputs written by pide_zoo 0.1 before the
    fused path and the block's faster embeddings: same keys, same outputs (float64, eval and train mode) with the
    kernel form release 0.1 computed, the paper's, passed explicitly."""
    saved = torch.load(Path(__file__).parents[1] / 'data' / 'pide_blocks_v0_1.pt', weights_only=True)
    for operator in ['diffusion', 'frac_laplacian', 'inv_frac_laplacian', 'log']:
        case = saved[operator]
        block = PIDEBlock(6, operator=operator, subsample=2, stages=2, h=0.5, lam=0.3, kernel_scale='paper',
                          dtype=torch.float64, **PAPER_WIDTHS)
        block.load_state_dict(case['state_dict'])
        with pytest.raises(RuntimeError, match=r'3 embedding channels, 6 value channels and no update scale.*'
                                               r'rd_channels=3, value_ratio=None, ls_init_value=None.*PAPER_WIDTHS'):
            PIDEBlock(6, operator=operator, subsample=2, kernel_scale='paper').load_state_dict(case['state_dict'])
        with torch.no_grad():
            torch.testing.assert_close(block.eval()(case['x']), case['eval'], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(block.train()(case['x']), case['train'], rtol=1e-12, atol=1e-12)
    for name, keys in saved['model_keys'].items():
        assert list(timm.create_model(name).state_dict()) == keys


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('needs', [(True, True, True), (True, False, False), (False, True, True), (False, True, False)])
def test_pointwise_conv_equals_conv2d_in_values_and_gradients(bias, needs):
    from pide_zoo.layers.fast_paths import _PointwiseConv
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 7, dtype=torch.float64, generator=g)
    w = torch.randn(6, 5, 1, 1, dtype=torch.float64, generator=g)
    b = torch.randn(6, dtype=torch.float64, generator=g) if bias else None
    grad = torch.randn(3, 6, 4, 7, dtype=torch.float64, generator=g)
    leaves = [t for t in (x, w, b) if t is not None]
    for t, need in zip(leaves, needs):
        t.requires_grad_(need)
    want = torch.nn.functional.conv2d(x, w, b)
    want_grads = torch.autograd.grad(want, [t for t in leaves if t.requires_grad], grad)
    got = _PointwiseConv.apply(x, w, b)
    got_grads = torch.autograd.grad(got, [t for t in leaves if t.requires_grad], grad)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(_PointwiseConv.apply, (x, w, b))


def test_pointwise_conv_is_used_only_where_it_applies(monkeypatch):
    from pide_zoo.layers import fast_paths
    calls = []
    real = fast_paths._PointwiseConv.apply
    monkeypatch.setattr(fast_paths._PointwiseConv, 'apply', lambda *a: calls.append(1) or real(*a))
    w = torch.randn(4, 4, 1, 1, requires_grad=True)
    x = torch.randn(2, 4, 3, 5)
    fast_paths.pointwise_conv(x, w, None)
    assert calls == [1]
    with torch.no_grad():
        fast_paths.pointwise_conv(x, w, None)  # inference: F.conv2d
    fast_paths.pointwise_conv(x.transpose(2, 3), w, None)  # not contiguous
    fast_paths.pointwise_conv(x, w.detach(), None)  # nothing needs a gradient
    with torch.autocast('cpu', dtype=torch.bfloat16):
        fast_paths.pointwise_conv(x, w, None)
    assert calls == [1]


@pytest.mark.parametrize('operator,kernel', CASES)
@pytest.mark.parametrize('widths', WIDTHS)
def test_training_block_gradients_do_not_depend_on_the_pointwise_path(monkeypatch, operator, kernel, widths):
    from pide_zoo.layers import fast_paths, nonlocal_block
    torch.manual_seed(0)
    block = PIDEBlock(6, operator=operator, kernel=kernel, subsample=2, h=0.5, lam=0.3,
                      dtype=torch.float64, **WIDTHS[widths]).train()
    x = torch.randn(2, 6, 4, 6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x)

    def run():
        out = block(x)
        return [out, *torch.autograd.grad(out, [x, *block.parameters()], grad)]

    calls = []
    real = fast_paths._PointwiseConv.apply
    monkeypatch.setattr(fast_paths._PointwiseConv, 'apply', lambda *a: calls.append(1) or real(*a))
    got = run()
    # the embedding and every stage's K_k (and value projection) took the GEMM path
    assert len(calls) == 1 + block.stages * (1 if block.value_proj is None else 2)
    monkeypatch.setattr(nonlocal_block, 'pointwise_conv', torch.nn.functional.conv2d)
    want = run()
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_fast_cpu_paths_are_twice_differentiable():
    from pide_zoo.layers.fast_paths import _PointwiseConv
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradgradcheck(_PointwiseConv.apply, (x, w, b))


def test_dense_training_block_is_twice_differentiable(monkeypatch):
    # e.g. a gradient penalty: second derivatives through the CPU fast path equal those through F.conv2d
    from pide_zoo.layers import fast_paths, nonlocal_block
    torch.manual_seed(0)
    block = PIDEBlock(4, operator='frac_laplacian', subsample=2, method='dense', dtype=torch.float64,
                      **WIDTHS['reduced']).train()
    x = torch.randn(2, 4, 4, 6, dtype=torch.float64, requires_grad=True)

    def second_order():
        g, = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), [x, *block.parameters()])

    calls = []
    real = fast_paths._PointwiseConv.apply
    monkeypatch.setattr(fast_paths._PointwiseConv, 'apply', lambda *a: calls.append(1) or real(*a))
    got = second_order()
    assert len(calls) == 1 + 2 * block.stages
    monkeypatch.setattr(nonlocal_block, 'pointwise_conv', torch.nn.functional.conv2d)
    want = second_order()
    for a, e in zip(got, want):  # conv biases before training-mode BN get ~0 gradients: absolute tolerance
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize('operator,kernel', CASES)
@pytest.mark.parametrize('method', ['auto', 'fused', 'dense'])
def test_empty_batch_gives_an_empty_output(operator, kernel, method):
    """A batch of 0 images (the last, empty shard of a dataset) returns 0 images on every path, with gradients."""
    block = PIDEBlock(8, operator=operator, kernel=kernel, method=method)
    for training in (True, False):
        x = torch.randn(0, 8, 6, 6, requires_grad=True)
        out = block.train(training)(x)
        assert out.shape == (0, 8, 6, 6)
        out.sum().backward()
        assert x.grad.shape == x.shape and all(p.grad is None or p.grad.abs().sum() == 0 for p in block.parameters())
    with torch.no_grad():
        assert block.eval()(torch.randn(0, 8, 6, 6)).shape == (0, 8, 6, 6)


def test_state_dict_records_the_block_and_names_what_differs():
    """Version 3 records the block's settings; loading into another block warns once, naming each setting with
    both values; the same block loads silently, and so does a dict without metadata."""
    from collections import OrderedDict

    from pide_zoo.layers import nonlocal_block

    nonlocal_block._warned_forms.clear()
    frac = PIDEBlock(16, operator='frac_laplacian').state_dict()
    meta = frac._metadata['']
    assert meta['version'] == 4 and meta['operator'] == 'frac_laplacian' and meta['s'] == 0.5
    assert (meta['embed_channels'], meta['value_channels'], meta['stages'], meta['normalizer'], meta['bn_eps']) == (
        8, 8, 2, 'key', 1e-5)
    with pytest.warns(UserWarning, match=r"saved from a block with operator='frac_laplacian', but this block has "
                                         r"operator='inv_frac_laplacian'; build it"):
        PIDEBlock(16, operator='inv_frac_laplacian').load_state_dict(frac)
    with pytest.warns(UserWarning, match=r"kernel_scale='width', operator='diffusion', s=None, embed_scale=1\.0, "
                                         r"but this block has kernel_scale='width', operator='log', s=1\.0, "
                                         r'embed_scale=2\.82'):
        PIDEBlock(16, operator='log').load_state_dict(PIDEBlock(16, operator='diffusion').state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        PIDEBlock(16, operator='frac_laplacian').load_state_dict(frac)  # same: silent
        PIDEBlock(16, operator='inv_frac_laplacian').load_state_dict(frac)  # warned once already
        PIDEBlock(16, operator='log').load_state_dict(OrderedDict(frac))  # no metadata: nothing to compare
    with pytest.raises(RuntimeError, match='8 embedding channels, 8 value channels and an update scale, but this '
                                           'block has 4, 16 and no update scale; build it with rd_channels=8, '
                                           'value_channels=8, ls_init_value=0.0 to load it'):
        PIDEBlock(16, operator='frac_laplacian', rd_channels=4, value_ratio=None, ls_init_value=None).load_state_dict(
            frac)


OPERATORS = ['diffusion', 'frac_laplacian', 'inv_frac_laplacian', 'log']


@pytest.mark.parametrize('operator', OPERATORS)
@pytest.mark.parametrize('method', ['auto', 'dense'])
def test_a_fresh_block_is_the_identity_and_learns_from_its_update_scale(operator, method):
    """At the mixing defaults a fresh block returns its input exactly (inference and training mode, whatever its
    batch norms' running statistics); at step 0 only the update scale has a gradient, after one SGD step every
    parameter has one. The paper's widths gain no parameter."""
    torch.manual_seed(0)
    block = PIDEBlock(64, operator=operator, method=method)
    x = torch.randn(2, 64, 8, 8).relu()
    with torch.no_grad():
        assert torch.equal(block.eval()(x), x) and torch.equal(block.train()(x), x)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    r = torch.randn_like(x)
    (block(x) * r).sum().backward()
    assert block.gamma.grad.abs().min() > 0
    assert all(p.grad.abs().sum() == 0 for name, p in block.named_parameters() if name != 'gamma')
    optimizer.step()
    optimizer.zero_grad()
    (block(x) * r).sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in block.parameters())
    paper = PIDEBlock(64, operator=operator, **PAPER_WIDTHS)
    assert 'gamma' not in dict(paper.named_parameters()) and paper.value_proj is None


@pytest.mark.parametrize('operator', OPERATORS)
@pytest.mark.parametrize('channels', [16, 256])
def test_every_operator_learns_the_long_range_task_at_the_mixing_defaults(operator, channels):
    """From the identity, 200 Adam steps (the paper's widths, no update scale: 60 suffice; from the identity the
    fractional Laplacian at 16 channels needs about 200): the block alone carries the code 6 pixels across."""
    from test_kernel_scale import long_range_accuracy

    torch.manual_seed(0)
    assert long_range_accuracy(PIDEBlock(channels, operator=operator, subsample=1), channels, steps=200) > 0.9


def test_a_trained_frac_block_stays_finite_and_bounded_on_unlike_inputs():
    """The fractional Laplacian's weight grows like |d|^-3 for nearly coincident embeddings; pairs closer than
    the squared distance's rounding count as coincident (weight 0), and V_j - V_i shrinks with |d|: on inputs unlike
    its training data (constant, nearly constant, all zero, 100x larger, binary) a trained block in inference
    mode gives finite outputs within a few times the input's scale."""
    from test_kernel_scale import long_range_accuracy

    torch.manual_seed(0)
    block = PIDEBlock(32, operator='frac_laplacian', subsample=1)
    assert long_range_accuracy(block, 32, steps=200) > 0.9
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 32, 8, 8, generator=g).relu()
    ones = torch.ones(2, 32, 8, 8)
    inputs = [ones, ones + 1e-6 * torch.randn(ones.shape, generator=g),
              ones + 1e-3 * torch.randn(ones.shape, generator=g), torch.zeros_like(x), 100 * x,
              (torch.rand(x.shape, generator=g) > 0.5).float()]
    with torch.no_grad():
        for v in inputs:
            out = block.eval()(v)
            assert torch.isfinite(out).all()
            assert (out - v).abs().max() <= 10 * max(1.0, v.abs().max().item())
