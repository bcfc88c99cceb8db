"""BDD100K at the paper's resolution: 1280x720 -> 160x90 by keeping every second row and column, three times.

The authors keep the odd rows and columns each time (``img[1::2, 1::2]`` thrice = ``img[7::8, 7::8]``);
labels are subsampled the same way, never interpolated.
"""
from __future__ import annotations

import os
import os.path as osp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = ['SPLITS', 'LayoutError', 'subsample', 'check_layout', 'prepare_bdd100k', 'mean_image']

SPLITS = ('train', 'val')
IMG_DIR = osp.join('images', '10k')
ANN_DIR = osp.join('labels', 'sem_seg', 'masks')
VALID_LABELS = frozenset(range(19)) | {255}


class LayoutError(ValueError):
    """The source folder is not the BDD100K 10k semantic segmentation layout; the message lists every problem."""


@dataclass
class SplitFiles:
    pairs: List[Tuple[str, str]] = field(default_factory=list)  # (image path, mask path)


def subsample(array: np.ndarray, times: int = 3) -> np.ndarray:
    """Keep every second row and column (the odd ones), ``times`` times: ``array[7::8, 7::8]`` for 3."""
    step = 2 ** times
    return array[step - 1::step, step - 1::step]


def check_layout(src: str, splits: Sequence[str] = SPLITS) -> Dict[str, SplitFiles]:
    """Pair every image with its mask; raise :class:`LayoutError` naming each missing folder or file."""
    problems, found = [], {}
    for split in splits:
        img_dir, ann_dir = osp.join(src, IMG_DIR, split), osp.join(src, ANN_DIR, split)
        missing = [d for d in (img_dir, ann_dir) if not osp.isdir(d)]
        if missing:
            problems += [f'missing folder {d}' for d in missing]
            continue
        images = {osp.splitext(f)[0]: f for f in os.listdir(img_dir) if f.lower().endswith('.jpg')}
        masks = {osp.splitext(f)[0]: f for f in os.listdir(ann_dir) if f.lower().endswith('.png')}
        if not images:
            problems.append(f'no .jpg images in {img_dir}')
        no_mask = sorted(set(images) - set(masks))
        no_image = sorted(set(masks) - set(images))
        if no_mask:
            problems.append(f'{len(no_mask)} images in {img_dir} have no mask in {ann_dir}: '
                            f'{", ".join(no_mask[:5])}{" ..." if len(no_mask) > 5 else ""}')
        if no_image:
            problems.append(f'{len(no_image)} masks in {ann_dir} have no image in {img_dir}: '
                            f'{", ".join(no_image[:5])}{" ..." if len(no_image) > 5 else ""}')
        found[split] = SplitFiles([(osp.join(img_dir, images[k]), osp.join(ann_dir, masks[k]))
                                   for k in sorted(set(images) & set(masks))])
    if problems:
        raise LayoutError(
            f'{src} is not the BDD100K 10k semantic segmentation layout '
            f'({IMG_DIR}/{{train,val}}/*.jpg, {ANN_DIR}/{{train,val}}/*.png):\n  - ' + '\n  - '.join(problems))
    return found


def _convert(job: Tuple[str, str, str, str, bool, int]) -> str:
    """Convert one pair; returns '' or a description of what is wrong with it."""
    from PIL import Image

    img_path, ann_path, img_out, ann_out, overwrite, quality = job
    if not overwrite and osp.isfile(img_out) and osp.isfile(ann_out):
        return ''
    img = np.asarray(Image.open(img_path).convert('RGB'))
    ann_img = Image.open(ann_path)
    if ann_img.mode not in ('L', 'P', 'I', 'I;16'):
        return f'{ann_path}: mask mode {ann_img.mode!r}, expected a single-channel label image'
    ann = np.asarray(ann_img)
    if ann.shape != img.shape[:2]:
        return f'{ann_path}: mask size {ann.shape[::-1]} differs from image size {img.shape[1::-1]} ({img_path})'
    bad = sorted(set(np.unique(ann).tolist()) - VALID_LABELS)
    if bad:
        return f'{ann_path}: label values {bad[:10]} outside 0-18 and 255'
    # Write to a temporary name first: an interrupted run never leaves a truncated file behind.
    for arr, out, kw in ((subsample(img), img_out, dict(quality=quality)), (subsample(ann), ann_out, {})):
        tmp = out + '.tmp' + osp.splitext(out)[1]
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, **kw)
        os.replace(tmp, out)
    return ''


def mean_image(img_dir: str) -> np.ndarray:
    """Per-pixel mean (3, H, W) in [0, 1], RGB, of the images in ``img_dir`` (all of one size)."""
    from PIL import Image

    files = sorted(f for f in os.listdir(img_dir) if f.lower().endswith('.jpg'))
    if not files:
        raise LayoutError(f'no .jpg images in {img_dir} to average')
    total = None
    for f in files:
        img = np.asarray(Image.open(osp.join(img_dir, f)).convert('RGB'), dtype=np.float64)
        if total is not None and img.shape != total.shape:
            raise LayoutError(f'{osp.join(img_dir, f)} has size {img.shape[1::-1]}, the others {total.shape[1::-1]}')
        total = img if total is None else total + img
    return (total / len(files) / 255.0).transpose(2, 0, 1).astype(np.float32)


def prepare_bdd100k(src: str, dst: str, splits: Sequence[str] = SPLITS, workers: int = 0, overwrite: bool = False,
                    quality: int = 95, progress: bool = True) -> Dict[str, int]:
    """Write the 160x90 copy of ``src`` under ``dst`` in the same layout, plus ``dst/mean_image.npy``
    (the train split's per-pixel mean). Existing outputs are kept unless ``overwrite``.

    Returns the number of pairs per split. Raises :class:`LayoutError` listing every problem found.
    """
    from tqdm import tqdm

    found = check_layout(src, splits)
    jobs = []
    for split, files in found.items():
        img_dir, ann_dir = osp.join(dst, IMG_DIR, split), osp.join(dst, ANN_DIR, split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        jobs += [(img, ann, osp.join(img_dir, osp.basename(img)), osp.join(ann_dir, osp.basename(ann)), overwrite,
                  quality) for img, ann in files.pairs]
    bar = tqdm(total=len(jobs), desc='bdd100k -> 160x90', unit='img', disable=not progress)
    errors = []
    if workers > 0:
        with ProcessPoolExecutor(workers) as pool:
            for err in pool.map(_convert, jobs, chunksize=16):
                errors += [err] if err else []
                bar.update()
    else:
        for job in jobs:
            err = _convert(job)
            errors += [err] if err else []
            bar.update()
    bar.close()
    if errors:
        raise LayoutError(f'{len(errors)} of {len(jobs)} pairs could not be converted (the others were written):'
                          '\n  - ' + '\n  - '.join(errors[:20]) + ('\n  - ...' if len(errors) > 20 else ''))
    if 'train' in found:
        np.save(osp.join(dst, 'mean_image.npy'), mean_image(osp.join(dst, IMG_DIR, 'train')))
    return {split: len(files.pairs) for split, files in found.items()}
