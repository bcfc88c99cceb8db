"""The mmsegmentation face: registry modules, configs, data preparation and the train/test tools."""
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from bdd100k_converter import LayoutError, check_layout, prepare_bdd100k, subsample

pytest.importorskip('mmseg', reason='the mmseg face needs the seg extra: pip install -e .[seg]')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import pide_zoo.seg  # noqa: E402, F401  (registers the modules)
from pide_zoo.checkpoint import load_model  # noqa: E402
from pide_zoo.layers import PIDEBlock  # noqa: E402
from pide_zoo.models import _paper_norm  # noqa: E402
from pide_zoo.seg.datasets import make_longrange_sample  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PY = sys.executable
MMSEG_TOOLS = osp.join(osp.dirname(__import__('mmseg').__file__), '.mim', 'tools')


def _build(config, **overrides):
    from mmseg.registry import MODELS

    init_default_scope('mmseg')
    cfg = Config.fromfile(osp.join(ROOT, 'configs', config))
    cfg.merge_from_dict(overrides)
    return MODELS.build(cfg.model)


def _count(module):
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize('config,want', [
    ('bdd100k_hamiltonian74.py', 0.49), ('bdd100k_pide_diffusion.py', 0.54), ('bdd100k_pide_frac.py', 0.54),
    ('bdd100k_pide_invfrac.py', 0.54), ('bdd100k_pide_log.py', 0.54), ('bdd100k_resnet44.py', 0.66),
    ('bdd100k_preresnet20.py', 0.57)])
def test_config_parameter_counts_match_table3(config, want):
    model = _build(config)
    assert abs(_count(model) - want) <= 0.01, _count(model)


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, PIDEBlock)]


def test_config_builds_the_paper_layout():
    model = _build('bdd100k_pide_frac.py')
    blocks = _blocks(model)
    assert len(blocks) == 3
    assert all(b.subsample == 3 and b.stages == 2 and b.operator == 'frac_laplacian' for b in blocks)
    x = torch.randn(2, 3, 90, 160)
    feats = model.extract_feat(x)
    assert feats[0].shape == (2, 112, 90, 160)  # no pooling anywhere
    assert model.decode_head.conv_seg.out_channels == 19
    void = _build('bdd100k_pide_diffusion_void.py')
    assert void.decode_head.conv_seg.out_channels == 20


def test_smoothness_loss_is_logged_as_its_own_term():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    model = _build('bdd100k_hamiltonian74.py', **{'model.smoothness_weight': 1.0})
    model.data_preprocessor.set_mean_image(torch.zeros(3, 18, 32))
    samples = []
    for _ in range(2):
        s = SegDataSample(metainfo=dict(img_shape=(18, 32), pad_shape=(18, 32)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 19, (1, 18, 32)))
        samples.append(s)
    data = model.data_preprocessor(dict(inputs=[torch.randint(0, 255, (3, 18, 32), dtype=torch.uint8)] * 2,
                                        data_samples=samples), True)
    losses = model.loss(data['inputs'], data['data_samples'])
    from pide_zoo.layers import smoothness_penalty
    torch.testing.assert_close(losses['loss_smooth'], smoothness_penalty(model.backbone, 1.0))
    assert losses['loss_smooth'] > 0 and 'decode.loss_ce' in losses


def test_pide_block_as_resnet_plugin_and_neck():
    from mmseg.registry import MODELS

    init_default_scope('mmseg')
    backbone = MODELS.build(dict(
        type='ResNetV1c', depth=50, base_channels=8, stem_channels=8, out_indices=(2, 3),
        plugins=[dict(cfg=dict(type='PIDEBlock', operator='log', subsample=1), stages=(False, False, True, True),
                      position='after_conv3')]))
    names = [n for n, m in backbone.named_modules() if isinstance(m, PIDEBlock)]
    assert len(names) == 6 + 3 and names[0].endswith('pide_block')
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [128, 256]
    neck = MODELS.build(dict(type='PIDENeck', in_channels=[128, 256], indices=[1],
                             block_cfg=dict(operator='inv_frac_laplacian', subsample=1, ls_init_value=1.0)))
    out = neck(feats)  # a block with a non-zero update scale changes its input (a fresh one: the identity)
    assert out[0] is feats[0] and out[1].shape == feats[1].shape and not torch.equal(out[1], feats[1])
    with pytest.raises(ValueError, match='indices must lie in'):
        MODELS.build(dict(type='PIDENeck', in_channels=[8], indices=[1]))


def test_configs_spell_the_block_as_block_cfg():
    assert _blocks(_build('bdd100k_hamiltonian74.py')) == []  # no block_cfg: the local network
    # the README's command line: a nonlocal variant of the local config through --cfg-options
    log = _blocks(_build('bdd100k_hamiltonian74.py', **{'model.backbone.block_cfg.operator': 'log'}))
    assert [(b.operator, b.stages, b.subsample) for b in log] == [('log', 2, 3)] * 3
    assert _blocks(_build('demo_longrange_local.py')) == []
    demo = _build('demo_longrange.py')
    assert [(b.operator, b.subsample, b.h) for b in _blocks(demo)] == [('diffusion', 2, 0.5)] * 3
    units = [s.unit for s in demo.backbone.body.stages]
    assert all(list(u.nonlocals) == ['1'] for u in units)  # placement (nonlocal_after=1) stays outside block_cfg


def _backbone(**kwargs):
    from mmseg.registry import MODELS

    init_default_scope('mmseg')
    return MODELS.build(dict(type='PIDEHamiltonianNet', depths=(1, 1, 1), **kwargs))


def test_backbone_block_cfg_reaches_every_block_unchanged():
    backbone = _backbone(block_cfg=dict(operator='inv_frac_laplacian', stages=3, subsample=2, lam=0.3, h=0.2,
                                        method='dense'), nonlocal_units=(0, 2))
    blocks = _blocks(backbone)
    assert [(b.operator, b.stages, b.subsample, b.lam, b.h, b.method) for b in blocks] == \
        [('inv_frac_laplacian', 3, 2, 0.3, 0.2, 'dense')] * 2
    # unset keys: the paper's segmentation blocks (2 stages, keys pooled by 3, its exact kernel), the block's operator
    assert [(b.operator, b.stages, b.subsample, b.kernel_scale) for b in _blocks(_backbone(block_cfg={}))] == \
        [('diffusion', 2, 3, 'paper')] * 3
    width = _blocks(_backbone(block_cfg=dict(operator='frac_laplacian', kernel_scale='width')))
    assert [(b.operator, b.kernel_scale) for b in width] == [('frac_laplacian', 'width')] * 3
    assert _blocks(_backbone()) == [] and _blocks(_backbone(block_cfg=None)) == []
    with pytest.raises(TypeError, match='block_cfg must be a dict'):
        _backbone(block_cfg='diffusion')
    with pytest.raises(ValueError, match="block_cfg must not set 'channels'"):
        _backbone(block_cfg=dict(channels=8))
    with pytest.raises(TypeError, match='wave'):  # PIDEBlock's own check of an unknown argument
        _backbone(block_cfg=dict(wave=1))


def _bn_settings(module):
    return {(m.eps, m.momentum) for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


def test_backbone_is_the_authors_network_h_and_batch_norm_reach_every_block():
    backbone = _backbone(h=0.05, block_cfg=dict(operator='log'))
    assert [b.h for b in _blocks(backbone)] == [0.05] * 3
    assert {b.h for b in backbone.body.modules() if type(b).__name__ == 'HamiltonianBlock'} == {0.05}
    assert _bn_settings(backbone) == {(1e-3, 1 - 0.99)}  # Keras's, the nonlocal blocks' included
    assert [b.h for b in _blocks(_backbone(h=0.05, block_cfg=dict(operator='log', h=0.3)))] == [0.3] * 3
    assert _bn_settings(_backbone(bn_tf=False, block_cfg={})) == {(1e-5, 0.1)}
    for config in ('bdd100k_pide_frac.py', 'bdd100k_hamiltonian74.py', 'bdd100k_resnet44.py'):
        assert _bn_settings(_build(config).backbone) == {(1e-3, 1 - 0.99)}, config
    # the demo is not the paper's network: PyTorch's batch norm, for which its kernel form is calibrated
    demo = _build('demo_longrange.py')
    assert _bn_settings(demo.backbone) == {(1e-5, 0.1)} and [b.h for b in _blocks(demo)] == [0.5] * 3
    # PIDEHead and its configs keep PyTorch's too
    head = _build('pidehead/pidehead-frac_r50-d8_4xb2-40k_cityscapes-512x1024.py').decode_head
    assert {eps for eps, _ in _bn_settings(_blocks(head)[0])} == {1e-5}


def test_backbone_checkpoint_records_batch_norm_through_mmengine(tmp_path):
    from mmengine.runner import load_checkpoint, save_checkpoint

    model = _build('bdd100k_pide_log.py')
    path = str(tmp_path / 'ckpt.pth')
    save_checkpoint(dict(state_dict=model.state_dict()), path)
    _paper_norm._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        load_checkpoint(_build('bdd100k_pide_log.py'), path)
        load_checkpoint(_build('bdd100k_pide_log.py', **{'model.backbone.bn_tf': False}), path)
    msgs = [str(w.message) for w in caught if 'batch norm' in str(w.message)]
    assert len(msgs) == 1 and msgs[0].startswith('backbone.body: this state dict was trained with batch norm '
                                                 'eps=0.001'), msgs


def test_backbone_old_argument_names_still_work_with_a_warning():
    new = _backbone(block_cfg=dict(operator='log', subsample=2, stages=3, h=0.5))
    with pytest.warns(FutureWarning, match=r'removed in pide_zoo 0\.3') as record:
        old = _backbone(nonlocal_operator='log', nonlocal_subsample=2, nonlocal_stages=3, nonlocal_cfg=dict(h=0.5))
    message = str(record[0].message)
    assert 'nonlocal_operator -> block_cfg.operator' in message and 'nonlocal_cfg -> block_cfg' in message
    assert [(b.operator, b.subsample, b.stages, b.h) for b in _blocks(old)] == [('log', 2, 3, 0.5)] * 3
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}
    with pytest.warns(FutureWarning):  # as before 0.2: the block arguments without an operator build no blocks
        assert _blocks(_backbone(nonlocal_subsample=3)) == []
    with pytest.raises(ValueError, match=r"old arguments \['nonlocal_stages'\]; move them into block_cfg"):
        _backbone(block_cfg=dict(operator='log'), nonlocal_stages=4)


def test_neck_block_cfg_is_checked():
    from mmseg.registry import MODELS

    init_default_scope('mmseg')
    with pytest.raises(TypeError, match='PIDENeck: block_cfg must be a dict'):
        MODELS.build(dict(type='PIDENeck', in_channels=[8], block_cfg=['log']))
    neck = MODELS.build(dict(type='PIDENeck', in_channels=[8, 8], block_cfg=dict(operator='log', h=0.5)))
    assert [(b.operator, b.h, b.subsample) for b in _blocks(neck)] == [('log', 0.5, 2)] * 2  # block defaults


def test_load_model_reads_an_mmengine_checkpoint_safely_in_a_fresh_process(tmp_path):
    from mmengine.logging import HistoryBuffer

    config = osp.join(ROOT, 'configs', 'demo_longrange.py')
    model, info = load_model(None, config)
    assert info['kind'] == 'segmentor' and info['source'] == 'initialisation' and not model.training
    assert len(_blocks(model)) == 3 and info['input_size'] is None  # SegDataPreProcessor fixes no size
    state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ckpt = str(tmp_path / 'iter_1.pth')  # as mmengine's CheckpointHook writes it: with the message hub
    hub = {'log_scalars': {'train/loss': HistoryBuffer([1.0, 0.5], [1, 1])}, 'runtime_info': {'iter': 1}}
    torch.save(dict(meta=dict(iter=1), state_dict=state, message_hub=hub), ckpt)
    # a fresh process that imports no pide_zoo.seg itself: load_model applies the weights-only allow-list
    code = ('import sys; from pide_zoo.checkpoint import load_model; m, info = load_model(sys.argv[1], sys.argv[2]); '
            'print(info["kind"], sum(float(v.double().sum()) for v in m.state_dict().values() '
            'if v.is_floating_point()))')
    out = subprocess.run([PY, '-c', code, ckpt, config], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1'), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    kind, total = out.stdout.splitlines()[-1].split()  # after mmengine's own lines
    assert kind == 'segmentor'
    assert float(total) == pytest.approx(sum(float(v.double().sum()) for v in state.values()
                                             if v.is_floating_point()), rel=1e-9)
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        load_model(str(tmp_path / 'nowhere.pth'), config)
    with pytest.raises(ValueError, match='cfg_options'):
        load_model(None, config, dict(depth=1))


def test_old_compat_module_forwards_with_a_warning():
    import pide_zoo.compat
    import pide_zoo.seg.compat

    with pytest.warns(FutureWarning, match=r'removed in pide_zoo 0\.3; use pide_zoo\.seg\.compat\.allow_mmengine'):
        forwarded = pide_zoo.compat.allow_mmengine_checkpoints
    assert forwarded is pide_zoo.seg.compat.allow_mmengine_checkpoints


def test_backbone_out_indices_and_init_cfg():
    from mmseg.registry import MODELS

    init_default_scope('mmseg')
    backbone = MODELS.build(dict(type='PIDEHamiltonianNet', depths=(1, 1, 1), out_indices=(0, 1, 2),
                                 block_cfg=dict(operator='diffusion'),
                                 init_cfg=dict(type='Constant', val=0.5, layer='Conv2d')))
    backbone.init_weights()
    assert torch.all(backbone.body.stem.conv.weight == 0.5)
    feats = backbone(torch.randn(1, 3, 12, 18))
    assert [f.shape[1:] for f in feats] == [(32, 12, 18), (64, 12, 18), (112, 12, 18)]
    with pytest.raises(ValueError, match='out_indices'):
        MODELS.build(dict(type='PIDEHamiltonianNet', out_indices=(3,)))


# --- the mean image as model state, inference at any size, the soft IoU --------------------------------
def _preprocessor(**kwargs):
    from mmseg.registry import MODELS

    init_default_scope('mmseg')
    return MODELS.build(dict(type='PixelMeanSegDataPreProcessor', size_divisor=1, **kwargs))


def _runner(pre, data_root):
    from types import SimpleNamespace

    loader = SimpleNamespace(dataset=SimpleNamespace(data_root=data_root))
    return SimpleNamespace(model=SimpleNamespace(data_preprocessor=pre), train_dataloader=loader,
                           val_dataloader=loader, test_dataloader=loader)


def test_mean_image_is_a_checkpointed_buffer(tmp_path):
    pre = _preprocessor()
    assert pre.state_dict()['pixel_mean'].shape == (0,) and not pre.has_mean
    mean = np.random.default_rng(0).random((3, 4, 6)).astype(np.float32)
    pre.set_mean_image(mean)
    state = pre.state_dict()
    torch.testing.assert_close(state['pixel_mean'], torch.from_numpy(mean))
    fresh = _preprocessor()
    fresh.load_state_dict(state)  # torch's strict loading resizes the empty buffer
    torch.testing.assert_close(fresh.pixel_mean, torch.from_numpy(mean))
    img = torch.randint(0, 255, (3, 4, 6), dtype=torch.uint8)
    out = fresh(dict(inputs=[img]))['inputs']
    torch.testing.assert_close(out[0], img.flip(0).float() / 255 - torch.from_numpy(mean))  # BGR -> RGB
    with pytest.raises(ValueError, match=r'size \(5, 6\).*mean image of size \(4, 6\).*Resize'):
        fresh(dict(inputs=[torch.zeros(3, 5, 6, dtype=torch.uint8)]))


def test_checkpoint_without_mean_falls_back_to_the_path(tmp_path):
    old_state = {k: v for k, v in _preprocessor().state_dict().items() if k != 'pixel_mean'}
    mean = np.full((3, 2, 3), 0.25, np.float32)
    np.save(tmp_path / 'mean_image.npy', mean)
    pre = _preprocessor(mean_image=str(tmp_path / 'mean_image.npy'))
    pre.load_state_dict(old_state)  # strict: the missing buffer is not an error
    out = pre(dict(inputs=[torch.zeros(3, 2, 3, dtype=torch.uint8)]))['inputs']
    torch.testing.assert_close(out, torch.full((1, 3, 2, 3), -0.25))
    assert pre.has_mean  # and the next checkpoint carries it
    bare = _preprocessor()
    bare.load_state_dict(old_state)
    with pytest.raises(RuntimeError, match='no mean image.*PixelMeanHook.*tools/prepare_bdd100k.py'):
        bare(dict(inputs=[torch.zeros(3, 2, 3, dtype=torch.uint8)]))
    # tools/test.py: the hook fills it from the evaluated data's data_root
    from pide_zoo.seg import PixelMeanHook

    PixelMeanHook().before_test(_runner(bare, str(tmp_path)))
    torch.testing.assert_close(bare.pixel_mean, torch.from_numpy(mean))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'x' / 'mean_image.npy'))):
        PixelMeanHook().before_test(_runner(_preprocessor(), str(tmp_path / 'x')))


def test_pixel_mean_hook_order_at_training_start(tmp_path):
    from pide_zoo.seg import PixelMeanHook

    root, other = tmp_path / 'root', tmp_path / 'other'
    root.mkdir(), other.mkdir()
    np.save(root / 'mean_image.npy', np.full((3, 2, 3), 1.0, np.float32))
    np.save(other / 'mean.npy', np.full((3, 2, 3), 2.0, np.float32))
    hook = PixelMeanHook()
    pre = _preprocessor()
    hook.before_train(_runner(pre, str(root)))  # the train dataloader's data_root
    assert torch.all(pre.pixel_mean == 1.0)
    pre = _preprocessor(mean_image=str(other / 'mean.npy'))
    hook.before_train(_runner(pre, str(root)))  # an explicit path wins
    assert torch.all(pre.pixel_mean == 2.0)
    pre = _preprocessor()
    pre.set_mean_image(np.full((3, 2, 3), 3.0, np.float32))
    hook.before_train(_runner(pre, str(tmp_path / 'gone')))  # a resumed model keeps its mean...
    assert torch.all(pre.pixel_mean == 3.0)
    want = re.escape(f"'{tmp_path / 'gone' / 'mean_image.npy'}' not found") + '.*' + re.escape(
        f'python tools/prepare_bdd100k.py --src data/bdd100k --dst {tmp_path / "gone"}')
    with pytest.raises(FileNotFoundError, match=want):  # ...a fresh one needs the file
        hook.before_train(_runner(_preprocessor(), str(tmp_path / 'gone')))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'missing.npy'))):
        hook.before_train(_runner(_preprocessor(mean_image=str(tmp_path / 'missing.npy')), str(root)))
    with pytest.raises(TypeError, match='PixelMeanSegDataPreProcessor'):
        hook.before_train(_runner(torch.nn.Identity(), str(root)))


def test_inference_on_any_size_resizes_to_the_mean_and_back():
    from mmseg.apis import inference_model, init_model

    model = init_model(osp.join(ROOT, 'configs', 'bdd100k_hamiltonian74.py'), None, device='cpu')
    model.data_preprocessor.set_mean_image(torch.zeros(3, 90, 160))
    img = np.random.default_rng(0).integers(0, 255, (61, 203, 3), dtype=np.uint8)
    result = inference_model(model, img)
    assert result.pred_sem_seg.shape == (61, 203) and result.seg_logits.data.shape == (19, 61, 203)
    assert result.metainfo['img_shape'] == (90, 160) and result.metainfo['ori_shape'] == (61, 203)


def test_test_time_scales_resize_the_mean_image_with_the_image():
    import torch.nn.functional as F
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    pre = _preprocessor()
    mean = torch.from_numpy(np.random.default_rng(0).random((3, 90, 160)).astype(np.float32))
    pre.set_mean_image(mean)
    for h, w in ((45, 80), (68, 120), (158, 280)):  # mmcv's rescale of 160x90 by 0.5, 0.75, 1.75
        img = torch.randint(0, 255, (3, h, w), dtype=torch.uint8)
        want = img.flip(0).float() / 255 - F.interpolate(mean[None], (h, w), mode='bilinear', align_corners=False)[0]
        torch.testing.assert_close(pre(dict(inputs=[img]))['inputs'][0], want)
        sample = SegDataSample(gt_sem_seg=PixelData(data=torch.zeros(1, h, w, dtype=torch.long)))
        with pytest.raises(ValueError, match=rf'size \({h}, {w}\) .* mean image of size \(90, 160\)'):
            pre(dict(inputs=[img], data_samples=[sample]), training=True)  # training stays at the mean's size
    with pytest.raises(ValueError, match=r'size \(427, 640\).*Resize.*same aspect ratio'):
        pre(dict(inputs=[torch.zeros(3, 427, 640, dtype=torch.uint8)]))  # another frame: resize it first


def test_bdd100k_tta_pipeline_scales_the_trained_frame(bdd_160x90):
    from mmseg.registry import DATASETS

    init_default_scope('mmseg')
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'bdd100k_pide_diffusion.py'))
    dataset = DATASETS.build(dict(cfg.test_dataloader.dataset, data_root=bdd_160x90, pipeline=cfg.tta_pipeline))
    sample = dataset[0]
    sizes = [tuple(x.shape[-2:]) for x in sample['inputs']]
    assert sizes == [s for s in ((45, 80), (68, 120), (90, 160), (113, 200), (135, 240), (158, 280))
                     for _ in range(2)]  # each scale unflipped and flipped
    assert [d.flip for d in sample['data_samples']] == [False, True] * 6
    assert {d.gt_sem_seg.shape for d in sample['data_samples']} == {(90, 160)}  # labels at the image's size


def _soft_iou_numpy(logits, label, ignore_index=255, smooth=1.0):
    """The authors' iou_fn for one image, over the pixels not ignored: one-hot labels y, softmax p,
    I = sum(y * p), union = sum(y) + sum(p) - I."""
    counted = label != ignore_index
    p = np.exp(logits - logits.max(0))
    p = (p / p.sum(0))[:, counted]
    y = np.zeros_like(p)
    y[label[counted], np.arange(counted.sum())] = 1
    inter = (y * p).sum()
    return (inter + smooth) / (y.sum() + p.sum() - inter + smooth)


@pytest.mark.parametrize('ignored', [0.0, 0.3])
def test_soft_iou_metric_matches_the_formula(ignored):
    from mmengine.evaluator import Evaluator

    rng = np.random.default_rng(1)
    logits = [rng.normal(0, 2, (5, 7, 9)) for _ in range(3)]
    labels = [rng.integers(0, 5, (7, 9)) for _ in range(3)]
    for lab in labels:
        lab[rng.random(lab.shape) < ignored] = 255
    if ignored:
        labels[2][:] = 255  # an image without counted pixels scores (0 + 1) / (0 + 1)
    want = [_soft_iou_numpy(lg, lb) for lg, lb in zip(logits, labels)]
    assert (want[2] == 1.0) == bool(ignored)
    init_default_scope('mmseg')
    evaluator = Evaluator([dict(type='IoUMetric'), dict(type='SoftIoUMetric')])
    evaluator.dataset_meta = dict(classes=tuple('abcde'))
    samples = [dict(seg_logits=dict(data=torch.from_numpy(lg).float()),
                    pred_sem_seg=dict(data=torch.from_numpy(lg.argmax(0))[None]),
                    gt_sem_seg=dict(data=torch.from_numpy(lb)[None])) for lg, lb in zip(logits, labels)]
    evaluator.process(samples[:2])
    evaluator.process(samples[2:])
    metrics = evaluator.evaluate(3)
    assert metrics['sIoU'] == pytest.approx(round(100 * float(np.mean(want)), 2), abs=1e-9)
    assert 'mIoU' in metrics and 'aAcc' in metrics


def test_soft_iou_counts_void_pixels_as_a_class():
    from pide_zoo.seg.metrics import soft_iou

    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1, (20, 4, 5))
    label = rng.integers(0, 19, (4, 5))
    label[0] = 255
    void = np.where(label == 255, 19, label)  # what VoidAsClass gives the metric
    got = soft_iou(torch.from_numpy(logits), torch.from_numpy(void))
    assert got == pytest.approx(_soft_iou_numpy(logits, void, ignore_index=-1), rel=1e-12)
    assert got != pytest.approx(_soft_iou_numpy(logits, label), rel=1e-6)
    with pytest.raises(ValueError, match=r'labels \[19\] outside 0-18'):
        soft_iou(torch.from_numpy(logits[:19]), torch.from_numpy(void))
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'bdd100k_pide_diffusion_void.py'))
    assert [m['type'] for m in cfg.test_evaluator] == ['IoUMetric', 'SoftIoUMetric']


def test_soft_iou_metric_names_the_file_of_a_bad_label():
    from pide_zoo.seg.metrics import SoftIoUMetric

    metric = SoftIoUMetric()
    label = torch.zeros(1, 4, 5, dtype=torch.long)
    label[0, 1, 2] = 7
    sample = dict(seg_logits=dict(data=torch.zeros(3, 4, 5)), gt_sem_seg=dict(data=label),
                  img_path='/data/img/a.png', seg_map_path='/data/ann/a.png')
    with pytest.raises(ValueError, match=r'^/data/ann/a.png: gt_sem_seg has labels \[7\] outside 0-2'):
        metric.process({}, [sample])


def _demo_cfg(data, work, **overrides):
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'demo_longrange.py'))
    cfg.merge_from_dict({'work_dir': work, 'train_cfg.max_iters': 1, 'train_cfg.val_interval': 1,
                         'default_hooks.logger.interval': 1, **{
                             f'{split}_dataloader.dataset.{k}': v for split in ('train', 'val', 'test')
                             for k, v in (('data_root', data), ('num_samples', 2))}, **overrides})
    return cfg


def test_bad_label_names_its_file_and_the_classes_in_training_and_in_every_metric(tmp_path):
    from mmengine.runner import Runner
    from PIL import Image

    from pide_zoo.seg.datasets import write_longrange_split

    data = str(tmp_path / 'data')
    for split, seed in (('train', 0), ('val', 1)):
        write_longrange_split(osp.join(data, 'img_dir', split), osp.join(data, 'ann_dir', split), 2, seed)
        bad = osp.join(data, 'ann_dir', split, '00001.png')
        label = np.array(Image.open(bad))
        label[0, 0] = 7
        Image.fromarray(label).save(bad)
    want = r"ann_dir/{}/00001.png: labels \[7\] outside 0-3 \(the 4 classes of LongRangeDemoDataset; 255 ="
    runner = Runner.from_cfg(_demo_cfg(data, str(tmp_path / 'train'), **{
        'train_dataloader.batch_size': 2}))
    with pytest.raises(ValueError, match=want.format('train')):
        runner.train()  # without the check: the loss's IndexError "Target 7 is out of bounds"
    for metrics in ([dict(type='IoUMetric')], [dict(type='IoUMetric'), dict(type='SoftIoUMetric')]):
        runner = Runner.from_cfg(_demo_cfg(data, str(tmp_path / 'test'), test_evaluator=metrics))
        with pytest.raises(ValueError, match=want.format('val')):
            runner.test()  # without the check IoUMetric drops the label silently


# --- data -------------------------------------------------------------------------------------------
def _fake_bdd100k(root, sizes=(('train', 4), ('val', 2)), hw=(720, 1280), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in sizes:
        img_dir = osp.join(root, 'images', '10k', split)
        ann_dir = osp.join(root, 'labels', 'sem_seg', 'masks', split)
        os.makedirs(img_dir)
        os.makedirs(ann_dir)
        for i in range(n):
            img = rng.integers(0, 255, (*hw, 3), dtype=np.uint8)
            ann = rng.choice(np.array(list(range(19)) + [255], np.uint8), size=hw)
            Image.fromarray(img).save(osp.join(img_dir, f'{split}{i:03d}.jpg'), quality=95)
            Image.fromarray(ann).save(osp.join(ann_dir, f'{split}{i:03d}.png'))


def test_subsample_keeps_odd_rows_three_times():
    a = np.arange(720 * 1280).reshape(720, 1280)
    want = a[1::2, 1::2][1::2, 1::2][1::2, 1::2]
    assert subsample(a).shape == (90, 160)
    np.testing.assert_array_equal(subsample(a), want)


def test_prepare_bdd100k_writes_paper_copy(tmp_path):
    from PIL import Image

    src, dst = str(tmp_path / 'bdd'), str(tmp_path / 'out')
    _fake_bdd100k(src, hw=(48, 64))
    counts = prepare_bdd100k(src, dst, progress=False)
    assert counts == {'train': 4, 'val': 2}
    ann = np.asarray(Image.open(osp.join(dst, 'labels/sem_seg/masks/train/train000.png')))
    full = np.asarray(Image.open(osp.join(src, 'labels/sem_seg/masks/train/train000.png')))
    np.testing.assert_array_equal(ann, full[7::8, 7::8])  # nearest: exact label values
    mean = np.load(osp.join(dst, 'mean_image.npy'))
    assert mean.shape == (3, 6, 8) and 0 < mean.mean() < 1
    imgs = [np.asarray(Image.open(osp.join(dst, f'images/10k/train/train{i:03d}.jpg')), np.float64)
            for i in range(4)]
    np.testing.assert_allclose(mean, (sum(imgs) / 4 / 255).transpose(2, 0, 1), atol=1e-6)
    # a second run keeps what is there
    mtime = os.path.getmtime(osp.join(dst, 'images/10k/val/val001.jpg'))
    prepare_bdd100k(src, dst, progress=False)
    assert os.path.getmtime(osp.join(dst, 'images/10k/val/val001.jpg')) == mtime


def test_prepare_bdd100k_says_what_is_wrong(tmp_path):
    from PIL import Image

    src = str(tmp_path / 'bdd')
    with pytest.raises(LayoutError, match=re.escape(osp.join(src, 'images', '10k', 'train'))):
        check_layout(src)
    _fake_bdd100k(src, hw=(16, 16))
    os.remove(osp.join(src, 'labels/sem_seg/masks/val/val001.png'))
    with pytest.raises(LayoutError, match='1 images in .* have no mask .*val001'):
        check_layout(src)
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(osp.join(src, 'labels/sem_seg/masks/val/val001.png'))
    Image.fromarray(np.full((16, 16), 42, np.uint8)).save(osp.join(src, 'labels/sem_seg/masks/train/train002.png'))
    with pytest.raises(LayoutError, match=r'train002.png: label values \[42\] outside 0-18 and 255'):
        prepare_bdd100k(src, str(tmp_path / 'out'), progress=False)
    out = subprocess.run([PY, osp.join(ROOT, 'tools/prepare_bdd100k.py'), '--src', src, '--dst', str(tmp_path / 'o')],
                         capture_output=True, text=True)
    assert out.returncode == 2 and 'label values [42]' in out.stderr


def test_longrange_sample_needs_distant_context():
    rng = np.random.default_rng(0)
    for _ in range(20):
        img, label = make_longrange_sample(rng)
        cls = set(np.unique(label).tolist()) - {0}
        assert len(cls) == 1
        color = int(np.argmax(img[:, :16].reshape(-1, 3).mean(0)))
        assert cls == {color + 1}  # the strip's colour decides the class
        assert np.all(label[:, :48] == 0)  # the labelled blob is at least 32 px from the strip


# --- end to end through the tools ---------------------------------------------------------------------
def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900, **kw)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def _bdd_options(data_root, iters):
    # the data only through the three dataloaders' data_root: the mean image comes from there too
    return ['--cfg-options', f'train_dataloader.dataset.data_root={data_root}',
            f'val_dataloader.dataset.data_root={data_root}', f'test_dataloader.dataset.data_root={data_root}',
            f'train_cfg.max_iters={iters}',
            f'train_cfg.val_interval={iters}', 'default_hooks.checkpoint.interval=2',
            'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0', 'val_dataloader.num_workers=0',
            'train_dataloader.persistent_workers=False', 'val_dataloader.persistent_workers=False',
            'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False',
            'default_hooks.logger.interval=1']


def tiny_bdd_160x90(root):
    """A tiny BDD100K prepared by tools/prepare_bdd100k.py (4 train, 2 val images) in ``root``/dst."""
    _fake_bdd100k(osp.join(root, 'src'), sizes=(('train', 4), ('val', 2)))
    _run([PY, 'tools/prepare_bdd100k.py', '--src', osp.join(root, 'src'), '--dst', osp.join(root, 'dst')])
    return osp.join(root, 'dst')


@pytest.fixture(scope='module')
def bdd_160x90(tmp_path_factory):
    return tiny_bdd_160x90(str(tmp_path_factory.mktemp('bdd')))


def _checkpoint_mean(ckpt):
    # mmengine checkpoints load with torch's safe unpickler once pide_zoo.seg is imported
    return torch.load(ckpt, weights_only=True)['state_dict']['data_preprocessor.pixel_mean'].numpy()


@pytest.mark.slow
def test_interrupted_run_resumes_and_tests(bdd_160x90, tmp_path):
    work = str(tmp_path / 'work')
    cfg = 'configs/bdd100k_pide_diffusion.py'
    # a long run, killed once its iteration-2 checkpoint is written
    with open(tmp_path / 'first.log', 'w') as log:
        proc = subprocess.Popen([PY, 'tools/train.py', cfg, '--work-dir', work, *_bdd_options(bdd_160x90, 1000)],
                                cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1'), stdout=log,
                                stderr=subprocess.STDOUT)
        pointer, deadline = osp.join(work, 'last_checkpoint'), time.time() + 600
        while not osp.isfile(pointer) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        proc.kill()
        proc.wait()
    assert osp.isfile(pointer), (tmp_path / 'first.log').read_text()[-3000:]
    ckpt = osp.join(work, 'iter_2.pth')
    assert open(pointer).read().strip() == ckpt
    np.testing.assert_array_equal(_checkpoint_mean(ckpt), np.load(osp.join(bdd_160x90, 'mean_image.npy')))
    out = _run([PY, 'tools/train.py', cfg, '--work-dir', work, '--resume', *_bdd_options(bdd_160x90, 4)])
    assert 'resumed' in out.lower() and osp.isfile(osp.join(work, 'iter_4.pth'))
    assert re.search(r'Iter\(train\) \[3/4\]', out) and not re.search(r'Iter\(train\) \[1/4\]', out)
    out = _run([PY, 'tools/test.py', cfg, osp.join(work, 'iter_4.pth'), '--work-dir', work,
                '--out', str(tmp_path / 'pred'), *_bdd_options(bdd_160x90, 4)])
    assert re.search(r'aAcc: [\d.]+\s+mIoU: [\d.]+\s+mAcc: [\d.]+\s+sIoU: [\d.]+', out)
    assert sorted(os.listdir(tmp_path / 'pred')) == ['val000.png', 'val001.png']  # label maps from IoUMetric


@pytest.mark.slow
def test_checkpoint_alone_segments_photos_of_another_size(bdd_160x90, tmp_path):
    import mmcv
    from mmseg.apis import inference_model, init_model
    from mmseg.models.utils import resize
    from sklearn.datasets import load_sample_images

    data, work = str(tmp_path / 'data'), str(tmp_path / 'work')
    shutil.copytree(bdd_160x90, data)
    mean = np.load(osp.join(data, 'mean_image.npy'))
    config = osp.join(ROOT, 'configs', 'bdd100k_pide_diffusion.py')
    _run([PY, 'tools/train.py', config, '--work-dir', work, *_bdd_options(data, 2)])
    shutil.rmtree(data)
    model = init_model(config, osp.join(work, 'iter_2.pth'), device='cpu')
    np.testing.assert_array_equal(model.data_preprocessor.pixel_mean.numpy(), mean)
    photos = load_sample_images()
    results = inference_model(model, list(photos.filenames))
    for path, photo, result in zip(photos.filenames, photos.images, results):
        assert photo.shape == (427, 640, 3)
        assert result.pred_sem_seg.shape == (427, 640) and result.seg_logits.shape == (427, 640)
        # by hand: resize to the trained 160x90, subtract the checkpoint's mean, resize the logits back
        img = mmcv.imresize(mmcv.imread(path), (160, 90))[..., ::-1] / 255.0
        x = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) - mean)[None]
        with torch.no_grad():
            logits = resize(model.encode_decode(x, [result.metainfo]), size=(427, 640), mode='bilinear',
                            align_corners=False)[0]
        torch.testing.assert_close(result.seg_logits.data, logits, atol=1e-4, rtol=1e-4)


# A user's config: the frac network at one Hamiltonian block per Unit, the shipped TTA at two of its scales.
TTA_USER_CONFIG = """
_base_ = ['{root}/configs/bdd100k_pide_frac.py']
model = dict(backbone=dict(depths=(1, 1, 1)))
tta = _base_.tta_pipeline
scales = [dict(type='Resize', scale_factor=r, keep_ratio=True) for r in (0.5, 0.75)]
tta_pipeline = tta[:2] + [dict(tta[2], transforms=[scales] + tta[2].transforms[1:])]
"""


@pytest.mark.slow
def test_tta_on_bdd100k_under_mmseg_and_project_test_tools(bdd_160x90, tmp_path):
    from mmseg.apis import init_model
    from mmseg.datasets import BDD100KDataset

    config = tmp_path / 'my_frac.py'
    config.write_text(TTA_USER_CONFIG.format(root=ROOT))
    model = init_model(str(config), None, device='cpu')
    model.data_preprocessor.set_mean_image(osp.join(bdd_160x90, 'mean_image.npy'))
    ckpt = str(tmp_path / 'frac.pth')
    torch.save(dict(state_dict=model.state_dict(), meta=dict(dataset_meta=BDD100KDataset.METAINFO)), ckpt)
    for tool in (osp.join(MMSEG_TOOLS, 'test.py'), 'tools/test.py'):
        out = _run([PY, tool, str(config), ckpt, '--tta', '--work-dir', str(tmp_path / 'work'),
                    *_bdd_options(bdd_160x90, 2)])
        assert re.search(r'aAcc: [\d.]+\s+mIoU: [\d.]+\s+mAcc: [\d.]+\s+sIoU: [\d.]+', out), (tool, out[-2000:])


@pytest.mark.slow
def test_configs_run_under_mmseg_own_tools(bdd_160x90, tmp_path):
    work = str(tmp_path / 'work')
    _run([PY, osp.join(MMSEG_TOOLS, 'train.py'), 'configs/bdd100k_pide_log.py', '--work-dir', work,
          *_bdd_options(bdd_160x90, 2)])
    out = _run([PY, osp.join(MMSEG_TOOLS, 'test.py'), 'configs/bdd100k_pide_log.py', osp.join(work, 'iter_2.pth'),
                '--work-dir', work, *_bdd_options(bdd_160x90, 2)])
    assert 'mIoU' in out


@pytest.mark.slow
def test_torchrun_two_processes(bdd_160x90, tmp_path):
    work = str(tmp_path / 'work')
    out = _run([PY, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29631', 'tools/train.py',
                'configs/bdd100k_hamiltonian74.py', '--launcher', 'pytorch', '--work-dir', work,
                *_bdd_options(bdd_160x90, 2)])
    np.testing.assert_array_equal(_checkpoint_mean(osp.join(work, 'iter_2.pth')),
                                  np.load(osp.join(bdd_160x90, 'mean_image.npy')))
    assert re.search(r'sIoU: [\d.]+', out)  # SoftIoUMetric gathered from both processes


def test_missing_data_root_says_where_bdd100k_goes(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([PY, 'tools/train.py', 'configs/bdd100k_hamiltonian74.py', '--work-dir', str(tmp_path),
                          '--cfg-options', f'train_dataloader.dataset.data_root={tmp_path}/nowhere',
                          'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False'],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode != 0
    assert 'tools/prepare_bdd100k.py --src data/bdd100k --dst data/bdd100k_160x90' in out.stderr
    assert 'images/10k/{train,val}' in out.stderr


@pytest.mark.slow
def test_demo_config_runs(tmp_path):
    data = str(tmp_path / 'data')
    out = _run([PY, 'tools/train.py', 'configs/demo_longrange.py', '--work-dir', str(tmp_path / 'work'),
                '--cfg-options', f'train_dataloader.dataset.data_root={data}',
                f'val_dataloader.dataset.data_root={data}', f'test_dataloader.dataset.data_root={data}',
                'train_dataloader.dataset.num_samples=16',
                'val_dataloader.dataset.num_samples=8', 'train_cfg.max_iters=3', 'train_cfg.val_interval=3'])
    assert re.search(r'mIoU: [\d.]+', out) and osp.isfile(osp.join(tmp_path, 'work', 'iter_3.pth'))
    assert len(os.listdir(osp.join(data, 'img_dir', 'train'))) == 16 + 1  # images and the generator's stamp


@pytest.mark.slow
def test_demo_figure_from_two_checkpoints(tmp_path):
    pytest.importorskip('matplotlib', reason='the figure needs the analysis extra: pip install -e .[analysis]')
    from mmseg.apis import init_model
    from PIL import Image

    ckpts = []
    for name in ('demo_longrange_local', 'demo_longrange'):  # untrained weights: the figure's layout only
        model = init_model(osp.join(ROOT, 'configs', f'{name}.py'), None, device='cpu')
        ckpts.append(str(tmp_path / f'{name}.pth'))
        torch.save(dict(state_dict=model.state_dict(), meta=dict(dataset_meta=dict(
            classes=('background', 'red region', 'green region', 'blue region')))), ckpts[-1])
    out = str(tmp_path / 'fig' / 'demo.png')
    args = [PY, 'tools/demo_figure.py', '--local-checkpoint', ckpts[0], '--nonlocal-checkpoint', ckpts[1],
            '--data-root', str(tmp_path / 'data'), '--num-images', '3', '--out', out]
    assert f'wrote {out} (3 images' in _run(args)
    assert Image.open(out).size == (800, round(100 * (0.7 * 3 + 0.35)))
    missing = str(tmp_path / 'none.pth')
    bad = subprocess.run(args[:3] + [missing] + args[4:], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert bad.returncode == 2 and f"checkpoint {missing!r} does not exist" in bad.stderr


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_amp_passes_its_dtype_to_mmengine(dtype, monkeypatch, tmp_path):
    import argparse

    from pide_zoo.seg import cli
    monkeypatch.setattr(cli.torch.cuda, 'is_available', lambda: True)  # --amp is for CUDA
    parser = cli.add_common_args(argparse.ArgumentParser())
    parser.add_argument('config')
    args = parser.parse_args(['configs/demo_longrange.py', '--work-dir', str(tmp_path)])
    wrapper = cli.load_config(args, amp=True, amp_dtype=dtype).optim_wrapper
    assert wrapper.type == 'AmpOptimWrapper' and wrapper.dtype == dtype
    assert wrapper.get('loss_scale') == ('dynamic' if dtype == 'float16' else None)
    with pytest.raises(SystemExit, match='--amp-dtype must be one of'):
        cli.load_config(args, amp=True, amp_dtype='float64')
