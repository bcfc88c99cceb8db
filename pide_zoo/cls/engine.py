"""One epoch of training and an evaluation pass for timm classifiers, with the weight-smoothness decay (4.8).

``tools/train_cls.py`` and ``tools/eval_cls.py`` drive these with timm's optimiser, scheduler, EMA and loss
scaler; :func:`median_summary` reduces several runs as the paper reports them (the median of 5 seeds).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from timm.utils import AverageMeter, accuracy, unwrap_model
from torch import Tensor, nn

from ..layers import smoothness_penalty

__all__ = ['compute_loss', 'train_one_epoch', 'evaluate', 'median_summary']


def compute_loss(model: nn.Module, output: Tensor, target: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 smoothness: float = 0.0) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The training objective: ``loss_fn(output, target)`` plus the weight-smoothness decay (4.8)
    ``smoothness_penalty(model, smoothness)``. Returns the total and its parts (``'ce'``, ``'smooth'``)."""
    ce = loss_fn(output, target)
    smooth = smoothness_penalty(unwrap_model(model), smoothness) if smoothness else ce.new_zeros(())
    return ce + smooth, dict(ce=ce.detach(), smooth=smooth.detach())


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
