"""Data tools on bad files: each bad file is named with its problem, nothing else is lost.

tools/prepare_bdd100k.py converts every good pair, writes atomically and resumes; tools/train_cls.py,
eval_cls.py, spectrum.py and stability.py stop on a corrupt or foreign checkpoint or a corrupt CIFAR /
STL-10 file with one message naming the file, exit status 2 and no traceback, leaving earlier outputs as
they were.
"""
import hashlib
import importlib.util
import io
import json
import logging
import os
import os.path as osp
import pickle
import subprocess

import numpy as np
import pytest
import timm
import torch
from bdd100k_converter import MEAN_IMAGE, ConversionError, convert_bdd100k, prepare_bdd100k
from test_cls_tools import PY, ROOT, TINY

import pide_zoo  # noqa: F401  (registers the models)
from pide_zoo.checkpoint import CheckpointError, load_model, read_checkpoint
from pide_zoo.cls import DatasetCorruptError, load_split

IMG, ANN = osp.join('images', '10k'), osp.join('labels', 'sem_seg', 'masks')
HW = (32, 48)  # source size: outputs are 4 x 6


def _run(args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    return subprocess.run([PY, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def _tool(name):
    spec = importlib.util.spec_from_file_location(f'_data_tool_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digest(folder):
    """{relative path: sha1} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = osp.join(root, f)
            out[osp.relpath(path, folder)] = hashlib.sha1(open(path, 'rb').read()).hexdigest()
    return out


# --- BDD100K ---------------------------------------------------------------------------------------------
def _pair(src, split, name, hw=HW, mask_hw=None, labels=None, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(src, IMG, split), exist_ok=True)
    os.makedirs(osp.join(src, ANN, split), exist_ok=True)
    img = rng.integers(0, 255, (*hw, 3), dtype=np.uint8)
    ann = rng.choice(np.array(labels or list(range(19)) + [255], np.uint8), size=mask_hw or hw)
    Image.fromarray(img).save(osp.join(src, IMG, split, f'{name}.jpg'), quality=95)
    Image.fromarray(ann).save(osp.join(src, ANN, split, f'{name}.png'))


def _truncate(path, keep=0.5):
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[:int(len(data) * keep)])


def _bad_bdd100k(src):
    """Two good train pairs, one good val pair and one bad file of every kind; returns {bad path: problem}."""
    for i in (0, 4):
        _pair(src, 'train', f't{i}', seed=i)
    _pair(src, 'val', 'v2', seed=12)
    for i in (1, 2, 3):
        _pair(src, 'train', f't{i}', seed=i)
    _pair(src, 'val', 'v0', hw=(24, 40), seed=10)
    _pair(src, 'val', 'v1', mask_hw=(16, 48), seed=11)
    _pair(src, 'train', 't5', seed=5)
    os.remove(osp.join(src, ANN, 'train', 't5.png'))
    _truncate(osp.join(src, IMG, 'train', 't1.jpg'))
    with open(osp.join(src, ANN, 'train', 't2.png'), 'wb') as f:
        f.write(np.random.default_rng(0).bytes(300))
    _pair(src, 'train', 't3', labels=[0, 42], seed=3)
    return {
        osp.join(src, IMG, 'train', 't1.jpg'): 'truncated',
        osp.join(src, ANN, 'train', 't2.png'): 'cannot be read',
        osp.join(src, ANN, 'train', 't3.png'): 'label values [42] outside 0-18 and 255',
        osp.join(src, IMG, 'val', 'v0.jpg'): 'image size (40, 24), the others are (48, 32)',
        osp.join(src, ANN, 'val', 'v1.png'): 'mask size (48, 16) differs from image size (48, 32)',
        osp.join(src, IMG, 'train', 't5.jpg'): f"no mask {osp.join(src, ANN, 'train', 't5.png')}",
    }


def _outputs(dst):
    return sorted(osp.relpath(osp.join(r, f), dst) for r, _, fs in os.walk(dst) for f in fs)


def test_prepare_bdd100k_names_every_bad_file_and_converts_the_others(tmp_path):
    from PIL import Image

    src, dst = str(tmp_path / 'src'), str(tmp_path / 'dst')
    bad = _bad_bdd100k(src)
    out = _run(['tools/prepare_bdd100k.py', '--src', src, '--dst', dst, '--no-progress'])
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr
    lines = [ln[len('bad file: '):] for ln in out.stderr.splitlines() if ln.startswith('bad file: ')]
    assert len(lines) == len(bad), out.stderr
    for path, problem in bad.items():
        assert any(ln.startswith(f'{path}: ') and problem in ln for ln in lines), (path, problem, out.stderr)
    assert 'error: 6 bad source file(s)' in out.stderr and '5 pair(s) not converted' in out.stderr
    assert f'{dst}: 2 of 5 train pairs, 1 of 3 val pairs (wrote 3, kept 0 already there)' in out.stdout
    # every good pair is there, nothing of a bad one, no temporary file
    assert _outputs(dst) == sorted([osp.join(IMG, 'train', 't0.jpg'), osp.join(IMG, 'train', 't4.jpg'),
                                    osp.join(IMG, 'val', 'v2.jpg'), osp.join(ANN, 'train', 't0.png'),
                                    osp.join(ANN, 'train', 't4.png'), osp.join(ANN, 'val', 'v2.png'), MEAN_IMAGE])
    full = np.asarray(Image.open(osp.join(src, ANN, 'val', 'v2.png')))
    np.testing.assert_array_equal(np.asarray(Image.open(osp.join(dst, ANN, 'val', 'v2.png'))), full[7::8, 7::8])
    written = [np.asarray(Image.open(osp.join(dst, IMG, 'train', f't{i}.jpg')), np.float64) for i in (0, 4)]
    np.testing.assert_allclose(np.load(osp.join(dst, MEAN_IMAGE)), (sum(written) / 2 / 255).transpose(2, 0, 1),
                               atol=1e-6)
    assert f'{osp.join(dst, MEAN_IMAGE)} averages 2 train images' in out.stdout

    # The user repairs the sources; the rerun converts only what is missing and refreshes the mean.
    before = {f: os.path.getmtime(osp.join(dst, f)) for f in _outputs(dst)}
    for i in (1, 2, 3):
        _pair(src, 'train', f't{i}', seed=i)
    _pair(src, 'val', 'v0', seed=10)
    _pair(src, 'val', 'v1', seed=11)
    os.remove(osp.join(src, IMG, 'train', 't5.jpg'))
    out = _run(['tools/prepare_bdd100k.py', '--src', src, '--dst', dst, '--no-progress'])
    assert out.returncode == 0, out.stderr
    assert f'{dst}: 5 of 5 train pairs, 3 of 3 val pairs (wrote 5, kept 3 already there)' in out.stdout
    for f, mtime in before.items():
        if f != MEAN_IMAGE:
            assert os.path.getmtime(osp.join(dst, f)) == mtime, f
    written = [np.asarray(Image.open(osp.join(dst, IMG, 'train', f't{i}.jpg')), np.float64) for i in range(5)]
    np.testing.assert_allclose(np.load(osp.join(dst, MEAN_IMAGE)), (sum(written) / 5 / 255).transpose(2, 0, 1),
                               atol=1e-6)
    # a third run has nothing to do and rewrites nothing, the mean included
    before = _digest(dst), {f: os.path.getmtime(osp.join(dst, f)) for f in _outputs(dst)}
    summary = convert_bdd100k(src, dst, progress=False)
    assert summary.written == {'train': 0, 'val': 0} and summary.kept == {'train': 5, 'val': 3}
    assert summary.mean_image is None and summary.problems == []
    assert (_digest(dst), {f: os.path.getmtime(osp.join(dst, f)) for f in _outputs(dst)}) == before


def test_prepare_bdd100k_api_raises_after_converting_the_good_pairs(tmp_path):
    src, dst = str(tmp_path / 'src'), str(tmp_path / 'dst')
    bad = _bad_bdd100k(src)
    with pytest.raises(ConversionError) as e:
        prepare_bdd100k(src, dst, progress=False)
    assert e.value.summary.done == {'train': 2, 'val': 1}
    assert sorted(p.split(': ')[0] for p in e.value.summary.problems) == sorted(bad)
    assert all(path in str(e.value) for path in bad)
    assert '6 bad source file(s); 3 of 8 pairs are converted' in str(e.value)


class _Crash(BaseException):
    """A kill between two writes (BaseException: nothing in the converter catches it)."""


def test_interrupted_prepare_leaves_no_half_written_file(tmp_path, monkeypatch):
    from PIL import Image

    src, dst, clean = str(tmp_path / 'src'), str(tmp_path / 'dst'), str(tmp_path / 'clean')
    for i in range(3):
        _pair(src, 'train', f't{i}', seed=i)
    _pair(src, 'val', 'v0', seed=9)
    convert_bdd100k(src, clean, progress=False)

    real_save, calls = Image.Image.save, []

    def save_then_die(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 4:  # the first pair is written; the second dies half-way through its mask
            with open(fp, 'wb') as f:
                buf = io.BytesIO()
                real_save(self, buf, *args, **kwargs)
                f.write(buf.getvalue()[:20])
            raise _Crash()
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, 'save', save_then_die)
    with pytest.raises(_Crash):
        convert_bdd100k(src, dst, progress=False)
    monkeypatch.undo()
    # what a reader (mmseg lists *.jpg / *.png) sees is complete; the torn file is a .part
    listed = [f for f in _outputs(dst) if f.endswith(('.jpg', '.png'))]
    assert listed == sorted([osp.join(IMG, 'train', 't0.jpg'), osp.join(ANN, 'train', 't0.png'),
                             osp.join(IMG, 'train', 't1.jpg')])
    for f in listed:
        Image.open(osp.join(dst, f)).load()
    assert [f for f in _outputs(dst) if f.endswith('.part')] == [osp.join(ANN, 'train', 't1.png.part')]
    assert not osp.exists(osp.join(dst, MEAN_IMAGE))

    summary = convert_bdd100k(src, dst, progress=False)
    assert summary.written == {'train': 2, 'val': 1} and summary.kept == {'train': 1, 'val': 0}
    assert _digest(dst) == _digest(clean)  # the resumed copy equals an uninterrupted one, no leftovers


# --- classification: corrupt datasets ---------------------------------------------------------------------
def _cifar(root, n=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = osp.join(root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        entry = {'labels': rng.integers(0, 10, n).tolist(), 'data': rng.integers(0, 255, (n, 3072), dtype=np.uint8)}
        with open(osp.join(folder, name), 'wb') as f:
            pickle.dump(entry, f)
    return root


def _stl10(root, n=2):
    folder = osp.join(root, 'stl10_binary')
    os.makedirs(folder, exist_ok=True)
    for split in ('train', 'test'):
        np.zeros((n, 3, 96, 96), np.uint8).tofile(osp.join(folder, f'{split}_X.bin'))
        np.arange(1, n + 1, dtype=np.uint8).tofile(osp.join(folder, f'{split}_y.bin'))
    return root


@pytest.mark.parametrize('damage,problem', [
    ('truncate', 'cannot be unpickled ('),
    ('random', 'cannot be unpickled'),
    ('empty', 'cannot be unpickled (EOFError'),
    ('no_data', "holds no 'data' and 'labels' entries (found: ['batch_label'])"),
    ('short_rows', "'data' is uint8 of shape (4, 100), not uint8 rows of 3072 values"),
    ('labels', 'label values 0..12 outside 0..9'),
    ('count', '3 labels for 4 images'),
])
def test_corrupt_cifar_file_is_named(tmp_path, damage, problem):
    root = _cifar(str(tmp_path))
    path = osp.join(root, 'cifar-10-batches-py', 'data_batch_3')
    entry = {'labels': [0, 1, 12, 3], 'data': np.zeros((4, 3072), np.uint8)}
    if damage == 'truncate':
        _truncate(path)
    elif damage == 'random':
        open(path, 'wb').write(np.random.default_rng(1).bytes(5000))
    elif damage == 'empty':
        open(path, 'wb').close()
    else:
        entry = {'no_data': {'batch_label': 'x'}, 'labels': entry, 'count': dict(entry, labels=[0, 1, 2]),
                 'short_rows': {'labels': [0] * 4, 'data': np.zeros((4, 100), np.uint8)}}[damage]
        with open(path, 'wb') as f:
            pickle.dump(entry, f)
    with pytest.raises(DatasetCorruptError) as e:
        load_split('cifar10', root, 'train')
    msg = str(e.value)
    assert msg.startswith(f'{path}: ') and problem in msg, msg
    assert 'CIFAR-10' in msg and '--download' in msg
    assert load_split('cifar10', root, 'test')[0].shape == (4, 3, 32, 32)  # the other split still loads


@pytest.mark.parametrize('damage,file,problem', [
    ('truncate_x', 'train_X.bin', '13824 bytes, not a positive multiple of 3 x 96 x 96 = 27648'),
    ('empty_x', 'train_X.bin', '0 bytes, not a positive multiple'),
    ('short_y', 'train_y.bin', '1 labels for 2 images'),
    ('labels', 'train_y.bin', 'label values 0..2 outside 1..10'),
])
def test_corrupt_stl10_file_is_named(tmp_path, damage, file, problem):
    root = _stl10(str(tmp_path))
    path = osp.join(root, 'stl10_binary', file)
    if damage == 'truncate_x':
        _truncate(path, keep=0.25)
    elif damage == 'empty_x':
        open(path, 'wb').close()
    elif damage == 'short_y':
        np.array([1], np.uint8).tofile(path)
    else:
        np.array([0, 2], np.uint8).tofile(path)
    with pytest.raises(DatasetCorruptError) as e:
        load_split('stl10', root, 'train')
    assert str(e.value).startswith(f'{path}: ') and problem in str(e.value), str(e.value)


# --- classification: corrupt and foreign checkpoints ------------------------------------------------------
@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A real checkpoint of tools/train_cls.py (one epoch of a tiny network on a tiny CIFAR-10) and its data."""
    root = tmp_path_factory.mktemp('trained')
    data = _cifar(str(root / 'data'))
    run = str(root / 'run')
    out = _run(['tools/train_cls.py', *TINY, '--dataset', 'cifar10', '--data-dir', data, '-b', '8', '-j', '0',
                '--no-progress', '--epochs', '1', '--output', run])
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(data=data, run=run, ckpt=osp.join(run, 'last.pth.tar'))


def _mmseg_checkpoint(path):
    """What mmengine's CheckpointHook writes: meta, state_dict, the message hub's HistoryBuffers, optimizer."""
    pytest.importorskip('mmengine', reason='writing an mmengine checkpoint needs the seg extra')
    from mmengine.logging import HistoryBuffer

    hub = {'log_scalars': {'train/loss': HistoryBuffer([1.0, 0.5], [1, 1])}, 'runtime_info': {'iter': 2}}
    torch.save(dict(meta=dict(iter=2, mmengine_version='0.10.7'), state_dict={'backbone.w': torch.ones(2)},
                    message_hub=hub, optimizer={}), path)


def _bad_checkpoint(kind, good, path):
    """A bad checkpoint of ``kind`` at ``path``; returns the words its message must hold."""
    data = open(good, 'rb').read()
    if kind == 'random':
        open(path, 'wb').write(np.random.default_rng(0).bytes(2000))
        return 'cannot be read as a torch checkpoint, truncated or corrupt?'
    if kind == 'truncated':
        open(path, 'wb').write(data[:len(data) // 2])
        return 'cannot be read as a torch checkpoint, truncated or corrupt?'
    if kind == 'empty':
        open(path, 'wb').close()
        return 'the file is empty (0 bytes), not a torch checkpoint'
    if kind == 'state_dict':
        torch.save(timm.create_model('resnet44_cifar').state_dict(), path)
        return 'a bare state dict'
    if kind == 'other_model':  # the weights of one model recorded as another
        ckpt = torch.load(good, weights_only=True)
        ckpt.update(arch='resnet44_cifar', model_kwargs={'num_classes': 10})
        torch.save(ckpt, path)
        return "does not fit resnet44_cifar {'num_classes': 10}"
    if kind == 'mmseg':
        _mmseg_checkpoint(path)
        return 'an mmengine / mmseg checkpoint?'
    raise ValueError(kind)


BAD_CHECKPOINTS = ('random', 'truncated', 'empty', 'state_dict', 'other_model', 'mmseg')


@pytest.mark.parametrize('kind', BAD_CHECKPOINTS)
def test_load_model_names_the_file_and_the_problem(trained, tmp_path, kind):
    path = str(tmp_path / f'{kind}.pth.tar')
    words = _bad_checkpoint(kind, trained['ckpt'], path)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert str(e.value).startswith(f'{path}: ') and words in str(e.value), str(e.value)
    assert '\n' not in str(e.value)


def _call(tool, argv, capsys):
    """Run a tool in this process; returns (exit status, stderr). Any exception other than SystemExit fails."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        with pytest.raises(SystemExit) as e:
            _tool(tool).main(argv)
    finally:  # train_cls sets up file logging into its output folder
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)
            h.close()
    return e.value.code, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize('kind', BAD_CHECKPOINTS)
def test_every_tool_stops_on_a_bad_checkpoint(trained, tmp_path, capsys, kind):
    bad = str(tmp_path / f'{kind}.pth.tar')
    words = _bad_checkpoint(kind, trained['ckpt'], bad)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'eval.json').write_text('{"earlier": 1}')
    (out / 'spectrum.json').write_text('{"earlier": 2}')
    (out / 'stability.json').write_text('{"earlier": 3}')
    run_before, out_before = _digest(trained['run']), _digest(str(out))
    calls = {
        'eval_cls': [trained['ckpt'], bad, '--data-dir', trained['data'], '-j', '0',
                     '--output', str(out / 'eval.json')],
        'spectrum': [bad, '--output', str(out)],
        'stability': [trained['ckpt'], bad, '--data-dir', trained['data'], '--num-images', '2', '--output', str(out)],
        'train_cls': [*TINY, '--dataset', 'cifar10', '--data-dir', trained['data'], '-b', '8', '-j', '0',
                      '--no-progress', '--epochs', '2', '--output', trained['run'], '--resume', bad],
    }
    for tool, argv in calls.items():
        code, err = _call(tool, argv, capsys)
        if tool == 'train_cls' and kind == 'other_model':  # --resume compares the model first
            words = "it holds resnet44_cifar {'num_classes': 10}, not --model hamiltonian74"
        assert code == 2, (tool, err)
        assert f'{bad}: ' in err and words in err, (tool, err)
        assert trained['ckpt'] + ':' not in err and 'usage:' not in err, (tool, err)  # the good one is not blamed
    assert _digest(trained['run']) == run_before  # the resumed run's checkpoints, logs and summary are untouched
    assert _digest(str(out)) == out_before


def test_eval_cls_names_every_bad_checkpoint_without_traceback(trained, tmp_path):
    bad = [str(tmp_path / f'{k}.pth.tar') for k in ('random', 'mmseg')]
    for kind, path in zip(('random', 'mmseg'), bad):
        _bad_checkpoint(kind, trained['ckpt'], path)
    out = _run(['tools/eval_cls.py', trained['ckpt'], *bad, '--data-dir', trained['data'], '-j', '0',
                '--output', str(tmp_path / 'eval.json')])
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 2 and errors[0].startswith(f'eval_cls.py: error: {bad[0]}: ') and errors[1].startswith(
        f'{bad[1]}: '), out.stderr
    assert not (tmp_path / 'eval.json').exists() and out.stdout == ''


@pytest.mark.slow
def test_every_tool_stops_on_a_corrupt_dataset_file(trained, tmp_path, capsys):
    data = _cifar(str(tmp_path / 'data'))
    bad = osp.join(data, 'cifar-10-batches-py', 'test_batch')
    _truncate(bad)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'eval.json').write_text('{"earlier": 1}')
    (out / 'stability.json').write_text('{"earlier": 3}')
    before = _digest(str(out))
    calls = {
        'eval_cls': [trained['ckpt'], '--data-dir', data, '-j', '0', '--output', str(out / 'eval.json')],
        'stability': [trained['ckpt'], '--data-dir', data, '--num-images', '2', '--output', str(out)],
        'train_cls': [*TINY, '--dataset', 'cifar10', '--data-dir', data, '-b', '8', '-j', '0', '--no-progress',
                      '--epochs', '1', '--output', str(out / 'run')],
    }
    for tool, argv in calls.items():
        code, err = _call(tool, argv, capsys)
        assert code == 2, (tool, err)
        assert f'{bad}: cannot be unpickled' in err and '--download' in err and 'usage:' not in err, (tool, err)
    files = _digest(str(out))
    assert {k: v for k, v in files.items() if not k.startswith('run')} == before
    assert not any(f.endswith('.pth.tar') for f in files)  # train_cls stopped before its first checkpoint
    assert json.loads((out / 'eval.json').read_text()) == {'earlier': 1}


def test_read_checkpoint_accepts_the_real_one(trained):
    ckpt = read_checkpoint(trained['ckpt'])
    assert ckpt['arch'] == 'hamiltonian74' and ckpt['dataset'] == 'cifar10' and ckpt['data_mean'].shape == (3, 32, 32)
