"""Parameters and FLOPs of any mmseg config, PIDE blocks counted the paper's way and this project's way.

    python tools/get_flops.py configs/bdd100k_pide_diffusion.py
    python tools/get_flops.py configs/bdd100k_pide_frac.py --nonlocal-method dense
    python tools/get_flops.py mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py --shape 512 1024

mmseg's ``tools/analysis_tools/get_flops.py`` for this project: the segmentor's tensor-mode forward
(backbone and decode head; auxiliary heads are training only and dropped, as mmseg's tool does) on a
random (1, 3, H, W) input, counted by fvcore with the handles of :mod:`pide_zoo.flops`. Units are
mmseg's: GFLOPs (one multiply-add is one flop) and M parameters. PIDE blocks are counted with the
paper's dense N x M kernel and with this project's path (``auto``: low rank for diffusion, tiled for the
distance kernels); ``--nonlocal-method both`` prints the two side by side. The default input size
comes from the config's test pipeline (its ``Resize``) or crop size; nothing is downloaded: pretrained
weights named by the config are not loaded, as counts do not depend on them.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

try:
    import pide_zoo  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from mmengine.config import Config, DictAction
from torch import nn

from pide_zoo.flops import count_params, module_flop_analysis, pide_block_names

METHODS = ('dense', 'auto', 'both')
METHOD_TITLES = {'dense': "dense: the paper's N x M kernel", 'auto': "auto: pide_zoo's low-rank / tiled path"}
SPLIT_LINE = '=' * 30


def load_config(config: str, cfg_options: Optional[Dict[str, Any]] = None) -> Config:
    """The config at path ``config`` or in an installed package as ``'mmseg::group/config.py'``."""
    if '::' in config:
        package = config.split('::', 1)[0]
        if importlib.util.find_spec(package) is None:
            raise FileNotFoundError(f'config {config!r}: package {package!r} is not installed')
        from mmengine.hub import get_config

        try:
            cfg = get_config(config)
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f'config {config!r} not found in {package}: {e}') from None
    elif not os.path.isfile(config):
        raise FileNotFoundError(f'config file {config!r} does not exist')
    else:
        cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if 'model' not in cfg:
        raise ValueError(f'config {config!r} defines no model')
    return cfg


def _is_pretrained_init(init_cfg: Any) -> bool:
    return isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained'


def drop_pretrained(node: Any, path: str = 'model') -> List[str]:
    """Remove, in place, every pretrained checkpoint a model config names (``pretrained``, ``init_cfg`` of type
    ``Pretrained``, ``TIMMBackbone``'s ``checkpoint_path``); returns what was removed, for the report."""
    dropped = []
    if isinstance(node, dict):
        for key in list(node):
            value, where = node[key], f'{path}.{key}'
            if key == 'pretrained' and value and isinstance(value, (str, bool)):
                node[key] = None if isinstance(value, str) else False
                dropped.append(f'{where}={value!r}')
            elif key == 'checkpoint_path' and value and str(node.get('type', '')).endswith('TIMMBackbone'):
                node[key] = ''
                dropped.append(f'{where}={value!r}')
            elif key == 'init_cfg' and _is_pretrained_init(value):
                node[key] = None
                dropped.append(f"{where} (Pretrained {value.get('checkpoint')!r})")
            elif key == 'init_cfg' and isinstance(value, list) and any(map(_is_pretrained_init, value)):
                node[key] = [c for c in value if not _is_pretrained_init(c)]
                dropped += [f"{where} (Pretrained {c.get('checkpoint')!r})" for c in value if _is_pretrained_init(c)]
            else:
                dropped += drop_pretrained(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            dropped += drop_pretrained(value, f'{path}[{i}]')
    return dropped


def _hw(size: Any, hw_order: bool) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    a, b = (int(v) for v in size[:2])
    return (a, b) if hw_order else (b, a)


def default_input_shape(cfg: Config) -> Tuple[Tuple[int, int], str]:
    """(H, W) the config's test pipeline resizes to, else its crop size, and where it came from."""
    test_pipeline = (cfg.get('test_dataloader') or {}).get('dataset', {}).get('pipeline') \
        or cfg.get('test_pipeline') or []
    for t in test_pipeline:
        if isinstance(t, dict) and str(t.get('type', '')).split('.')[-1] == 'Resize' and t.get('scale'):
            # mmcv's Resize scale is (w, h); with keep_ratio the image fits into it (images of that aspect: equal).
            keep = f", keep_ratio={bool(t.get('keep_ratio'))}"
            return _hw(t['scale'], hw_order=False), f"test pipeline: Resize scale={tuple(t['scale'])}{keep}"
    size = (cfg.model.get('data_preprocessor') or {}).get('size')
    if size:
        return _hw(size, hw_order=True), f'crop size: model.data_preprocessor.size={tuple(size)}'
    train_pipeline = (cfg.get('train_dataloader') or {}).get('dataset', {}).get('pipeline') \
        or cfg.get('train_pipeline') or []
    for t in train_pipeline:
        if isinstance(t, dict) and str(t.get('type', '')).split('.')[-1] == 'RandomCrop':
            return _hw(t['crop_size'], hw_order=True), f"crop size: train pipeline RandomCrop " \
                                                       f"crop_size={tuple(t['crop_size'])}"
    raise ValueError('the config sets no input size (no Resize in its test pipeline, no crop size); '
                     'pass --shape H W')


def _test_padding(model: nn.Module, hw: Tuple[int, int]) -> Tuple[Tuple[int, int], str]:
    """The size mmseg's data preprocessor pads a test image of ``hw`` to (its ``test_cfg``)."""
    test_cfg = getattr(getattr(model, 'data_preprocessor', None), 'test_cfg', None) or {}
    h, w = hw
    size, divisor = test_cfg.get('size'), test_cfg.get('size_divisor')
    if size:
        h, w = max(h, size[0]), max(w, size[1])
    if divisor:
        h, w = math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor
    note = f'padded from {hw} by data_preprocessor.test_cfg {dict(test_cfg)}' if (h, w) != tuple(hw) else ''
    return (h, w), note


def build_segmentor(cfg: Config) -> Tuple[nn.Module, List[str], Dict[str, int]]:
    """The config's model, built by mmseg's registry without pretrained weights, with SyncBN reverted and
    auxiliary heads dropped. Returns it, the pretrained entries removed and the parameters dropped per head."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope(cfg.get('default_scope', 'mmseg'))
    model_cfg = cfg.model.copy()
    dropped = drop_pretrained(model_cfg)
    model = MODELS.build(model_cfg)
    not_counted = {}
    if getattr(model, 'auxiliary_head', None) is not None:
        not_counted['auxiliary_head'] = count_params(model.auxiliary_head)
        model.auxiliary_head = None
    return revert_sync_batchnorm(model), dropped, not_counted


def get_flops(config: str, shape: Optional[Sequence[int]] = None, nonlocal_method: str = 'both',
              cfg_options: Optional[Dict[str, Any]] = None, device: Optional[str] = None) -> Dict[str, Any]:
    """Parameters and FLOPs of the segmentor of ``config``; see the module docstring.

    Args:
        config: a config path or ``'mmseg::group/config.py'``.
        shape: (H, W) or (S,) of the input; None: from the config (:func:`default_input_shape`).
        nonlocal_method: ``'dense'``, ``'auto'`` or ``'both'`` (PIDE blocks only).
        cfg_options: overrides merged into the config.
        device: where to trace (default: CUDA if available, as mmseg's tool).

    Returns:
        A dict with ``input_shape`` (1, 3, H, W), ``shape_source``, ``params``, ``params_not_counted``,
        ``pretrained_dropped``, ``flops`` (method -> total), ``pide_blocks`` (name -> method -> flops)
        and ``unsupported_ops`` (method -> op -> count).
    """
    if nonlocal_method not in METHODS:
        raise ValueError(f'nonlocal_method must be one of {METHODS}, got {nonlocal_method!r}')
    cfg = load_config(config, cfg_options)
    if shape is None:
        try:
            hw, source = default_input_shape(cfg)
        except ValueError as e:
            raise ValueError(f'config {config!r}: {e}') from None
    else:
        if len(shape) not in (1, 2) or any(int(s) < 1 for s in shape):
            raise ValueError(f'shape must be H W or one size, positive, got {list(shape)}')
        hw, source = _hw(list(shape), hw_order=True), '--shape'
    model, dropped, not_counted = build_segmentor(cfg)
    hw, padding = _test_padding(model, hw)
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model.to(device)
    x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(0)).to(device)
    blocks = pide_block_names(model)
    methods = ('dense', 'auto') if nonlocal_method == 'both' else (nonlocal_method,)
    flops, per_block, unsupported = {}, {name: {} for name in blocks}, {}
    for method in methods if blocks else methods[:1]:
        fa = module_flop_analysis(model, (x,), nonlocal_method=method)
        flops[method] = round(fa.total())
        by_module = fa.by_module()
        for name in blocks:
            per_block[name][method] = round(by_module[name])
        unsupported[method] = dict(fa.unsupported_ops())
    return dict(config=config, input_shape=(1, 3, *hw), shape_source=source + (f'; {padding}' if padding else ''),
                params=count_params(model), params_not_counted=not_counted, pretrained_dropped=dropped,
                flops=flops, pide_blocks=per_block, unsupported_ops=unsupported)


def _g(flops: float) -> str:
    return f'{flops / 1e9:.4g}'


def format_result(result: Dict[str, Any]) -> str:
    """mmseg's get_flops report (Input shape, Flops, Params) plus the PIDE blocks per method."""
    flops, blocks = result['flops'], result['pide_blocks']
    if blocks:
        flops_line = ' | '.join(f'{_g(v)} GFLOPs ({METHOD_TITLES[m]})' for m, v in flops.items())
    else:
        flops_line = f'{_g(next(iter(flops.values())))} GFLOPs'
    lines = [SPLIT_LINE,
             "Compute type: fvcore with pide_zoo.flops handles, model(inputs, mode='tensor') on a random input",
             f"Input shape: {tuple(result['input_shape'])} ({result['shape_source']})",
             f'Flops: {flops_line}',
             f"Params: {result['params'] / 1e6:.3f} M ({result['params']:,})",
             SPLIT_LINE]
    if blocks:
        methods = list(flops)
        rows = [(name, *(_g(v[m]) for m in methods)) for name, v in blocks.items()]
        rows.append((f'all {len(blocks)} PIDE blocks', *(_g(sum(v[m] for v in blocks.values())) for m in methods)))
        rows.append(('whole model', *(_g(flops[m]) for m in methods)))
        header = ('GFLOPs', *methods)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines += [fmt(header), *map(fmt, rows)]
    for head, n in result['params_not_counted'].items():
        lines.append(f'Not counted: {head} ({n / 1e6:.3f} M params; training only, as in mmseg\'s get_flops)')
    if result['pretrained_dropped']:
        lines.append('Not loaded (counts need no weights): ' + ', '.join(result['pretrained_dropped']))
    for method, ops in result['unsupported_ops'].items():
        if ops:
            lines.append(f'Unsupported ops, counted as 0 ({method}): '
                         + ', '.join(f'{op} x{n}' for op, n in sorted(ops.items())))
    return '\n'.join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help="config file, or an installed package's config as mmseg::group/config.py")
    parser.add_argument('--shape', type=int, nargs='+', metavar='SIZE',
                        help='input H W (or one size for H = W); default: from the config')
    parser.add_argument('--nonlocal-method', default='both', help=f'PIDE block evaluation counted: one of '
                        f"{', '.join(METHODS)} (default: %(default)s)")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings, key=value')
    args = parser.parse_args(argv)
    if args.nonlocal_method not in METHODS:
        parser.error(f"--nonlocal-method must be one of {', '.join(METHODS)}, got {args.nonlocal_method!r}")
    if args.shape is not None and (len(args.shape) > 2 or min(args.shape) < 1):
        parser.error(f'--shape must be H W or one size, positive, got {" ".join(map(str, args.shape))}')
    args.parser = parser
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    try:
        result = get_flops(args.config, args.shape, args.nonlocal_method, args.cfg_options)
    except (FileNotFoundError, ValueError) as e:
        args.parser.exit(2, f'{args.parser.prog}: error: {e}\n')
    print(format_result(result))
    return result


if __name__ == '__main__':
    main()
