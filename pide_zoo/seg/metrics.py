"""The soft (probability) IoU of the paper's Table 3, as an mmseg metric beside ``IoUMetric``."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmseg.registry import METRICS

__all__ = ['SoftIoUMetric', 'soft_iou']


def soft_iou(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255, smooth: float = 1.0) -> float:
    """Soft IoU of one image: ``(I + smooth) / (2P - I + smooth)``.

    With softmax probabilities p over the classes (dim 0 of ``logits``, (C, H, W)) and the P counted
    pixels (``label`` != ``ignore_index``), I is the sum over counted pixels of p(true class). The
    union, sum of one-hot labels plus sum of probabilities minus I, is 2P - I since each pixel's
    probabilities sum to 1. An image without counted pixels scores 1.
    """
    if logits.ndim != 3 or logits.shape[0] < 2:
        raise ValueError(f'seg_logits must have shape (C, H, W) with C >= 2 classes, got {tuple(logits.shape)}')
    if tuple(label.shape) != tuple(logits.shape[1:]):
        raise ValueError(f'gt_sem_seg of size {tuple(label.shape)} does not match seg_logits of size '
                         f'{tuple(logits.shape[1:])}')
    counted = label != ignore_index
    true = label[counted].long()
    if true.numel() and (true.min() < 0 or true.max() >= logits.shape[0]):
        bad = sorted(set(true[(true < 0) | (true >= logits.shape[0])].tolist()))
        raise ValueError(f'gt_sem_seg has labels {bad} outside 0-{logits.shape[0] - 1} '
                         f'(ignore_index={ignore_index})')
    prob = logits.double().softmax(dim=0)
    intersection = prob[:, counted].gather(0, true[None]).sum()
    pixels = float(true.numel())
    return float((intersection + smooth) / (2 * pixels - intersection + smooth))


@METRICS.register_module()
class SoftIoUMetric(BaseMetric):
    """Mean over images of :func:`soft_iou`: the IoU of the paper's Table 3 (the authors' ``iou_fn``).

    Reads ``seg_logits`` (resized back to the image's size by the segmentor) and ``gt_sem_seg`` of each
    data sample, like mmseg's ``IoUMetric`` reads ``pred_sem_seg``, and reports ``sIoU`` in percent.
    With ``void_as_class`` datasets the void label is a class of its own and its pixels are counted.

    Args:
        ignore_index: label of pixels that are not counted.
        smooth: added to the intersection and the union (the authors' 1).
        collect_device: device of the results gathered across processes (``'cpu'`` or ``'gpu'``).
        prefix: prefix of the metric name.
    """

    default_prefix: Optional[str] = None

    def __init__(self, ignore_index: int = 255, smooth: float = 1.0, collect_device: str = 'cpu',
                 prefix: Optional[str] = None, **kwargs) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        if smooth < 0:
            raise ValueError(f'smooth must be >= 0, got {smooth!r}')
        self.ignore_index = ignore_index
        self.smooth = smooth

    def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
        classes = (self.dataset_meta or {}).get('classes')
        for data_sample in data_samples:
            logits = data_sample['seg_logits']['data']
            if classes is not None and logits.shape[0] != len(classes):
                raise ValueError(f'seg_logits have {logits.shape[0]} channels but dataset_meta has '
                                 f'{len(classes)} classes')
            label = data_sample['gt_sem_seg']['data'].squeeze(0).to(logits.device)
            try:
                self.results.append(soft_iou(logits, label, self.ignore_index, self.smooth))
            except ValueError as e:  # name the image: the label map's file where the sample carries it
                where = data_sample.get('seg_map_path') or data_sample.get('img_path')
                if where is None:
                    raise
                raise ValueError(f'{where}: {e}') from None

    def compute_metrics(self, results: List[float]) -> Dict[str, float]:
        return {'sIoU': float(np.round(np.mean(results) * 100, 2))}
