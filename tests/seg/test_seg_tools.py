"""mmseg's tool habits on the project's configs: test-time augmentation, the test tool's display flags,
CPU multi-process runs of SyncBN configs and configs written for release 0.1."""
import os
import os.path as osp
import re
import socket
import subprocess
import sys

import pytest

pytest.importorskip('mmseg', reason='the mmseg face needs the seg extra: pip install -e .[seg]')

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PY = sys.executable
MMSEG_TOOLS = osp.join(osp.dirname(__import__('mmseg').__file__), '.mim', 'tools')


def _run(args, check=True, **env):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', **env)
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _torchrun(*args):
    return [PY, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}', *args,
            '--launcher', 'pytorch']


# A user's config outside the repository: a PIDEHead config (SyncBN in backbone and heads) on a folder of
# small images, cropped to 32 x 32.
PIDEHEAD_USER_CONFIG = '''
_base_ = ['{root}/configs/pidehead/pidehead-frac_r50-d8_4xb4-80k_ade20k-512x512.py']
crop_size = (32, 32)
data_preprocessor = dict(size=crop_size)
model = dict(pretrained=None, data_preprocessor=data_preprocessor, decode_head=dict(num_classes=4),
             auxiliary_head=dict(num_classes=4))
split = dict(type='LongRangeDemoDataset', data_root='{data}')
train_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                  dict(type='RandomCrop', crop_size=crop_size), dict(type='PackSegInputs')]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'), dict(type='PackSegInputs')]
train_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(
    split, _delete_=True, num_samples=4, seed=0, pipeline=train_pipeline,
    data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train')))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(
    split, _delete_=True, num_samples=2, seed=1, pipeline=test_pipeline,
    data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val')))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=2, val_interval=2)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
'''


@pytest.mark.slow
def test_syncbn_config_trains_and_tests_in_two_cpu_processes(tmp_path):
    config = tmp_path / 'my_pidehead.py'
    config.write_text(PIDEHEAD_USER_CONFIG.format(root=ROOT, data=tmp_path / 'data'))
    work = tmp_path / 'work'
    out = _run(_torchrun('tools/train.py', config, '--work-dir', work))
    log = out.stdout + out.stderr
    # ResNet-50-D8's 55 norms, the PIDEHead's 3 convs and 2 block stages, the auxiliary head's conv (rank 0 logs)
    assert re.findall(r'CPU launch over gloo: (\d+) SyncBN layers converted to BN', log) == ['61'], log[-3000:]
    assert re.search(r'decode\.loss_ce: [\d.]+', log) and re.search(r'mIoU: [\d.]+', log)
    out = _run(_torchrun('tools/test.py', config, work / 'iter_2.pth', '--work-dir', work))
    log = out.stdout + out.stderr
    assert 'SyncBN layers converted to BN' in log and re.search(r'mIoU: [\d.]+', log)


def _demo_checkpoint(path):
    """The demo network, untrained (the flow, not the numbers), as a checkpoint."""
    import torch
    from mmseg.apis import init_model

    model = init_model(osp.join(ROOT, 'configs', 'demo_longrange.py'), None, device='cpu')
    torch.save(dict(state_dict=model.state_dict(), meta=dict(dataset_meta=dict(
        classes=('background', 'red region', 'green region', 'blue region')))), path)
    return path


@pytest.mark.slow
def test_demo_tta_and_show_dir_under_mmseg_and_project_test_tools(tmp_path):
    ckpt = _demo_checkpoint(tmp_path / 'demo.pth')
    data = tmp_path / 'data'
    options = ['--cfg-options', f'test_dataloader.dataset.data_root={data}', 'test_dataloader.dataset.num_samples=5',
               'test_dataloader.batch_size=2']
    out = _run([PY, osp.join(MMSEG_TOOLS, 'test.py'), 'configs/demo_longrange.py', ckpt, '--tta',
                '--work-dir', tmp_path / 'work', *options])
    assert re.search(r'mIoU: [\d.]+', out.stdout + out.stderr)
    show = tmp_path / 'show'
    out = _run([PY, 'tools/test.py', 'configs/demo_longrange.py', ckpt, '--tta', '--show-dir', show,
                '--work-dir', tmp_path / 'work', *options])
    assert re.search(r'mIoU: [\d.]+', out.stdout + out.stderr)
    painted = sorted(os.listdir(show / 'vis_data' / 'vis_image'))
    assert painted == [f'test_{i:05d}.png_0.png' for i in range(5)]  # every test image, not every 50th batch


def test_tta_without_a_tta_pipeline_says_what_is_missing(tmp_path):
    from mmengine.config import Config

    from pide_zoo.seg.cli import apply_tta

    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'demo_longrange.py')).to_dict()
    cfg = Config({k: v for k, v in cfg.items() if k != 'tta_pipeline'})
    with pytest.raises(SystemExit, match=r'--tta needs tta_pipeline in my\.py'):
        apply_tta(cfg, 'my.py')
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'bdd100k_pide_log.py'))
    cfg.model.data_preprocessor.mean_image = 'mine.npy'  # the model's preprocessor, not the top-level one, is used
    apply_tta(cfg, 'bdd.py')
    assert cfg.model.type == 'SegTTAModel' and cfg.model.module.type == 'PIDEEncoderDecoder'
    assert cfg.model.data_preprocessor.mean_image == 'mine.npy'
    assert cfg.test_dataloader.dataset.pipeline[-1].type == 'TestTimeAug'


# A config written for release 0.1: the package, not pide_zoo.seg, in custom_imports.
RELEASE_01_CONFIG = '''
_base_ = ['{root}/configs/demo_longrange.py']
custom_imports = dict(imports=['pide_zoo'], allow_failed_imports=False)
data = '{data}'
train_dataloader = dict(batch_size=2, dataset=dict(data_root=data, num_samples=4))
val_dataloader = dict(dataset=dict(data_root=data, num_samples=2))
test_dataloader = val_dataloader
train_cfg = dict(max_iters={iters}, val_interval={iters})
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
'''

SCRIPT = '''
import sys
import pide_zoo  # first, as a timm user would
assert not {{'mmengine', 'mmseg', 'mmcv'}} & {{m.split('.')[0] for m in sys.modules}}, 'OpenMMLab loaded'
from mmseg.apis import init_model
model = init_model({config!r}, {ckpt!r}, device='cpu')  # torch.load(weights_only=True) of an mmengine checkpoint
print('built', type(model).__name__, type(model.backbone).__name__, model.dataset_meta['classes'][1])
'''


@pytest.mark.slow
def test_release_01_config_under_mmseg_tools_and_in_a_script(tmp_path):
    from mmengine.config import Config

    def config(iters):
        path = tmp_path / f'old_{iters}.py'
        path.write_text(RELEASE_01_CONFIG.format(root=ROOT, data=tmp_path / 'data', iters=iters))
        return path

    assert Config.fromfile(config(1)).custom_imports.imports == ['pide_zoo']
    work = tmp_path / 'work'
    _run([PY, osp.join(MMSEG_TOOLS, 'train.py'), config(1), '--work-dir', work])
    out = _run([PY, osp.join(MMSEG_TOOLS, 'test.py'), config(1), work / 'iter_1.pth', '--work-dir', work])
    assert re.search(r'mIoU: [\d.]+', out.stdout + out.stderr)
    out = _run([PY, osp.join(MMSEG_TOOLS, 'train.py'), config(2), '--work-dir', work, '--resume'])
    log = out.stdout + out.stderr
    assert 'resumed epoch: 0, iter: 1' in log and re.search(r'Iter\(train\) \[2/2\]', log), log[-2000:]
    out = _run([PY, '-c', SCRIPT.format(config=str(config(2)), ckpt=str(work / 'iter_2.pth'))])
    assert 'built PIDEEncoderDecoder PIDEHamiltonianNet red region' in out.stdout, out.stdout + out.stderr[-2000:]
