"""PIDEHead (pide_zoo.seg.heads) and its configs in configs/pidehead/."""
import doctest
import gc
import os
import os.path as osp
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip('mmseg', reason='the mmseg face needs the seg extra: pip install -e .[seg]')

from mmcv.cnn import ConvModule  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from torch import nn  # noqa: E402

import pide_zoo.seg  # noqa: E402, F401  (registers the modules)
import pide_zoo.seg.heads  # noqa: E402
from pide_zoo.layers import PAPER_WIDTHS, PIDEBlock  # noqa: E402
from pide_zoo.seg.heads import PIDEHead  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PY = sys.executable
MMSEG_DIR = osp.dirname(__import__('mmseg').__file__)
MMSEG_CONFIGS = osp.join(MMSEG_DIR, '.mim', 'configs')
MMSEG_TOOLS = osp.join(MMSEG_DIR, '.mim', 'tools')

# mmseg's NonLocal net configs and their class counts; each has a diffusion and a frac PIDEHead config.
SCHEDULES = {
    '4xb2-40k_cityscapes-512x1024': 19, '4xb2-80k_cityscapes-512x1024': 19,
    '4xb4-80k_ade20k-512x512': 150, '4xb4-160k_ade20k-512x512': 150,
    '4xb4-20k_voc12aug-512x512': 21, '4xb4-40k_voc12aug-512x512': 21,
}
OPERATORS = {'diffusion': 'diffusion', 'frac': 'frac_laplacian'}
CONFIGS = [(f'pidehead-{op}_r50-d8_{sched}.py', OPERATORS[op], sched, classes)
           for sched, classes in SCHEDULES.items() for op in OPERATORS]
NL_ONLY_KEYS = ('reduction', 'use_scale', 'mode')

# The head keeps the paper's widths and starts as the identity, as NLHead's NonLocal2d.
HEAD_WIDTHS = {**PAPER_WIDTHS, 'ls_init_value': 0.0}


def _config(name, **overrides):
    init_default_scope('mmseg')
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'pidehead', name))
    cfg.merge_from_dict(overrides)
    return cfg


def _unscoped(cfg):
    """``cfg`` without the ``_scope_`` keys that mmengine adds to dicts read through ``mmseg::`` bases."""
    if isinstance(cfg, dict):
        return {k: _unscoped(v) for k, v in cfg.items() if k != '_scope_'}
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(map(_unscoped, cfg))
    return cfg


def test_every_config_is_listed():
    on_disk = {f for f in os.listdir(osp.join(ROOT, 'configs', 'pidehead')) if f.endswith('.py')}
    assert on_disk == {name for name, *_ in CONFIGS}


@pytest.mark.parametrize('name,operator,schedule,classes', CONFIGS)
def test_config_is_the_nonlocal_config_with_the_head_replaced(name, operator, schedule, classes):
    cfg = _unscoped(_config(name).to_dict())
    nl = Config.fromfile(osp.join(MMSEG_CONFIGS, 'nonlocal_net', f'nonlocal_r50-d8_{schedule}.py')).to_dict()
    assert cfg['custom_imports'] == dict(imports=['pide_zoo.seg'], allow_failed_imports=False)
    head, nl_head = cfg['model'].pop('decode_head'), nl['model'].pop('decode_head')
    want = {k: v for k, v in nl_head.items() if k not in NL_ONLY_KEYS}
    want.update(type='PIDEHead', block_cfg=dict(operator=operator))
    assert head == want and head['num_classes'] == classes
    for key in ('custom_imports', 'pide_head'):
        cfg.pop(key)
    assert cfg == nl  # backbone, auxiliary head, data, schedule and runtime are mmseg's


def _no_pretrained(cfg):
    """Every init_cfg in ``cfg`` without a checkpoint."""
    if isinstance(cfg, dict):
        return cfg.get('type') != 'Pretrained' and 'checkpoint' not in cfg and all(map(_no_pretrained, cfg.values()))
    if isinstance(cfg, (list, tuple)):
        return all(map(_no_pretrained, cfg))
    return True


@pytest.mark.slow
@pytest.mark.parametrize('name,operator,schedule,classes', CONFIGS)
def test_config_builds_without_download_and_trains_one_iteration(name, operator, schedule, classes):
    torch.manual_seed(0)
    cfg = _config(name, **{'model.pretrained': None, 'model.data_preprocessor.size': (64, 64)})
    model = MODELS.build(cfg.model)
    assert isinstance(model.decode_head, PIDEHead) and model.decode_head.pide_block.operator == operator
    assert model.decode_head.conv_seg.out_channels == classes
    assert all(_no_pretrained(getattr(m, 'init_cfg', None)) for m in model.modules())
    model.init_weights()  # would download an ImageNet checkpoint if one were configured
    model = revert_sync_batchnorm(model)  # as mmengine's Runner does without a process group
    model.train()
    data = dict(inputs=[torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)],
                data_samples=[SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, classes, (1, 64, 64))))])
    head = model.decode_head
    before = [p.detach().clone() for p in (head.convs[0].conv.weight, head.conv_seg.weight)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    grads = {}  # whether each parameter has a finite gradient when SGD steps (train_step zeroes them after)
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.update(
        (name, p.grad is not None and bool(torch.isfinite(p.grad).all())) for name, p in model.named_parameters()))
    losses = model.train_step(data, OptimWrapper(optimizer))
    assert {'decode.loss_ce', 'aux.loss_ce'} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    # every parameter is in the graph, the PIDE block's included, and the head took an SGD step
    assert len(grads) == len(list(model.parameters())) and all(grads.values())
    assert any(name.startswith('decode_head.pide_block.') for name in grads)
    for old, new in zip(before, (head.convs[0].conv.weight, head.conv_seg.weight)):
        assert not torch.equal(old, new)


def _manual(head, operator, concat_input):
    """The head's composition rebuilt from independent modules with the head's weights."""
    norm = dict(type='BN')
    conv0 = ConvModule(6, 4, 3, padding=1, norm_cfg=norm)
    block = PIDEBlock(4, operator=operator, stages=2, subsample=2, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU,
                      **HEAD_WIDTHS)
    conv1 = ConvModule(4, 4, 3, padding=1, norm_cfg=norm)
    conv_cat = ConvModule(10, 4, 3, padding=1, norm_cfg=norm) if concat_input else None
    cls = nn.Conv2d(4, 3, 1)
    pairs = [(conv0, head.convs[0]), (block, head.pide_block), (conv1, head.convs[1]), (cls, head.conv_seg)]
    if concat_input:
        pairs.append((conv_cat, head.conv_cat))
    for mine, theirs in pairs:
        mine.load_state_dict(theirs.state_dict())
    mods = nn.ModuleList([m for m, _ in pairs]).double()

    def forward(x):
        out = conv1(block(conv0(x)))
        if concat_input:
            out = conv_cat(torch.cat([x, out], 1))
        return cls(out)

    return forward, pairs, mods


@pytest.mark.parametrize('operator', ['diffusion', 'frac_laplacian'])
@pytest.mark.parametrize('concat_input', [True, False])
def test_head_equals_its_composition_in_values_and_gradients(operator, concat_input):
    torch.manual_seed(0)
    head = PIDEHead(in_channels=6, channels=4, num_classes=3, dropout_ratio=0, block_cfg=dict(operator=operator),
                    concat_input=concat_input, norm_cfg=dict(type='BN'))
    # zero at the start (the identity): the block's path would be untested
    torch.nn.init.uniform_(head.pide_block.gamma, 0.5, 1.5)
    head.double()
    forward, pairs, _ = _manual(head, operator, concat_input)
    x = torch.randn(2, 6, 8, 12, dtype=torch.float64)
    weight = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    x_head, x_manual = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = head([x_head])
    assert out.shape == (2, 3, 8, 12)
    ref = forward(x_manual)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(x_head.grad, x_manual.grad, rtol=1e-10, atol=1e-12)
    assert x_head.grad.abs().sum() > 0
    for mine, theirs in pairs:
        for (name, p), (_, q) in zip(mine.named_parameters(), theirs.named_parameters()):
            assert q.grad is not None and q.grad.abs().sum() > 0, name
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def _relative_grad(conv):
    return float(conv.weight.grad.norm() / conv.weight.detach().norm())


def test_frac_head_learns_at_r50_width():
    """R-50-D8 width (2048 -> 512 channels, 256-dim embeddings), after one SGD step from the identity: the paper's
    fractional Laplacian kernel puts the aggregate far below BN's eps; the default width scale keeps its K_1
    relative gradient within 100x of the diffusion head's."""
    x = torch.randn(2, 2048, 16, 16, generator=torch.Generator().manual_seed(0))
    grads = {}
    for operator, scale in (('diffusion', 'width'), ('frac_laplacian', 'width'), ('frac_laplacian', 'paper')):
        torch.manual_seed(0)
        head = PIDEHead(in_channels=2048, channels=512, num_classes=19, norm_cfg=dict(type='BN'),
                        block_cfg=dict(operator=operator, kernel_scale=scale))
        # the block starts as the identity: one SGD step gives its update scales their first values
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
        head([x]).square().mean().backward()
        assert head.pide_block.gamma.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        head([x]).square().mean().backward()
        grads[operator, scale] = _relative_grad(head.pide_block.convs[0])
    diffusion = grads['diffusion', 'width']
    assert diffusion / 100 < grads['frac_laplacian', 'width'] < diffusion * 100, grads
    assert grads['frac_laplacian', 'paper'] < diffusion / 1000, grads  # what the width scale fixes


def test_head_picks_its_input_by_in_index():
    head = PIDEHead(in_channels=5, channels=4, num_classes=2, in_index=1, norm_cfg=dict(type='BN')).eval()
    out = head([torch.randn(1, 3, 6, 6), torch.randn(1, 5, 6, 10)])
    assert out.shape == (1, 2, 6, 10)


@pytest.mark.parametrize('block_args,want', [
    (dict(operator='frac', s=0.3, n=3, stages=3, h=0.1, lam=0.2, rd_ratio=0.25, subsample=3, symmetric=True,
          normalizer='rowsum', method='dense', tile_size=16),
     dict(operator='frac_laplacian', s=0.3, n=3, stages=3, h=0.1, lam=0.2, embed_channels=2, subsample=3,
          symmetric=True, phi=None, normalizer='rowsum', method='dense', tile_size=16)),
    (dict(operator='diffusion', kernel='embedded_gaussian', normalizer=2.0, subsample=1, tile_size=8),
     dict(operator='diffusion', s=None, kernel='embedded_gaussian', normalizer=2.0, subsample=1, tile_size=8)),
    (dict(operator='log', kernel_scale='paper'), dict(operator='log', kernel_scale='paper', embed_scale=1.0)),
    (dict(operator='log', kernel_scale=3.0), dict(operator='log', kernel_scale=3.0, embed_scale=3.0)),
])
def test_every_block_argument_passes_through(block_args, want):
    block = PIDEHead(in_channels=8, channels=8, num_classes=2, block_cfg=block_args).pide_block
    assert {k: getattr(block, k) for k in want} == want
    # and nothing else differs from the block built directly (the same resolved method, widths, ...)
    assert repr(block) == repr(PIDEBlock(8, norm_layer=nn.Identity, **{**HEAD_WIDTHS, **block_args}))  # no norm


def test_head_defaults_are_the_block_defaults_at_the_papers_widths():
    head = PIDEHead(in_channels=8, channels=8, num_classes=2).pide_block  # FCNHead's norm_cfg=None: no norm
    assert repr(head) == repr(PIDEBlock(8, norm_layer=nn.Identity, **HEAD_WIDTHS))
    assert (head.embed_channels, head.value_channels, head.value_proj) == (4, 8, None)


def test_flat_block_arguments_still_work_with_a_warning():
    """The spelling before 0.3: the block's arguments on the head itself."""
    torch.manual_seed(0)
    new = PIDEHead(in_channels=8, channels=8, num_classes=2, block_cfg=dict(operator='log', subsample=1, lam=0.3))
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match=r"PIDEHead: the block arguments \['lam', 'operator', 'subsample'\] are "
                                           r'deprecated and will be removed in pide_zoo 0\.4; pass them as block_cfg'):
        old = PIDEHead(in_channels=8, channels=8, num_classes=2, operator='log', subsample=1, lam=0.3)
    assert repr(old) == repr(new)
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())
    with pytest.raises(ValueError, match='got block_cfg and the block arguments'):
        PIDEHead(in_channels=8, channels=8, num_classes=2, operator='log', block_cfg=dict(subsample=1))
    with pytest.raises(ValueError, match="block_cfg must not set 'norm_layer'"):
        PIDEHead(in_channels=8, channels=8, num_classes=2, block_cfg=dict(norm_layer=nn.BatchNorm2d))


def test_norm_and_act_cfg_reach_the_block():
    kw = dict(in_channels=8, channels=8, num_classes=2)
    gn = PIDEHead(norm_cfg=dict(type='GN', num_groups=2), act_cfg=dict(type='LeakyReLU', negative_slope=0.2),
                  **kw).pide_block
    assert all(isinstance(m, nn.GroupNorm) and m.num_groups == 2 for m in gn.norms)
    assert isinstance(gn.act, nn.LeakyReLU) and gn.act.negative_slope == 0.2
    sync = PIDEHead(norm_cfg=dict(type='SyncBN', requires_grad=False), **kw).pide_block
    assert all(isinstance(m, nn.SyncBatchNorm) and not m.weight.requires_grad for m in sync.norms)
    plain = PIDEHead(norm_cfg=None, act_cfg=None, **kw).pide_block  # FCNHead's defaults: no norm
    assert all(isinstance(m, nn.Identity) for m in plain.norms) and isinstance(plain.act, nn.Identity)


def test_head_builds_from_the_registry():
    init_default_scope('mmseg')
    head = MODELS.build(dict(type='PIDEHead', in_channels=8, channels=4, num_classes=2, block_cfg=dict(operator='log')))
    assert type(head) is PIDEHead and head.pide_block.operator == 'log'


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(block_cfg=dict(operator='nonlocal')), ValueError, r"operator must be one of .*'diffusion'.* got 'nonlocal'"),
    (dict(block_cfg=dict(method='fast')), ValueError, r'method must be one of'),
    (dict(block_cfg=dict(subsample=0)), ValueError, r'subsample must be a positive int, got 0'),
    (dict(block_cfg=dict(operator='diffusion', s=0.5)), ValueError, r"s is not used by operator 'diffusion'"),
    (dict(block_cfg='log'), TypeError, r'PIDEHead: block_cfg must be a dict'),
    (dict(reduction=2), TypeError, r"unexpected keyword argument 'reduction'"),  # NLHead's keys left in
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        PIDEHead(in_channels=8, channels=4, num_classes=2, **kwargs)


def test_docstring_example_runs():
    result = doctest.testmod(pide_zoo.seg.heads)
    assert result.attempted >= 4 and result.failed == 0


def _status_kb(field):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def _reset_peak_kb():
    """Current resident size; resets the peak (VmHWM) to it, so earlier peaks cannot hide later ones."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    return _status_kb('VmRSS')


@pytest.mark.slow
@pytest.mark.skipif(not osp.exists('/proc/self/clear_refs'), reason='peak RSS reset needs Linux /proc')
def test_whole_image_eval_forward_of_the_diffusion_head():
    """mmseg's whole-image test at 1024x2048: R-50-D8 features (1, 2048, 128, 256), no gradients."""
    cfg = _config('pidehead-diffusion_r50-d8_4xb2-40k_cityscapes-512x1024.py')
    head = MODELS.build(dict(cfg.model.decode_head, norm_cfg=dict(type='BN'))).eval()
    x = torch.randn(1, 2048, 128, 256)
    mark = {}

    def block_starts(module, args):
        mark['head_peak'] = _status_kb('VmHWM')
        mark['block_base'] = _reset_peak_kb()

    def block_ends(module, args, out):
        mark['block_mb'] = (_status_kb('VmHWM') - mark['block_base']) / 1024

    head.pide_block.register_forward_pre_hook(block_starts)
    head.pide_block.register_forward_hook(block_ends)
    gc.collect()
    base = _reset_peak_kb()
    with torch.no_grad():
        out = head([None, None, None, x])  # in_index=3: ResNet's last stage
    head_mb = (max(mark['head_peak'], _status_kb('VmHWM')) - base) / 1024
    assert out.shape == (1, 19, 128, 256) and torch.isfinite(out).all()
    # N = 32768 queries, M = 8192 pooled keys: an N x M float32 kernel (NLHead's attention) is 1024 MB.
    assert mark['block_mb'] < 512, f"the PIDE block's peak memory grew by {mark['block_mb']:.0f} MB"
    # the head's own maps: the concat (2560 x 32768) is 320 MB, each 512-channel map 64 MB
    assert head_mb < 1536, f"the head's peak memory grew by {head_mb:.0f} MB"


def _fake_cityscapes(root):
    import cv2

    rng = np.random.default_rng(0)
    for split, n in (('train', 2), ('val', 1)):
        for d in ('leftImg8bit', 'gtFine'):
            os.makedirs(osp.join(root, d, split, 'city'), exist_ok=True)
        for i in range(n):
            stem = osp.join(root, '{}', split, 'city', f'city_{i:06d}_000019_{{}}.png')
            cv2.imwrite(stem.format('leftImg8bit', 'leftImg8bit'), rng.integers(0, 256, (64, 128, 3), np.uint8))
            cv2.imwrite(stem.format('gtFine', 'gtFine_labelTrainIds'), rng.integers(0, 19, (64, 128), np.uint8))


def _tiny_run_options(data_root):
    """What a user passes to try a Cityscapes config on a small folder, from scratch, in seconds."""
    return ['--cfg-options', 'model.pretrained=None', f'train_dataloader.dataset.data_root={data_root}',
            f'val_dataloader.dataset.data_root={data_root}', 'model.data_preprocessor.size=(64,64)',
            'train_dataloader.dataset.pipeline.2.scale=(128,64)',
            'train_dataloader.dataset.pipeline.3.crop_size=(64,64)', 'val_dataloader.dataset.pipeline.1.scale=(128,64)',
            'train_dataloader.batch_size=2',
            'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
            'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False', 'train_cfg.max_iters=1',
            'default_hooks.logger.interval=1']


@pytest.mark.slow
@pytest.mark.parametrize('tool,name', [
    ('tools/train.py', 'pidehead-diffusion_r50-d8_4xb2-40k_cityscapes-512x1024.py'),
    (osp.join(MMSEG_TOOLS, 'train.py'), 'pidehead-frac_r50-d8_4xb2-40k_cityscapes-512x1024.py')])
def test_config_trains_under_the_project_and_mmseg_tools(tool, name, tmp_path):
    _fake_cityscapes(str(tmp_path / 'cityscapes'))
    work = tmp_path / 'work'
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([PY, tool, osp.join('configs', 'pidehead', name), '--work-dir', str(work),
                          *_tiny_run_options(tmp_path / 'cityscapes')],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert re.search(r'decode\.loss_ce: [\d.]+', log) and (work / 'iter_1.pth').is_file()
    assert re.search(r'mIoU: [\d.]+', log)  # the validation at the last iteration, mmseg's whole-image test


def test_in_channels_that_do_not_match_the_input_name_the_head_and_both_widths():
    head = PIDEHead(in_channels=64, channels=16, num_classes=3, in_index=0)
    with pytest.raises(ValueError, match=r'PIDEHead has in_channels=64 but its input \(in_index=0\) has 32 '
                                         r'channels: set decode_head.in_channels=32'):
        head([torch.rand(1, 32, 8, 8)])
    assert head([torch.rand(1, 64, 8, 8)]).shape == (1, 3, 8, 8)


@pytest.mark.parametrize('operator', ['diffusion', 'frac_laplacian', 'inv_frac_laplacian', 'log'])
def test_head_neck_and_plugin_blocks_start_as_the_identity(operator):
    """PIDEHead's block (as NLHead's NonLocal2d, whose output convolution starts at zero), PIDENeck's blocks and the
    blocks of mmseg's ResNet plugins return their input in inference mode right after construction."""
    init_default_scope('mmseg')
    x = torch.randn(2, 8, 6, 10)
    head = PIDEHead(in_channels=8, channels=8, num_classes=3, norm_cfg=dict(type='BN'),
                    block_cfg=dict(operator=operator)).eval()
    neck = MODELS.build(dict(type='PIDENeck', in_channels=[8, 8], block_cfg=dict(operator=operator))).eval()
    resnet = MODELS.build(dict(type='ResNetV1c', depth=50, base_channels=8, stem_channels=8,
                               plugins=[dict(cfg=dict(type='PIDEBlock', operator=operator), position='after_conv3',
                                             stages=(False, False, True, True))]))
    seen = []
    for m in resnet.modules():
        if isinstance(m, PIDEBlock):
            m.register_forward_hook(lambda module, args, output: seen.append(torch.equal(output, args[0])))
    with torch.no_grad():
        assert torch.equal(head.pide_block(x), x)
        assert all(torch.equal(a, b) for a, b in zip(neck([x, x + 1]), [x, x + 1]))
        resnet.eval()  # mmseg's ResNet.train returns None
        resnet(torch.randn(1, 3, 64, 64))
    assert len(seen) == 6 + 3 and all(seen)
