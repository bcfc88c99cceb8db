"""A kernel added from outside the package: a nonlocal heat operator, registered in this file only.

w_ij = c exp(-|theta_i - phi_j|^2 / (4 t)), c = (4 pi t)^(-n/2), in the diffusion form sum_j w_ij (V_j - V_i),
with the time t as the kernel's own parameter. It gets the dense and fused paths with gradients, PIDEBlock,
PIDEHead, the mmseg registry and the FLOP counter without any package file naming it.
"""
import math
import pathlib
import re

import pytest
import torch
from test_kernel_scale import long_range_accuracy
from torch import nn

from pide_zoo.layers import PIDEBlock, get_operator, nonlocal_aggregate, pide_kernel, register_operator


def heat_weight(x, t):
    return torch.exp(x / (-4 * t))


def heat_derivative(x, t):
    return torch.exp(x / (-4 * t)) / (-4 * t)


def heat_constant(s, n, t):
    return (4 * math.pi * t) ** (-n / 2)


register_operator('heat', weight=heat_weight, derivative=heat_derivative, form='difference',
                  constant=heat_constant, params=dict(t=0.5), aliases=('heat_kernel',), replace=True)


def _literal(theta, phi, vq, vk, t, lam, sigma=1.0, n=2):
    """(1/M) sum_j lam c exp(-|theta_i - phi_j|^2 / (4 t sigma^2)) (V_j - V_i), loop by loop."""
    c = (4 * math.pi * t) ** (-n / 2)
    out = torch.zeros(vq.shape, dtype=torch.float64)
    m = phi.shape[2]
    for b in range(theta.shape[0]):
        for i in range(theta.shape[2]):
            for j in range(m):
                d2 = float(((theta[b, :, i] - phi[b, :, j]) ** 2).sum()) / sigma ** 2
                out[b, :, i] += lam * c * math.exp(-d2 / (4 * t)) * (vk[b, :, j] - vq[b, :, i]) / m
    return out


def _inputs(dtype=torch.float64, n=11, m=5):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, e, p, generator=g, dtype=dtype) for e, p in ((3, n), (3, m), (4, n), (4, m))]


@pytest.mark.parametrize('method', ['fused', 'dense'])
@pytest.mark.parametrize('t,sigma', [(0.5, 1.0), (0.2, 2.0)])
def test_heat_kernel_matches_the_literal_sum(method, t, sigma):
    theta, phi, vq, vk = _inputs()
    phi[:, :, 0] = theta[:, :, 2]  # a coincident pair counts fully: the heat kernel is not singular
    got = nonlocal_aggregate(theta, phi, vq, vk, operator='heat', lam=0.7, kernel_params=dict(t=t),
                             embed_scale=sigma, method=method, tile_size=4)
    torch.testing.assert_close(got, _literal(theta, phi, vq, vk, t, 0.7, sigma), rtol=1e-12, atol=1e-14)


def test_heat_kernel_gradients_are_exact_on_both_paths():
    inputs = [t.requires_grad_() for t in _inputs(n=7, m=3)]
    for method in ('fused', 'dense'):
        def f(*args, method=method):
            return nonlocal_aggregate(*args, operator='heat_kernel', lam=0.9, kernel_params=dict(t=0.3),
                                      embed_scale=1.3, method=method, tile_size=3)
        assert torch.autograd.gradcheck(f, inputs)
    # the dense kernel itself, as pide_kernel returns it
    theta, phi = _inputs(n=4, m=3)[:2]
    want = 0.5 * heat_constant(None, 2, 0.5) * torch.exp(-torch.cdist(theta.transpose(1, 2),
                                                                          phi.transpose(1, 2)) ** 2 / 2)
    torch.testing.assert_close(pide_kernel(theta, phi, operator='heat', lam=0.5), want)


def test_heat_block_learns_a_long_range_task():
    """A heat block between 1x1 convolutions carries the code across the image; without it the task is chance."""
    torch.manual_seed(0)
    heat = long_range_accuracy(PIDEBlock(32, operator='heat', kernel_params=dict(t=0.25), subsample=1), 32)
    none = long_range_accuracy(nn.Identity(), 32)
    assert heat > 0.9 and none < 0.7, (heat, none)


def test_heat_block_flops_and_width_scale():
    block = PIDEBlock(16, operator='heat', method='dense').eval()
    assert block.embed_scale == pytest.approx(math.sqrt(8))  # tau sqrt(E), tau = 1
    assert block.kernel_params == dict(t=0.5)
    pytest.importorskip('fvcore', reason='FLOP counting needs the flops extra')
    from pide_zoo.flops import module_flop_analysis

    fa = module_flop_analysis(block, (torch.randn(1, 16, 8, 8),))
    assert not fa.unsupported_ops() and fa.total() > 0
    fused = module_flop_analysis(block, (torch.randn(1, 16, 8, 8),), nonlocal_method='fused')
    assert fused.total() > 0


def test_heat_head_from_an_mmseg_config():
    pytest.importorskip('mmseg', reason='the mmseg face needs the seg extra')
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import pide_zoo.seg  # noqa: F401  (registers PIDEHead)

    init_default_scope('mmseg')
    head = MODELS.build(dict(type='PIDEHead', in_channels=8, channels=8, num_classes=3, norm_cfg=dict(type='BN'),
                             block_cfg=dict(operator='heat', kernel_params=dict(t=2.0), subsample=1)))
    assert head.pide_block.operator == 'heat' and head.pide_block.kernel_params == dict(t=2.0)
    out = head([torch.randn(2, 8, 6, 6)])
    out.sum().backward()
    # the head's block starts as the identity: its last update scale gets the first gradient
    assert out.shape == (2, 3, 6, 6) and head.pide_block.gamma.grad.abs().sum() > 0


def test_registration_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"kernel_params \['tau'\] are not parameters of operator 'heat'"):
        PIDEBlock(8, operator='heat', kernel_params=dict(tau=1.0))
    with pytest.raises(ValueError, match='paper operators'):
        register_operator('log', weight=heat_weight, derivative=heat_derivative)
    with pytest.raises(ValueError, match=r"operator names \['heat'\] are taken"):
        register_operator('heat', weight=heat_weight, derivative=heat_derivative)
    with pytest.raises(ValueError, match='form must be one of'):
        register_operator('heat2', weight=heat_weight, derivative=heat_derivative, form='gradient')
    with pytest.raises(ValueError, match="s is not used by operator 'heat'"):
        PIDEBlock(8, operator='heat', s=0.5)
    assert get_operator('heat_kernel').form == 'difference'


def test_no_package_file_names_the_heat_kernel():
    root = pathlib.Path(__file__).resolve().parents[2] / 'pide_zoo'
    naming = [str(p) for p in root.rglob('*.py') if re.search(r'\bheat\b', p.read_text(), re.IGNORECASE)]
    assert naming == []


def test_a_checkpoint_with_other_kernel_params_names_them():
    saved = PIDEBlock(8, operator='heat', kernel_params=dict(t=0.5)).state_dict()
    with pytest.warns(UserWarning, match=r"kernel_params=\{'t': 0\.5\}, but this block has "
                                         r"kernel_params=\{'t': 0\.25\}"):
        PIDEBlock(8, operator='heat', kernel_params=dict(t=0.25)).load_state_dict(saved)
