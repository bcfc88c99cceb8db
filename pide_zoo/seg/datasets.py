"""Datasets and transforms: BDD100K at the paper's 160x90 and a procedural long-range demo."""
from __future__ import annotations

import json
import os
import os.path as osp
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmengine.dist import barrier, get_rank, is_distributed
from mmseg.datasets import BaseSegDataset, BDD100KDataset
from mmseg.registry import DATASETS, TRANSFORMS

__all__ = ['BDD100KPaperDataset', 'VoidAsClass', 'LongRangeDemoDataset', 'check_labels', 'make_longrange_sample',
           'write_longrange_split']

BDD100K_HELP = (
    'Put the official BDD100K 10k semantic segmentation set under data/bdd100k '
    '(images/10k/{train,val}/*.jpg, labels/sem_seg/masks/{train,val}/*.png) and write the paper\'s 160x90 '
    'copy with `python tools/prepare_bdd100k.py --src data/bdd100k --dst data/bdd100k_160x90`, '
    'or point the config at your copy with --cfg-options train_dataloader.dataset.data_root=... '
    'val_dataloader.dataset.data_root=... test_dataloader.dataset.data_root=...')


def check_labels(data: Optional[Dict[str, Any]], num_classes: int, ignore_index: int, dataset: str) -> None:
    """Raise a ``ValueError`` naming the label file when a packed sample (or each of its test-time
    augmentations) has a label outside ``0 .. num_classes - 1`` other than ``ignore_index``."""
    if data is None:
        return
    samples = data.get('data_samples')
    for sample in samples if isinstance(samples, (list, tuple)) else [samples]:
        if sample is None or 'gt_sem_seg' not in sample:
            continue
        values = torch.unique(sample.gt_sem_seg.data)
        bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
        if bad.numel():
            where = sample.metainfo.get('seg_map_path') or sample.metainfo.get('img_path')
            raise ValueError(f'{where}: labels {bad.tolist()} outside 0-{num_classes - 1} (the {num_classes} classes '
                             f'of {dataset}; {ignore_index} = ignore_index is skipped)')


class _CheckedLabels:
    """Every sample's labels checked by :func:`check_labels`: without it a bad label stops training with the
    loss's bare index error and mmseg's ``IoUMetric`` drops it silently."""

    def prepare_data(self, idx: int) -> Any:
        data = super().prepare_data(idx)
        check_labels(data, len(self.metainfo['classes']), self.ignore_index, type(self).__name__)
        return data


@TRANSFORMS.register_module()
class VoidAsClass(BaseTransform):
    """Relabel ``ignore_index`` pixels as class ``label`` (the authors' code trains 255 as a 20th class)."""

    def __init__(self, ignore_index: int = 255, label: int = 19):
        self.ignore_index, self.label = ignore_index, label

    def transform(self, results: Dict[str, Any]) -> Dict[str, Any]:
        seg = results['gt_seg_map']
        results['gt_seg_map'] = np.where(seg == self.ignore_index, self.label, seg).astype(seg.dtype)
        return results

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(ignore_index={self.ignore_index}, label={self.label})'


@DATASETS.register_module()
class BDD100KPaperDataset(_CheckedLabels, BDD100KDataset):
    """mmseg's ``BDD100KDataset`` (19 classes, 255 ignored) with clear errors for missing data and for labels
    outside the classes (naming the file).

    Args:
        void_as_class: train the ignore label 255 as a 20th class ``'void'`` like the authors' code
            (set the decode head's ``num_classes=20`` too).
        **kwargs: ``BDD100KDataset`` arguments.
    """

    def __init__(self, void_as_class: bool = False, **kwargs: Any):
        self.void_as_class = void_as_class
        if void_as_class:
            meta = dict(kwargs.pop('metainfo', None) or {})
            meta.setdefault('classes', BDD100KDataset.METAINFO['classes'] + ('void',))
            meta.setdefault('palette', BDD100KDataset.METAINFO['palette'] + [[0, 0, 0]])
            kwargs['metainfo'] = meta
            pipeline = list(kwargs.get('pipeline', []))
            at = next((i + 1 for i, t in enumerate(pipeline) if isinstance(t, dict)
                       and t.get('type') in ('LoadAnnotations', 'mmseg.LoadAnnotations')), None)
            if at is None:
                raise ValueError('void_as_class=True needs a LoadAnnotations step in the pipeline')
            pipeline.insert(at, dict(type='VoidAsClass', ignore_index=255, label=19))
            kwargs['pipeline'] = pipeline
        super().__init__(**kwargs)

    def load_data_list(self) -> List[dict]:
        for key in ('img_path', 'seg_map_path'):
            path = self.data_prefix.get(key, '')
            if not osp.isdir(path):
                raise FileNotFoundError(f'BDD100K {key} folder {path!r} does not exist. {BDD100K_HELP}')
        data_list = super().load_data_list()
        if not data_list:
            raise FileNotFoundError(f'no *.jpg images in {self.data_prefix["img_path"]!r}. {BDD100K_HELP}')
        return data_list


# --- the long-range demo -------------------------------------------------------------------------
LONGRANGE_CLASSES = ('background', 'red region', 'green region', 'blue region')
LONGRANGE_PALETTE = [[0, 0, 0], [220, 40, 40], [40, 200, 40], [40, 40, 220]]
_BEACON = np.array(LONGRANGE_PALETTE[1:], dtype=np.float32)


def make_longrange_sample(rng: np.random.Generator, height: int = 32, width: int = 96, strip: int = 16,
                          gap: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3 uint8 RGB) and label map (H, W uint8).

    A coloured strip on the left edge (red, green or blue) decides the class of a grey blob on the
    right, at least ``gap`` pixels away; everything else is background. The blob is locally the same
    for every class, so a network must see the strip to label it.
    """
    color = int(rng.integers(3))
    img = rng.normal(110, 20, (height, width, 3)).astype(np.float32)
    img[:, :strip] = _BEACON[color] + rng.normal(0, 25, (height, strip, 3))
    label = np.zeros((height, width), np.uint8)
    x0 = strip + gap
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(x0 + 8, width - 8)
    ry, rx = rng.uniform(0.15, 0.35) * height, rng.uniform(5, min(14, (width - x0) / 2))
    yy, xx = np.mgrid[:height, :width]
    blob = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) & (xx >= x0)
    img[blob] = rng.normal(175, 20, (int(blob.sum()), 3))
    label[blob] = color + 1
    return np.clip(img, 0, 255).astype(np.uint8), label


def write_longrange_split(img_dir: str, ann_dir: str, num_samples: int, seed: int) -> None:
    """Write ``num_samples`` demo samples as PNGs (deterministic in ``seed``), unless already there."""
    from PIL import Image

    stamp = osp.join(img_dir, '.longrange.json')
    spec = dict(num_samples=num_samples, seed=seed, version=1)
    if osp.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == spec:
                return
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_samples):
        img, label = make_longrange_sample(rng)
        Image.fromarray(img).save(osp.join(img_dir, f'{i:05d}.png'))
        Image.fromarray(label).save(osp.join(ann_dir, f'{i:05d}.png'))
    with open(stamp, 'w') as f:
        json.dump(spec, f)


@DATASETS.register_module()
class LongRangeDemoDataset(_CheckedLabels, BaseSegDataset):
    """Procedural segmentation task whose labels depend on context ~32 px away (see
    :func:`make_longrange_sample`). Generated into ``data_root`` on first use; no download. A label outside
    its classes (in a folder edited by hand) stops with the file named.

    Args:
        num_samples: images in this split.
        seed: generator seed of this split.
        **kwargs: ``BaseSegDataset`` arguments (``data_root``, ``data_prefix``, ``pipeline``...).
    """

    METAINFO = dict(classes=LONGRANGE_CLASSES, palette=LONGRANGE_PALETTE)

    def __init__(self, num_samples: int = 200, seed: int = 0, **kwargs: Any):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f'num_samples must be a positive int, got {num_samples!r}')
        self.num_samples, self.seed = num_samples, seed
        super().__init__(img_suffix='.png', seg_map_suffix='.png', reduce_zero_label=False, **kwargs)

    def load_data_list(self) -> List[dict]:
        args = (self.data_prefix['img_path'], self.data_prefix['seg_map_path'], self.num_samples, self.seed)
        if is_distributed():  # one writer; the other processes wait for it
            if get_rank() == 0:
                write_longrange_split(*args)
            barrier()
        else:
            write_longrange_split(*args)
        return super().load_data_list()
