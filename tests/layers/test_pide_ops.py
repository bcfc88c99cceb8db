import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pide_zoo.layers import pide_ops
from pide_zoo.layers.ops import fused
from pide_zoo.layers.pide_ops import nonlocal_aggregate, pide_constant, pide_kernel

import reference

OPS = ['diffusion', 'frac_laplacian', 'inv_frac_laplacian', 'log']
# (operator, kernel, s) combinations the paper uses plus a non-default order for each fractional one.
CASES = [('diffusion', 'dot', None), ('diffusion', 'embedded_gaussian', None), ('frac_laplacian', 'dot', None),
         ('frac_laplacian', 'dot', 0.3), ('inv_frac_laplacian', 'dot', None), ('inv_frac_laplacian', 'dot', 0.8),
         ('log', 'dot', None)]


def _inputs(b=2, e=4, c=3, n=10, m=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, k, p, generator=g, dtype=dtype) for k, p in ((e, n), (e, m), (c, n), (c, m))]


def test_reference_constants_are_the_closed_forms():
    """tests/reference.py's constants against literal values, so that the reference is not a copy of the package."""
    assert reference.constant('frac_laplacian', 0.5, 2) == pytest.approx(1 / (2 * math.pi), rel=1e-14)
    assert reference.constant('frac_laplacian', 0.5, 3) == pytest.approx(1 / math.pi ** 2, rel=1e-14)
    assert reference.constant('inv_frac_laplacian', 0.5, 3) == pytest.approx(1 / (2 * math.pi ** 2), rel=1e-14)
    assert reference.constant('inv_frac_laplacian', 1.0, 3) == pytest.approx(1 / (4 * math.pi), rel=1e-14)
    assert reference.constant('log', 1.0, 2) == pytest.approx(1 / (4 * math.pi), rel=1e-14)


def test_constants_n2_closed_forms():
    assert pide_constant('frac_laplacian', 0.5) == pytest.approx(1 / (2 * math.pi))
    assert pide_constant('inv_frac_laplacian', 0.5) == pytest.approx(1 / (2 * math.pi))
    assert pide_constant('log') == pytest.approx(1 / (4 * math.pi))
    assert pide_constant('diffusion') == 1.0
    for op, s, n in [('frac_laplacian', 0.3, 2), ('inv_frac_laplacian', 1.2, 3), ('log', 1.5, 3)]:
        assert pide_constant(op, s, n) == pytest.approx(reference.constant(op, s, n))


@pytest.mark.parametrize('operator,kernel,s', CASES)
@pytest.mark.parametrize('method', ['dense', 'fused', 'auto'])
@pytest.mark.parametrize('normalizer', [None, 'query', 'rowsum', 2.5])
def test_aggregate_matches_double_loop(operator, kernel, s, method, normalizer):
    theta, phi, vq, vk = _inputs()
    lam = 0.7
    got = nonlocal_aggregate(theta, phi, vq, vk, operator=operator, s=s, lam=lam, kernel=kernel,
                             normalizer=normalizer, method=method, tile_size=3)
    want = reference.aggregate(theta, phi, vq, vk, operator, s, 2, lam, kernel, normalizer or 'key')
    assert got.shape == (2, 3, 10)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('normalizer', [None, 'query', 'rowsum'])
def test_lowrank_diffusion_matches_double_loop(normalizer):
    theta, phi, vq, vk = _inputs(n=12, m=12, seed=3)
    got = nonlocal_aggregate(theta, phi, vq, vk, operator='diffusion', lam=0.1, normalizer=normalizer,
                             method='lowrank')
    want = reference.aggregate(theta, phi, vq, vk, 'diffusion', lam=0.1, normalizer=normalizer or 'key')
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_lowrank_never_forms_the_n_by_m_kernel(monkeypatch):
    theta, phi, vq, vk = _inputs(b=1, e=2, c=3, n=40, m=30)
    shapes = []
    real_bmm = torch.bmm

    def spy(a, b):
        out = real_bmm(a, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, 'bmm', spy)
    nonlocal_aggregate(theta, phi, vq, vk, operator='diffusion', method='lowrank')
    assert shapes and all(40 * 30 > s[1] * s[2] for s in shapes)
    shapes.clear()
    nonlocal_aggregate(theta, phi, vq, vk, operator='diffusion', method='dense')
    assert (1, 40, 30) in shapes


def test_fused_path_evaluates_each_tile_once_per_pass(monkeypatch):
    theta, phi, vq, vk = [t.requires_grad_() for t in _inputs(b=1, n=50, m=20)]
    calls = []
    real = fused._tile

    def spy(k, theta_t, *a, **kw):
        calls.append(theta_t.shape[2])
        return real(k, theta_t, *a, **kw)

    monkeypatch.setattr(fused, '_tile', spy)
    out = nonlocal_aggregate(theta, phi, vq, vk, operator='log', method='fused', tile_size=16)
    assert calls == [16, 16, 16, 2]
    calls.clear()
    out.sum().backward()
    assert calls == [16, 16, 16, 2]


def test_tiled_is_the_fused_path():
    assert pide_ops.resolve_method('tiled', 'log', 'dot') == 'fused'
    assert pide_ops.resolve_method('auto', 'frac_laplacian', 'dot') == 'fused'
    assert pide_ops.resolve_method('auto', 'diffusion', 'embedded_gaussian') == 'fused'
    assert pide_ops.resolve_method('auto', 'diffusion', 'dot') == 'lowrank'


def test_default_tile_size_rule():
    assert pide_ops.query_tile(8, 1590) == (1 << 21) // (8 * 1590)  # 164 queries on CPU
    assert pide_ops.query_tile(8, 1590, device='cuda') == (1 << 24) // (8 * 1590)
    assert pide_ops.query_tile(8, 10 ** 7) == 1
    # Many keys: at least 64 queries per tile while a tile stays within 2^25 elements.
    assert pide_ops.query_tile(1, 102240) == 64  # BDD 1280x720, pool 3
    assert pide_ops.query_tile(8, 14400) == 64  # BDD 160x90, pool 1
    assert pide_ops.query_tile(8, 102240) == (1 << 25) // (8 * 102240)
    assert pide_ops.query_tile(8, 1590, tile_size=5) == 5


@pytest.mark.parametrize('operator,kernel,s', CASES)
@pytest.mark.parametrize('method', ['dense', 'fused', 'auto'])
def test_gradcheck(operator, kernel, s, method):
    theta, phi, vq, vk = [t.requires_grad_() for t in _inputs(b=1, e=3, c=2, n=5, m=4, seed=1)]
    fn = lambda *t: nonlocal_aggregate(*t, operator=operator, s=s, lam=0.5, kernel=kernel, method=method,  # noqa: E731
                                       tile_size=2)
    assert torch.autograd.gradcheck(fn, (theta, phi, vq, vk))


@pytest.mark.parametrize('normalizer', ['key', 'query', 2.5, 'rowsum'])
@pytest.mark.parametrize('needs', [(0, 1, 2, 3), (0,), (1, 3), (2,)])
def test_lowrank_backward_matches_dense(normalizer, needs):
    """The low-rank path's hand-written backward against autograd through the dense kernel."""
    base = _inputs(b=2, e=3, c=4, n=9, m=5, seed=6)
    grad_out = torch.randn(2, 4, 9, dtype=torch.float64)
    grads = {}
    for method in ('lowrank', 'dense'):
        ts = [t.clone().requires_grad_(i in needs) for i, t in enumerate(base)]
        out = nonlocal_aggregate(*ts, operator='diffusion', lam=0.3, normalizer=normalizer, method=method)
        grads[method] = torch.autograd.grad(out, [ts[i] for i in needs], grad_out)
    for got, want in zip(grads['lowrank'], grads['dense']):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    ts = [t.clone().requires_grad_(i in needs) for i, t in enumerate(base)]
    assert torch.autograd.gradcheck(
        lambda *t: nonlocal_aggregate(*t, operator='diffusion', lam=0.3, normalizer=normalizer, method='lowrank'), ts)


@pytest.mark.parametrize('operator,kernel,s', CASES)
@pytest.mark.parametrize('normalizer', ['key', 'query', 2.5, 'rowsum'])
@pytest.mark.parametrize('needs', [(0, 1, 2, 3), (0,), (1, 3), (2,)])
def test_fused_backward_matches_dense(operator, kernel, s, normalizer, needs):
    """The fused path's hand-written backward against autograd through the dense kernel, over 3 tiles."""
    base = _inputs(b=2, e=3, c=4, n=9, m=5, seed=6)
    grad_out = torch.randn(2, 4, 9, dtype=torch.float64)
    grads = {}
    for method in ('fused', 'dense'):
        ts = [t.clone().requires_grad_(i in needs) for i, t in enumerate(base)]
        out = nonlocal_aggregate(*ts, operator=operator, s=s, kernel=kernel, lam=0.3, normalizer=normalizer,
                                 method=method, tile_size=4)
        if out.requires_grad:
            grads[method] = torch.autograd.grad(out, [ts[i] for i in needs], grad_out, allow_unused=True)
        else:  # only v_query requires grad, and (4.5), (4.6) do not use it with a fixed normalizer
            grads[method] = [None] * len(needs)
    for got, want in zip(grads['fused'], grads['dense']):
        if want is None:  # v_query does not enter (4.5), (4.6) with a fixed normalizer
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('operator,kernel,s', CASES)
def test_fused_saves_no_kernel_sized_tensor(operator, kernel, s):
    """Nothing with B*N*M elements is saved for backward on the fused path, where the dense path saves some."""
    b, n, m = 2, 60, 50
    theta, phi, vq, vk = [t.requires_grad_() for t in _inputs(b=b, e=3, c=4, n=n, m=m, seed=8)]
    for method in ('fused', 'dense'):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t,
                                                      lambda t: t):
            out = nonlocal_aggregate(theta, phi, vq, vk, operator=operator, s=s, kernel=kernel,
                                     normalizer='rowsum', method=method, tile_size=16)
        out.sum().backward()
        assert (max(saved) >= b * n * m) == (method == 'dense'), (method, max(saved))


@pytest.mark.parametrize('operator', OPS[1:])
def test_fused_allocates_only_tiles(operator):
    """Forward and backward never allocate more than one B x tile x M kernel tile at a time."""
    b, n, m, tile = 2, 64, 48, 8
    theta, phi, vq, vk = [t.requires_grad_() for t in _inputs(b=b, e=3, c=4, n=n, m=m, seed=9)]
    with _LargestOutput() as fwd:
        out = nonlocal_aggregate(theta, phi, vq, vk, operator=operator, method='fused', tile_size=tile)
    with _LargestOutput() as bwd:
        out.backward(torch.randn_like(out))
    assert fwd.largest == bwd.largest == b * tile * m
    with _LargestOutput() as dense:
        nonlocal_aggregate(theta, phi, vq, vk, operator=operator, method='dense')
    assert dense.largest == b * n * m


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


class _FullSizeStorages(TorchDispatchMode):
    """Records the distinct storages of at least ``numel`` elements that ops return."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.storages = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                self.storages.add(t.untyped_storage().data_ptr())
        return out


def test_lowrank_allocates_few_full_size_tensors():
    """Forward: the output only; backward: one buffer that becomes the value gradient (autograd through
    the plain ops allocated five (B, C, N) tensors in each pass)."""
    theta, phi, vq, vk = [t.requires_grad_() for t in _inputs(b=2, e=3, c=4, n=50, m=6, seed=7)]
    with _FullSizeStorages(vq.numel()) as fwd:
        out = nonlocal_aggregate(theta, phi, vq, vk, operator='diffusion', method='lowrank')
    with _FullSizeStorages(vq.numel()) as bwd:
        out.backward(torch.randn_like(out))
    assert len(fwd.storages) == 1 and len(bwd.storages) <= 2
    assert all(torch.isfinite(t.grad).all() for t in (theta, phi, vq, vk))


@pytest.mark.parametrize('operator', OPS)
@pytest.mark.parametrize('method', ['dense', 'fused'])
def test_coincident_embeddings_contribute_nothing(operator, method):
    theta, phi, vq, vk = _inputs(n=6, m=6, seed=2)
    phi = phi.clone()
    phi[:, :, 0] = theta[:, :, 0]  # theta_0 == phi_0 exactly
    got = nonlocal_aggregate(theta, phi, vq, vk, operator=operator, method=method)
    want = reference.aggregate(theta, phi, vq, vk, operator)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert pide_kernel(theta, phi, operator=operator)[:, 0, 0].eq(0).all() or operator == 'diffusion'


@pytest.mark.parametrize('operator', OPS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('gap', [0.0, 1e-6, 1e-3])
def test_nearly_coincident_gradients_are_finite(operator, dtype, gap):
    theta, phi, vq, vk = _inputs(b=2, n=8, m=8, seed=4, dtype=dtype)
    phi = (theta + gap * torch.randn_like(theta)).detach()  # every pair i == j (nearly) coincident
    ts = [t.clone().requires_grad_() for t in (theta, phi, vq, vk)]
    for method in ('dense', 'fused'):
        out = nonlocal_aggregate(*ts, operator=operator, method=method, tile_size=3)
        assert torch.isfinite(out).all()
        if dtype == torch.float64 and gap == 1e-3:  # pairs close but apart: the paper's sum, rounding aside
            want = reference.aggregate(*(t.detach() for t in ts), operator)
            torch.testing.assert_close(out.detach(), want, rtol=1e-6, atol=1e-9)
        grads = torch.autograd.grad(out.square().sum(), ts, allow_unused=True)  # v_query unused by (4.5), (4.6)
        assert all(torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.parametrize('operator', OPS)
def test_autocast_bfloat16_computes_kernel_in_float32(operator):
    theta, phi, vq, vk = _inputs(n=9, m=5, seed=5, dtype=torch.float32)
    phi[:, :, 1] = theta[:, :, 1]
    want = nonlocal_aggregate(theta, phi, vq, vk, operator=operator)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = nonlocal_aggregate(theta.bfloat16(), phi, vq, vk, operator=operator)
        kern = pide_kernel(theta, phi, operator=operator)
    assert kern.dtype == torch.float32
    assert got.dtype == torch.float32  # follows v_query
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # theta was rounded to bfloat16


def test_rowsum_normalizer_guards_zero_and_sign():
    theta = torch.tensor([[[1.0, 1.0]]], dtype=torch.float64)  # (1, 1, 2)
    phi = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)  # dot row sums are exactly 0
    v = torch.ones(1, 1, 2, dtype=torch.float64)
    # |theta_i - phi_0| = 0 (coincident, no contribution), |theta_i - phi_1| = 2: the sum over one key is that key's V
    out = nonlocal_aggregate(theta, phi, v, v, operator='inv_frac_laplacian', normalizer='rowsum')
    torch.testing.assert_close(out, torch.ones(1, 1, 2, dtype=torch.float64), rtol=1e-14, atol=0)
    # sum_j w_ij (V_j - V_i) = 1 * (2 - 1) + (-1) * (1 - 1) = 1 over a row sum of exactly 0, guarded to +1e-6
    out = nonlocal_aggregate(theta, phi, v, torch.tensor([[[2.0, 1.0]]], dtype=torch.float64),
                             operator='diffusion', normalizer='rowsum')
    torch.testing.assert_close(out, torch.full((1, 1, 2), 1e6, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize('kwargs,match', [
    (dict(operator='wave'), 'operator must be one of'),
    (dict(operator='frac_laplacian', s=1.0), r'0 < s < 1'),
    (dict(operator='frac_laplacian', s=0.0), r'0 < s < 1'),
    (dict(operator='inv_frac_laplacian', s=1.0), r'0 < s < n/2'),
    (dict(operator='log', s=0.5), 's must equal n/2'),
    (dict(operator='diffusion', s=0.5), 's is not used'),
    (dict(operator='diffusion', kernel='cosine'), 'kernel must be one of'),
    (dict(operator='log', kernel='embedded_gaussian'),
     "kernel='embedded_gaussian' applies to operator 'diffusion' only"),
    (dict(operator='log', embed_scale=0), 'embed_scale must be a positive finite number'),
    (dict(operator='diffusion', normalizer='rows'), 'normalizer must be one of'),
    (dict(operator='diffusion', normalizer=0), 'normalizer must be one of'),
    (dict(operator='diffusion', method='fast'), 'method must be one of'),
    (dict(operator='log', method='lowrank'), "method='lowrank' needs"),
    (dict(operator='log', tile_size=0), 'tile_size must be a positive int'),
    (dict(operator='log', n=0), 'n .* must be a positive int'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nonlocal_aggregate(*_inputs(), **kwargs)


@pytest.mark.parametrize('index,shape,match', [
    (0, (2, 4), 'theta must be a 3-D tensor'),
    (1, (2, 5, 7), 'phi must have batch and embedding sizes'),
    (2, (2, 3, 9), r'v_query must be \(B=2, C, N=10\)'),
    (3, (2, 2, 7), r'v_key must be \(B=2, C=3, M=7\)'),
])
def test_bad_shapes(index, shape, match):
    args = _inputs()
    args[index] = torch.randn(*shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        nonlocal_aggregate(*args, operator='diffusion')


def test_aliases():
    assert pide_ops.resolve_operator('L') == 'diffusion'
    assert pide_ops.resolve_operator('(-Delta)^{1/2}') == 'frac_laplacian'
    assert pide_ops.resolve_operator('(-Delta)^{-1/2}') == 'inv_frac_laplacian'
    assert pide_ops.resolve_operator('(-Delta)^{-1}') == 'log'
    assert pide_ops.default_s('log', 2) == 1.0 and pide_ops.default_s('frac', 2) == 0.5
