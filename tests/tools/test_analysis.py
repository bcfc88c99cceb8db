"""Stability analysis (pide_zoo.analysis) and its tools (tools/spectrum.py, tools/stability.py)."""
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from torch import nn

import pide_zoo  # noqa: F401  (registers the models)
from pide_zoo.analysis import (
    block_modules,
    feature_norms,
    matrix_spectrum,
    nonlocal_spectra,
    perturb,
    perturbation_sensitivity,
    plot_feature_norms,
    plot_sensitivity,
    plot_spectra,
)
from pide_zoo.layers import HamiltonianBlock, PIDEBlock

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PY = sys.executable
SMALL = dict(depths=(2, 2, 1), widths=(8, 8, 16))


def _small(name='nl_hamiltonian74', **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(SMALL, **kw)).eval()


def test_matrix_spectrum_matches_numpy():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((12, 12))
    s = matrix_spectrum(torch.from_numpy(k).float().view(12, 12, 1, 1))
    eig = np.linalg.eigvals(k.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(sorted(s['real']), sorted(eig.real), atol=1e-8)
    np.testing.assert_allclose(s['sym'], np.linalg.eigvalsh((k + k.T) / 2), atol=1e-5)
    assert s['size'] == 12 and s['spectral_norm'] == pytest.approx(np.linalg.norm(k, 2), rel=1e-5)
    # diag(1, -1, 2) plus an antisymmetric part: the symmetric part keeps the diagonal
    d = torch.diag(torch.tensor([1.0, -1.0, 2.0])) + torch.tensor([[0, 3.0, 0], [-3.0, 0, 0], [0, 0, 0]])
    s = matrix_spectrum(d)
    assert s['sym'] == pytest.approx([-1.0, 1.0, 2.0]) and s['frac_pos_sym'] == pytest.approx(2 / 3)
    assert s['frac_pos_real'] == pytest.approx(1 / 3)  # eigenvalues 2 and +-sqrt(8) i: K and K_s differ
    with pytest.raises(ValueError, match='must be square'):
        matrix_spectrum(torch.zeros(3, 4, 1, 1))


def test_matrix_spectrum_counts_rounding_noise_as_zero(monkeypatch):
    # A purely imaginary pair as some LAPACK builds return it (real parts +4.8e-17): zero, not positive.
    d = torch.diag(torch.tensor([1.0, -1.0, 2.0])) + torch.tensor([[0, 3.0, 0], [-3.0, 0, 0], [0, 0, 0]])
    noisy = torch.tensor([4.8e-17 + 8 ** 0.5 * 1j, 4.8e-17 - 8 ** 0.5 * 1j, 2.0 + 0j], dtype=torch.complex128)
    monkeypatch.setattr(torch.linalg, 'eigvals', lambda k: noisy)
    assert matrix_spectrum(d)['frac_pos_real'] == pytest.approx(1 / 3)
    noisy[0] = noisy[1] = 1e-3 + 0j  # well above rounding: positive
    assert matrix_spectrum(d)['frac_pos_real'] == 1.0


def test_nonlocal_spectra_cover_every_block_and_stage():
    model = _small(block_cfg=dict(stages=3))
    spectra = nonlocal_spectra(model)
    assert [b['channels'] for b in spectra['blocks']] == [8, 8, 16]
    assert all(len(b['stages']) == 3 and b['operator'] == 'diffusion' for b in spectra['blocks'])
    block = model.stages[2].unit.nonlocals['1']
    k2 = block.convs[1].weight.detach().view(16, 16).double()
    assert spectra['blocks'][2]['stages'][1]['sym'] == pytest.approx(
        torch.linalg.eigvalsh((k2 + k2.T) / 2).tolist())
    nn.init.constant_(block.norms[0].running_var, 3.0)
    nn.init.constant_(block.norms[0].weight, 2.0)
    folded = nonlocal_spectra(model, fold_bn=True)['blocks'][2]['stages'][0]
    k1 = block.convs[0].weight.detach().view(16, 16).double() * 2.0 / (3.0 + block.norms[0].eps) ** 0.5
    assert folded['spectral_norm'] == pytest.approx(torch.linalg.matrix_norm(k1, 2).item())
    with pytest.raises(ValueError, match='no nonlocal blocks'):
        nonlocal_spectra(_small('hamiltonian74'))


def test_feature_norms_and_block_discovery():
    model = _small()
    blocks = block_modules(model)
    assert [type(m) for _, m in blocks].count(PIDEBlock) == 3
    assert [type(m) for _, m in blocks].count(HamiltonianBlock) == 5
    x = torch.randn(4, 3, 32, 32)
    r = feature_norms(model, x)
    assert len(r['gain']) == 8 and r['kinds'][2] == 'nonlocal'
    with torch.no_grad():
        y = model.stages[0].unit.blocks[0](model.stem(x))
    assert r['norm_out'][0] == pytest.approx(y.flatten(1).norm(dim=1).mean().item(), rel=1e-5)
    # at initialisation the Hamiltonian blocks barely change the norm; ResNet v1 blocks amplify it
    resnet = feature_norms(timm.create_model('resnet44_cifar').eval(), x)
    assert max(abs(g - 1) for g in r['gain']) < 0.1 < max(resnet['gain'])
    with pytest.raises(ValueError, match='has none of the block types'):
        block_modules(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_perturbations_fgsm_is_worse_than_random():
    model = _small()
    x, target = torch.randn(6, 3, 32, 32), torch.arange(6)
    rnd = perturb(model, x, target, 0.05, 'random', generator=torch.Generator().manual_seed(0))
    fgsm = perturb(model, x, target, 0.05, 'fgsm')
    assert rnd.abs().max() == pytest.approx(0.05) and fgsm.abs().max() == pytest.approx(0.05)
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(model(x + fgsm), target) > loss(model(x + rnd), target) > 0
    r = perturbation_sensitivity(model, x, target, eps=(0.01, 0.05))
    assert set(r['perturbations']) == {'random', 'fgsm'} and len(r['blocks']) == 8
    for kind, rows in r['perturbations'].items():
        assert rows[1]['logit_rel_change'] > rows[0]['logit_rel_change'] > 0, kind
        assert len(rows[0]['rel_change']) == len(rows[0]['gain']) == 8
    assert r['perturbations']['fgsm'][1]['logit_rel_change'] > r['perturbations']['random'][1]['logit_rel_change']
    with pytest.raises(ValueError, match='kind must be one of'):
        perturb(model, x, target, 0.1, 'pgd')


def test_plots_write_png(tmp_path):
    pytest.importorskip('matplotlib', reason='the plots need the analysis extra: pip install -e .[analysis]')
    model = _small()
    paths = plot_spectra(nonlocal_spectra(model), str(tmp_path / 's_'), title='t')
    x, target = torch.randn(3, 3, 32, 32), torch.arange(3)
    paths.append(plot_feature_norms({'a': feature_norms(model, x)}, str(tmp_path / 'n.png')))
    paths.append(plot_sensitivity({'a': perturbation_sensitivity(model, x, target, eps=(0.01,))},
                                  str(tmp_path / 'p.png')))
    for p in paths:
        with open(p, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'


# --- the tools -----------------------------------------------------------------------------------------------
def _run(args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    out = subprocess.run([PY, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _check_outputs(folder, name, figures):
    result = json.loads(open(osp.join(folder, name)).read())
    for f in figures:
        path = osp.join(folder, f)
        assert osp.getsize(path) > 1000 and open(path, 'rb').read(4) == b'\x89PNG'
    return result


@pytest.mark.slow
def test_tools_on_fresh_and_briefly_trained_models(tmp_path):
    pytest.importorskip('matplotlib', reason='the tools plot: pip install -e .[analysis]')
    kwargs = ['--model-kwargs', 'depths=(2,2,1)', 'widths=(8,8,16)']
    # a briefly trained nonlocal model and Hamiltonian baseline on the bundled digits
    for model in ('nl_hamiltonian74', 'hamiltonian74'):
        _run(['tools/train_cls.py', '--dataset', 'digits', '--model', model, *kwargs, '--epochs', '1', '-b', '50',
              '-j', '0', '--no-progress', '--output', str(tmp_path / model)])
    ckpt = str(tmp_path / 'nl_hamiltonian74' / 'last.pth.tar')

    out = _run(['tools/spectrum.py', '--model', 'nl_hamiltonian74', *kwargs, '--output', str(tmp_path / 'spec0')])
    figures = ['spectrum_real.png', 'spectrum_sym.png', 'spectrum_complex.png']
    fresh = _check_outputs(tmp_path / 'spec0', 'spectrum.json', figures)
    assert fresh['epoch'] == 0 and len(fresh['blocks']) == 3 and 'positive: real parts' in out
    _run(['tools/spectrum.py', ckpt, '--output', str(tmp_path / 'spec1')])
    trained = _check_outputs(tmp_path / 'spec1', 'spectrum.json', figures)
    assert trained['epoch'] == 1 and trained['arch'] == 'nl_hamiltonian74'
    assert trained['blocks'][0]['stages'][0]['real'] != fresh['blocks'][0]['stages'][0]['real']
    assert 0 <= trained['blocks'][2]['stages'][1]['frac_pos_sym'] <= 1

    out = _run(['tools/stability.py', ckpt, str(tmp_path / 'hamiltonian74' / 'last.pth.tar'),
                '--models', 'resnet44_cifar', 'nl_hamiltonian74', '--num-images', '8', '--eps', '2', '8',
                '--output', str(tmp_path / 'stab')])
    result = _check_outputs(tmp_path / 'stab', 'stability.json', ['feature_norms.png', 'sensitivity.png'])
    assert result['dataset'] == 'digits' and result['num_images'] == 8 and len(result['models']) == 4
    labels = list(result['models'])
    assert labels[0] == 'nl_hamiltonian74 (epoch 1)' and labels[2] == 'resnet44_cifar (epoch 0)'
    fgsm = result['models'][labels[0]]['sensitivity']['perturbations']['fgsm']
    assert [row['eps'] for row in fgsm] == pytest.approx([2 / 255, 8 / 255]) and 'clean accuracy' in out
