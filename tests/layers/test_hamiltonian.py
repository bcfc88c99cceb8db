import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pide_zoo.layers import PAPER_WIDTHS, PIDEBlock
from pide_zoo.layers.hamiltonian import HamiltonianBlock, HamiltonianUnit, hamiltonian_units, smoothness_penalty


def _adjoint(weight, t, shape):
    """K^T t as the adjoint of u -> K u (the gradient of <K u, t> in u), without conv_transpose2d."""
    u = torch.zeros(shape, dtype=t.dtype, requires_grad=True)
    (g,) = torch.autograd.grad((F.conv2d(u, weight, padding=weight.shape[-1] // 2) * t).sum(), u)
    return g


def _bn_eval(x, bn):
    return (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps) \
        * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _verlet_reference(block, x):
    """Y <- Y + h (K1^T relu(BN(K1 Z + b1)) + b1); Z <- Z - h (K2^T relu(BN(K2 Y + b2)) + b2), eq. (2.6)."""
    c = x.shape[1] // 2
    y, z = x[:, :c], x[:, c:]
    w1, b1, w2, b2 = block.conv1.weight, block.conv1.bias, block.conv2.weight, block.conv2.bias
    t = torch.relu(_bn_eval(F.conv2d(z, w1, b1, padding=1), block.bn1))
    y = y + block.h * (_adjoint(w1, t, z.shape) + b1.view(1, -1, 1, 1))
    t = torch.relu(_bn_eval(F.conv2d(y, w2, b2, padding=1), block.bn2))
    z = z - block.h * (_adjoint(w2, t, y.shape) + b2.view(1, -1, 1, 1))
    return torch.cat([y, z], 1)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=m.running_mean.dtype) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype) + 0.5)
        if isinstance(m, nn.Conv2d):
            m.bias.data.normal_(0, 0.1, generator=g)


def test_block_matches_verlet_equations():
    torch.manual_seed(0)
    block = HamiltonianBlock(8, h=0.3, dtype=torch.float64).eval()
    _randomize(block)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        got = block(x)
    torch.testing.assert_close(got, _verlet_reference(block, x).detach(), rtol=1e-12, atol=1e-12)


def test_block_without_norm_and_second_bias():
    block = HamiltonianBlock(4, norm_layer=None, transpose_bias=False, dtype=torch.float64)
    assert sum(p.numel() for p in block.parameters()) == 2 * (2 * 2 * 9 + 2)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    y, z = x[:, :2], x[:, 2:]
    w1, b1 = block.conv1.weight, block.conv1.bias
    want_y = y + block.h * _adjoint(w1, torch.relu(F.conv2d(z, w1, b1, padding=1)), z.shape)
    torch.testing.assert_close(block(x)[:, :2], want_y.detach())


@pytest.mark.parametrize('train', [False, True])
def test_block_is_invertible(train):
    torch.manual_seed(1)
    block = HamiltonianBlock(6, h=0.5, dtype=torch.float64).train(train)
    _randomize(block)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        out = block(x, update_stats=False)
    torch.testing.assert_close(block.inverse(out), x, rtol=1e-10, atol=1e-10)


def _unit_pair(nonlocal_layer=None):
    torch.manual_seed(2)
    kw = dict(channels=8, depth=5, h=0.2, nonlocal_layer=nonlocal_layer, nonlocal_after=(2,), dtype=torch.float64)
    stored, rev = HamiltonianUnit(**kw, reversible=False), HamiltonianUnit(**kw, reversible=True)
    _randomize(stored)
    rev.load_state_dict(stored.state_dict())
    return stored, rev


@pytest.mark.parametrize('with_nonlocal', [False, True])
def test_reversible_gradients_equal_stored_activations(with_nonlocal):
    nl = (lambda c, **kw: PIDEBlock(c, operator='frac_laplacian', **PAPER_WIDTHS, **kw)) if with_nonlocal else None
    stored, rev = _unit_pair(nl)
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    outs, grads = [], []
    for unit in (stored, rev):
        unit.train()
        xi = x.clone().requires_grad_()
        out = unit(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in unit.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # BN running statistics were updated exactly once on both paths.
    for (name, a), (_, b) in zip(stored.named_buffers(), rev.named_buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14, msg=name)


def test_reversible_saves_no_block_activations():
    """Only the Unit output is kept for backward on the reversible path."""
    stored, rev = _unit_pair()
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64, requires_grad=True)
    sizes = []
    for unit in (stored, rev):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t,
                                                      lambda t: t):
            unit.train()(x)
        sizes.append(sum(saved))
    assert sizes[1] <= x.numel() and sizes[0] > 10 * x.numel()


def test_smoothness_penalty_matches_formula():
    torch.manual_seed(3)
    nl = lambda c, **kw: PIDEBlock(c, **PAPER_WIDTHS, **kw)  # noqa: E731
    units = nn.Sequential(HamiltonianUnit(4, 3, h=0.1, nonlocal_layer=nl), HamiltonianUnit(6, 2, h=0.2))
    alpha = 1e-3
    want = 0.0
    for unit in units:
        blocks = list(unit.blocks)
        for a, b in zip(blocks[:-1], blocks[1:]):
            for k in ('conv1', 'conv2'):
                d = (getattr(a, k).weight - getattr(b, k).weight) / a.h
                want = want + alpha * a.h * (d ** 2).sum()
    got = smoothness_penalty(units, alpha)
    torch.testing.assert_close(got, want)
    assert [len(u) for u in hamiltonian_units(units)] == [3, 2]
    got.backward()
    assert units[0].blocks[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in units[0].nonlocals.parameters())  # nonlocal blocks excluded


def test_smoothness_penalty_without_units_is_zero():
    assert smoothness_penalty(nn.Linear(2, 2)).item() == 0.0


@pytest.mark.parametrize('kwargs,match', [
    (dict(channels=5), 'channels must be an even int'),
    (dict(channels=4, kernel_size=2), 'kernel_size must be a positive odd int'),
    (dict(channels=4, h=0), 'h must be a positive number'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HamiltonianBlock(**kwargs)


def test_bad_input():
    with pytest.raises(ValueError, match=r'x must be \(B, 4, H, W\)'):
        HamiltonianBlock(4)(torch.randn(1, 6, 3, 3))
    with pytest.raises(ValueError, match='nonlocal_after positions'):
        HamiltonianUnit(4, 2, nonlocal_layer=PIDEBlock, nonlocal_after=(3,))


def _ddp_worker(rank, world, port, results):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        grads = {}
        for reversible in (False, True):
            torch.manual_seed(0)
            unit = HamiltonianUnit(4, 3, h=0.3, reversible=reversible, dtype=torch.float64)
            model = DDP(unit)
            x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
            model(x).square().sum().backward()
            grads[reversible] = [p.grad.clone() for p in unit.parameters()]
        results[rank] = [torch.allclose(a, b, rtol=1e-8, atol=1e-10) for a, b in zip(grads[False], grads[True])]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_reversible_under_ddp_matches_stored():
    """The reversible backward hands parameter gradients to autograd, so DDP's all-reduce hooks fire."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    assert len(results) == 2 and all(all(v) for v in results.values())
