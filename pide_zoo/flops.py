"""FLOP and parameter counts of the pide_zoo models (and any module) with fvcore.

fvcore traces a model with ``torch.jit.trace`` and counts every traced ``aten::`` op with a handle;
an op without a handle is reported by ``.unsupported_ops()``. :data:`FLOP_HANDLES` is the one table
of handles this project adds to fvcore's defaults, installed by :class:`PIDEFlopCountAnalysis`.
The conventions are fvcore's: one multiply-add is one flop (convolutions, ``linear``, ``bmm``),
eval-mode batch norm costs 2 per element, pooling and sum/mean reductions one per input element
(as fvcore's ``adaptive_avg_pool2d``), and pointwise ops (add, mul, pow, log, where, ...) are
declared zero-cost unless ``elementwise`` gives them a cost per output element.

The paper's Table 4 (Bohn, Griebel & Kannan 2021) was measured differently: the authors' scripts
(``flops_nonlocal.py``, ``flops_resnet.py`` of dkannan08/Nonlocal-CNN) print TensorFlow's v1 graph
profiler ``total_float_ops / 2``. That counts convolutions and (batched) matmuls at one per
multiply-add, every registered pointwise op (Add, Sub, Mul, RealDiv, Pow, Log, BiasAdd, pooling,
Sum) at 1/2 per element, fused batch norm, ReLU, Sqrt and (in the version used; the numbers fit
only so) AddV2 not at all, and, as an artefact of profiling the whole graph, the Mul and Add of
every weight's He-normal initializer (one per weight); the paper then truncates to one decimal.
By hand, these rules give ResNet-44, Hamiltonian-74 and the diffusion network's cells exactly.
fvcore's convention stays within about 1 % of every cell of Table 4 in the ``'dense'`` mode; the
rest is mostly batch norm (2 per element here, 0 there) and the pointwise ops on the N x M kernel
(pow, log), which only ``elementwise`` counts. ``tools/flops.py`` prints the comparison with the paper's
tables (kept with the tools, in ``tools/paper_tables.py``); ``tools/get_flops.py`` counts any mmseg config with
the same handles (:func:`module_flop_analysis`).

:class:`~pide_zoo.layers.PIDEBlock` evaluates its kernel in one of several ways; the paper formed
the dense N x M kernel once and applied it in every stage. :func:`count_flops` sets the method of
every PIDE block for the count (``'dense'``: the paper's cost; ``'auto'``: this project's path,
low rank for the dot-product diffusion kernel; for the distance kernels fused, which forms the
squared distances in every stage: its traced forward counts what a forward pass costs, while the
dense path's backward reuses the stored kernel and the fused one evaluates each tile once more).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

try:
    with warnings.catch_warnings():
        # fvcore.nn scripts its focal losses at import, which recent torch flags as deprecated.
        warnings.simplefilter('ignore', FutureWarning)
        from fvcore.nn import FlopCountAnalysis
        from fvcore.nn.jit_handles import Handle, get_shape
except ImportError as e:
    raise ImportError(f'pide_zoo.flops counts FLOPs with fvcore, which is not installed ({e}); '
                      'pip install "pide_zoo[flops]"') from e

from .layers.nonlocal_block import PIDEBlock
from .layers.ops import resolve_method

__all__ = [
    'DATASETS', 'POINTWISE_OPS', 'ZERO_COST_OPS', 'FLOP_HANDLES', 'flop_handles', 'PIDEFlopCountAnalysis',
    'set_nonlocal_method', 'pide_block_names', 'module_flop_analysis', 'flop_analysis', 'count_flops',
    'count_params', 'truncate', 'create_paper_model', 'segmentation_params',
]

# The datasets whose cfgs the paper's networks have (timm tags), as in Tables 1-4.
DATASETS = ('cifar10', 'cifar100', 'stl10')
# Table 3's layout (BDD100K at 160x90, 20 classes) for segmentation_params.
SEG_NUM_CLASSES = 20
SEG_IMG_SIZE = (90, 160)

# Arithmetic pointwise ops: zero-cost by fvcore's convention, countable with ``elementwise``.
POINTWISE_OPS = (
    'aten::add', 'aten::add_', 'aten::sub', 'aten::sub_', 'aten::rsub', 'aten::mul', 'aten::mul_',
    'aten::div', 'aten::div_', 'aten::addcmul', 'aten::addcmul_', 'aten::neg', 'aten::pow', 'aten::log',
    'aten::log2', 'aten::exp', 'aten::sqrt',
    'aten::rsqrt', 'aten::reciprocal', 'aten::abs', 'aten::square', 'aten::clamp_min', 'aten::clamp_max',
    'aten::sigmoid', 'aten::tanh', 'aten::silu', 'aten::gelu', 'aten::hardswish', 'aten::hardsigmoid',
    'aten::softmax',
    # in-place forms (the tiled kernel path works in place to keep one N x M buffer)
    'aten::neg_', 'aten::pow_', 'aten::rsqrt_', 'aten::reciprocal_', 'aten::sqrt_', 'aten::exp_', 'aten::log_',
    'aten::log2_', 'aten::clamp_min_', 'aten::clamp_max_',
)
# Ops that move, select, compare or create data, beyond those fvcore already ignores (relu, cat, view...).
ZERO_COST_OPS = (
    'aten::view_as', 'aten::where', 'aten::ones_like', 'aten::new_ones', 'aten::empty_like', 'aten::lt', 'aten::le',
    'aten::ne', 'aten::sign', 'aten::clone', 'aten::alias', 'aten::expand_as', 'aten::reshape_as',
    'aten::masked_fill', 'aten::masked_fill_', 'aten::fill_',
    'aten::pad', 'aten::ceil',  # TensorFlow-'same' padding (resnet44_cifar): a copy, and its size arithmetic
    'aten::dropout', 'aten::feature_dropout',  # identities in eval mode (mmseg heads' Dropout2d)
)


def _numel(shape: Optional[Sequence[int]]) -> int:
    return math.prod(shape) if shape else 1


def _pointwise(cost: float) -> Handle:
    def handle(inputs: List[Any], outputs: List[Any]) -> float:
        return cost * _numel(get_shape(outputs[0]))
    return handle


def _reduction(inputs: List[Any], outputs: List[Any]) -> int:
    # One accumulation per input element, as fvcore counts adaptive_avg_pool2d.
    return _numel(get_shape(inputs[0]))


def _baddbmm(elementwise: float) -> Handle:
    def handle(inputs: List[Any], outputs: List[Any]) -> float:
        # input + alpha * (b1 @ b2): the batched product as fvcore's bmm, the add as a pointwise op
        (b, n, k), m = get_shape(inputs[1]), get_shape(inputs[2])[-1]
        return b * n * k * m + elementwise * _numel(get_shape(outputs[0]))
    return handle


def _int_list(value: Any) -> Optional[List[int]]:
    """The constant int list behind a traced argument (a constant or a prim::ListConstruct of constants)."""
    ivalue = value.toIValue()
    if ivalue is None and value.node().kind() == 'prim::ListConstruct':
        ivalue = [v.toIValue() for v in value.node().inputs()]
    if isinstance(ivalue, int):
        ivalue = [ivalue]
    if not ivalue or not all(isinstance(v, int) for v in ivalue):
        return None
    return list(ivalue)


def _pool(ndim: int) -> Handle:
    def handle(inputs: List[Any], outputs: List[Any]) -> int:
        # Kernel area times output elements: the input size for the non-overlapping pools used here.
        kernel = _int_list(inputs[1])
        if kernel is None:
            return _numel(get_shape(inputs[0]))
        if len(kernel) == 1:
            kernel = kernel * ndim
        return math.prod(kernel) * _numel(get_shape(outputs[0]))
    return handle


def flop_handles(elementwise: float = 0.0) -> Dict[str, Optional[Handle]]:
    """The handles added to fvcore's defaults (``None`` declares an op zero-cost).

    Args:
        elementwise: cost per output element of the pointwise ops in :data:`POINTWISE_OPS`
            (0: fvcore's convention; TensorFlow's profiler counts 1 flop per element, which is 1/2
            in the paper's multiply-adds).
    """
    if not elementwise >= 0:
        raise ValueError(f'elementwise must be a non-negative cost per element, got {elementwise!r}')
    handles: Dict[str, Optional[Handle]] = {
        'aten::avg_pool1d': _pool(1),
        'aten::max_pool1d': _pool(1),
        'aten::avg_pool2d': _pool(2),
        'aten::max_pool2d': _pool(2),
        'aten::adaptive_max_pool2d': _reduction,
        'aten::sum': _reduction,
        'aten::mean': _reduction,
        'aten::baddbmm': _baddbmm(elementwise),
        'aten::baddbmm_': _baddbmm(elementwise),
    }
    handles.update({name: None for name in ZERO_COST_OPS})
    handles.update({name: (_pointwise(elementwise) if elementwise else None) for name in POINTWISE_OPS})
    return handles


#: The table of fvcore handles in this project's (fvcore's) convention.
FLOP_HANDLES: Dict[str, Optional[Handle]] = flop_handles()


class PIDEFlopCountAnalysis(FlopCountAnalysis):
    """fvcore's :class:`~fvcore.nn.FlopCountAnalysis` with :data:`FLOP_HANDLES` installed.

    Trace under ``torch.no_grad()`` (as :func:`count_flops` does): with gradients enabled the
    reversible Hamiltonian chain is a custom autograd function that ``torch.jit.trace`` cannot record.

    Args:
        model: the module to analyse.
        inputs: its positional inputs.
        elementwise: cost per output element of pointwise ops (see :func:`flop_handles`).
    """

    def __init__(self, model: nn.Module, inputs: Any, elementwise: float = 0.0):
        super().__init__(model, inputs)
        self.set_op_handle(**(FLOP_HANDLES if not elementwise else flop_handles(elementwise)))
        self.tracer_warnings('none')


@contextlib.contextmanager
def set_nonlocal_method(model: nn.Module, method: Optional[str]) -> Iterator[nn.Module]:
    """Temporarily set ``method`` (``'auto'``, ``'lowrank'``, ``'tiled'``, ``'dense'``) on every PIDE block.

    ``None`` leaves the blocks as they are. The previous methods are restored on exit.
    """
    blocks = [m for m in model.modules() if isinstance(m, PIDEBlock)] if method is not None else []
    saved = [b.method for b in blocks]
    try:
        for b in blocks:
            b.method = resolve_method(method, b.operator, b.kernel)
        yield model
    finally:
        for b, m in zip(blocks, saved):
            b.method = m


def pide_block_names(model: nn.Module) -> List[str]:
    """Qualified names of the :class:`~pide_zoo.layers.PIDEBlock` modules of ``model`` (keys of ``by_module()``)."""
    return [name for name, m in model.named_modules() if isinstance(m, PIDEBlock)]


def _example_input(model: nn.Module, input_size: Sequence[int], batch_size: int) -> torch.Tensor:
    p = next(model.parameters(), None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *input_size, generator=g)
    return x.to(device=p.device, dtype=p.dtype) if p is not None else x


def module_flop_analysis(
        model: nn.Module,
        inputs: Tuple[Any, ...],
        nonlocal_method: Optional[str] = 'dense',
        elementwise: float = 0.0,
) -> PIDEFlopCountAnalysis:
    """Run a :class:`PIDEFlopCountAnalysis` of any module on given positional ``inputs``, in eval mode under
    ``torch.no_grad()`` (e.g. an mmseg segmentor, whose ``forward(inputs)`` is its tensor mode).

    Args:
        model: the module (its train/eval mode is restored afterwards).
        inputs: the positional arguments of ``model.forward``.
        nonlocal_method: evaluation path set on every PIDE block for the count (``'dense'``: the
            paper's; ``'auto'``: this project's default; ``None``: as configured).
        elementwise: cost per output element of pointwise ops (0: fvcore's convention).

    Returns:
        The analysis, already evaluated, so that ``.total()``, ``.by_operator()``, ``.by_module()``
        and ``.unsupported_ops()`` report the count made with ``nonlocal_method``.
    """
    was_training = model.training
    fa = PIDEFlopCountAnalysis(model, tuple(inputs), elementwise=elementwise)
    fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    try:
        model.eval()
        with set_nonlocal_method(model, nonlocal_method), torch.no_grad():
            fa.total()  # fvcore analyses lazily: trace now, while the methods are set
    finally:
        model.train(was_training)
    return fa


def flop_analysis(
        model: nn.Module,
        input_size: Sequence[int],
        nonlocal_method: Optional[str] = 'dense',
        elementwise: float = 0.0,
        batch_size: int = 1,
) -> PIDEFlopCountAnalysis:
    """:func:`module_flop_analysis` of ``model`` on a random input of ``input_size``.

    Args:
        model: the model (its train/eval mode is restored afterwards).
        input_size: (C, H, W) of one input.
        nonlocal_method: evaluation path set on every PIDE block for the count (``'dense'``: the
            paper's; ``'auto'``: this project's default; ``None``: as configured).
        elementwise: cost per output element of pointwise ops (0: fvcore's convention).
        batch_size: batch size of the traced input.
    """
    x = _example_input(model, input_size, batch_size)
    return module_flop_analysis(model, (x,), nonlocal_method, elementwise)


def count_flops(
        model: nn.Module,
        input_size: Sequence[int],
        nonlocal_method: Optional[str] = 'dense',
        elementwise: float = 0.0,
        batch_size: int = 1,
) -> int:
    """Total FLOPs (multiply-adds) of ``model`` on one input of ``input_size``; see :func:`flop_analysis`."""
    return round(flop_analysis(model, input_size, nonlocal_method, elementwise, batch_size).total())


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def truncate(value: float, digits: int) -> float:
    """``value`` cut (not rounded) to ``digits`` decimals, as the paper prints its tables."""
    scale = 10 ** digits
    return math.floor(value * scale + 1e-9) / scale


def create_paper_model(name: str, dataset: str = 'cifar10', **kwargs) -> Tuple[nn.Module, Tuple[int, int, int]]:
    """A registered timm model with the cfg of ``dataset`` and its input size (C, H, W)."""
    import timm

    if dataset not in DATASETS:
        raise ValueError(f'dataset must be one of {DATASETS}, got {dataset!r}')
    model = timm.create_model(f'{name}.{dataset}', **kwargs)
    return model, tuple(model.pretrained_cfg['input_size'])


def segmentation_params(name: str) -> int:
    """Parameters of the Table 3 (BDD100K) layout of ``name``: no pooling, 1x1 conv head to 20 classes."""
    import timm

    from .models import HamiltonianNet

    if name.startswith(('hamiltonian', 'nl_hamiltonian')):
        ref = timm.create_model(name)
        operator = ref.nonlocal_operator
        stages = next((m.stages for m in ref.modules() if isinstance(m, PIDEBlock)), 2)
        cfg = None if operator is None else dict(operator=operator, stages=stages, subsample=3)
        body = HamiltonianNet(num_classes=0, global_pool='', downsample=False, block_cfg=cfg, img_size=SEG_IMG_SIZE)
    else:
        body = timm.create_model(name, num_classes=0, global_pool='', downsample=False)
    head = nn.Conv2d(body.num_features, SEG_NUM_CLASSES, 1)
    return count_params(body) + count_params(head)
