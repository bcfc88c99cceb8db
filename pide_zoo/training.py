"""Deprecated: the classification recipe, the training loop and the checkpoints moved in pide_zoo 0.3.

The recipe, data and training loop are in :mod:`pide_zoo.cls`, the checkpoints and the model loader in
:mod:`pide_zoo.checkpoint`. The names here forward there with a FutureWarning and will be removed in pide_zoo 0.4.
"""
import importlib
import warnings

_MOVED = dict.fromkeys((
    'PAPER_SCHEDULE', 'PAPER_RECIPES', 'WD_PARAMS', 'keras_l2_to_weight_decay', 'weight_decay_param_groups',
    'classifier_kwargs', 'create_lr_scheduler', 'epoch_seed', 'seed_epoch', 'compute_loss', 'train_one_epoch',
    'evaluate', 'median_summary'), 'pide_zoo.cls')
_MOVED.update(dict.fromkeys((
    'CHECKPOINT_FORMAT', 'CheckpointError', 'ClsCheckpointSaver', 'checkpoint_meta', 'plain', 'read_checkpoint',
    'load_model', 'load_models'), 'pide_zoo.checkpoint'))
# Deprecated since 0.2: they warn when called, as before, and have no new home to name.
_DEPRECATED = ('load_checkpoint', 'model_from_checkpoint')


def __getattr__(name: str):
    if name in _DEPRECATED:
        return getattr(importlib.import_module('pide_zoo.checkpoint'), name)
    if name not in _MOVED:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    warnings.warn(f'pide_zoo.training.{name} moved to {_MOVED[name]}.{name}; pide_zoo.training will be removed in '
                  f'pide_zoo 0.4', FutureWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)


def __dir__():
    return sorted(list(globals()) + list(_MOVED) + list(_DEPRECATED))
