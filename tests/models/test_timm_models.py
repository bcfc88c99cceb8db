import copy
import importlib
import importlib.util
import os
import os.path as osp
import subprocess
import sys
from functools import partial

import pytest
import timm
import torch
import torch.fx
from paper_tables import COLUMNS, PAPER_PARAMS  # tools/, the paper's Tables 1 and 2
from torch import nn

import pide_zoo
from pide_zoo.layers import PIDEBlock, smoothness_penalty
from pide_zoo.models import HamiltonianNet, insert_pide_blocks

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

OURS = ['hamiltonian74', 'nl_hamiltonian74', 'nl_hamiltonian74_frac', 'nl_hamiltonian74_invfrac',
        'nl_hamiltonian74_log', 'nl_hamiltonian74_4stage', 'resnet44_cifar', 'preresnet20_cifar']
NONLOCAL = ['nl_hamiltonian74', 'nl_hamiltonian74_frac', 'nl_hamiltonian74_invfrac', 'nl_hamiltonian74_log']


def _count(model):
    return sum(p.numel() for p in model.parameters()) / 1e6


def test_models_registered():
    assert set(OURS) <= set(timm.list_models())
    assert set(timm.list_models(module='hamiltonian_net')) == set(OURS[:6])
    assert 'nl_hamiltonian74.cifar100' in timm.list_models(pretrained=False, include_tags=True)


@pytest.mark.parametrize('name', PAPER_PARAMS)
def test_parameter_counts_match_paper(name):
    for tag, want in zip(COLUMNS, PAPER_PARAMS[name]):
        got = _count(timm.create_model(f'{name}.{tag}'))
        assert abs(got - want) <= 0.01, (name, tag, got, want)


def test_segmentation_layout_counts_match_table3():
    """No pooling, 1x1 conv head to 20 classes: 0.49 M (Hamiltonian-74), 0.54 M (nonlocal), Table 3."""
    for operator, want in ((None, 0.49), ('diffusion', 0.54), ('log', 0.54)):
        body = HamiltonianNet(num_classes=0, global_pool='', downsample=False, img_size=(90, 160),
                              block_cfg=None if operator is None else dict(operator=operator, subsample=3))
        got = _count(body) + _count(nn.Conv2d(112, 20, 1))
        assert abs(got - want) <= 0.01, (operator, got)


def test_stl10_geometry_from_input_size():
    model = timm.create_model('nl_hamiltonian74.stl10')
    assert model.img_size == (96, 96) and model.head_pool == 8
    assert all(s.unit.nonlocals['2'].subsample == 4 for s in model.stages)
    assert model.fc.in_features == 3 * 3 * 112
    assert timm.create_model('nl_hamiltonian74', img_size=96).head_pool == 8


@pytest.mark.parametrize('name', OURS)
def test_forward_backward_default_size(name):
    model = timm.create_model(name, num_classes=7)
    x = torch.randn(2, *model.pretrained_cfg['input_size'])
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('name', ['nl_hamiltonian74', 'nl_hamiltonian74_log', 'resnet44_cifar'])
@pytest.mark.parametrize('size', [(48, 40), (64, 64)])
def test_other_input_sizes(name, size):
    kw = dict(global_pool='avg') if 'hamiltonian' in name else {}
    model = timm.create_model(name, **kw)
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 10)
    out.sum().backward()
    if 'hamiltonian' in name:  # the fixed 'flatten' head takes other sizes when built for them
        assert timm.create_model(name, img_size=size)(torch.randn(1, 3, *size)).shape == (1, 10)


@pytest.mark.parametrize('name', OURS)
def test_features_only(name):
    model = timm.create_model(name, features_only=True)
    x = torch.randn(2, *timm.get_pretrained_cfg(name).input_size)
    feats = model(x)
    assert len(feats) == 3
    for f, c, r in zip(feats, model.feature_info.channels(), model.feature_info.reduction()):
        assert f.shape[1] == c and f.shape[2] == x.shape[2] // r
    model = timm.create_model(name, features_only=True, out_indices=(2,))
    assert len(model(x)) == 1


@pytest.mark.parametrize('name', OURS)
def test_head_api(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, *model.pretrained_cfg['input_size'])
    feats = model.forward_features(x)
    assert feats.shape[1] == model.num_features
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
    assert model.get_classifier() is model.fc
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)
    model.reset_classifier(0, '')
    assert model(x).dim() == 4
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 3 and final.shape == feats.shape


@pytest.mark.parametrize('name', OURS)
def test_default_cfg_consistency(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert len(cfg['mean']) == len(cfg['std']) == cfg['input_size'][0] == 3
    first = model.get_submodule(cfg['first_conv'])
    assert first.in_channels == 3
    assert model.get_submodule(cfg['classifier']).out_features == cfg['num_classes']
    assert timm.create_model(f'{name}.cifar100').num_classes == 100
    if cfg.get('pool_size'):
        feats = model.forward_features(torch.randn(1, *cfg['input_size']))
        assert tuple(feats.shape[-2:]) == tuple(cfg['pool_size'])


@pytest.mark.parametrize('name', OURS)
def test_fx_trace(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, *model.pretrained_cfg['input_size'])
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize('name', ['nl_hamiltonian74_frac', 'preresnet20_cifar'])
def test_torch_compile(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend='aot_eager')
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['nl_hamiltonian74_invfrac', 'preresnet20_cifar'])
def test_checkpoint_round_trip(name, tmp_path):
    model = timm.create_model(name, num_classes=100).eval()
    path = tmp_path / 'model.pth'
    torch.save(model.state_dict(), path)
    loaded = timm.create_model(name, num_classes=100, checkpoint_path=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_reversible_model_matches_stored():
    torch.manual_seed(0)
    a = timm.create_model('nl_hamiltonian74', depths=(3, 3, 3)).double()
    b = timm.create_model('nl_hamiltonian74', depths=(3, 3, 3), reversible=True).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for m in (a, b):
        m(x).square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-9, msg=n)


def test_keyword_arguments_change_the_layout():
    model = timm.create_model('nl_hamiltonian74_log', depths=(2, 3, 4), widths=(16, 32, 48), nonlocal_units=(2,),
                              nonlocal_after=1, block_cfg=dict(stages=4, subsample=1, lam=0.5, h=0.1))
    assert [len(s.unit.blocks) for s in model.stages] == [2, 3, 4]
    blocks = [m for m in model.modules() if isinstance(m, PIDEBlock)]
    assert len(blocks) == 1 and blocks[0].channels == 48 and blocks[0].stages == 4
    assert blocks[0].operator == 'log'  # the user's block_cfg updates the model's
    assert blocks[0].subsample == 1 and blocks[0].lam == 0.5 and blocks[0].h == 0.1
    assert list(model.stages[2].unit.nonlocals) == ['1']
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_old_nonlocal_arguments_still_work_with_a_warning():
    torch.manual_seed(0)
    new = timm.create_model('hamiltonian74', block_cfg=dict(operator='log', stages=3, subsample=1, lam=0.5))
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match=r"removed in pide_zoo 0\.4; use one block_cfg dict \(.*nonlocal_operator "
                                           r'-> block_cfg\.operator'):
        old = timm.create_model('hamiltonian74', nonlocal_operator='log', nonlocal_stages=3, nonlocal_subsample=1,
                                nonlocal_kwargs=dict(lam=0.5))
    assert repr(old) == repr(new)
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())
    with pytest.warns(FutureWarning):  # another operator for a registered nonlocal model, as before
        frac = timm.create_model('nl_hamiltonian74', nonlocal_operator='frac', nonlocal_kwargs=dict(h=0.2))
    assert {(b.operator, b.h) for b in frac.modules() if isinstance(b, PIDEBlock)} == {('frac_laplacian', 0.2)}
    with pytest.warns(FutureWarning):  # without an operator the old arguments built no blocks
        assert not [m for m in timm.create_model('hamiltonian74', nonlocal_kwargs=dict(h=1.0)).modules()
                    if isinstance(m, PIDEBlock)]


def test_smoothness_penalty_on_model():
    model = timm.create_model('nl_hamiltonian74')
    assert smoothness_penalty(model, 1.0).item() > 0
    blocks = [list(s.unit.blocks) for s in model.stages]
    want = sum(((a.conv1.weight - b.conv1.weight) ** 2).sum() / a.h + ((a.conv2.weight - b.conv2.weight) ** 2).sum()
               / a.h for unit in blocks for a, b in zip(unit[:-1], unit[1:]))
    torch.testing.assert_close(smoothness_penalty(model, 1.0), want)


def test_attn_layer_and_insert_helper():
    model = timm.create_model('resnet18', num_classes=3,
                              block_args=dict(attn_layer=partial(PIDEBlock, operator='log', subsample=1)))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model = timm.create_model('resnet18', num_classes=3)
    before = set(model.state_dict())
    insert_pide_blocks(model, indices=(-1, -2), operator='frac_laplacian', subsample=1)
    assert before < set(model.state_dict())
    assert {b.channels for b in model.pide_blocks.values()} == {256, 512}
    calls = []
    model.pide_blocks['4'].register_forward_hook(lambda *a: calls.append(1))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3) and calls == [1]
    with pytest.raises(ValueError, match='indices must lie in'):
        insert_pide_blocks(timm.create_model('resnet18'), indices=(7,))
    with pytest.raises(ValueError, match='feature_info'):
        insert_pide_blocks(nn.Linear(2, 2))


@pytest.mark.parametrize('call,match', [
    (lambda: timm.create_model('hamiltonian74', in_chans=1)(torch.randn(1, 3, 32, 32)), 'in_chans=1'),
    (lambda: timm.create_model('hamiltonian74')(torch.randn(1, 3, 6, 6)), 'smaller than the network pooling'),
    (lambda: timm.create_model('hamiltonian74')(torch.randn(1, 3, 64, 64)), "'flatten' head was built for"),
    (lambda: timm.create_model('hamiltonian74', block_cfg=dict(operator='wave')), 'operator must be one of'),
    (lambda: timm.create_model('hamiltonian74', img_size=6), 'img_size=.* is too small'),
    (lambda: timm.create_model('hamiltonian74', global_pool='max'), 'global_pool must be one of'),
    (lambda: timm.create_model('resnet44_cifar', depth=45), 'depth must be 6n'),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _fresh_python(code, **env):
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1', COLUMNS='1000', **env))


_LOADED = ('import sys; print(sorted({m.split(".")[0] for m in sys.modules} & '
           '{"mmengine", "mmseg", "mmcv", "fvcore", "matplotlib"}))')


def test_import_is_light():
    """``import pide_zoo`` (and its classification face, checkpoints and export) need torch and timm: no OpenMMLab
    package, no fvcore, no matplotlib."""
    out = _fresh_python('import pide_zoo, pide_zoo.cls, pide_zoo.checkpoint, pide_zoo.training, pide_zoo.export; '
                        + _LOADED)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == '[]'
    assert pide_zoo.__version__ == '0.2.0'
    if importlib.util.find_spec('mmseg') is not None:  # the check sees them where they are imported
        out = _fresh_python('import pide_zoo.seg; ' + _LOADED)
        assert out.stdout.strip() == "['mmcv', 'mmengine', 'mmseg']", out.stderr[-2000:]


def test_timm_tests_are_found_where_the_install_recorded_them(tmp_path, monkeypatch):
    """The folder tools/install.sh records in the venv wins over PIDE_ZOO_CACHE at test time."""
    sys.path.insert(0, osp.join(ROOT, 'tests', 'timm_suite'))
    try:
        from timm_source import RECORD, timm_source_dir
    finally:
        sys.path.pop(0)
    version = f'timm-{timm.__version__}'
    monkeypatch.delenv('PIDE_ZOO_TIMM_TESTS', raising=False)
    monkeypatch.setenv('PIDE_ZOO_CACHE', str(tmp_path / 'elsewhere'))
    assert timm_source_dir(str(tmp_path)) == str(tmp_path / 'elsewhere' / version)  # nothing recorded
    (tmp_path / RECORD).write_text(f'/opt/cache/{version}\n')
    assert timm_source_dir(str(tmp_path)) == f'/opt/cache/{version}'
    monkeypatch.setenv('PIDE_ZOO_TIMM_TESTS', str(tmp_path / 'mine'))
    assert timm_source_dir(str(tmp_path)) == str(tmp_path / 'mine')


def test_install_records_the_timm_tests_folder_in_the_venv(tmp_path):
    """tools/install.sh on an up-to-date environment (a venv whose python refuses pip: nothing is installed)."""
    import hashlib

    cache = os.environ.get('PIDE_ZOO_CACHE') or osp.join(
        os.environ.get('XDG_CACHE_HOME') or osp.expanduser('~/.cache'), 'pide_zoo')
    cached = osp.join(cache, f'timm-{timm.__version__}')
    if not osp.isfile(osp.join(cached, 'tests', 'test_models.py')):
        pytest.skip(f"timm's tests are not cached in {cached}: run tools/install.sh")
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    python = venv / 'bin' / 'python'
    python.write_text(f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && {{ echo "pip refused" >&2; exit 1; }}\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    fingerprint = hashlib.sha256(b''.join(open(osp.join(ROOT, f), 'rb').read() for f in (
        'tools/install.sh', 'setup.cfg', 'pyproject.toml'))).hexdigest()
    (venv / '.pide_zoo_install').write_text(fingerprint + '\n')
    out = subprocess.run(['bash', 'tools/install.sh'], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, VENV=str(venv), PIDE_ZOO_CACHE=cache))
    assert out.returncode == 0 and 'environment is up to date' in out.stdout, out.stdout + out.stderr
    assert (venv / '.pide_zoo_timm_tests').read_text().strip() == osp.abspath(cached)


def test_timm_suite_without_its_cache_skips_or_fails_in_ci(tmp_path):
    """Without timm's cached tests the suite is one skip saying why, and an error where CI=true."""
    cmd = ('import sys, pytest; sys.exit(pytest.main(["-q", "-rs", "-p", "no:cacheprovider", "tests/timm_suite"]))')
    local = _fresh_python(cmd, PIDE_ZOO_TIMM_TESTS=str(tmp_path), CI='')
    assert local.returncode in (0, 5) and '1 skipped' in local.stdout, local.stdout[-2000:]  # 5: no test ran
    assert f"timm's own tests not found: {tmp_path}" in local.stdout and 'tools/install.sh' in local.stdout
    ci = _fresh_python(cmd, PIDE_ZOO_TIMM_TESTS=str(tmp_path), CI='true')
    assert ci.returncode in (1, 2), ci.stdout[-2000:]  # a collection error
    assert '1 error' in ci.stdout and f"CI=true: timm's own tests not found: {tmp_path}" in ci.stdout


def test_drop_path_rate_is_stochastic_depth_on_the_verlet_steps():
    """timm's --drop-path reaches the Hamiltonian blocks, rising linearly to the rate at the last block; in
    training a dropped sample passes the step unchanged, in inference nothing is dropped."""
    model = timm.create_model('nl_hamiltonian74', drop_path_rate=0.3)
    rates = [b.drop_path for s in model.stages for b in s.unit.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3) and len(rates) == 18
    assert all(a <= b for a, b in zip(rates, rates[1:]))
    block = model.stages[2].unit.blocks[-1]
    x = torch.randn(64, 112, 4, 4)
    block.train()
    torch.manual_seed(0)
    out = block(x)
    unchanged = (out - x).flatten(1).abs().amax(1) == 0
    assert 5 < unchanged.sum() < 35  # about 30 % of 64 samples skip the step
    block.eval()
    assert not torch.equal(block(x), x)
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # trains
    with pytest.raises(ValueError, match='drop_path_rate cannot be combined with reversible'):
        timm.create_model('hamiltonian74', drop_path_rate=0.1, reversible=True)
    model.set_grad_checkpointing()
    with pytest.raises(ValueError, match='stochastic depth dropped at random'):
        model.train()(torch.randn(2, 3, 32, 32))
    # the default builds exactly the model without stochastic depth
    torch.manual_seed(0)
    a = timm.create_model('hamiltonian74')
    torch.manual_seed(0)
    b = timm.create_model('hamiltonian74', drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize('name', ['resnet44_cifar', 'preresnet20_cifar'])
def test_cifar_resnet_grad_checkpointing_matches(name):
    torch.manual_seed(0)
    a = timm.create_model(name).double()
    b = timm.create_model(name).double()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=n)


@pytest.mark.parametrize('head_pool', [0, -2, 1.5])
def test_head_pool_is_checked(head_pool):
    with pytest.raises(ValueError, match=rf'head_pool must be a positive int .* got {head_pool!r}'):
        timm.create_model('hamiltonian74', head_pool=head_pool)


@pytest.mark.parametrize('name', ['seresnext26d_32x4d', 'efficientnet_b0', 'mobilenetv3_small_100', 'convnext_tiny'])
def test_insert_pide_blocks_in_timm_families(name):
    model = insert_pide_blocks(timm.create_model(name, num_classes=3), indices=(-1,), operator='frac_laplacian',
                               subsample=1)
    out = model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3) and torch.isfinite(out).all() and len(model.pide_blocks) == 1


@pytest.mark.parametrize('name,match', [
    ('vit_tiny_patch16_224', 'VisionTransformer is a token model'),
    ('vit_tiny_r_s16_p8_224', 'VisionTransformer is a token model'),
])
def test_insert_pide_blocks_refuses_token_models_at_build_time(name, match):
    with pytest.raises(ValueError, match=match):
        insert_pide_blocks(timm.create_model(name), operator='log')


def test_insert_pide_blocks_refuses_features_only_models():
    with pytest.raises(ValueError, match='FeatureListNet is a features_only model'):
        insert_pide_blocks(timm.create_model('resnet18', features_only=True), operator='log')


@pytest.mark.parametrize('operator', ['diffusion', 'frac_laplacian', 'inv_frac_laplacian', 'log'])
def test_mixed_in_blocks_start_as_the_identity(operator):
    """resnet50 with a PIDE attn_layer in every bottleneck, and PIDE blocks inserted after stages of resnet50,
    seresnext26d, efficientnet_b0, mobilenetv3 and convnext: in inference mode right after construction every block
    returns its input, so the network computes what it computed before (as with timm's NonLocalAttn)."""
    seen = []

    def identity(module, args, output):
        seen.append(torch.equal(output, args[0]))

    model = timm.create_model('resnet50', num_classes=3,
                              block_args=dict(attn_layer=partial(PIDEBlock, operator=operator)))
    for m in model.modules():
        if isinstance(m, PIDEBlock):
            m.register_forward_hook(identity)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 64, 64))
    assert len(seen) == 16 and all(seen)
    for name in ('resnet50', 'seresnext26d_32x4d', 'efficientnet_b0', 'mobilenetv3_small_100', 'convnext_tiny'):
        torch.manual_seed(0)
        plain = timm.create_model(name, num_classes=3).eval()
        mixed = insert_pide_blocks(copy.deepcopy(plain), indices=(-2, -1), operator=operator).eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(mixed(x), plain(x)), name


def _docs_module(tmp_path, monkeypatch, name):
    """The module the timm guide shows as ``name``, imported from a folder on sys.path as --device-modules does."""
    text = open(osp.join(osp.dirname(__file__), '..', '..', 'docs', 'timm.md')).read()
    code = text.split(f'<!-- {name} ')[1].split('```python\n')[1].split('```')[0]
    (tmp_path / name).write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name[:-3], raising=False)
    return importlib.import_module(name[:-3])


def test_the_timm_guides_factories_build_as_timms_train_py_calls_them(tmp_path, monkeypatch):
    """The guide's module registers mixed networks by name; built as timm's train.py builds a model (its
    create_model keywords, --pretrained from a local file), they start as the pretrained network and every block
    is there."""
    if 'resnet50_pide_frac' not in timm.list_models():  # registered once per process
        _docs_module(tmp_path, monkeypatch, 'my_pide_models.py')
    train_py = dict(in_chans=3, num_classes=5, drop_rate=0.0, drop_path_rate=0.05, drop_block_rate=None,
                    global_pool=None, bn_momentum=None, bn_eps=None, scriptable=False, checkpoint_path='')
    x = torch.randn(2, 3, 64, 64)
    for name, base, blocks in (('resnet50_pide_frac', 'resnet50', 16), ('convnext_tiny_pide_log', 'convnext_tiny', 2)):
        torch.manual_seed(0)
        plain = timm.create_model(base, num_classes=5)
        weights = tmp_path / f'{base}.pth'
        torch.save(plain.state_dict(), weights)
        overlay = dict(file=str(weights), num_classes=5)  # else timm drops the classifier it would not fit
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **train_py)
        assert sum(isinstance(m, PIDEBlock) for m in model.modules()) == blocks
        assert model.pretrained_cfg['input_size'] == plain.pretrained_cfg['input_size']
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=0, atol=0)
