"""tools/export.py and pide_zoo.export: one ONNX file (dynamo exporter) and one torch.export program per model,
run at batch 1 and 3 against eager PyTorch."""
import json
import os.path as osp
import re

import pytest
import timm
import torch
from test_cls_tools import _run, _tool

import pide_zoo  # noqa: F401  (registers the models)
from pide_zoo.checkpoint import CHECKPOINT_FORMAT, checkpoint_meta
from pide_zoo.export import export_onnx, export_program, onnx_value_shapes
from pide_zoo.layers import PAPER_WIDTHS, PIDEBlock

onnx = pytest.importorskip('onnx', reason='the export extra: pip install -e .[export]')
ort = pytest.importorskip('onnxruntime', reason='the export extra: pip install -e .[export]')

ATOL = 1e-4


def _images(*shape, generator=None):
    """Random inputs in the range of mean-subtracted [0, 1] images (a trained nonlocal block is not made for
    N(0, 1) noise: its dot-product kernel grows with the cube of the input)."""
    return torch.rand(*shape, generator=generator) - 0.5


def _calibrate_norms(model, size, seed=0):
    """Batch-norm statistics of random inputs, as training leaves them: activations of order one, so a
    1e-4 tolerance is as strict as for a trained network (fresh deep ResNets reach logits of ~1e3)."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(_images(8, *size, generator=gen))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def _onnx_vs_eager(path, model, shapes, seed=1):
    """Max |onnxruntime - eager| for each input shape, all through one session of one file."""
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    gen = torch.Generator().manual_seed(seed)
    diffs = []
    for shape in shapes:
        x = _images(*shape, generator=gen)
        with torch.no_grad():
            want = model(x)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == tuple(want.shape)
        diffs.append(float((torch.from_numpy(got) - want).abs().max()))
    return diffs


def _input_dims(path):
    return [d.dim_param or d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]


# (model, checkpoint kind, spatial size fixed by the head, (N, M) of the first diffusion block at 32 px)
CLASSIFIERS = [('nl_hamiltonian74', 'train_cls', True, (32 * 32, 16 * 16)),
               ('nl_hamiltonian74_frac', 'state_dict', True, None),
               ('resnet44_cifar', 'state_dict', False, None)]


@pytest.mark.slow
@pytest.mark.parametrize('name,kind,fixed,nm', CLASSIFIERS, ids=[c[0] for c in CLASSIFIERS])
def test_classifier_export_matches_eager(name, kind, fixed, nm, tmp_path):
    torch.manual_seed(0)
    model = _calibrate_norms(timm.create_model(name), (3, 32, 32))
    ckpt = str(tmp_path / 'model.pth')
    if kind == 'train_cls':  # what tools/train_cls.py writes: the model name and arguments with the weights
        meta = checkpoint_meta(name, dict(num_classes=10, img_size=32), 'cifar10', torch.zeros(3, 32, 32))
        torch.save(dict(meta, format=CHECKPOINT_FORMAT, epoch=0, state_dict=model.state_dict()), ckpt)
    else:
        torch.save(model.state_dict(), ckpt)
    out_dir = str(tmp_path / 'out')
    out = _run(['tools/export.py', name, '--checkpoint', ckpt, '--output', out_dir])
    log = out.stdout + out.stderr
    assert re.search(r'input \(1, 3, 32, 32\), output scale \S+: max abs diff to eager: onnxruntime \S+ \(\S+ of '
                     r'the scale\)', log), log
    report = json.loads(open(osp.join(out_dir, 'export.json')).read())
    assert report['passed'] and report['opset'] >= 18
    assert report['tiled_blocks'] == (3 if name == 'nl_hamiltonian74_frac' else 0)  # one per Unit
    assert [c['shape'][0] for c in report['checks']] == [1, 3]
    assert all(c['onnx_max_abs_diff'] <= ATOL and c['pt2_max_abs_diff'] <= ATOL for c in report['checks'])
    assert all(c['onnx_rel_diff'] == c['onnx_max_abs_diff'] / c['output_scale'] > 0 for c in report['checks'])

    onnx_path = osp.join(out_dir, f'{name}.onnx')
    dims = _input_dims(onnx_path)
    assert isinstance(dims[0], str) and dims[1] == 3  # dynamic batch
    if fixed:  # the flatten head fixes 32 x 32
        assert dims[2:] == [32, 32]
        shapes = [(1, 3, 32, 32), (3, 3, 32, 32)]
    else:
        assert all(isinstance(d, str) for d in dims[2:])
        shapes = [(1, 3, 32, 32), (3, 3, 40, 48)]
    assert max(_onnx_vs_eager(onnx_path, model, shapes)) <= ATOL
    program = torch.export.load(osp.join(out_dir, f'{name}.pt2')).module()
    x = _images(*shapes[1])
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), atol=ATOL, rtol=0)
    if nm is not None:  # the low-rank diffusion path: no tensor holds the N x M kernel of one image
        largest = max(torch.Size(s).numel() for s in onnx_value_shapes(onnx_path, _images(1, 3, 32, 32)).values())
        assert largest < nm[0] * nm[1], largest


@pytest.mark.slow
def test_value_shapes_find_a_dense_kernel(tmp_path):
    """What the N x M checks rely on: the dense path's kernel shows up, the low-rank path has none."""
    x = torch.randn(2, 4, 8, 8)  # N = 64 queries, M = 16 keys
    largest = {}
    for method in ('dense', 'lowrank'):
        block = PIDEBlock(4, subsample=2, method=method, **PAPER_WIDTHS).eval()
        path = str(tmp_path / f'{method}.onnx')
        export_onnx(export_program(block, x, fixed_spatial=True), path)
        largest[method] = max(torch.Size(s).numel() for s in onnx_value_shapes(path, x[:1]).values())
    assert largest['dense'] >= 64 * 16 > largest['lowrank']


@pytest.mark.slow
def test_segmentor_export_matches_eager(tmp_path):
    pytest.importorskip('mmseg', reason='the seg extra: pip install -e .[seg]')
    from mmseg.apis import init_model
    from test_seg import _bdd_options, tiny_bdd_160x90

    cfg = 'configs/bdd100k_pide_diffusion.py'
    work, out_dir = str(tmp_path / 'work'), str(tmp_path / 'out')
    _run(['tools/train.py', cfg, '--work-dir', work, *_bdd_options(tiny_bdd_160x90(str(tmp_path / 'bdd')), 2)])
    ckpt = osp.join(work, 'iter_2.pth')
    # config and checkpoint only: the input size comes from the mean image the checkpoint holds
    out = _run(['tools/export.py', cfg, '--checkpoint', ckpt, '--output', out_dir])
    log = out.stdout + out.stderr
    assert 'input (batch, 3, 90, 160)' in log and 'ok: every difference <= atol' in log
    report = json.loads(open(osp.join(out_dir, 'export.json')).read())
    assert [c['shape'] for c in report['checks']] == [[1, 3, 90, 160], [3, 3, 90, 160]]
    assert all(c['onnx_max_abs_diff'] <= ATOL and c['pt2_max_abs_diff'] <= ATOL for c in report['checks'])
    onnx_path = osp.join(out_dir, 'bdd100k_pide_diffusion.onnx')
    dims = _input_dims(onnx_path)
    assert isinstance(dims[0], str) and dims[1:] == [3, 90, 160]  # dynamic batch; PIDE blocks fix the size

    segmentor = init_model(cfg, ckpt, device='cpu').eval()
    model = lambda x: segmentor(x, mode='tensor')  # noqa: E731  (the decode head's logits)
    assert max(_onnx_vs_eager(onnx_path, model, [(1, 3, 90, 160), (3, 3, 90, 160)])) <= ATOL
    # low-rank diffusion at 160 x 90 with key pooling 3: N = 14400 queries, M = 30 x 53 keys, never an N x M tensor
    shapes = onnx_value_shapes(onnx_path, _images(1, 3, 90, 160))
    assert max(torch.Size(s).numel() for s in shapes.values()) < 14400 * 1590


def test_export_tool_exit_status_and_errors(tmp_path, capsys, monkeypatch):
    export = _tool('export')
    for argv, msg in ((['resnet44_cifar', '--opset', '17'], '--opset must be >= 18'),
                      (['no_such_net'], "'no_such_net' is not a timm model name"),
                      (['configs/nowhere.py'], "config file 'configs/nowhere.py' does not exist"),
                      (['resnet44_cifar', '--checkpoint', str(tmp_path / 'none.pth')], 'none.pth'),
                      (['resnet44_cifar', '--batch-sizes', '0'], '--batch-sizes must be positive')):
        with pytest.raises(SystemExit):
            export.main(argv)
        assert msg in capsys.readouterr().err
    meta = checkpoint_meta('hamiltonian74', {}, 'cifar10', torch.zeros(3, 32, 32))
    torch.save(dict(meta, state_dict={}), tmp_path / 'h74.pth')
    with pytest.raises(SystemExit):
        export.main(['resnet44_cifar', '--checkpoint', str(tmp_path / 'h74.pth')])
    assert "holds 'hamiltonian74', not model 'resnet44_cifar'" in capsys.readouterr().err

    # a difference above atol + rtol x the output's scale: the report says so and the exit status is 1
    def check(shape, diff, scale):
        return dict(shape=shape, output_scale=scale, onnx_max_abs_diff=diff, pt2_max_abs_diff=0.0,
                    onnx_rel_diff=diff / scale, pt2_rel_diff=0.0)

    def fake_export(model, size, output, name, **kw):
        return dict(onnx='m.onnx', pt2='m.pt2', onnx_input_shape=['batch', 3, 32, 32], export_s=dict(onnx=0, pt2=0),
                    fixed_spatial=False,
                    largest_value=dict(shape=[1, 64, 8, 8], input_shape=[1, 3, 32, 32]),
                    checks=[check([1, 3, 32, 32], 2e-6, 1.0), check([3, 3, 32, 32], 3e-3, 100.0)])

    monkeypatch.setattr(export, 'export_and_check', fake_export)
    assert export.main(['resnet44_cifar', '--output', str(tmp_path), '--atol', '1e-3', '--rtol', '1e-5']) == 1
    err = capsys.readouterr().err
    assert 'FAILED (atol 0.001 + rtol 1e-05 x output scale): onnx 0.003 > 0.002 at input (3, 3, 32, 32)' in err
    assert json.loads((tmp_path / 'export.json').read_text())['passed'] is False
    # the same difference is 3e-5 of a scale of 100: within rtol 1e-4
    assert export.main(['resnet44_cifar', '--output', str(tmp_path), '--atol', '1e-3', '--rtol', '1e-4']) == 0
    assert 'largest relative 3e-05' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        export.main(['resnet44_cifar', '--rtol', '-1'])
    assert '--atol and --rtol must be >= 0' in capsys.readouterr().err


@pytest.mark.parametrize('operator', ['frac_laplacian', 'inv_frac_laplacian', 'log'])
def test_exported_block_runs_with_autograd(operator):
    """An exported program of a fused-path block runs with gradients too (it records the forward pass, which
    therefore has no in-place update of a tensor autograd saves), and they match the eager block's."""
    torch.manual_seed(0)
    block = PIDEBlock(8, operator=operator, method='fused', ls_init_value=1.0).eval()  # not the identity
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        program = torch.export.export(block, (x,))
    exported, eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = program.module()(exported)
    out.square().sum().backward()
    block(eager).square().sum().backward()
    torch.testing.assert_close(out, block(x))
    torch.testing.assert_close(exported.grad, eager.grad, rtol=1e-4, atol=1e-6)
