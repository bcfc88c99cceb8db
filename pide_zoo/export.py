"""Export for deployment: a ``torch.export`` program (``.pt2``) and ONNX, checked against eager PyTorch.

ONNX goes through PyTorch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, opset >= 18), fed
with the ``torch.export`` program itself, so both files hold the same graph. The batch dimension is
dynamic, and so is the spatial size unless the network fixes it (the paper's pool + flatten head,
``fixed_input_size`` in the timm cfg) or has PIDE blocks (see :func:`export_and_check`). The graphs take
what the network's first layer takes:

* classifiers: images with the train split's mean already subtracted (:mod:`pide_zoo.cls`);
* mmseg segmentors: the data preprocessor's output (RGB in [0, 1] minus the mean image), and they
  return the decode head's logits (``mode='tensor'``), before any resizing.

Models come from :func:`pide_zoo.checkpoint.load_model` (checkpoint, timm name or mmseg config); segmentors are
wrapped in :class:`SegmentorLogits`. The ONNX side needs the ``export`` extra (``pip install -e .[export]``:
onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import math
import os
import os.path as osp
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .checkpoint import load_model
from .layers import PIDEBlock

__all__ = [
    'MIN_OPSET', 'SegmentorLogits', 'fix_tile_sizes', 'export_program', 'export_onnx', 'onnx_max_abs_diff',
    'export_and_check', 'onnx_value_shapes',
    'load_classifier', 'load_segmentor',  # deprecated, removed in 0.3
]

MIN_OPSET = 18  # the dynamo exporter's lowest supported opset


class SegmentorLogits(nn.Module):
    """An mmseg segmentor as a plain tensor-in, tensor-out module: preprocessed images to decode logits."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, x: Tensor) -> Tensor:
        return self.segmentor(x, mode='tensor')


def load_classifier(model_name: Optional[str] = None, checkpoint: Optional[str] = None,
                    model_kwargs: Optional[Dict[str, Any]] = None,
                    use_ema: bool = False) -> Tuple[nn.Module, Tuple[int, int, int], bool]:
    """Deprecated: ``(model, input size, fixed)``; use :func:`pide_zoo.checkpoint.load_model`. Removed in 0.3."""
    warnings.warn('pide_zoo.export.load_classifier is deprecated and will be removed in pide_zoo 0.3; use '
                  'pide_zoo.checkpoint.load_model(checkpoint, model_name)', FutureWarning, stacklevel=2)
    model, info = load_model(checkpoint, model_name, model_kwargs, use_ema=use_ema)
    return model, info['input_size'], info['fixed_input_size']


def load_segmentor(config: str, checkpoint: Optional[str] = None,
                   cfg_options: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Optional[Tuple[int, int, int]]]:
    """Deprecated: ``(SegmentorLogits, input size)``; use :func:`pide_zoo.checkpoint.load_model`. Removed in 0.3."""
    warnings.warn('pide_zoo.export.load_segmentor is deprecated and will be removed in pide_zoo 0.3; use '
                  'SegmentorLogits(pide_zoo.checkpoint.load_model(checkpoint, config)[0])', FutureWarning, stacklevel=2)
    segmentor, info = load_model(checkpoint, config, cfg_options=cfg_options)
    return SegmentorLogits(segmentor).eval(), info['input_size']


def fix_tile_sizes(model: nn.Module, example: Tensor) -> List[nn.Module]:
    """Give each tiled PIDE block without a ``tile_size`` the tile it picks for one image of ``example``'s size.

    Their default tile depends on the batch size, which an exported graph leaves open; fixed, the graph
    serves every batch size. The number of tiles still follows the spatial size, which then stays fixed.
    Returns the blocks changed.
    """
    from .layers.ops import query_tile

    keys = {}

    def record(block, args):
        keys.setdefault(block, args[0].shape[2:])

    blocks = [m for m in model.modules() if isinstance(m, PIDEBlock) and m.method != 'lowrank' and m.tile_size is None]
    hooks = [b.register_forward_pre_hook(record) for b in blocks]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    for block, (h, w) in keys.items():
        block.tile_size = query_tile(1, (h // block.subsample) * (w // block.subsample))
    return list(keys)


def _dynamic_shapes(fixed_spatial: bool) -> Tuple[Dict[int, Any]]:
    dim = torch.export.Dim.DYNAMIC
    return ({0: dim} if fixed_spatial else {0: dim, 2: dim, 3: dim},)


def export_program(model: nn.Module, example: Tensor, fixed_spatial: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` on ``example`` with a dynamic batch (and spatial size unless fixed)."""
    with torch.no_grad():
        return torch.export.export(model.eval(), (example,), dynamic_shapes=_dynamic_shapes(fixed_spatial))


def export_onnx(program: torch.export.ExportedProgram, path: str, opset: int = MIN_OPSET) -> None:
    """The dynamo exporter on an exported program, one self-contained ``.onnx`` file."""
    if opset < MIN_OPSET:
        raise ValueError(f'opset must be >= {MIN_OPSET} for the dynamo exporter, got {opset}')
    torch.onnx.export(program, f=path, dynamo=True, opset_version=opset, external_data=False, verbose=False)


def onnx_max_abs_diff(path: str, model: nn.Module, inputs: Sequence[Tensor]) -> List[float]:
    """Max |onnxruntime - eager| of each input, run through one onnxruntime session of ``path``."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    diffs = []
    with torch.no_grad():
        for x in inputs:
            want = model(x)
            got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
            if got.shape != want.shape:
                raise ValueError(f'onnxruntime output shape {tuple(got.shape)} != eager {tuple(want.shape)}')
            diffs.append((got - want).abs().max().item())
    return diffs


def _check_inputs(fixed_spatial: bool, input_size: Tuple[int, int, int],
                  batch_sizes: Sequence[int]) -> List[Tuple[int, int, int, int]]:
    """The parity shapes: each batch size at ``input_size``; with a dynamic spatial size the last one also at
    (H + 1, W + 2), so the check covers a size the graph was not traced at."""
    c, h, w = input_size
    shapes = [(b, c, h, w) for b in batch_sizes]
    if not fixed_spatial and shapes:
        shapes[-1] = (batch_sizes[-1], c, h + 1, w + 2)
    return shapes


def export_and_check(model: nn.Module, input_size: Tuple[int, int, int], output_dir: str, name: str,
                     fixed_spatial: bool = False, batch_sizes: Sequence[int] = (1, 3), opset: int = MIN_OPSET,
                     seed: int = 0) -> Dict[str, Any]:
    """Write ``<name>.pt2`` and ``<name>.onnx`` to ``output_dir`` and compare both with eager on random images.

    Returns a report: file paths, export times, the ONNX input shape (symbolic where dynamic) and, per checked
    input shape, the max abs difference of onnxruntime and of the exported program against eager, the output's
    scale (max |eager output|) and each difference relative to it.
    """
    if any(not isinstance(b, int) or b < 1 for b in batch_sizes) or not batch_sizes:
        raise ValueError(f'batch_sizes must be positive ints, got {batch_sizes!r}')
    import onnx

    os.makedirs(output_dir, exist_ok=True)
    model = model.eval()
    gen = torch.Generator().manual_seed(seed)

    def images(*shape):  # uniform in [-0.5, 0.5]: the range of mean-subtracted [0, 1] images
        return torch.rand(*shape, generator=gen) - 0.5

    example = images(2, *input_size)  # batch 2: a size-1 batch would be specialised
    tiled = fix_tile_sizes(model, example)
    # With nonlocal blocks the size stays fixed: the low-rank path's 1/M scale (a size-dependent scalar of
    # addcmul) does not convert with a symbolic size, and the tiled paths' tile count follows the size.
    fixed_spatial = fixed_spatial or any(isinstance(m, PIDEBlock) for m in model.modules())
    t0 = time.time()
    program = export_program(model, example, fixed_spatial)
    pt2 = osp.join(output_dir, f'{name}.pt2')
    torch.export.save(program, pt2)
    t1 = time.time()
    onnx_path = osp.join(output_dir, f'{name}.onnx')
    export_onnx(program, onnx_path, opset)
    t2 = time.time()

    shapes = _check_inputs(fixed_spatial, input_size, batch_sizes)
    inputs = [images(*s) for s in shapes]
    onnx_diffs = onnx_max_abs_diff(onnx_path, model, inputs)
    loaded = torch.export.load(pt2).module()
    with torch.no_grad():
        pt2_diffs = [(loaded(x) - model(x)).abs().max().item() for x in inputs]
        # the output's scale: what a difference means depends on it (logits of tens, updates of 1e-3)
        scales = [model(x).abs().max().item() for x in inputs]
    graph_input = onnx.load(onnx_path, load_external_data=False).graph.input[0]
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    # the largest tensor the ONNX graph forms for one image: memory at deployment, no N x M kernel
    value_shapes = onnx_value_shapes(onnx_path, inputs[0][:1])
    largest = max(value_shapes, key=lambda k: math.prod(value_shapes[k]))
    return dict(
        name=name, pt2=pt2, onnx=onnx_path, opset=opset, onnx_input_shape=dims, fixed_spatial=fixed_spatial,
        tiled_blocks=len(tiled),
        export_s=dict(pt2=round(t1 - t0, 1), onnx=round(t2 - t1, 1)),
        largest_value=dict(name=largest, shape=list(value_shapes[largest]), input_shape=list(inputs[0][:1].shape)),
        checks=[dict(shape=list(s), output_scale=m, onnx_max_abs_diff=d, pt2_max_abs_diff=p,
                     onnx_rel_diff=d / m if m > 0 else d, pt2_rel_diff=p / m if m > 0 else p)
                for s, d, p, m in zip(shapes, onnx_diffs, pt2_diffs, scales)],
    )


def onnx_value_shapes(path: str, x: Tensor) -> Dict[str, Tuple[int, ...]]:
    """The shape of every value the ONNX graph computes for input ``x`` (one onnxruntime run that returns
    all node outputs), e.g. to check that no N x M kernel is formed."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    graph = model.graph
    typed = {v.name: v for v in graph.value_info}
    seen = {o.name for o in graph.output}
    for node in graph.node:
        for out in node.output:
            if out and out not in seen:
                graph.output.append(typed.get(out) or onnx.ValueInfoProto(name=out))
                seen.add(out)
    session = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
    values = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return {o.name: tuple(v.shape) for o, v in zip(session.get_outputs(), values)}
