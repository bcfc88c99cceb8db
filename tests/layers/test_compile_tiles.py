"""The opt-in compiled tiles (``compile_tiles=True``) against the eager fused path, and their argument checks."""
import pytest
import torch
from torch._dynamo.utils import counters

from pide_zoo.layers import PIDEBlock
from pide_zoo.layers.ops import compiled, nonlocal_aggregate


def _inputs(b=2, e=8, c=16, n=256, m=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(b, e, n, generator=g), torch.randn(b, e, m, generator=g),
         torch.randn(b, c, n, generator=g), torch.randn(b, c, m, generator=g)]
    x[1][:, :, :8] = x[0][:, :, :8]  # theta_i == phi_j: weight 0, no NaN
    return x


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.cuda)], indirect=True)
@pytest.mark.parametrize('operator', ['frac_laplacian', 'log'])
def test_compiled_tiles_equal_the_eager_fused_path_in_values_and_gradients(operator, device):
    """With coincident pairs (the mask inside the compiled functions) and a shorter last tile (a second shape):
    the output and the gradients of theta, phi and the key values within float32 round-off of the eager path's
    (on a GPU: inductor's device kernels against the eager path on the device)."""
    inputs = [x.to(device) for x in _inputs()]
    weight = torch.randn(inputs[2].shape, generator=torch.Generator().manual_seed(1)).to(device)
    results = {}
    for compile_tiles in (False, True):
        t = [x.clone().requires_grad_(i != 2) for i, x in enumerate(inputs)]
        try:
            out = nonlocal_aggregate(*t, operator=operator, method='fused', embed_scale=2.0, tile_size=96,
                                     compile_tiles=compile_tiles)
        except Exception as exc:  # inductor needs a working C++ toolchain (or triton on a GPU)
            if not compile_tiles:
                raise
            pytest.skip(f'torch.compile cannot compile here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}')
        grads = torch.autograd.grad((out * weight).sum(), [t[0], t[1], t[3]])
        results[compile_tiles] = (out.detach(), *grads)
    for eager, got in zip(results[False], results[True]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6 * float(eager.abs().max()))


def test_each_kernel_compiles_apart_so_many_kernels_stay_compiled(monkeypatch):
    """Twelve orders s of the fractional Laplacian in one process: each kernel's tiles are compiled on their own
    (four graphs: forward and backward, two tile shapes), where functions sharing one code object would exhaust
    dynamo's recompile limit (fullgraph: an error)."""
    monkeypatch.setattr(compiled, 'BACKEND', 'eager')  # the same capture, without inductor's compile time
    x = _inputs(b=1, e=4, c=6, n=40, m=12)
    for s in [0.05 * j for j in range(1, 13)]:
        before = counters['stats']['unique_graphs']
        t = [a.clone().requires_grad_(j != 2) for j, a in enumerate(x)]
        out = nonlocal_aggregate(*t, operator='frac_laplacian', s=s, method='fused', tile_size=16, compile_tiles=True)
        eager = nonlocal_aggregate(*x, operator='frac_laplacian', s=s, method='fused', tile_size=16)
        out.sum().backward()
        assert counters['stats']['unique_graphs'] - before == 4, s
        torch.testing.assert_close(out.detach(), eager, rtol=1e-6, atol=0)


def test_a_block_with_compiled_tiles_equals_the_eager_block(monkeypatch):
    monkeypatch.setattr(compiled, 'BACKEND', 'eager')
    torch.manual_seed(0)
    eager = PIDEBlock(16, operator='inv_frac_laplacian', ls_init_value=1.0).eval()
    block = PIDEBlock(16, operator='inv_frac_laplacian', ls_init_value=1.0, compile_tiles=True).eval()
    block.load_state_dict(eager.state_dict())
    x = torch.randn(2, 16, 12, 10)
    torch.testing.assert_close(block(x), eager(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('kwargs,match', [
    (dict(operator='frac_laplacian', method='dense'), "got method='dense'"),
    (dict(operator='diffusion'), "got method='lowrank' and a dot-product kernel"),
    (dict(operator='frac_laplacian', compile_tiles='yes'), 'compile_tiles must be True or False'),
])
def test_compile_tiles_is_refused_where_it_does_not_apply(kwargs, match):
    kwargs = {'compile_tiles': True, **kwargs}
    with pytest.raises(ValueError, match=match):
        PIDEBlock(8, **kwargs)
    x = [torch.randn(1, 4, 16), torch.randn(1, 4, 8), torch.randn(1, 8, 16), torch.randn(1, 8, 8)]
    with pytest.raises(ValueError, match=match):
        nonlocal_aggregate(*x, **kwargs)
