"""The classification face: the paper's recipe, its data and the training loop, on timm's building blocks.

``tools/train_cls.py`` and ``tools/eval_cls.py`` are thin command lines over this package:
:mod:`~pide_zoo.cls.recipe` (schedule, weight decay, model arguments, seeds), :mod:`~pide_zoo.cls.data`
(CIFAR-10/100, STL-10 and scikit-learn's digits with the paper's preprocessing) and
:mod:`~pide_zoo.cls.engine` (one epoch, evaluation). Checkpoints and the model loader are in
:mod:`pide_zoo.checkpoint`. Needs torch and timm only (torchvision and scikit-learn when a dataset asks).
"""
from .data import (
    DATASETS,
    SPLITS,
    ClassificationDataset,
    DatasetCorruptError,
    DatasetInfo,
    DatasetNotFoundError,
    PadCropFlip,
    build_dataset,
    dataset_info,
    load_digits_split,
    load_split,
    per_pixel_mean,
)
from .engine import compute_loss, evaluate, median_summary, train_one_epoch
from .recipe import (
    PAPER_RECIPES,
    PAPER_SCHEDULE,
    WD_PARAMS,
    classifier_kwargs,
    create_lr_scheduler,
    epoch_seed,
    keras_l2_to_weight_decay,
    seed_epoch,
    weight_decay_param_groups,
)

__all__ = [
    # recipe
    'PAPER_SCHEDULE', 'PAPER_RECIPES', 'WD_PARAMS', 'keras_l2_to_weight_decay', 'weight_decay_param_groups',
    'classifier_kwargs', 'create_lr_scheduler', 'epoch_seed', 'seed_epoch',
    # data
    'DATASETS', 'SPLITS', 'DatasetInfo', 'DatasetNotFoundError', 'DatasetCorruptError', 'ClassificationDataset',
    'PadCropFlip', 'dataset_info', 'load_split', 'load_digits_split', 'per_pixel_mean', 'build_dataset',
    # engine
    'compute_loss', 'train_one_epoch', 'evaluate', 'median_summary',
]
