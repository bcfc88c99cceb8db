"""The paper's networks' blocks, built as a user builds them, against the authors' Keras code (issue 26).

``authors_reference`` transcribes the authors' ``Nonlocal_pseudo``, ``Nonlocal_diff``, ``Hamiltonian_Block`` and
``resnet_v1`` block in float64 numpy, with Keras's batch norm. Each block is compared in inference mode (moving
statistics), in training mode (batch statistics) and by the moving statistics after that training call.
"""
from functools import partial

import authors_reference as authors
import numpy as np
import pytest
import timm
import torch
from torch import nn

import pide_zoo  # noqa: F401  (registers the timm models)

TOL = 1e-12
# Nonlocal_pseudo's typ and the timm model that builds it.
PSEUDO_MODELS = {2: 'nl_hamiltonian74_frac', 3: 'nl_hamiltonian74_invfrac', 4: 'nl_hamiltonian74_log'}
# The authors' norm and affinity options as the blocks spell them.
NORMS = {'norm1': {}, 'norm2': dict(normalizer='rowsum')}
AFFINITIES = {'dot1': {}, 'dot2': dict(normalizer='rowsum'), 'embed_gaussian': dict(kernel='embedded_gaussian',
                                                                                    normalizer='rowsum')}
OPERATOR_TYP = {'frac_laplacian': 2, 'inv_frac_laplacian': 3, 'log': 4}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # the models' initial weights, so that every run compares the same numbers


def _np(t):
    return t.detach().cpu().double().numpy().copy()


def _nhwc(x):
    return _np(x.permute(0, 2, 3, 1))


def _conv(conv):
    """(kernel HWIO, bias) of a torch convolution, the layout of Keras's Conv2D."""
    return _np(conv.weight.permute(2, 3, 1, 0)), _np(conv.bias)


def _bn(bn):
    return authors.BatchNorm(_np(bn.weight), _np(bn.bias), _np(bn.running_mean), _np(bn.running_var))


def _bns(block):
    return [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]


def _pide_reference(block, pool, affinity=None, typ=None, norm='norm1', h=authors.H):
    """The authors' block with ``block``'s weights; their options are given, not read from ``block``."""
    def build():
        bns = [_bn(n) for n in block.norms]
        kw = dict(conv_theta=_conv(block.theta), conv_phi=_conv(block.phi), w_layers=[_conv(c) for c in block.convs],
                  bn_layers=bns, h=h, subsample=pool > 1, nl_pool_size=pool)
        if affinity is not None:
            return partial(authors.nonlocal_diff, affinity=affinity, **kw), bns
        return partial(authors.nonlocal_pseudo, typ=typ, norm=norm, **kw), bns
    return build


def _hamiltonian_reference(block, h=authors.H):
    def build():
        bns = [_bn(block.bn1), _bn(block.bn2)]
        return partial(authors.hamiltonian_block, conv1=_conv(block.conv1), conv2=_conv(block.conv2), bn1=bns[0],
                       bn2=bns[1], h=h), bns
    return build


def _resnet_reference(block, strides):
    def build():
        bns = [_bn(block.bn1), _bn(block.bn2)]
        return partial(authors.resnet_v1_block, conv_a=_conv(block.conv1), bn_a=bns[0], conv_b=_conv(block.conv2),
                       bn_b=bns[1], shortcut=_conv(block.shortcut), strides=strides), bns
    return build


def _take(model, block):
    """``block`` of float64 ``model`` with random conv biases and batch-norm affines (the init leaves them 0
    and 1, where a missing bias or affine would go unseen)."""
    model.double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in block(model).modules():
            if isinstance(m, nn.Conv2d):
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=torch.float64))
                m.bias.copy_(0.5 * torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return block(model)


def _calibrate(block, build, x):
    """Moving statistics near those of the pre-BN signals, whose scale the operators set (variances down to 1e-11
    for the fractional Laplacian at the paper's scale): the batch statistics of the authors' block on ``x``,
    perturbed."""
    ref, bns = build()
    ref(_nhwc(x), training=True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for bn, keras_bn in zip(_bns(block), bns):
            c = bn.num_features
            std = torch.from_numpy(np.sqrt(keras_bn.batch_variance))
            bn.running_mean.copy_(torch.from_numpy(keras_bn.batch_mean) + std * torch.randn(c, generator=g))
            bn.running_var.copy_(torch.from_numpy(keras_bn.batch_variance) * (0.5 + 1.5 * torch.rand(c, generator=g)))


def _rel(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def _errors(block, build, x):
    """Relative differences of ``block`` from the authors' block on ``x``: inference output, training output and
    the moving statistics after the training call, each as (output, update out - x) or (mean, variance)."""
    x_ref = _nhwc(x)
    errs = {}
    ref, bns = build()
    with torch.no_grad():
        for mode, training in (('eval', False), ('train', True)):
            block.train(training)
            got, want = _nhwc(block(x)), ref(x_ref, training=training)
            errs[mode] = (_rel(got, want), _rel(got - x_ref, want - x_ref) if got.shape == x_ref.shape else 0.0)
    errs['stats'] = (max(_rel(_np(bn.running_mean), k.moving_mean) for bn, k in zip(_bns(block), bns)),
                     max(_rel(_np(bn.running_var), k.moving_variance) for bn, k in zip(_bns(block), bns)))
    return errs


def _check(block, build, x):
    _calibrate(block, build, _input(x.shape[1], x.shape[2], seed=3))
    errs = _errors(block, build, x)
    assert max(errs['eval'][0], errs['train'][0], *errs['stats']) <= TOL, errs
    # The update alone, at 1e-11: the package's log kernel uses Euler's gamma in full where the authors
    # truncate it to 0.5772156649, which moves the log blocks' update by up to 1.4e-12 relative.
    assert max(errs['eval'][1], errs['train'][1]) <= 10 * TOL, errs


def _input(channels, size, seed=0):
    return torch.randn(2, channels, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _nonlocal(stage):
    return lambda model: model.stages[stage].unit.nonlocals['2']


@pytest.mark.parametrize('norm', sorted(NORMS))
@pytest.mark.parametrize('typ', sorted(PSEUDO_MODELS))
def test_nonlocal_pseudo(typ, norm):
    """Nonlocal_pseudo types 2-4, norm1 / norm2, in the CIFAR network (keys max-pooled by 2)."""
    model = timm.create_model(PSEUDO_MODELS[typ], block_cfg=NORMS[norm])
    block = _take(model, _nonlocal(0))
    assert block.subsample == 2
    _check(block, _pide_reference(block, 2, typ=typ, norm=norm), _input(32, 8))


@pytest.mark.parametrize('affinity', sorted(AFFINITIES))
def test_nonlocal_diff(affinity):
    """Nonlocal_diff (version 2) with affinity dot1, dot2 and embed_gaussian, in the CIFAR network."""
    model = timm.create_model('nl_hamiltonian74', block_cfg=AFFINITIES[affinity])
    block = _take(model, _nonlocal(1))
    _check(block, _pide_reference(block, 2, affinity=affinity), _input(64, 8))


@pytest.mark.parametrize('stage', [0, 2])
def test_hamiltonian_block(stage):
    """Hamiltonian_Block: a Verlet step with the conv bias after K^T."""
    model = timm.create_model('hamiltonian74')
    block = _take(model, lambda m: m.stages[stage].unit.blocks[1])
    _check(block, _hamiltonian_reference(block), _input(model.stages[stage].unit.channels, 8))


@pytest.mark.parametrize('pool', [1, 3, 4])
@pytest.mark.parametrize('operator', ['diffusion', 'frac_laplacian', 'inv_frac_laplacian', 'log'])
def test_key_pools(operator, pool):
    """Keys not pooled (the authors' nl_subsample=False), max-pooled by 3 (their BDD100K pool, here with a
    remainder dropped) and by 4 (their STL-10 networks, from the tag)."""
    name = 'nl_hamiltonian74' + {'diffusion': '', 'frac_laplacian': '_frac', 'inv_frac_laplacian': '_invfrac',
                                 'log': '_log'}[operator]
    model = timm.create_model(name + '.stl10') if pool == 4 else timm.create_model(name, block_cfg=dict(subsample=pool))
    block = _take(model, _nonlocal(0))
    assert block.subsample == pool
    kind = dict(affinity='dot1') if operator == 'diffusion' else dict(typ=OPERATOR_TYP[operator])
    _check(block, _pide_reference(block, pool, **kind), _input(32, {1: 6, 3: 10, 4: 12}[pool]))


@pytest.mark.parametrize('name', ['nl_hamiltonian74', 'nl_hamiltonian74_frac', 'nl_hamiltonian74_invfrac',
                                  'nl_hamiltonian74_log', 'nl_hamiltonian74_4stage'])
def test_network_h_reaches_blocks(name):
    """The network's ``h`` in its PIDE blocks as in its Hamiltonian blocks, as the authors' Units pass it."""
    model = timm.create_model(name, h=0.05)
    block = _take(model, _nonlocal(1))
    kind = dict(typ=OPERATOR_TYP[block.operator]) if block.operator != 'diffusion' else dict(affinity='dot1')
    assert len(block.convs) == (4 if name.endswith('4stage') else 2)
    _check(block, _pide_reference(block, 2, h=0.05, **kind), _input(64, 8))
    ham = _take(model, lambda m: m.stages[1].unit.blocks[3])
    _check(ham, _hamiltonian_reference(ham, h=0.05), _input(64, 8))


@pytest.mark.parametrize('h', [None, 0.05])
@pytest.mark.parametrize('operator', ['diffusion', 'frac_laplacian', 'inv_frac_laplacian', 'log'])
def test_mmseg_backbone(operator, h):
    """The BDD100K network (keys max-pooled by 3, a remainder dropped), with its ``h`` in every block."""
    pytest.importorskip('mmseg', reason='the mmseg backbone needs the seg extra: pip install -e .[seg]')
    from pide_zoo.seg.backbones import PIDEHamiltonianNet

    net = PIDEHamiltonianNet(block_cfg=dict(operator=operator), **({} if h is None else dict(h=h)))
    step = authors.H if h is None else h
    block = _take(net.body, _nonlocal(2))
    assert block.subsample == 3
    kind = dict(typ=OPERATOR_TYP[operator]) if operator != 'diffusion' else dict(affinity='dot1')
    _check(block, _pide_reference(block, 3, h=step, **kind), _input(112, 10))
    ham = _take(net.body, lambda m: m.stages[0].unit.blocks[5])
    _check(ham, _hamiltonian_reference(ham, h=step), _input(32, 6))


@pytest.mark.parametrize('size', [8, 9])
def test_resnet44_downsampling_block(size):
    """The first block of Unit 2 of resnet44_cifar: TensorFlow's 'same' padding at stride 2 (0 before and 1
    after on even sizes, 1 and 1 on odd ones), the unnormalised 1x1 shortcut and Keras's batch norm."""
    model = timm.create_model('resnet44_cifar')
    block = _take(model, lambda m: m.stages[1][0])
    _check(block, _resnet_reference(block, strides=2), _input(16, size))


def _wrong(setting):
    """A block built with ``setting`` wrong and the authors' block it should have been. The only place here that
    overrides a network's settings: PyTorch's eps, PyTorch's momentum, the PIDE blocks' former fixed h, PyTorch's
    symmetric padding."""
    tf_bn = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)
    if setting == 'padding':
        model = timm.create_model('resnet44_cifar')
        block = _take(model, lambda m: m.stages[1][0])
        right = block.conv1
        block.conv1 = nn.Conv2d(16, 32, 3, 2, 1, dtype=torch.float64)  # PyTorch's symmetric padding
        block.conv1.load_state_dict(right.state_dict())
        return block, _resnet_reference(block, strides=2), _input(16, 8)
    if setting == 'h':
        model = timm.create_model('nl_hamiltonian74_log', h=0.05, block_cfg=dict(h=0.06))
    else:
        norm = partial(nn.BatchNorm2d, eps=1e-5, momentum=0.01) if setting == 'eps' else partial(tf_bn, momentum=0.1)
        model = timm.create_model('nl_hamiltonian74_log', h=0.05, norm_layer=norm)
    block = _take(model, _nonlocal(0))
    return block, _pide_reference(block, 2, typ=4, h=0.05), _input(32, 8)


@pytest.mark.parametrize('setting,seen_in', [('eps', ('eval', 'train', 'stats')), ('momentum', ('stats',)),
                                              ('h', ('eval', 'train')), ('padding', ('eval', 'train'))])
def test_comparison_sees_wrong_settings(setting, seen_in):
    """The comparison above fails, by far, for a block with a wrong eps, momentum, h or padding."""
    block, build, x = _wrong(setting)
    _calibrate(block, build, _input(x.shape[1], x.shape[2], seed=3))
    errs = _errors(block, build, x)
    for key in seen_in:
        assert errs[key][0] > 1e6 * TOL, errs
