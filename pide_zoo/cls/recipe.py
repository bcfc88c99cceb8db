"""The paper's classification recipe on timm's building blocks: schedule, weight decay, model arguments, seeds.

The recipe of Bohn, Griebel & Kannan (2021), Section 5.1, with the authors' code filling its gaps:
batch 100 (STL-10: 50), SGD with momentum 0.9, 200 epochs at learning rate 0.01 for the first epoch,
then 0.1 divided by 10 at epochs 80, 120, 160 and 180, L2 regularisation of all convolution weights as
Keras ``l2(reg)`` with reg = 2e-4 (STL-10: 5e-4) and the weight-smoothness decay (4.8) with
alpha_2 = 1e-8. Keras adds ``reg * sum(w**2)`` to the loss, whose gradient ``2 * reg * w`` is SGD
weight decay ``2 * reg``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from timm.models import get_pretrained_cfg, is_model
from timm.scheduler import create_scheduler_v2
from timm.utils import random_seed
from torch import nn, optim

from .data import dataset_info

__all__ = [
    'PAPER_SCHEDULE', 'PAPER_RECIPES', 'WD_PARAMS', 'keras_l2_to_weight_decay', 'weight_decay_param_groups',
    'classifier_kwargs', 'create_lr_scheduler', 'epoch_seed', 'seed_epoch',
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


def create_lr_scheduler(optimizer: optim.Optimizer, sched: str = 'multistep',
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


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: every epoch's shuffling and augmentation depend only on (seed, epoch, rank),
    so a run resumed at an epoch boundary continues exactly."""
    return seed + 100_003 * (epoch + 1)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed torch, numpy and random for ``epoch`` on ``rank`` (see :func:`epoch_seed`)."""
    random_seed(epoch_seed(seed, epoch), rank)
