"""Export a timm classifier or an mmseg segmentor to ONNX and a torch.export program, checked in onnxruntime.

    python tools/export.py nl_hamiltonian74 --checkpoint output/train_cls/nl_hamiltonian74-digits/last.pth.tar
    python tools/export.py resnet44_cifar.cifar100 --checkpoint r44_c100_state_dict.pth --output out/r44
    python tools/export.py configs/bdd100k_pide_diffusion.py --checkpoint work_dirs/.../iter_175000.pth

Writes ``<name>.onnx`` (dynamo exporter, opset >= 18), ``<name>.pt2`` (``torch.export.save``) and ``export.json``
to ``--output``, with a dynamic batch dimension (and spatial size, unless the network fixes it), then runs the
ONNX file in onnxruntime and the program in PyTorch at each ``--batch-sizes`` and prints the max abs difference
to eager PyTorch; exits with status 1 if a difference exceeds ``--atol``. Classifiers take mean-subtracted
images; segmentors take their data preprocessor's output and return the decode head's logits.
"""
import argparse
import json
import os.path as osp
import sys

from timm.utils import ParseKwargs

from pide_zoo.checkpoint import load_model
from pide_zoo.export import MIN_OPSET, SegmentorLogits, export_and_check


class _CfgOptions(argparse.Action):
    """mmengine's ``DictAction`` (key=value with lists and tuples), imported only when the option is used."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            from mmengine.config import DictAction
        except ImportError:
            parser.error(f'{option_string} needs mmengine (pip install -e .[seg])')
        DictAction(self.option_strings, self.dest)(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('model', help='a timm model name (tags allowed: nl_hamiltonian74.stl10) or an mmseg config (.py)')
    p.add_argument('--checkpoint', default=None,
                   help='tools/train_cls.py checkpoint or plain state dict (timm model), mmseg checkpoint (config);\n'
                        'without it the freshly initialised weights are exported')
    p.add_argument('--output', default='', help='output folder (default: output/export/<name>)')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='extra timm.create_model arguments for a plain state dict, e.g. num_classes=100')
    p.add_argument('--use-ema', action='store_true', help='export the EMA weights of a train_cls.py checkpoint')
    p.add_argument('--cfg-options', nargs='+', action=_CfgOptions, help='mmseg config overrides, key=value')
    p.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                   help="traced input size (default: the model's cfg, or the segmentor's data preprocessor)")
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 3], help='checked batch sizes (default: 1 3)')
    p.add_argument('--atol', type=float, default=1e-4, help='allowed max abs difference at an output scale of 0 '
                   '(default: 1e-4)')
    p.add_argument('--rtol', type=float, default=1e-5, help="allowed difference per unit of the output's scale, "
                   'max |eager output|: a check passes when diff <= atol + rtol * scale (default: 1e-5)')
    p.add_argument('--opset', type=int, default=MIN_OPSET, help=f'ONNX opset, >= {MIN_OPSET} (default: %(default)s)')
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.opset < MIN_OPSET:
        parser.error(f'--opset must be >= {MIN_OPSET} (the dynamo exporter), got {args.opset}')
    if any(b < 1 for b in args.batch_sizes):
        parser.error(f'--batch-sizes must be positive, got {args.batch_sizes}')
    if args.atol < 0 or args.rtol < 0:
        parser.error(f'--atol and --rtol must be >= 0, got {args.atol} and {args.rtol}')
    if args.input_size is not None and min(args.input_size) < 1:
        parser.error(f'--input-size must be positive, got {args.input_size}')
    segmentor = args.model.endswith('.py')
    if segmentor and (args.model_kwargs or args.use_ema):
        parser.error('--model-kwargs and --use-ema apply to timm models; change a config with --cfg-options')
    if not segmentor and args.cfg_options:
        parser.error('--cfg-options applies to mmseg configs (.py)')
    try:
        model, info = load_model(args.checkpoint, args.model, args.model_kwargs or None, use_ema=args.use_ema,
                                 cfg_options=args.cfg_options)
    except (FileNotFoundError, ImportError, ValueError) as e:
        parser.error(str(e))
    if segmentor:
        name = osp.splitext(osp.basename(args.model))[0]
        model = SegmentorLogits(model).eval()
    else:
        name = args.model.replace('.', '-')
    fixed = info['fixed_input_size']
    size = tuple(args.input_size) if args.input_size else info['input_size']
    if size is None:
        parser.error(f'{args.model}: the data preprocessor fixes no input size; give --input-size C H W')
    output = args.output or osp.join('output', 'export', name)
    print(f'exporting {args.model} ({args.checkpoint or "freshly initialised weights"}), input (batch, {size[0]}, '
          f'{size[1]}, {size[2]}) -> {output}', flush=True)
    report = export_and_check(model, size, output, name, fixed_spatial=fixed, batch_sizes=args.batch_sizes,
                              opset=args.opset)
    report.update(model=args.model, checkpoint=args.checkpoint, atol=args.atol, rtol=args.rtol)
    dynamic = 'batch' if report['fixed_spatial'] else 'batch and spatial size'
    print(f"  {report['onnx']} (opset {args.opset}, input {report['onnx_input_shape']}, dynamic {dynamic}, "
          f"{report['export_s']['onnx']} s) and {report['pt2']} ({report['export_s']['pt2']} s)")
    big = report['largest_value']
    print(f"  largest tensor in the ONNX graph for input {tuple(big['input_shape'])}: {tuple(big['shape'])}")
    failed = []
    for c in report['checks']:
        print(f"  input {tuple(c['shape'])}, output scale {c['output_scale']:.3g}: max abs diff to eager: onnxruntime "
              f"{c['onnx_max_abs_diff']:.3g} ({c['onnx_rel_diff']:.2g} of the scale), torch.export program "
              f"{c['pt2_max_abs_diff']:.3g} ({c['pt2_rel_diff']:.2g})")
        allowed = args.atol + args.rtol * c['output_scale']
        failed += [f"{what} {c[f'{what}_max_abs_diff']:.3g} > {allowed:.3g} at input {tuple(c['shape'])}"
                   for what in ('onnx', 'pt2') if c[f'{what}_max_abs_diff'] > allowed]
    report['passed'] = not failed
    with open(osp.join(output, 'export.json'), 'w') as f:
        json.dump(report, f, indent=2)
    if failed:
        print(f'FAILED (atol {args.atol} + rtol {args.rtol} x output scale): ' + '; '.join(failed), file=sys.stderr)
        return 1
    worst = max(max(c['onnx_rel_diff'], c['pt2_rel_diff']) for c in report['checks'])
    print(f'ok: every difference <= atol {args.atol} + rtol {args.rtol} x output scale (largest relative '
          f'{worst:.2g}); {osp.join(output, "export.json")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
