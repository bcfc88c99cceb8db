"""Classification data, the training recipe and the train/eval tools (tools/train_cls.py, tools/eval_cls.py)."""
import csv
import importlib.util
import itertools
import json
import os
import os.path as osp
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from torch import nn

import pide_zoo  # noqa: F401  (registers the models)
from pide_zoo.checkpoint import CHECKPOINT_FORMAT, CheckpointError, checkpoint_meta, load_model, read_checkpoint
from pide_zoo.cls import (
    DATASETS,
    PAPER_RECIPES,
    DatasetNotFoundError,
    PadCropFlip,
    build_dataset,
    classifier_kwargs,
    compute_loss,
    create_lr_scheduler,
    keras_l2_to_weight_decay,
    load_digits_split,
    load_split,
    median_summary,
    per_pixel_mean,
    weight_decay_param_groups,
)
from pide_zoo.layers import smoothness_penalty

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PY = sys.executable
TINY = ['--model', 'hamiltonian74', '--model-kwargs', 'depths=(2,1,1)', 'widths=(8,8,16)']


def make_cifar(root, name='cifar10', n_train=(4, 4, 4, 4, 5), n_test=6, seed=0, offset=(0, 0)):
    """A tiny dataset in the real CIFAR python pickle layout; ``offset`` shifts train / test pixel values."""
    rng = np.random.default_rng(seed)
    folder = osp.join(root, 'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python')
    os.makedirs(folder, exist_ok=True)
    key, classes = ('labels', 10) if name == 'cifar10' else ('fine_labels', 100)
    files = ([f'data_batch_{i}' for i in range(1, 6)] if name == 'cifar10' else ['train']) + \
        ['test_batch' if name == 'cifar10' else 'test']
    sizes = (list(n_train) if name == 'cifar10' else [sum(n_train)]) + [n_test]
    for i, (fname, n) in enumerate(zip(files, sizes)):
        shift = offset[1] if i == len(files) - 1 else offset[0]
        data = np.clip(rng.integers(0, 200, (n, 3072)) + shift, 0, 255).astype(np.uint8)
        entry = {'batch_label': fname, key: rng.integers(0, classes, n).tolist(), 'data': data,
                 'filenames': [f'{fname}_{j}.png' for j in range(n)]}
        with open(osp.join(folder, fname), 'wb') as f:
            pickle.dump(entry, f)
    return root


def _run(args, ok=True, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    out = subprocess.run([PY, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    if ok:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _tool(name):
    spec = importlib.util.spec_from_file_location(f'_tool_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- data ----------------------------------------------------------------------------------------------
def test_cifar_pickle_layout_is_read(tmp_path):
    make_cifar(str(tmp_path))
    x, y = load_split('cifar10', str(tmp_path), 'train')
    assert x.shape == (21, 3, 32, 32) and x.dtype == np.uint8 and y.shape == (21,) and y.dtype == np.int64
    with open(tmp_path / 'cifar-10-batches-py' / 'data_batch_1', 'rb') as f:
        first = pickle.load(f, encoding='latin1')
    # rows of 3072 bytes are R, G, B planes of 32 x 32, row-major
    np.testing.assert_array_equal(x[0, 1, 2, 5], first['data'][0][1024 + 2 * 32 + 5])
    assert load_split('cifar10', str(tmp_path), 'test')[0].shape == (6, 3, 32, 32)
    make_cifar(str(tmp_path), 'cifar100')
    x100, y100 = load_split('cifar100', str(tmp_path), 'train')
    assert x100.shape == (21, 3, 32, 32) and y100.max() < 100


def test_stl10_binary_layout_is_read(tmp_path):
    folder = tmp_path / 'stl10_binary'
    folder.mkdir()
    img = np.arange(3 * 96 * 96, dtype=np.int64).reshape(1, 3, 96, 96) % 251
    for split in ('train', 'test'):
        # the files are column-major per image: (N, C, W, H)
        img.transpose(0, 1, 3, 2).astype(np.uint8).tofile(folder / f'{split}_X.bin')
        np.array([10], dtype=np.uint8).tofile(folder / f'{split}_y.bin')
    x, y = load_split('stl10', str(tmp_path), 'train')
    np.testing.assert_array_equal(x, img.astype(np.uint8))
    assert y.tolist() == [9]  # labels 1..10 on disk


def test_missing_dataset_names_layout_and_alternatives(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_split('cifar100', str(tmp_path), 'train')
    msg = str(e.value)
    assert 'cifar-100-python/{test, train}' in msg and '--download' in msg and '--dataset digits' in msg
    with pytest.raises(ValueError, match=r"dataset must be one of \('cifar10', 'cifar100', 'stl10', 'digits'\)"):
        load_split('mnist', str(tmp_path))


def test_mean_subtraction_uses_the_train_split_only(tmp_path):
    make_cifar(str(tmp_path), offset=(0, 50))  # test images are brighter
    train_x = load_split('cifar10', str(tmp_path), 'train')[0]
    test_x = load_split('cifar10', str(tmp_path), 'test')[0]
    mean = per_pixel_mean(train_x)
    np.testing.assert_allclose(mean.numpy(), train_x.mean(0) / 255.0, rtol=1e-6)
    test = build_dataset('cifar10', 'test', str(tmp_path))
    assert torch.equal(test.mean, mean) and test.transform is None
    x, _ = test[3]
    torch.testing.assert_close(x, torch.from_numpy(test_x[3]).float() / 255 - mean)
    assert not torch.allclose(mean, per_pixel_mean(test_x), atol=0.05)
    train = build_dataset('cifar10', 'train', str(tmp_path))
    assert torch.equal(train.mean, mean) and isinstance(train.transform, PadCropFlip)


def test_pad_crop_flip():
    x = torch.rand(3, 32, 32) + 1
    aug = PadCropFlip(pad=4)
    torch.manual_seed(0)
    outs = [aug(x) for _ in range(40)]
    assert all(o.shape == x.shape for o in outs)
    assert any((o == 0).any() for o in outs)  # zero padding (the mean value after subtraction) enters
    assert any(torch.equal(o, x.flip(-1)) for o in outs) and any(torch.equal(o, x) for o in outs)
    torch.manual_seed(0)
    assert all(torch.equal(a, aug(x)) for a in outs)  # draws from the seeded global generator
    assert not any(torch.equal(PadCropFlip(0, hflip=False)(x), x.flip(-1)) for _ in range(5))
    with pytest.raises(ValueError, match='pad must be a non-negative int'):
        PadCropFlip(-1)


def test_digits_fixed_split():
    x, y = load_digits_split('train')
    xt, yt = load_digits_split('test')
    assert x.shape == (1437, 3, 32, 32) and xt.shape == (360, 3, 32, 32) and x.dtype == np.uint8
    assert np.array_equal(x[:, 0], x[:, 2]) and x.max() == 255
    assert np.bincount(yt).min() >= 35  # stratified
    x2, y2 = load_digits_split('train')
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not DATASETS['digits'].hflip


# --- recipe ----------------------------------------------------------------------------------------------
def test_schedule_is_the_authors():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = create_lr_scheduler(opt)
    lrs = []
    for epoch in range(200):
        sched.step(epoch)
        lrs.append(round(opt.param_groups[0]['lr'], 10))
    runs = [(lr, len(list(g))) for lr, g in itertools.groupby(lrs)]
    # Keras PiecewiseConstantDecay at epochs [1, 80, 120, 160, 180] with rates [0.01, 0.1, ..., 1e-5]
    assert runs == [(0.01, 1), (0.1, 79), (0.01, 40), (0.001, 40), (0.0001, 20), (1e-05, 20)]
    # milestones count from the start of training with or without a warm-up
    for warmup, want in ((0, [0.1, 0.1, 0.01, 0.001]), (2, [0.01, 0.055, 0.01, 0.001])):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = create_lr_scheduler(opt, epochs=4, decay_milestones=(2, 3), warmup_epochs=warmup)
        got = []
        for epoch in range(4):
            sched.step(epoch)
            got.append(opt.param_groups[0]['lr'])
        assert got == pytest.approx(want), warmup


def test_weight_decay_is_keras_l2_on_conv_weights():
    assert keras_l2_to_weight_decay(2e-4) == pytest.approx(4e-4)
    assert PAPER_RECIPES['stl10'] == dict(batch_size=50, keras_l2=5e-4)
    model = timm.create_model('nl_hamiltonian74', depths=(2, 2, 2))
    no_decay, decay = weight_decay_param_groups(model, 4e-4)
    ids = {id(p) for p in decay['params']}
    assert decay['weight_decay'] == 4e-4 and no_decay['weight_decay'] == 0
    assert id(model.stages[0].unit.blocks[0].conv1.weight) in ids  # Hamiltonian K (also used by K^T)
    assert id(model.stages[1].unit.nonlocals['2'].convs[0].weight) in ids  # nonlocal K_1
    assert id(model.stem.conv.weight) in ids and id(model.fc.weight) not in ids
    assert all(p.ndim == 4 for p in decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))
    _, decay_all = weight_decay_param_groups(model, 4e-4, which='weights')
    assert id(model.fc.weight) in {id(p) for p in decay_all['params']}
    # one SGD step with weight decay 2 * reg equals one step on loss + reg * ||w||^2 (Keras l2)
    w = nn.Parameter(torch.randn(4, 4, 1, 1))
    w2 = nn.Parameter(w.detach().clone())
    w.grad = torch.zeros_like(w)
    torch.optim.SGD([w], lr=0.1, weight_decay=keras_l2_to_weight_decay(2e-4)).step()
    (2e-4 * w2.pow(2).sum()).backward()
    torch.optim.SGD([w2], lr=0.1).step()
    torch.testing.assert_close(w, w2)


def test_smoothness_penalty_is_part_of_the_loss():
    model = timm.create_model('hamiltonian74', depths=(3, 2, 2), widths=(8, 8, 16))
    out = model(torch.randn(2, 3, 32, 32))
    target = torch.tensor([1, 2])
    total, parts = compute_loss(model, out, target, nn.CrossEntropyLoss(), smoothness=1e-4)
    expect = smoothness_penalty(model, 1e-4)
    assert expect.item() > 0
    torch.testing.assert_close(parts['smooth'], expect.detach())
    torch.testing.assert_close(total, parts['ce'] + expect)
    total.backward()  # the penalty's gradient reaches the Hamiltonian kernels
    w = model.stages[0].unit.blocks[1].conv1.weight
    ce_only = w.grad.clone()
    model.zero_grad()
    compute_loss(model, model(torch.randn(2, 3, 32, 32)), target, nn.CrossEntropyLoss())[0].backward()
    assert not torch.allclose(ce_only, w.grad)


def test_classifier_kwargs_follow_the_dataset():
    assert classifier_kwargs('nl_hamiltonian74', 'stl10') == dict(num_classes=10, img_size=96)
    assert classifier_kwargs('hamiltonian74', 'cifar100', dict(depths=(1, 1, 1))) == \
        dict(num_classes=100, img_size=32, depths=(1, 1, 1))
    assert classifier_kwargs('resnet44_cifar', 'stl10') == dict(num_classes=10)  # global pooling: any size
    with pytest.raises(ValueError, match='timm model name'):
        classifier_kwargs('no_such_net', 'cifar10')


def test_median_summary():
    s = median_summary([dict(top1=90.0, top5=99.0), dict(top1=92.0, top5=99.5), dict(top1=91.0, top5=98.0)])
    assert s['runs'] == 3 and s['top1']['median'] == 91.0 and s['top5']['median'] == 99.0


def test_every_table_entry_has_a_config():
    train_cls = _tool('train_cls')
    parser = train_cls.build_parser()
    nets = ['resnet44_cifar', 'preresnet20_cifar', 'hamiltonian74', 'nl_hamiltonian74', 'nl_hamiltonian74_frac',
            'nl_hamiltonian74_invfrac', 'nl_hamiltonian74_log', 'nl_hamiltonian74_4stage']
    for net, dataset in itertools.product(nets, ('cifar10', 'cifar100', 'stl10')):
        path = osp.join(ROOT, 'configs', 'cls', f'{net}_{dataset}.yaml')
        args = train_cls.parse_args(parser, ['-c', path])
        assert (args.model, args.dataset) == (net, dataset)
        assert args.batch_size == (50 if dataset == 'stl10' else 100)
        assert args.weight_decay == pytest.approx(1e-3 if dataset == 'stl10' else 4e-4)
        assert (args.epochs, args.lr, args.warmup_lr, args.opt) == (200, 0.1, 0.01, 'momentum')
        assert args.decay_milestones == [80, 120, 160, 180] and args.smoothness == 1e-8
    for path in os.listdir(osp.join(ROOT, 'configs', 'cls')):
        train_cls.parse_args(train_cls.build_parser(), ['-c', osp.join(ROOT, 'configs', 'cls', path)])


def test_digits_without_config_uses_the_digits_recipe():
    train_cls = _tool('train_cls')

    def parse(*argv):
        return train_cls.parse_args(train_cls.build_parser(), list(argv))

    args = parse('--model', 'nl_hamiltonian74', '--dataset', 'digits')
    assert args.config == osp.join(ROOT, 'configs', 'cls', 'nl_hamiltonian74_digits.yaml')
    assert (args.epochs, args.batch_size, args.lr, args.decay_milestones, args.workers) == (4, 32, 0.05, [3], 0)
    assert 'digits recipe of configs/cls/nl_hamiltonian74_digits.yaml (epochs 4, batch_size 32' in args.recipe_note
    args = parse('--dataset', 'digits', '--epochs', '2', '-b', '16')  # the command line still wins
    assert (args.epochs, args.batch_size, args.lr) == (2, 16, 0.05) and 'epochs 2, batch_size 16' in args.recipe_note
    args = parse('--model', 'resnet44_cifar', '--dataset', 'digits')
    assert args.model == 'resnet44_cifar' and args.config.endswith('resnet44_cifar_digits.yaml')
    args = parse('--model', 'preresnet20_cifar', '--dataset', 'digits')  # no file of its own: the same recipe
    assert args.model == 'preresnet20_cifar' and args.config.endswith('nl_hamiltonian74_digits.yaml')
    assert args.epochs == 4
    for dataset in ('cifar10', 'stl10'):  # the paper's recipe stays the default there
        args = parse('--dataset', dataset)
        assert (args.config, args.recipe_note, args.epochs, args.lr) == ('', '', 200, 0.1)


def test_bad_arguments_name_the_option_and_the_choices(tmp_path, capsys):
    train_cls = _tool('train_cls')
    for argv, msg in ((['--dataset', 'mnist'], '--dataset must be one of cifar10, cifar100, stl10, digits'),
                      (['--sched', 'warm'], '--sched must be one of multistep'),
                      (['--wd-params', 'all'], '--wd-params must be one of conv, weights'),
                      (['--model', 'no_such_net'], '--model must be a timm model name'),
                      (['--epochs', '0'], '--epochs must be >= 1'),
                      (['--weight-decay', '1e-4', '--keras-l2', '1e-4'], 'not both')):
        with pytest.raises(SystemExit):
            train_cls.parse_args(train_cls.build_parser(), argv)
        assert msg in capsys.readouterr().err
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model: hamiltonian74\nlearning_rate: 0.1\n')
    with pytest.raises(SystemExit):
        train_cls.parse_args(train_cls.build_parser(), ['-c', str(bad)])
    assert "unknown option(s) ['learning_rate']" in capsys.readouterr().err


def test_missing_dataset_path_is_a_clear_error(tmp_path):
    out = _run(['tools/train_cls.py', '--dataset', 'cifar10', '--data-dir', str(tmp_path / 'nowhere'),
                '--output', str(tmp_path / 'out'), *TINY], ok=False)
    assert out.returncode == 2
    assert 'cifar-10-batches-py/{data_batch_1' in out.stderr
    assert '--download' in out.stderr and '--dataset digits' in out.stderr
    assert 'Traceback' not in out.stderr


# --- one loader: load_model -----------------------------------------------------------------------------------
SMALL = dict(num_classes=10, img_size=32, depths=(1, 1, 1), widths=(8, 8, 8))


def _cls_checkpoint(path, ema=False):
    """What tools/train_cls.py writes, for a small hamiltonian74 after 4 epochs; returns the model."""
    torch.manual_seed(0)
    model = timm.create_model('hamiltonian74', **SMALL)
    state = dict(checkpoint_meta('hamiltonian74', SMALL, 'cifar10', torch.full((3, 32, 32), 0.5)),
                 format=CHECKPOINT_FORMAT, epoch=3, state_dict=model.state_dict())
    if ema:
        state['state_dict_ema'] = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, path)
    return model


def _same_weights(a, b):
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_load_model_from_a_train_cls_checkpoint(tmp_path):
    path = str(tmp_path / 'last.pth.tar')
    saved = _cls_checkpoint(path, ema=True)
    model, info = load_model(path)
    assert _same_weights(model, saved) and not model.training
    assert {k: info[k] for k in ('kind', 'arch', 'dataset', 'epoch', 'source', 'input_size', 'fixed_input_size')} == \
        dict(kind='classifier', arch='hamiltonian74', dataset='cifar10', epoch=4, source=path, input_size=(3, 32, 32),
             fixed_input_size=True)
    assert info['model_kwargs'] == SMALL and torch.equal(info['data_mean'], torch.full((3, 32, 32), 0.5))
    ema, _ = load_model(path, 'hamiltonian74', use_ema=True)  # naming the model it holds is fine
    assert all(torch.equal(v, saved.state_dict()[k] + (1 if v.is_floating_point() else 0))
               for k, v in ema.state_dict().items())
    with pytest.raises(ValueError, match=f"checkpoint '{path}' holds 'hamiltonian74', not model 'resnet44_cifar'"):
        load_model(path, 'resnet44_cifar')
    with pytest.raises(ValueError, match='records the model arguments; drop model_kwargs'):
        load_model(path, 'hamiltonian74', dict(num_classes=3))


def test_load_model_warns_for_a_checkpoint_with_other_batch_norm(tmp_path, monkeypatch):
    from pide_zoo.models import _paper_norm

    monkeypatch.setattr(_paper_norm, '_warned', set())
    path = str(tmp_path / 'old.pth.tar')
    saved = _cls_checkpoint(path)  # as written before the record: no top-level batch_norm
    ckpt = torch.load(path, weights_only=True)
    ckpt['state_dict'] = dict(ckpt['state_dict'])  # and its metadata stripped
    torch.save(ckpt, path)
    with pytest.warns(UserWarning, match=rf"{re.escape(path)}: this state dict records no batch-norm settings"):
        load_model(path)
    ckpt['batch_norm'] = dict(eps=1e-5, momentum=0.1)
    torch.save(ckpt, path)
    with pytest.warns(UserWarning, match=rf'{re.escape(path)}: .* trained with batch norm eps=1e-05, momentum=0.1 '
                                         r'but the model uses eps=0\.001, momentum=0\.01; build it with bn_tf=False'):
        model, _ = load_model(path)
    assert _same_weights(model, saved)


def test_load_model_from_a_name_with_or_without_a_state_dict(tmp_path):
    torch.manual_seed(1)
    resnet = timm.create_model('resnet44_cifar', num_classes=100)
    path = str(tmp_path / 'r44.pth')
    torch.save(resnet.state_dict(), path)
    model, info = load_model(path, 'resnet44_cifar', dict(num_classes=100))
    assert _same_weights(model, resnet) and not model.training
    assert info['epoch'] is None and info['source'] == path and info['data_mean'] is None
    assert info['input_size'] == (3, 32, 32) and info['fixed_input_size'] is False
    with pytest.raises(CheckpointError, match=f'^{path}: its weights do not fit resnet44_cifar'):
        load_model(path, 'resnet44_cifar')  # 10 classes: the classifier's shape differs
    fresh, info = load_model(model='hamiltonian74', dataset='cifar100')
    assert fresh.fc.out_features == 100 and info['source'] == 'initialisation' and info['epoch'] == 0
    assert load_model(model='hamiltonian74')[0].fc.out_features == 10  # no dataset: the model's cfg


def test_load_model_says_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match='give a checkpoint, a model'):
        load_model()
    with pytest.raises(ValueError, match="'no_such_net' is not a timm model name"):
        load_model(model='no_such_net')
    with pytest.raises(FileNotFoundError, match='none.pth'):
        load_model(str(tmp_path / 'none.pth'))
    with pytest.raises(ValueError, match='cfg_options apply to mmseg configs'):
        load_model(model='hamiltonian74', cfg_options={'model.x': 1})
    path = str(tmp_path / 'last.pth.tar')
    _cls_checkpoint(path)
    with pytest.raises(CheckpointError, match=f"^{path}: has no 'state_dict_ema'"):
        load_model(path, use_ema=True)


def test_deprecated_loaders_warn_and_match_load_model(tmp_path):
    from pide_zoo import export, training

    path = str(tmp_path / 'last.pth.tar')
    _cls_checkpoint(path)
    want = load_model(path)[0].state_dict()
    calls = {
        'load_checkpoint': lambda: training.load_checkpoint(path)['state_dict'],
        'model_from_checkpoint': lambda: training.model_from_checkpoint(path)[0].state_dict(),
        'load_classifier': lambda: export.load_classifier(None, path)[0].state_dict(),
    }
    for old, call in calls.items():
        with pytest.warns(FutureWarning, match=rf'{old} is deprecated and will be removed in pide_zoo 0\.3; use '):
            state = call()
        assert state.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in state.items()), old
    with pytest.warns(FutureWarning):
        assert export.load_classifier(None, path)[1:] == ((3, 32, 32), True)
    with pytest.warns(FutureWarning, match=r'model_name=\.\.\.\) is deprecated .* use load_model\(model=\.\.\.\)'):
        assert load_model(model_name='hamiltonian74', dataset='cifar100')[0].fc.out_features == 100


def test_old_module_paths_forward_with_a_warning():
    """pide_zoo.training and pide_zoo.data.classification forward each name to its new home until 0.4."""
    from pide_zoo import checkpoint, cls
    from pide_zoo.cls import data

    out = subprocess.run([PY, '-W', 'error', '-c', 'import pide_zoo.training, pide_zoo.data.classification'],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-2000:]  # importing the old modules alone does not warn
    for old, name, new in (('pide_zoo.training', 'train_one_epoch', cls),
                           ('pide_zoo.training', 'load_model', checkpoint),
                           ('pide_zoo.data.classification', 'build_dataset', data)):
        match = rf'{old}\.{name} moved to {new.__name__}\.{name}; {old} will be removed in pide_zoo 0\.4'
        with pytest.warns(FutureWarning, match=match):
            assert getattr(importlib.import_module(old), name) is getattr(new, name)
    with pytest.raises(AttributeError, match="'pide_zoo.training' has no attribute 'nothing'"):
        _ = importlib.import_module('pide_zoo.training').nothing


# --- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_checkpoint_resume_evaluate(tmp_path):
    data = make_cifar(str(tmp_path / 'data'))
    common = ['tools/train_cls.py', *TINY, '--dataset', 'cifar10', '--data-dir', data, '-b', '8', '-j', '0',
              '--no-progress', '--model-ema', '--model-ema-decay', '0.5']
    _run([*common, '--epochs', '2', '--output', str(tmp_path / 'a')])
    _run([*common, '--epochs', '1', '--output', str(tmp_path / 'b')])
    out = _run([*common, '--epochs', '2', '--output', str(tmp_path / 'b'), '--resume',
                str(tmp_path / 'b' / 'last.pth.tar')])
    assert 'epoch 2/2' in out.stderr and 'epoch 1/2' not in out.stderr

    a = torch.load(tmp_path / 'a' / 'last.pth.tar', weights_only=True)  # plain data only
    b = read_checkpoint(str(tmp_path / 'b' / 'last.pth.tar'))
    assert a['arch'] == 'hamiltonian74' and a['epoch'] == b['epoch'] == 1
    assert a['model_kwargs'] == dict(num_classes=10, img_size=32, depths=(2, 1, 1), widths=(8, 8, 16))
    # the batch-norm settings at the top level, where timm's loaders do not strip them
    assert a['batch_norm'] == dict(eps=1e-3, momentum=pytest.approx(0.01))
    for key in ('state_dict', 'state_dict_ema'):  # the resumed run continued exactly
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for i, state in a['optimizer']['state'].items():
        assert torch.equal(state['momentum_buffer'], b['optimizer']['state'][i]['momentum_buffer'])
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    train_x = load_split('cifar10', data, 'train')[0]
    assert torch.equal(a['data_mean'], per_pixel_mean(train_x))

    summary = json.loads((tmp_path / 'a' / 'summary.json').read_text())
    assert {'top1', 'top5', 'loss', 'ema_top1', 'params_m', 'wall_time_s'} <= summary.keys()
    assert summary['epochs'] == 2 and summary['test_images'] == 6
    rows_a = list(csv.DictReader(open(tmp_path / 'a' / 'summary.csv')))
    rows_b = list(csv.DictReader(open(tmp_path / 'b' / 'summary.csv')))
    assert [r['epoch'] for r in rows_b] == ['0', '1']
    assert [float(r['lr']) for r in rows_a] == [0.01, 0.1]
    for ra, rb in zip(rows_a, rows_b):
        assert ra['train_loss'] == rb['train_loss'] and ra['eval_top1'] == rb['eval_top1']
        # the smoothness penalty is in the logged loss
        assert float(ra['train_smooth']) > 0
        assert float(ra['train_loss']) == pytest.approx(float(ra['train_ce']) + float(ra['train_smooth']), rel=1e-5)
    for name in ('last.pth.tar', 'model_best.pth.tar', 'log.txt', 'args.yaml'):
        assert (tmp_path / 'a' / name).is_file()

    out = _run(['tools/eval_cls.py', str(tmp_path / 'a'), str(tmp_path / 'b' / 'last.pth.tar'), '--data-dir', data,
                '-j', '0', '--output', str(tmp_path / 'eval.json')])
    result = json.loads((tmp_path / 'eval.json').read_text())
    assert [r['top1'] for r in result['results']] == [summary['top1']] * 2
    assert result['summary']['top1']['median'] == summary['top1'] and 'median over 2' in out.stdout
    model, info = load_model(str(tmp_path / 'a' / 'last.pth.tar'), use_ema=True)
    assert not model.training and model.fc.out_features == 10 and info['epoch'] == 2
    assert all(torch.equal(v, a['state_dict_ema'][k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    data = make_cifar(str(tmp_path / 'data'), n_test=7)
    _run(['-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29641', 'tools/train_cls.py', *TINY,
          '--dataset', 'cifar10', '--data-dir', data, '-b', '4', '-j', '0', '--no-progress', '--epochs', '1',
          '--output', str(tmp_path / 'ddp')])
    summary = json.loads((tmp_path / 'ddp' / 'summary.json').read_text())
    assert summary['world_size'] == 2 and summary['test_images'] == 7  # every test image once


@pytest.mark.slow
def test_eval_every_keeps_the_log_columns(tmp_path):
    data = make_cifar(str(tmp_path / 'data'))
    _run(['tools/train_cls.py', *TINY, '--dataset', 'cifar10', '--data-dir', data, '-b', '8', '-j', '0',
          '--no-progress', '--epochs', '3', '--eval-every', '2', '--output', str(tmp_path / 'run')])
    rows = list(csv.DictReader(open(tmp_path / 'run' / 'summary.csv')))
    assert [r['eval_top1'] == '' for r in rows] == [True, False, False]
    assert all(len(r) == len(rows[0]) and None not in r for r in rows)


@pytest.mark.slow
def test_digits_end_to_end_tiny(tmp_path):
    """The embedded dataset through the tool (a tiny network; the full-size result is a recorded benchmark)."""
    out_dir = str(tmp_path / 'digits')
    out = _run(['tools/train_cls.py', '--dataset', 'digits', '--model', 'nl_hamiltonian74', '--model-kwargs',
                'depths=(1,1,1)', 'widths=(8,8,16)', '--epochs', '2', '-b', '32', '-j', '0', '--no-progress',
                '--output', out_dir])
    assert 'digits recipe of configs/cls/nl_hamiltonian74_digits.yaml (epochs 2, batch_size 32, lr 0.05' in out.stderr
    summary = json.loads(open(osp.join(out_dir, 'summary.json')).read())
    assert summary['test_images'] == 360 and summary['top1'] > 50


@pytest.mark.skipif(not os.environ.get('PIDE_ZOO_DIGITS_BENCHMARK'),
                    reason='recorded benchmark (minutes on CPU): set PIDE_ZOO_DIGITS_BENCHMARK=1')
def test_digits_benchmark_nl_hamiltonian74(tmp_path):
    """The first command a reader tries: no config, the digits recipe, >= 95 % top-1 in minutes."""
    _run(['tools/train_cls.py', '--model', 'nl_hamiltonian74', '--dataset', 'digits', '--no-progress',
          '--output', str(tmp_path / 'digits')], timeout=3600)
    summary = json.loads((tmp_path / 'digits' / 'summary.json').read_text())
    assert summary['epochs'] == 4 and summary['top1'] >= 95.0, summary
