"""The width-aware kernel scale, the kernels' float32 precision and the blocks' learning at the widths users run."""
import contextlib
import io
import warnings
from collections import OrderedDict
from functools import partial

import pytest
import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pide_zoo.layers import PAPER_WIDTHS, PIDEBlock, width_scale
from pide_zoo.layers.nonlocal_block import _warned_forms
from pide_zoo.layers.pide_ops import nonlocal_aggregate

import reference

CASES = [('diffusion', 'dot', None), ('diffusion', 'embedded_gaussian', None), ('frac_laplacian', 'dot', None),
         ('frac_laplacian', 'dot', 0.3), ('inv_frac_laplacian', 'dot', 0.8), ('log', 'dot', None)]
POWER = {'frac_laplacian': lambda s: 2 + 2 * s, 'inv_frac_laplacian': lambda s: 2 - 2 * s}


def _inputs(b=2, e=4, c=3, n=10, m=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, k, p, generator=g, dtype=dtype) for k, p in ((e, n), (e, m), (c, n), (c, m))]


@pytest.mark.parametrize('operator,kernel,s', CASES)
@pytest.mark.parametrize('method', ['dense', 'fused', 'auto'])
@pytest.mark.parametrize('normalizer', [None, 'query', 'rowsum', 2.5])
def test_scaled_kernel_matches_double_loop(operator, kernel, s, method, normalizer):
    """embed_scale sigma: the paper's literal loops at theta / sigma, phi / sigma and, in closed form, with
    lam sigma^p (power kernels) or lam / sigma^2 (dot kernel) on the unscaled embeddings."""
    theta, phi, vq, vk = _inputs()
    lam, sigma = 0.7, 2.3
    got = nonlocal_aggregate(theta, phi, vq, vk, operator=operator, s=s, lam=lam, kernel=kernel, embed_scale=sigma,
                             normalizer=normalizer, method=method, tile_size=3)
    norm = normalizer or 'key'
    want = reference.aggregate(theta / sigma, phi / sigma, vq, vk, operator, s, 2, lam, kernel, norm)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if operator in POWER:
        s_ = s if s is not None else 0.5
        closed = reference.aggregate(theta, phi, vq, vk, operator, s, 2, lam * sigma ** POWER[operator](s_), kernel,
                                     norm)
        torch.testing.assert_close(got, closed, rtol=1e-10, atol=1e-10)
    if kernel == 'dot' and operator == 'diffusion':
        closed = reference.aggregate(theta, phi, vq, vk, operator, s, 2, lam / sigma ** 2, kernel, norm)
        torch.testing.assert_close(got, closed, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('operator,kernel,s', CASES)
@pytest.mark.parametrize('method', ['dense', 'fused'])
def test_scaled_kernel_gradcheck(operator, kernel, s, method):
    args = [t.requires_grad_() for t in _inputs(b=1, e=3, c=2, n=5, m=4, seed=1)]
    fn = partial(nonlocal_aggregate, operator=operator, s=s, lam=0.5, kernel=kernel, embed_scale=1.7, method=method,
                 tile_size=2)
    assert torch.autograd.gradcheck(fn, args)


def test_width_scale():
    assert width_scale('frac_laplacian', 'dot', 64) == pytest.approx(1.5 * 8)
    assert width_scale('inv_frac_laplacian', 'dot', 64) == pytest.approx(1.5 * 8)
    assert width_scale('log', 'dot', 64) == pytest.approx(8)
    assert width_scale('diffusion', 'embedded_gaussian', 64) == pytest.approx(64 ** 0.25)
    assert width_scale('diffusion', 'dot', 64) == 1.0
    block = PIDEBlock(32, operator='frac', rd_channels=16)
    assert block.kernel_scale == 'width' and block.embed_scale == pytest.approx(1.5 * 4)
    assert PIDEBlock(32, operator='frac').embed_scale == pytest.approx(1.5 * 8 ** 0.5)  # E = 8 (rd_divisor)
    assert PIDEBlock(32, operator='frac', kernel_scale='paper').embed_scale == 1.0
    assert PIDEBlock(32, operator='frac', kernel_scale=2.0).embed_scale == 2.0
    with pytest.raises(ValueError, match='kernel_scale must be one of'):
        PIDEBlock(32, kernel_scale='wide')
    with pytest.raises(ValueError, match='kernel_scale must be one of'):
        PIDEBlock(32, kernel_scale=-1.0)


def test_paper_networks_keep_the_paper_kernel_and_mixed_in_blocks_get_the_width_scale():
    from pide_zoo import insert_pide_blocks
    for name in ('nl_hamiltonian74_frac', 'nl_hamiltonian74_log'):
        assert {b.kernel_scale for b in timm.create_model(name).modules() if isinstance(b, PIDEBlock)} == {'paper'}
    model = timm.create_model('hamiltonian74', block_cfg=dict(operator='frac', kernel_scale='width'))
    assert {b.kernel_scale for b in model.modules() if isinstance(b, PIDEBlock)} == {'width'}
    model = insert_pide_blocks(timm.create_model('resnet18'), operator='frac')
    assert [b.kernel_scale for b in model.pide_blocks.values()] == ['width']


@pytest.mark.parametrize('operator', ['frac_laplacian', 'inv_frac_laplacian', 'log'])
@pytest.mark.parametrize('channels', [16, 2048])
@pytest.mark.parametrize('widths', ['mixing', 'paper'])
def test_width_scale_keeps_the_signal_above_batch_norms_eps(operator, channels, widths):
    """The input of the first batch norm at initialisation, x = ReLU(N(0, 1)), median of three seeds: the width
    scale keeps its standard deviation above 1e-2 (about 3 sqrt(eps)) at the mixing defaults and the paper's widths;
    the paper's fractional Laplacian kernel is below sqrt(eps) here."""
    stds = {}
    for form in ('width', 'paper'):
        seen = []
        for seed in range(3):
            torch.manual_seed(seed)
            block = PIDEBlock(channels, operator=operator, kernel_scale=form, stages=1,
                              **(PAPER_WIDTHS if widths == 'paper' else {}))
            block.norms[0].register_forward_hook(lambda m, i, o, seen=seen: seen.append(i[0].std().item()))
            with torch.no_grad():
                block(torch.relu(torch.randn(2, channels, 8, 8)))
        stds[form] = sorted(seen)[1]
    assert stds['width'] > 1e-2, stds
    if operator == 'frac_laplacian':
        assert stds['paper'] < 1e-3, stds


def _long_range_task(generator, batch):
    """A code of +-1 on the two left columns; the class is read on the right column, 6 pixels away."""
    y = torch.randint(0, 2, (batch,), generator=generator)
    x = torch.zeros(batch, 2, 8, 8)
    x[:, 0, :, :2] = (y.float() * 2 - 1).view(-1, 1, 1)
    x[:, 1] = 0.1 * torch.randn(batch, 8, 8, generator=generator)
    return x, y


def long_range_accuracy(block: nn.Module, channels: int, steps: int = 60) -> float:
    """Test accuracy after ``steps`` Adam steps of 1x1 convolutions around ``block`` on the long-range task: only the
    block can move the code across the image."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(), block,
                          nn.Conv2d(channels, 2, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        x, y = _long_range_task(g, 16)
        loss = nn.functional.cross_entropy(model(x)[:, :, :, 7].mean(2), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = _long_range_task(g, 256)
    with torch.no_grad():
        return (model.eval()(x)[:, :, :, 7].mean(2).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize('form', ['width', 'paper'])
def test_wide_frac_block_carries_information_across_the_image(form):
    """One 256-channel fractional Laplacian block: with the width scale it learns the task; the paper's kernel stays
    at chance."""
    torch.manual_seed(0)
    accuracy = long_range_accuracy(PIDEBlock(256, operator='frac_laplacian', subsample=1, kernel_scale=form), 256)
    if form == 'width':
        assert accuracy > 0.9
    else:
        assert accuracy < 0.7


def test_frac_attn_layer_in_resnet50_gets_gradients_like_diffusion():
    """A PIDEBlock in every bottleneck of timm's resnet50 (256-2048 channels). At the mixing defaults the blocks
    start as the identity: at step 0 only their update scales get gradients, after one SGD step every parameter
    does. With the update scale at 1, layer 4's fractional Laplacian blocks get K_1 gradients within 100x of the
    diffusion blocks' (what the width scale is for)."""
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))

    def build(operator, **kwargs):
        torch.manual_seed(0)
        model = timm.create_model('resnet50', num_classes=10, zero_init_last=False,
                                  block_args=dict(attn_layer=partial(PIDEBlock, operator=operator, **kwargs)))
        blocks = [m for m in model.layer4.modules() if isinstance(m, PIDEBlock)]
        assert len(blocks) == 3 and blocks[0].channels == 2048
        return model, blocks

    model, blocks = build('frac_laplacian')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).logsumexp(1).sum().backward()
    assert all(b.gamma.grad.abs().sum() > 0 and b.theta.weight.grad.abs().sum() == 0 for b in blocks)
    optimizer.step()
    optimizer.zero_grad()
    model(x).logsumexp(1).sum().backward()
    assert all(p.grad.abs().sum() > 0 for b in blocks for p in b.parameters())
    grads = {}
    for operator in ('diffusion', 'frac_laplacian'):
        model, blocks = build(operator, ls_init_value=1.0)
        model(x).logsumexp(1).sum().backward()
        grads[operator] = min(float(b.convs[0].weight.grad.norm() / b.convs[0].weight.detach().norm()) for b in blocks)
    assert grads['diffusion'] / 100 < grads['frac_laplacian'] < grads['diffusion'] * 100, grads


class _MatmulPrecision(TorchDispatchMode):
    """Records the oneDNN and CUDA float32 matmul settings in force at every float32 matrix product."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten.mm, torch.ops.aten.addmm):
            if args[0].dtype == torch.float32:
                self.seen.append((torch.backends.mkldnn.matmul.fp32_precision,
                                  torch.backends.cuda.matmul.fp32_precision))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _medium_precision():
    saved = torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = 'bf16'
    torch.backends.cuda.matmul.fp32_precision = 'tf32'
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


@pytest.mark.skipif(not hasattr(torch.backends.mkldnn.matmul, 'fp32_precision'), reason='torch >= 2.9')
@pytest.mark.parametrize('operator', ['frac_laplacian', 'inv_frac_laplacian', 'log'])
@pytest.mark.parametrize('method', ['fused', 'dense'])
def test_kernel_products_are_ieee_float32_whatever_the_global_precision(operator, method):
    """With bf16 (oneDNN) and TF32 (CUDA) float32 matmuls chosen globally, every float32 product of the kernel's
    forward and backward runs in IEEE float32, the result stays within 1e-5 of float64 (E = 56, C = 112,
    N = 1024, M = 256), and the user's setting is back afterwards."""
    theta, phi, vq, vk = _inputs(b=1, e=56, c=112, n=1024, m=256, seed=3, dtype=torch.float32)
    theta, phi = theta * 0.3, phi * 0.3
    grad = torch.randn(1, 112, 1024, generator=torch.Generator().manual_seed(4))

    def run(*t):
        t = [a.clone().requires_grad_(i == 0) for i, a in enumerate(t)]
        out = nonlocal_aggregate(*t, operator=operator, method=method)
        return out.detach(), torch.autograd.grad(out, t[0], grad.to(out.dtype))[0]

    want = run(*(a.double() for a in (theta, phi, vq, vk)))
    spy = _MatmulPrecision()
    with _medium_precision():
        with spy:
            got = run(theta, phi, vq, vk)
        assert torch.backends.mkldnn.matmul.fp32_precision == 'bf16'
        assert torch.backends.cuda.matmul.fp32_precision == 'tf32'
    assert spy.seen and set(spy.seen) == {('ieee', 'ieee')}
    for a, e in zip(got, want):
        assert float((a.double() - e).abs().max() / e.abs().max()) < 1e-5


@pytest.mark.parametrize('operator', ['diffusion', 'frac_laplacian', 'inv_frac_laplacian', 'log'])
@pytest.mark.parametrize('method', ['auto', 'fused', 'dense'])
def test_bf16_autocast_operator_is_accurate(operator, method):
    """Under bf16 autocast the aggregate and its gradients (theta, key values) stay within 1e-2 of float64 (max
    abs error over max abs), with embeddings and values arriving in bf16 as the autocast convolutions give them."""
    theta, phi, vq, vk = (t.to(torch.bfloat16) for t in _inputs(b=2, e=16, c=24, n=96, m=24, seed=5,
                                                                      dtype=torch.float32))
    theta, phi = theta * 0.5, phi * 0.5
    grad = torch.randn(2, 24, 96, generator=torch.Generator().manual_seed(6))

    def run(*t, autocast):
        t = [a.clone().requires_grad_(i in (0, 3)) for i, a in enumerate(t)]
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):  # backward inside it, as some loops do
            out = nonlocal_aggregate(*t, operator=operator, embed_scale=2.0, method=method)
            return (out.detach(), *torch.autograd.grad(out, [t[0], t[3]], grad.to(out.dtype)))

    got = run(theta, phi, vq, vk, autocast=True)
    want = run(*(a.double() for a in (theta, phi, vq, vk)), autocast=False)
    for a, e in zip(got, want):
        assert float((a.double() - e).abs().max() / e.abs().max()) < 1e-2


def _state_dict_bytes(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _paper_block(*args, **kwargs):
    return PIDEBlock(*args, **PAPER_WIDTHS, **kwargs)


def test_state_dicts_record_their_kernel_form_and_warn_once_on_a_mismatch():
    _warned_forms.clear()
    width = _paper_block(8, operator='frac')
    sd = _state_dict_bytes(width.state_dict())  # the metadata survives torch.save / weights_only load
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        _paper_block(8, operator='frac').load_state_dict(sd)  # same form: silent
        _paper_block(8, operator='diffusion', kernel_scale='paper').load_state_dict(
            _paper_block(8, operator='diffusion').state_dict())  # the dot kernel's width form is the paper's
        plain = OrderedDict(sd)  # timm's loaders drop the metadata: nothing to compare
        _paper_block(8, operator='frac', kernel_scale='paper').load_state_dict(plain)
    with pytest.warns(UserWarning, match=r"saved from a block with kernel_scale='width', embed_scale=3\.0, but "
                                         r"this block has kernel_scale='paper', embed_scale=1\.0; build it with"):
        _paper_block(8, operator='frac', kernel_scale='paper').load_state_dict(sd)
    # pide_zoo 0.2 recorded the kernel form only
    v02 = OrderedDict(_paper_block(8, operator='frac').state_dict())
    v02._metadata = OrderedDict({'': {'version': 2, 'kernel_scale': 'width', 'embed_scale': width.embed_scale}})
    with pytest.warns(UserWarning, match=r"trained with kernel_scale='width'.*pass kernel_scale='width'"):
        _paper_block(8, operator='frac', kernel_scale='paper').load_state_dict(v02)
    with pytest.warns(UserWarning, match='the operator or the embedding width differ'):
        _paper_block(8, operator='log').load_state_dict(v02)  # the same form, another scale: not the form's fault
    # release 0.1 wrote version 1 and computed the paper's kernel
    v01 = OrderedDict(_paper_block(8, operator='log', kernel_scale='paper').state_dict())
    v01._metadata = OrderedDict({'': {'version': 1}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(3):  # e.g. the blocks of one network
            _paper_block(8, operator='log').load_state_dict(v01)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "pass kernel_scale='paper'" in messages[0] and 'pide_zoo 0.1' in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        _paper_block(8, operator='log', kernel_scale='paper').load_state_dict(v01)
