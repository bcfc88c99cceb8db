"""Checkpoints: the format ``tools/train_cls.py`` writes, reading and checking it, and the one model loader.

A checkpoint of :class:`ClsCheckpointSaver` (timm's saver) holds tensors and plain data only, so
``torch.load(weights_only=True)`` reads it, and records what rebuilds its model: the timm name, its keyword
arguments, the dataset and the train split's per-pixel mean (:data:`CHECKPOINT_FORMAT`).
:func:`read_checkpoint` reads and checks one, naming the file and the problem in a :class:`CheckpointError`.
:func:`load_model` is the one loader of the tools and the export: a model from such a checkpoint, from a timm
name (fresh or with a plain state dict) or from an mmseg config (imports mmengine and mmseg only then).
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from timm.models import is_model
from timm.utils import CheckpointSaver, get_state_dict
from torch import Tensor, nn

from .cls.data import DATASETS
from .cls.recipe import classifier_kwargs
from .models._paper_norm import bn_settings, check_bn_settings

__all__ = [
    'CHECKPOINT_FORMAT', 'CheckpointError', 'ClsCheckpointSaver', 'checkpoint_meta', 'plain', 'read_checkpoint',
    'load_model', 'load_models',
]

CHECKPOINT_FORMAT = 'pide_zoo.cls/1'
_PLAIN = (str, int, float, bool, type(None))


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


# Deprecated in 0.2, public only as pide_zoo.training.load_checkpoint and .model_from_checkpoint.
def load_checkpoint(path: str, map_location: Any = 'cpu') -> Dict[str, Any]:
    """Deprecated alias of :func:`read_checkpoint` (it shadowed timm's ``load_checkpoint``); removed in 0.3."""
    warnings.warn('pide_zoo.training.load_checkpoint is deprecated and will be removed in pide_zoo 0.3; use '
                  'pide_zoo.checkpoint.read_checkpoint (the entries) or load_model (the model)', FutureWarning,
                  stacklevel=2)
    return read_checkpoint(path, map_location)


def model_from_checkpoint(path_or_ckpt: Any, use_ema: bool = False,
                          device: Any = 'cpu') -> Tuple[nn.Module, Dict[str, Any]]:
    """Deprecated: ``(model, checkpoint entries)``; use :func:`load_model` (and :func:`read_checkpoint`).
    Removed in pide_zoo 0.3."""
    warnings.warn('pide_zoo.training.model_from_checkpoint is deprecated and will be removed in pide_zoo 0.3; use '
                  'pide_zoo.checkpoint.load_model(checkpoint) (and read_checkpoint for the entries)', FutureWarning,
                  stacklevel=2)
    is_path = isinstance(path_or_ckpt, (str, os.PathLike))
    ckpt = read_checkpoint(path_or_ckpt) if is_path else path_or_ckpt
    model = _model_from_checkpoint(ckpt, str(path_or_ckpt) if is_path else 'the checkpoint', use_ema)
    return model.to(device).eval(), ckpt
