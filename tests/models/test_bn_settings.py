"""The paper's networks with the authors' batch norm, step size and padding; the settings in checkpoints."""
import io
import warnings
from functools import partial

import pytest
import timm
import torch
from torch import nn

import pide_zoo  # noqa: F401  (registers the models)
from pide_zoo.layers import PIDEBlock
from pide_zoo.models import _paper_norm
from pide_zoo.models.hamiltonian_net import HamiltonianNet

PAPER = ['hamiltonian74', 'nl_hamiltonian74', 'nl_hamiltonian74_frac', 'nl_hamiltonian74_invfrac',
         'nl_hamiltonian74_log', 'nl_hamiltonian74_4stage', 'resnet44_cifar', 'preresnet20_cifar']
TF, TORCH = (1e-3, 1 - 0.99), (1e-5, 0.1)


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _settings(model):
    return {(m.eps, m.momentum) for m in _bns(model)}


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(_paper_norm, '_warned', set())  # each test sees its first warning


@pytest.mark.parametrize('name', PAPER)
def test_paper_networks_default_to_the_authors_batch_norm(name):
    for tag in ('', '.stl10'):
        assert _settings(timm.create_model(name + tag)) == {TF}
    assert _settings(timm.create_model(name, bn_tf=False)) == {TORCH}
    given = partial(nn.BatchNorm2d, eps=1e-4)
    assert _settings(timm.create_model(name, norm_layer=given)) == {(1e-4, 0.1)}  # norm_layer wins


def test_pide_blocks_take_the_network_h_and_norm_layer():
    model = timm.create_model('nl_hamiltonian74_log', h=0.05)
    blocks = [s.unit.nonlocals['2'] for s in model.stages]
    assert len(blocks) == 3 and all(b.h == 0.05 for b in blocks)
    assert all(hb.h == 0.05 for s in model.stages for hb in s.unit.blocks)
    assert all((n.eps, n.momentum) == TF for b in blocks for n in b.norms)
    own = timm.create_model('nl_hamiltonian74_log', h=0.05, block_cfg=dict(h=0.2, norm_layer=nn.BatchNorm2d))
    assert all(s.unit.nonlocals['2'].h == 0.2 for s in own.stages)
    assert _settings(own.stages[0].unit.nonlocals['2']) == {TORCH} and _settings(own.stem) == {TF}
    # the default h is the authors' 0.06 everywhere
    assert {b.h for b in timm.create_model('nl_hamiltonian74').modules() if hasattr(b, 'h')} == {0.06}


def test_h_changes_the_pide_blocks_output():
    """The network's h reaches the PIDE blocks: equal to setting it on them, unequal to their old 0.06."""
    torch.manual_seed(0)
    a = timm.create_model('nl_hamiltonian74_frac', h=0.05).double().eval()
    same = timm.create_model('nl_hamiltonian74_frac', h=0.05, block_cfg=dict(h=0.05)).double().eval()
    old = timm.create_model('nl_hamiltonian74_frac', h=0.05, block_cfg=dict(h=0.06)).double().eval()
    same.load_state_dict(a.state_dict())
    old.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(a(x), same(x))
        assert not torch.allclose(a(x), old(x), rtol=1e-6, atol=0)


def test_resnet44_pads_stride_two_as_tensorflow_same():
    torch.manual_seed(0)
    tf_pad = timm.create_model('resnet44_cifar').eval()
    sym = timm.create_model('resnet44_cifar', pad_type='').eval()
    sym.load_state_dict(tf_pad.state_dict())
    conv_tf, conv_sym = tf_pad.stages[1][0].conv1, sym.stages[1][0].conv1
    x = torch.randn(1, 16, 32, 32)
    # TensorFlow's 'same' on an even size at stride 2: no row/column before, one after
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), conv_sym.weight, conv_sym.bias, 2)
    torch.testing.assert_close(conv_tf(x), want)
    assert not torch.allclose(conv_sym(x), want)
    # odd sizes pad symmetrically, as TensorFlow does
    x = torch.randn(1, 16, 33, 33)
    torch.testing.assert_close(conv_tf(x), conv_sym(x))
    assert sum(p.numel() for p in tf_pad.parameters()) == sum(p.numel() for p in sym.parameters()) == 662_826
    with pytest.raises(ValueError, match="pad_type must be 'same'"):
        timm.create_model('resnet44_cifar', pad_type='valid')
    with pytest.raises(TypeError, match='bn_tf must be True'):
        timm.create_model('hamiltonian74', bn_tf='tf')


def test_mixed_in_blocks_keep_pytorch_batch_norm():
    assert _settings(PIDEBlock(16)) == {TORCH}
    resnet = timm.create_model('resnet18', block_args=dict(attn_layer=partial(PIDEBlock, operator='log')))
    assert _settings(resnet) == {TORCH}


def _round_trip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _load(model, state_dict):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model.load_state_dict(state_dict)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize('name', ['nl_hamiltonian74_frac', 'resnet44_cifar'])
def test_state_dict_records_the_batch_norm_settings(name):
    tf_model, torch_model = timm.create_model(name), timm.create_model(name, bn_tf=False)
    state = _round_trip(tf_model.state_dict())
    assert state._metadata['']['bn_eps'] == 1e-3 and state._metadata['']['bn_momentum'] == pytest.approx(0.01)
    assert _load(timm.create_model(name), state) == []
    msgs = _load(torch_model, state)
    assert len(msgs) == 1 and 'trained with batch norm eps=0.001, momentum=0.01' in msgs[0]
    assert 'uses eps=1e-05, momentum=0.1' in msgs[0] and 'bn_tf=True' in msgs[0]
    assert _load(timm.create_model(name, bn_tf=False), state) == []  # once


@pytest.mark.parametrize('name, hint', [('nl_hamiltonian74_log', 'bn_tf=False to'),
                                        ('resnet44_cifar', "bn_tf=False, pad_type='' to")])
def test_a_pre_0_3_state_dict_warns_once_into_the_authors_settings(name, hint):
    old = timm.create_model(name, bn_tf=False).state_dict()
    for meta in old._metadata.values():  # as pide_zoo 0.2 wrote it: no record
        meta.pop('bn_eps', None)
        meta.pop('bn_momentum', None)
    old = _round_trip(old)
    assert _load(timm.create_model(name, bn_tf=False), old) == []
    msgs = _load(timm.create_model(name), old)
    assert len(msgs) == 1 and 'records no batch-norm settings' in msgs[0] and hint in msgs[0]
    assert _load(timm.create_model(name), old) == []


def test_metadata_free_state_dicts_and_timm_checkpoint_path_load_quietly(tmp_path):
    """timm's loaders strip the metadata: nothing to compare, nothing said."""
    model = timm.create_model('nl_hamiltonian74_invfrac', bn_tf=False)
    assert _load(timm.create_model('nl_hamiltonian74_invfrac'), dict(model.state_dict())) == []
    path = tmp_path / 'w.pth'
    torch.save(model.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        loaded = timm.create_model('nl_hamiltonian74_invfrac', bn_tf=False, checkpoint_path=str(path))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_segmentation_layout_without_classifier_records_too():
    body = HamiltonianNet(num_classes=0, global_pool='', downsample=False, block_cfg=dict(operator='log'))
    assert body.state_dict()._metadata['']['bn_eps'] == 1e-3
    gn = HamiltonianNet(num_classes=0, global_pool='', norm_layer=lambda c, **kw: nn.GroupNorm(2, c, **kw))
    assert 'bn_eps' not in gn.state_dict()._metadata['']
