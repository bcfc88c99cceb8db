"""Deprecated: the classification recipe, the training loop and the checkpoints moved in pide_zoo 0.3.

The recipe, data and training loop are in :mod:`pide_zoo.cls`, the checkpoints and the model loader in
:mod:`pide_zoo.checkpoint`. The names here forward there with a FutureWarning and will be removed in pide_zoo 0.4.
"""
from ._moved import forward_moved

_MOVED = dict.fromkeys((
    'PAPER_SCHEDULE', 'PAPER_RECIPES', 'WD_PARAMS', 'keras_l2_to_weight_decay', 'weight_decay_param_groups',
    'classifier_kwargs', 'create_lr_scheduler', 'epoch_seed', 'seed_epoch', 'compute_loss', 'train_one_epoch',
    'evaluate', 'median_summary'), 'pide_zoo.cls')
_MOVED.update(dict.fromkeys((
    'CHECKPOINT_FORMAT', 'CheckpointError', 'ClsCheckpointSaver', 'checkpoint_meta', 'plain', 'read_checkpoint',
    'load_model', 'load_models'), 'pide_zoo.checkpoint'))
# Deprecated since 0.2: they warn when called, as before, and have no new home to name.
__getattr__, __dir__ = forward_moved(__name__, _MOVED, '0.4', silent=('load_checkpoint', 'model_from_checkpoint'),
                                     silent_home='pide_zoo.checkpoint')
