"""tools/get_flops.py: parameters and FLOPs of mmseg configs, the project's and mmseg's own."""
import importlib.util
import os.path as osp

import pytest
import torch

pytest.importorskip('mmseg', reason='mmseg configs need the seg extra: pip install -e .[seg]')
pytest.importorskip('fvcore', reason='FLOP counting needs the flops extra: pip install -e .[flops]')

from fvcore.nn import FlopCountAnalysis  # noqa: E402
from mmengine.config import Config  # noqa: E402

import pide_zoo.seg  # noqa: E402, F401  (registers the modules)
from pide_zoo.flops import module_flop_analysis  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
FCN = 'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py'
NONLOCAL = ['bdd100k_pide_diffusion.py', 'bdd100k_pide_diffusion_void.py', 'bdd100k_pide_frac.py',
            'bdd100k_pide_invfrac.py', 'bdd100k_pide_log.py']


def _tool():
    spec = importlib.util.spec_from_file_location('_get_flops', osp.join(ROOT, 'tools', 'get_flops.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


get_flops = _tool()


def _model(config):
    """The config's model, built here without the tool's helpers."""
    from mmengine.hub import get_config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope('mmseg')
    cfg = get_config(config) if '::' in config else Config.fromfile(osp.join(ROOT, 'configs', config))
    cfg.model.pop('pretrained', None)
    return revert_sync_batchnorm(MODELS.build(cfg.model)).eval()


@pytest.mark.parametrize('config', NONLOCAL)
def test_bdd100k_nonlocal_configs(config, capsys):
    h, w = 12, 24
    result = get_flops.main([osp.join(ROOT, 'configs', config), '--shape', str(h), str(w)])
    model = _model(config)
    assert result['params'] == sum(p.numel() for p in model.parameters())
    assert f"Params: 0.548 M ({result['params']:,})" in capsys.readouterr().out
    assert result['input_shape'] == (1, 3, h, w) and result['shape_source'] == '--shape'
    assert result['params_not_counted'] == {} and result['pretrained_dropped'] == []
    assert len(result['pide_blocks']) == 3 and set(result['flops']) == {'dense', 'auto'}
    assert result['unsupported_ops'] == {'dense': {}, 'auto': {}}
    # the whole: the backbone as fvcore counts it alone, plus the 1x1 conv head by hand (112 -> classes)
    classes = model.decode_head.num_classes
    x = torch.rand(1, 3, h, w)
    for method in ('dense', 'auto'):
        backbone = module_flop_analysis(model.backbone, (x,), nonlocal_method=method).total()
        assert result['flops'][method] == backbone + 112 * classes * h * w
        assert 0 < sum(b[method] for b in result['pide_blocks'].values()) < result['flops'][method]


def test_bdd100k_diffusion_dense_and_efficient_columns(capsys):
    result = get_flops.main([osp.join(ROOT, 'configs', 'bdd100k_pide_diffusion.py'), '--shape', '24', '48'])
    out = capsys.readouterr().out
    # the low-rank path never forms the N x M kernel
    assert result['flops']['auto'] < result['flops']['dense']
    blocks = result['pide_blocks']
    assert all(b['auto'] < b['dense'] for b in blocks.values())
    g = lambda v: f'{v / 1e9:.4g}'  # noqa: E731
    assert (f"Flops: {g(result['flops']['dense'])} GFLOPs (dense: the paper's N x M kernel) | "
            f"{g(result['flops']['auto'])} GFLOPs (auto: pide_zoo's low-rank / tiled path)") in out
    assert 'Input shape: (1, 3, 24, 48) (--shape)' in out
    total_row = [ln for ln in out.splitlines() if ln.startswith('all 3 PIDE blocks')][0].split()
    assert total_row[-2:] == [g(sum(b['dense'] for b in blocks.values())), g(sum(b['auto'] for b in blocks.values()))]
    dense_only = get_flops.get_flops(osp.join(ROOT, 'configs', 'bdd100k_pide_diffusion.py'), (24, 48), 'dense')
    assert dense_only['flops'] == {'dense': result['flops']['dense']}


def test_local_bdd100k_config_has_one_column(capsys):
    result = get_flops.main([osp.join(ROOT, 'configs', 'bdd100k_hamiltonian74.py'), '--shape', '9', '16'])
    out = capsys.readouterr().out
    assert result['pide_blocks'] == {} and list(result['flops']) == ['dense']
    assert 'PIDE blocks' not in out and f"Flops: {result['flops']['dense'] / 1e9:.4g} GFLOPs\n" in out


def test_default_shape_comes_from_the_test_pipeline_or_the_crop_size():
    cfg = get_flops.load_config(osp.join(ROOT, 'configs', 'bdd100k_pide_frac.py'))
    assert get_flops.default_input_shape(cfg) == ((90, 160), 'test pipeline: Resize scale=(160, 90), keep_ratio=False')
    cfg = get_flops.load_config(FCN)
    assert get_flops.default_input_shape(cfg) == ((1024, 2048), 'test pipeline: Resize scale=(2048, 1024), '
                                                                'keep_ratio=True')
    crop = Config(dict(model=dict(data_preprocessor=dict(size=(512, 1024))), test_pipeline=[dict(type='LoadImage')]))
    assert get_flops.default_input_shape(crop) == ((512, 1024), 'crop size: model.data_preprocessor.size=(512, 1024)')
    crop = Config(dict(model=dict(), train_pipeline=[dict(type='RandomCrop', crop_size=(64, 96))]))
    assert get_flops.default_input_shape(crop)[0] == (64, 96)
    with pytest.raises(ValueError, match='pass --shape H W'):
        get_flops.default_input_shape(Config(dict(model=dict())))


def test_drop_pretrained_names_what_it_removes():
    cfg = dict(pretrained='open-mmlab://resnet50_v1c', backbone=dict(
        type='mmseg.TIMMBackbone', pretrained=True, checkpoint_path='w.pth',
        init_cfg=[dict(type='Kaiming'), dict(type='Pretrained', checkpoint='b.pth')]),
        decode_head=dict(init_cfg=dict(type='Pretrained', checkpoint='h.pth')))
    dropped = get_flops.drop_pretrained(cfg)
    assert dropped == ["model.pretrained='open-mmlab://resnet50_v1c'", 'model.backbone.pretrained=True',
                       "model.backbone.checkpoint_path='w.pth'", "model.backbone.init_cfg (Pretrained 'b.pth')",
                       "model.decode_head.init_cfg (Pretrained 'h.pth')"]
    assert cfg == dict(pretrained=None, backbone=dict(type='mmseg.TIMMBackbone', pretrained=False, checkpoint_path='',
                                                      init_cfg=[dict(type='Kaiming')]), decode_head=dict(init_cfg=None))


@pytest.mark.slow
def test_mmseg_fcn_config(capsys):
    h, w = 64, 128
    result = get_flops.main([FCN, '--shape', str(h), str(w)])
    out = capsys.readouterr().out
    model = _model(FCN)
    aux = sum(p.numel() for p in model.auxiliary_head.parameters())
    model.auxiliary_head = None  # training only: not counted, as mmseg's get_flops
    assert result['params'] == sum(p.numel() for p in model.parameters())
    assert result['params_not_counted'] == {'auxiliary_head': aux}
    assert result['pretrained_dropped'] == ["model.pretrained='open-mmlab://resnet50_v1c'"]
    # fvcore alone counts the same ops except the stem's 3x3 max pool, which it leaves out: 9 per output
    x = torch.rand(1, 3, h, w)
    with torch.no_grad():
        plain = FlopCountAnalysis(model, (x,))
        plain.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = plain.total()
        assert 'aten::max_pool2d' in plain.unsupported_ops()
        assert result['flops']['dense'] == round(total) + 9 * 64 * (h // 4) * (w // 4)
    assert result['unsupported_ops'] == {'dense': {}} and result['pide_blocks'] == {}
    assert f"Params: {result['params'] / 1e6:.3f} M" in out and 'Input shape: (1, 3, 64, 128) (--shape)' in out
    assert f'Not counted: auxiliary_head ({aux / 1e6:.3f} M params' in out
    assert "Not loaded (counts need no weights): model.pretrained='open-mmlab://resnet50_v1c'" in out


def test_bad_config_and_arguments_are_named(capsys):
    log = osp.join(ROOT, 'configs', 'bdd100k_pide_log.py')
    for args, msg in ((['nowhere.py'], "config file 'nowhere.py' does not exist"),
                      (['mmseg::fcn/no_such.py'], "config 'mmseg::fcn/no_such.py' not found in mmseg"),
                      ([log, '--nonlocal-method', 'tiled'],
                       "--nonlocal-method must be one of dense, auto, both, got 'tiled'"),
                      ([log, '--shape', '1', '2', '3'], '--shape must be H W or one size, positive, got 1 2 3')):
        with pytest.raises(SystemExit) as e:
            get_flops.main(args)
        assert e.value.code == 2 and msg in capsys.readouterr().err
