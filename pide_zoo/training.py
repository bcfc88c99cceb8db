"""Classification training on timm's building blocks: the paper's recipe, checkpoints, one epoch, evaluation.

The recipe of Bohn, Griebel & Kannan (2021), Section 5.1, with the authors' code filling its gaps:
batch 100 (STL-10: 50), SGD with momentum 0.9, 200 epochs at learning rate 0.01 for the first epoch,
then 0.1 divided by 10 at epochs 80, 120, 160 and 180, L2 regularisation of all convolution weights as
Keras ``l2(reg)`` with reg = 2e-4 (STL-10: 5e-4) and the weight-smoothness decay (4.8) with
alpha_2 = 1e-8. Keras adds ``reg * sum(w**2)`` to the loss, whose gradient ``2 * reg * w`` is SGD
weight decay ``2 * reg``.

``tools/train_cls.py`` and ``tools/eval_cls.py`` are thin command lines over this module. :func:`load_model` is
the one loader of the tools and the export: a model from a checkpoint written here, from a timm name (fresh or
with a plain state dict) or from an mmseg config (imports mmengine and mmseg only then).
"""
from __future__ import annotations

import math
import os
import pickle
import re
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from timm.models import get_pretrained_cfg, is_model
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, CheckpointSaver, accuracy, get_state_dict, random_seed, unwrap_model
from torch import Tensor, nn

from .data.classification import DATASETS, dataset_info
from .layers import smoothness_penalty
from .models._paper_norm import bn_settings, check_bn_settings

__all__ = [
    'PAPER_SCHEDULE', 'PAPER_RECIPES', 'WD_PARAMS', 'CHECKPOINT_FORMAT', 'keras_l2_to_weight_decay',
    'weight_decay_param_groups', 'classifier_kwargs', 'epoch_seed', 'seed_epoch', 'plain', 'compute_loss',
    'ClsCheckpointSaver', 'checkpoint_meta', 'CheckpointError', 'read_checkpoint', 'load_model', 'load_models',
    'train_one_epoch', 'evaluate', 'median_summary', 'create_lr_scheduler',
    'load_checkpoint', 'model_from_checkpoint',  # deprecated, removed in 0.3
]

# Epoch-level schedule of the authors' code (timm's multistep scheduler with a one-epoch warm-up prefix).
PAPER_SCHEDULE: Dict[str, Any] = dict(
    epochs=200, lr=0.1, warmup_lr=0.01, warmup_epochs=1, decay_milestones=(80, 120, 160, 180), decay_rate=0.1,
    opt='momentum', momentum=0.9, smoothness=1e-8,  # timm's 'momentum': SGD without Nesterov, as Keras
)
# Per dataset: batch size and Keras l2(reg). Digits (not in the paper) use the CIFAR values.
PAPER_RECIPES: Dict[str, Dict[str, float]] = {
    'cifar10': dict(batch_size=100, keras_l2=2e-4),
    'cifar100': dict(batch_size=100, keras_l2=2e-4),
    'stl10': dict(batch_size=50, keras_l2=5e-4),
    'digits': dict(batch_size=100, keras_l2=2e-4),
}
WD_PARAMS = ('conv', 'weights')
CHECKPOINT_FORMAT = 'pide_zoo.cls/1'
_PLAIN = (str, int, float, bool, type(None))


def keras_l2_to_weight_decay(reg: float) -> float:
    """SGD weight decay equal to Keras ``l2(reg)``: the gradient of ``reg * ||w||^2`` is ``2 * reg * w``."""
    return 2.0 * reg


def weight_decay_param_groups(model: nn.Module, weight_decay: float, which: str = 'conv') -> List[Dict[str, Any]]:
    """Parameter groups with weight decay on convolution weights only (``'conv'``, the paper's (4.7): all
    convolution weights, nonlocal ones included, not the classifier) or on every weight of two or more
    dimensions (``'weights'``, timm's default). Biases and normalisation parameters are never decayed."""
    if which not in WD_PARAMS:
        raise ValueError(f'which must be one of {WD_PARAMS}, got {which!r}')
    conv_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        selected = id(p) in conv_weights if which == 'conv' else p.ndim > 1
        (decay if selected else no_decay).append(p)
    return [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)]


def classifier_kwargs(model_name: str, dataset: str, model_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``timm.create_model`` keyword arguments for ``dataset``: its class count and, for models with a fixed
    input size (the paper's flatten head, ViTs), its image size; ``model_kwargs`` override both."""
    if not is_model(model_name):
        raise ValueError(f"model must be a timm model name (see timm.list_models()), got {model_name!r}")
    info = dataset_info(dataset)
    kwargs: Dict[str, Any] = dict(num_classes=info.num_classes)
    cfg = get_pretrained_cfg(model_name)
    if cfg is not None and cfg.fixed_input_size:
        kwargs['img_size'] = info.img_size
    kwargs.update(model_kwargs or {})
    return kwargs


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: every epoch's shuffling and augmentation depend only on (seed, epoch, rank),
    so a run resumed at an epoch boundary continues exactly."""
    return seed + 100_003 * (epoch + 1)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed torch, numpy and random for ``epoch`` on ``rank`` (see :func:`epoch_seed`)."""
    random_seed(epoch_seed(seed, epoch), rank)


def plain(value: Any) -> Any:
    """``value`` as plain data (dicts, lists, strings, numbers) that ``torch.load(weights_only=True)`` reads;
    anything else becomes its string."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if hasattr(value, '__dict__') and not isinstance(value, type):  # argparse.Namespace
        return plain(vars(value))
    return str(value)


def compute_loss(model: nn.Module, output: Tensor, target: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 smoothness: float = 0.0) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The training objective: ``loss_fn(output, target)`` plus the weight-smoothness decay (4.8)
    ``smoothness_penalty(model, smoothness)``. Returns the total and its parts (``'ce'``, ``'smooth'``)."""
    ce = loss_fn(output, target)
    smooth = smoothness_penalty(unwrap_model(model), smoothness) if smoothness else ce.new_zeros(())
    return ce + smooth, dict(ce=ce.detach(), smooth=smooth.detach())


class ClsCheckpointSaver(CheckpointSaver):
    """timm's :class:`~timm.utils.CheckpointSaver` writing checkpoints that ``torch.load(weights_only=True)``
    reads and that rebuild their model: ``meta`` (model name, its keyword arguments, dataset, data mean,
    run arguments as plain data) is stored next to the usual entries, and ``batch_norm`` (the model's eps and
    momentum), which timm's loaders would strip from the state dict's metadata."""

    def __init__(self, *args, meta: Dict[str, Any], **kwargs):
        super().__init__(*args, **kwargs)
        self.meta = meta

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        state: Dict[str, Any] = dict(self.meta)
        state.update(
            format=CHECKPOINT_FORMAT, epoch=epoch, version=2,  # version 2: resume starts at epoch + 1
            state_dict=get_state_dict(self.model, self.unwrap_fn), optimizer=self.optimizer.state_dict())
        bn = bn_settings(self.unwrap_fn(self.model))
        if bn is not None:
            state['batch_norm'] = bn
        if self.model_ema is not None:
            state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        torch.save(state, save_path)


def checkpoint_meta(model_name: str, model_kwargs: Dict[str, Any], dataset: str, data_mean: Tensor,
                    args: Any = None) -> Dict[str, Any]:
    """The entries a :class:`ClsCheckpointSaver` adds to every checkpoint."""
    return dict(arch=model_name, model_kwargs=plain(model_kwargs), dataset=dataset,
                data_mean=data_mean.detach().cpu().float(), args=plain(args) if args is not None else {})


class CheckpointError(ValueError):
    """A file is not a usable checkpoint of ``tools/train_cls.py``; the message names it and says what is wrong."""


CHECKPOINT_KEYS = ('arch', 'model_kwargs', 'dataset', 'data_mean', 'epoch', 'state_dict')
_NOT_OURS = 'not a checkpoint of tools/train_cls.py'
_MMENGINE_HINT = ' (an mmengine / mmseg checkpoint? tools/test.py and mmseg.apis.init_model load those)'


def _read_torch_file(path: str, map_location: Any) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a :class:`CheckpointError` naming ``path``."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file raises UnpicklingError, RuntimeError, EOFError...
        first = (str(e).strip().splitlines() or [''])[0][:200]
        foreign = re.search(r'GLOBAL ([\w.]+)', str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if foreign:
            hint = _MMENGINE_HINT if foreign.group(1).startswith(('mmengine', 'numpy')) else ''
            raise CheckpointError(f'{path}: {_NOT_OURS}: it holds {foreign.group(1)} objects, which a weights-only '
                                  f'load refuses (these checkpoints hold tensors and plain data){hint}') from None
        # torch's weights-only message opens with advice about its default; the reason is on a later line
        reason = re.search(r'WeightsUnpickler error:\s*(.+)', str(e))
        detail = reason.group(1).strip()[:200] if reason else first or 'the data ends early'
        if os.path.getsize(path) == 0:
            raise CheckpointError(f'{path}: the file is empty (0 bytes), not a torch checkpoint') from None
        raise CheckpointError(f'{path}: cannot be read as a torch checkpoint, truncated or corrupt? '
                              f'({type(e).__name__}: {detail})') from None


def _check_checkpoint(ckpt: Any, path: str) -> Dict[str, Any]:
    """``ckpt`` if it is a checkpoint of ``tools/train_cls.py``, else a :class:`CheckpointError` naming ``path``."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: {_NOT_OURS}: it holds a {type(ckpt).__name__}, not a dict')
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing and ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        raise CheckpointError(f'{path}: {_NOT_OURS}: it is a bare state dict ({len(ckpt)} tensors, e.g. '
                              f'{next(iter(ckpt))!r}); these checkpoints also record the model name, its arguments '
                              'and the data mean')
    if missing:
        hint = _MMENGINE_HINT if 'meta' in ckpt and 'state_dict' in ckpt else ''
        keys = sorted(map(str, ckpt))
        raise CheckpointError(f'{path}: {_NOT_OURS}: it lacks {missing} (its keys: {keys[:8]}'
                              f'{" ..." if len(keys) > 8 else ""}){hint}')
    if not isinstance(ckpt['arch'], str) or not is_model(ckpt['arch']):
        raise CheckpointError(f"{path}: records model {ckpt['arch']!r}, which is not a timm model name here")
    if ckpt['dataset'] not in DATASETS:
        raise CheckpointError(f"{path}: records dataset {ckpt['dataset']!r}, not one of {tuple(DATASETS)}")
    mean = ckpt['data_mean']
    if not isinstance(mean, Tensor) or mean.ndim != 3:
        raise CheckpointError(f'{path}: its data_mean is not a (C, H, W) tensor: '
                              f'{tuple(mean.shape) if isinstance(mean, Tensor) else type(mean).__name__}')
    return ckpt


def _check_file(path: Any, what: str = 'checkpoint') -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'{what} must be a file path, got {type(path).__name__}')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what} {str(path)!r} does not exist')
    return str(path)


def read_checkpoint(path: str, map_location: Any = 'cpu') -> Dict[str, Any]:
    """The entries of a checkpoint written by :class:`ClsCheckpointSaver` (``arch``, ``model_kwargs``,
    ``dataset``, ``data_mean``, ``epoch``, ``state_dict``, ...), read with ``weights_only=True`` and checked;
    no model is built (:func:`load_model` builds it).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is unreadable (truncated, corrupt) or another kind of checkpoint; the
            message names the file and what is wrong.
    """
    path = _check_file(path)
    return _check_checkpoint(_read_torch_file(path, map_location), path)


def _model_from_checkpoint(ckpt: Dict[str, Any], source: str, use_ema: bool) -> nn.Module:
    """The model a checked checkpoint records, with its weights (``state_dict_ema`` with ``use_ema``)."""
    import timm

    key = 'state_dict_ema' if use_ema else 'state_dict'
    if key not in ckpt:
        raise CheckpointError(f'{source}: has no {key!r} (use_ema={use_ema}); it has {sorted(ckpt)}')
    try:
        model = timm.create_model(ckpt['arch'], **ckpt['model_kwargs'])
    except Exception as e:  # noqa: BLE001 - bad recorded arguments surface as TypeError, ValueError...
        raise CheckpointError(f"{source}: cannot build its model {ckpt['arch']} {ckpt['model_kwargs']}: "
                              f'{type(e).__name__}: {e}') from None
    state, own = ckpt[key], model.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f'{source}: its {key!r} is not a dict of tensors')
    # Checked here rather than by load_state_dict, whose message is a page long.
    mismatch = [(what, keys) for what, keys in (
        ('missing', [k for k in own if k not in state]), ('unexpected', [k for k in state if k not in own]),
        ('of another shape', [k for k in state if k in own and state[k].shape != own[k].shape])) if keys]
    if mismatch:
        parts = ', '.join(f'{len(keys)} {what} (first: {keys[0]})' for what, keys in mismatch)
        raise CheckpointError(f"{source}: its {key} does not fit {ckpt['arch']} {ckpt['model_kwargs']}: "
                              f'{parts} weights')
    check_bn_settings(model, ckpt.get('batch_norm'), source, recorded='batch_norm' in ckpt)
    model.load_state_dict(state)
    return model


def _input_size(model: nn.Module) -> Tuple[Tuple[int, int, int], bool]:
    """A timm model's input size (C, H, W) and whether the network fixes it (a flatten head)."""
    cfg = model.pretrained_cfg
    c = getattr(model, 'in_chans', cfg['input_size'][0])
    img_size = getattr(model, 'img_size', None)  # the size a flatten head was built for, over the cfg's
    h, w = img_size if img_size is not None else cfg['input_size'][1:]
    return (int(c), int(h), int(w)), bool(cfg.get('fixed_input_size', False))


def _classifier(checkpoint: Optional[str], model: Optional[str], model_kwargs: Optional[Dict[str, Any]],
                dataset: Optional[str], use_ema: bool) -> Tuple[nn.Module, Dict[str, Any]]:
    """The classifier branch of :func:`load_model`: a train_cls checkpoint, or a timm name with a plain state dict
    or fresh weights."""
    import timm

    ckpt = None
    if checkpoint is not None:
        path = _check_file(checkpoint)
        ckpt = _read_torch_file(path, 'cpu')
    if ckpt is not None and (model is None or isinstance(ckpt, dict) and 'arch' in ckpt and 'model_kwargs' in ckpt):
        if model is not None and model.split('.')[0] != str(ckpt['arch']).split('.')[0]:
            raise ValueError(f"checkpoint {path!r} holds {ckpt['arch']!r}, not model {model!r}")
        ckpt = _check_checkpoint(ckpt, path)
        if model_kwargs:
            raise ValueError(f'checkpoint {path!r} records the model arguments; drop model_kwargs')
        net = _model_from_checkpoint(ckpt, path, use_ema)
        info = dict(kind='classifier', arch=ckpt['arch'], model_kwargs=ckpt['model_kwargs'], dataset=ckpt['dataset'],
                    epoch=ckpt['epoch'] + 1, data_mean=ckpt['data_mean'], source=path, args=ckpt.get('args', {}))
    else:
        kwargs = classifier_kwargs(model, dataset, model_kwargs) if dataset is not None else dict(model_kwargs or {})
        net = timm.create_model(model, **kwargs)
        info = dict(kind='classifier', arch=model, model_kwargs=plain(kwargs), dataset=dataset, epoch=0,
                    data_mean=None, source='initialisation', args={})
        if ckpt is not None:  # a plain state dict: timm's loader finds it (state_dict / model / EMA keys)
            from timm.models import load_checkpoint as timm_load_checkpoint

            try:
                timm_load_checkpoint(net, path, use_ema=use_ema, strict=True)
            except (RuntimeError, KeyError, TypeError, AttributeError) as e:  # load_state_dict's page, in a line
                detail = ' '.join(str(e).split())[:300]
                raise CheckpointError(f'{path}: its weights do not fit {model} {plain(kwargs)}: '
                                      f'{type(e).__name__}: {detail}') from None
            info.update(epoch=None, source=path)
    return net, info


def _model_argument(model: Optional[str], model_name: Optional[str]) -> Optional[str]:
    if model_name is not None:
        if model is not None:
            raise ValueError('give model, not both model and model_name (its deprecated spelling)')
        warnings.warn('load_model(model_name=...) is deprecated and will be removed in pide_zoo 0.3; '
                      'use load_model(model=...)', FutureWarning, stacklevel=3)
        model = model_name
    return model


def _segmentor(config: str, checkpoint: Optional[str], cfg_options: Optional[Dict[str, Any]],
               device: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    config = _check_file(config, 'config file')
    if checkpoint is not None:
        checkpoint = _check_file(checkpoint)
    try:
        from .seg.loading import load_segmentor  # registers the modules, allow-lists mmengine checkpoints
    except ImportError as e:
        raise ImportError(f'{config}: an mmseg config needs mmsegmentation (pip install -e .[seg]): {e}') from e
    return load_segmentor(config, checkpoint, cfg_options, device)


def load_model(checkpoint: Optional[str] = None, model: Optional[str] = None,
               model_kwargs: Optional[Dict[str, Any]] = None, dataset: Optional[str] = None, use_ema: bool = False,
               device: Any = 'cpu', *, cfg_options: Optional[Dict[str, Any]] = None,
               model_name: Optional[str] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """A model in eval mode on ``device``, from a checkpoint, a timm model name or an mmseg config.

    * ``load_model(ckpt)``: a ``tools/train_cls.py`` checkpoint, which records the model's name and arguments;
    * ``load_model(ckpt, 'resnet44_cifar.cifar100')``: a timm model with a plain state dict (or a dict holding
      one under ``'state_dict'``/``'model'``), or a ``tools/train_cls.py`` checkpoint of that model;
    * ``load_model(model='nl_hamiltonian74', dataset='cifar100')``: freshly initialised weights;
    * ``load_model(ckpt, 'configs/x.py')``: an mmseg segmentor (``mmseg.apis.init_model``; mmengine and mmseg are
      imported only here); without ``ckpt`` its initial weights.

    Args:
        checkpoint: the checkpoint file, or None for freshly initialised weights.
        model: a timm model name (tags such as ``'nl_hamiltonian74.stl10'`` pick the cfg) or an mmseg config
            file (``.py``); optional for a ``tools/train_cls.py`` checkpoint.
        model_kwargs: extra ``timm.create_model`` arguments (not for a ``tools/train_cls.py`` checkpoint, which
            records them).
        dataset: for a timm name: set the class count and a fixed head's image size for this dataset
            (:func:`classifier_kwargs`); None keeps the model's cfg. Ignored for ``tools/train_cls.py``
            checkpoints, which record theirs.
        use_ema: the EMA weights of a checkpoint that has them.
        device: where to put the model.
        cfg_options: overrides of the mmseg config (``key=value`` as in ``--cfg-options``).
        model_name: deprecated spelling of ``model``, removed in pide_zoo 0.3.

    Returns:
        The model and what is known about it: ``kind`` (``'classifier'`` or ``'segmentor'``), ``source`` (the
        checkpoint or ``'initialisation'``), ``input_size`` (C, H, W; None for a segmentor whose data
        preprocessor fixes none) and ``fixed_input_size``; for classifiers also ``arch``, ``model_kwargs``,
        ``dataset``, ``epoch`` (epochs trained, None for a plain state dict), ``data_mean`` (the train split's
        per-pixel mean, None unless the checkpoint records it) and ``args`` (the training run's arguments);
        for segmentors ``config``.

    Raises:
        FileNotFoundError: ``checkpoint`` or the config does not exist.
        CheckpointError: the checkpoint is unreadable, not the kind expected, or does not fit the model; the
            message names the file.
        ValueError: the arguments do not fit together (e.g. a checkpoint of another model).
    """
    import timm

    model = _model_argument(model, model_name)
    if checkpoint is None and model is None:
        raise ValueError('give a checkpoint, a model (timm name or mmseg config) or both')
    if model is not None and not isinstance(model, str):
        raise TypeError(f'model must be a timm model name or an mmseg config path, got {type(model).__name__}')
    if model is not None and model.endswith('.py'):
        if model_kwargs or dataset is not None or use_ema:
            raise ValueError('model_kwargs, dataset and use_ema apply to timm models; change an mmseg config '
                             'through cfg_options')
        return _segmentor(model, checkpoint, cfg_options, device)
    if cfg_options:
        raise ValueError(f'cfg_options apply to mmseg configs; {model!r} is taken as a timm model name')
    if model is not None and not timm.is_model(model):
        raise ValueError(f'{model!r} is not a timm model name (timm.list_models()) nor an mmseg config (.py)')

    net, info = _classifier(checkpoint, model, model_kwargs, dataset, use_ema)
    info['input_size'], info['fixed_input_size'] = _input_size(net)
    return net.to(device).eval(), info


def load_checkpoint(path: str, map_location: Any = 'cpu') -> Dict[str, Any]:
    """Deprecated alias of :func:`read_checkpoint` (it shadowed timm's ``load_checkpoint``); removed in 0.3."""
    warnings.warn('pide_zoo.training.load_checkpoint is deprecated and will be removed in pide_zoo 0.3; use '
                  'read_checkpoint (the entries) or load_model (the model)', FutureWarning, stacklevel=2)
    return read_checkpoint(path, map_location)


def model_from_checkpoint(path_or_ckpt: Any, use_ema: bool = False,
                          device: Any = 'cpu') -> Tuple[nn.Module, Dict[str, Any]]:
    """Deprecated: ``(model, checkpoint entries)``; use :func:`load_model` (and :func:`read_checkpoint`).
    Removed in pide_zoo 0.3."""
    warnings.warn('pide_zoo.training.model_from_checkpoint is deprecated and will be removed in pide_zoo 0.3; use '
                  'load_model(checkpoint) (and read_checkpoint for the entries)', FutureWarning, stacklevel=2)
    is_path = isinstance(path_or_ckpt, (str, os.PathLike))
    ckpt = read_checkpoint(path_or_ckpt) if is_path else path_or_ckpt
    model = _model_from_checkpoint(ckpt, str(path_or_ckpt) if is_path else 'the checkpoint', use_ema)
    return model.to(device).eval(), ckpt


def _to_device(x: Tensor, target: Tensor, device: torch.device, channels_last: bool) -> Tuple[Tensor, Tensor]:
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, target.to(device, non_blocking=True)


def train_one_epoch(
        model: nn.Module,
        loader: Any,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        device: torch.device,
        smoothness: float = 0.0,
        amp_autocast: Callable[[], Any] = nullcontext,
        loss_scaler: Any = None,
        model_ema: Any = None,
        num_updates: int = 0,
        clip_grad: Optional[float] = None,
        clip_mode: str = 'norm',
        channels_last: bool = False,
        progress: Any = None,
) -> Tuple[OrderedDict[str, float], int]:
    """One epoch of SGD on ``loss_fn`` + weight-smoothness decay. Returns the epoch's mean ``loss`` (total),
    ``ce``, ``smooth`` and train ``top1`` (on the augmented batches, this process only) and the update count.

    ``progress`` is called after every batch with the running metrics (e.g. a tqdm bar's ``set_postfix``).
    """
    from timm.utils import dispatch_clip_grad

    model.train()
    meters = {k: AverageMeter() for k in ('loss', 'ce', 'smooth', 'top1')}
    for x, target in loader:
        x, target = _to_device(x, target, device, channels_last)
        with amp_autocast():
            output = model(x)
            loss, parts = compute_loss(model, output, target, loss_fn, smoothness)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f'the loss is {loss.item()} at update {num_updates}; lower the learning rate '
                                     f'or check the inputs')
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=clip_grad, clip_mode=clip_mode, parameters=model.parameters())
        else:
            loss.backward()
            if clip_grad is not None:
                dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
            optimizer.step()
        num_updates += 1
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        n = x.shape[0]
        meters['loss'].update(loss.item(), n)
        meters['ce'].update(parts['ce'].item(), n)
        meters['smooth'].update(parts['smooth'].item(), n)
        meters['top1'].update(accuracy(output.detach().float(), target)[0].item(), n)
        if progress is not None:
            progress({k: m.avg for k, m in meters.items()})
    return OrderedDict((k, m.avg) for k, m in meters.items()), num_updates


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Any,
        device: torch.device,
        amp_autocast: Callable[[], Any] = nullcontext,
        channels_last: bool = False,
        distributed: bool = False,
        topk: Sequence[int] = (1, 5),
        progress: Any = None,
) -> OrderedDict[str, float]:
    """Cross-entropy ``loss``, ``top1`` and ``top5`` (%) and ``count`` over ``loader``; with ``distributed``,
    each process passes its own disjoint part of the split and the sums are reduced over all processes."""
    model.eval()
    sums = torch.zeros(2 + len(topk), dtype=torch.float64, device=device)  # loss, count, correct@k
    for x, target in loader:
        x, target = _to_device(x, target, device, channels_last)
        with amp_autocast():
            output = model(x)
        output = output.float()
        n = x.shape[0]
        sums[0] += nn.functional.cross_entropy(output, target, reduction='sum').double()
        sums[1] += n
        pred = output.topk(min(max(topk), output.shape[1]), dim=1).indices
        hits = pred.eq(target[:, None]).cumsum(1).clamp_(max=1).sum(0)  # images right within the top j + 1
        for i, k in enumerate(topk):
            sums[2 + i] += hits[min(k, pred.shape[1]) - 1]
        if progress is not None:
            progress({'top1': (100.0 * sums[2] / sums[1]).item()})
    if distributed:
        dist.all_reduce(sums)
    count = max(sums[1].item(), 1.0)
    metrics = OrderedDict(loss=sums[0].item() / count)
    for i, k in enumerate(topk):
        metrics[f'top{k}'] = 100.0 * sums[2 + i].item() / count
    metrics['count'] = int(sums[1].item())
    return metrics


def median_summary(results: Sequence[Dict[str, float]], keys: Sequence[str] = ('top1', 'top5')) -> Dict[str, Any]:
    """Median (the paper reports the median of 5 seeds), mean, standard deviation, min and max of ``keys``
    over several runs' results."""
    import statistics

    if not results:
        raise ValueError('results must hold at least one run')
    out: Dict[str, Any] = dict(runs=len(results))
    for k in keys:
        values = [float(r[k]) for r in results]
        out[k] = dict(median=statistics.median(values), mean=statistics.fmean(values),
                      std=statistics.stdev(values) if len(values) > 1 else 0.0, min=min(values), max=max(values))
    return out


def load_models(paths: Sequence[str], use_ema: bool = False,
                device: Any = 'cpu') -> List[Tuple[nn.Module, Dict[str, Any]]]:
    """:func:`load_model` of every checkpoint in ``paths``; checks them all first and raises one
    :class:`CheckpointError` naming every bad file."""
    loaded, errors = [], []
    for path in paths:
        try:
            loaded.append(load_model(path, use_ema=use_ema, device=device))
        except (CheckpointError, FileNotFoundError) as e:
            errors.append(str(e))
    if errors:
        raise CheckpointError('\n'.join(errors) if len(errors) > 1 else errors[0])
    return loaded


def create_lr_scheduler(optimizer: torch.optim.Optimizer, sched: str = 'multistep',
                        epochs: int = PAPER_SCHEDULE['epochs'],
                        decay_milestones: Sequence[int] = PAPER_SCHEDULE['decay_milestones'],
                        decay_rate: float = PAPER_SCHEDULE['decay_rate'],
                        warmup_epochs: int = PAPER_SCHEDULE['warmup_epochs'],
                        warmup_lr: float = PAPER_SCHEDULE['warmup_lr'], min_lr: float = 0.0,
                        decay_epochs: float = 30, seed: int = 42) -> Any:
    """timm's epoch scheduler with the warm-up counted in ``epochs``. With the defaults, the authors' schedule:
    0.01 in epoch 0, the base lr (0.1) in epochs 1-79, then divided by 10 from epochs 80, 120, 160 and 180 on.

    ``decay_milestones`` are 0-based epochs from which the lr is divided (again) by ``1 / decay_rate``,
    counted from the start of training whatever the warm-up length (timm's multistep scheduler counts them
    from the end of a warm-up prefix, minus one). Returns None for ``sched='none'``.
    """
    # timm applies milestone m at warm-up-relative index m - 1, i.e. at epoch m + warmup - 1.
    milestones = [int(m) - warmup_epochs + 1 for m in decay_milestones]
    lr_scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=epochs - warmup_epochs, decay_milestones=milestones,
        decay_epochs=decay_epochs, decay_rate=decay_rate, warmup_lr=warmup_lr, warmup_epochs=warmup_epochs,
        warmup_prefix=True, min_lr=min_lr, noise_seed=seed)
    return lr_scheduler
