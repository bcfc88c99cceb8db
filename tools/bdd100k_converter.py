"""BDD100K at the paper's resolution: 1280x720 -> 160x90 by keeping every second row and column, three times.

The converter behind ``tools/prepare_bdd100k.py`` (a tools module, not part of the package: it was
``pide_zoo.data.bdd100k`` before 0.3). Needs numpy, Pillow and tqdm.

The authors keep the odd rows and columns each time (``img[1::2, 1::2]`` thrice = ``img[7::8, 7::8]``);
labels are subsampled the same way, never interpolated.

The conversion names every bad source file (unreadable or truncated images and masks, a mask of another
size than its image, an image of another size than the others, label values outside 0-18 and 255, an
image without a mask or a mask without an image) and converts all the others. Every output is written
to a temporary name and renamed, so an interrupted run leaves no half-written file, and a rerun converts
only the pairs whose outputs are missing.
"""
from __future__ import annotations

import os
import os.path as osp
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ['SPLITS', 'MEAN_IMAGE', 'LayoutError', 'ConversionError', 'PrepareSummary', 'subsample', 'check_layout',
           'convert_bdd100k', 'prepare_bdd100k', 'mean_image']

SPLITS = ('train', 'val')
IMG_DIR = osp.join('images', '10k')
ANN_DIR = osp.join('labels', 'sem_seg', 'masks')
MEAN_IMAGE = 'mean_image.npy'
VALID_LABELS = frozenset(range(19)) | {255}
TMP_SUFFIX = '.part'  # matches neither .jpg nor .png, so mmseg never lists a half-written file
_FORMATS = {'.jpg': 'JPEG', '.jpeg': 'JPEG', '.png': 'PNG'}


class LayoutError(ValueError):
    """The source folder is not the BDD100K 10k semantic segmentation layout; the message lists every problem."""


@dataclass
class SplitFiles:
    pairs: List[Tuple[str, str]] = field(default_factory=list)  # (image path, mask path)
    no_mask: List[str] = field(default_factory=list)  # image paths
    no_image: List[str] = field(default_factory=list)  # mask paths

    def unpaired(self) -> List[str]:
        """``'path: problem'`` of every image without a mask and every mask without an image."""
        return [f'{p}: no mask {_other(p, IMG_DIR, ANN_DIR, ".png")}' for p in self.no_mask] + \
            [f'{p}: no image {_other(p, ANN_DIR, IMG_DIR, ".jpg")}' for p in self.no_image]


def _other(path: str, this: str, other: str, ext: str) -> str:
    """The partner file a pair would need: same split and name, in the other folder."""
    split_dir, name = osp.split(path)
    root = split_dir[:split_dir.rindex(this)]
    return osp.join(root, other, osp.basename(split_dir), osp.splitext(name)[0] + ext)


@dataclass
class PrepareSummary:
    """What :func:`convert_bdd100k` did.

    Args:
        pairs: pairs found per split.
        written: pairs converted by this run, per split.
        kept: pairs whose outputs were already there, per split.
        problems: ``'path: problem'`` for every bad source file.
        mean_image: path of the mean image, if this run wrote it.
        mean_of: train images it averages.
    """
    pairs: Dict[str, int]
    written: Dict[str, int]
    kept: Dict[str, int]
    problems: List[str]
    mean_image: Optional[str] = None
    mean_of: int = 0

    @property
    def done(self) -> Dict[str, int]:
        """Pairs present in the output per split (written now or before)."""
        return {s: self.written[s] + self.kept[s] for s in self.pairs}


class ConversionError(LayoutError):
    """Some source files are bad; every other pair was converted. ``summary`` is the :class:`PrepareSummary`."""

    def __init__(self, summary: PrepareSummary):
        self.summary = summary
        done, total = sum(summary.done.values()), sum(summary.pairs.values())
        super().__init__(f'{len(summary.problems)} bad source file(s); {done} of {total} pairs are converted '
                         '(all the others):\n  - ' + '\n  - '.join(summary.problems))


def subsample(array: np.ndarray, times: int = 3) -> np.ndarray:
    """Keep every second row and column (the odd ones), ``times`` times: ``array[7::8, 7::8]`` for 3."""
    step = 2 ** times
    return array[step - 1::step, step - 1::step]


def _scan(src: str, splits: Sequence[str]) -> Tuple[Dict[str, SplitFiles], List[str]]:
    """Pairs per split and the folder-level problems (missing folders, no images)."""
    fatal, found = [], {}
    for split in splits:
        img_dir, ann_dir = osp.join(src, IMG_DIR, split), osp.join(src, ANN_DIR, split)
        missing = [d for d in (img_dir, ann_dir) if not osp.isdir(d)]
        if missing:
            fatal += [f'missing folder {d}' for d in missing]
            continue
        images = {osp.splitext(f)[0]: f for f in os.listdir(img_dir) if f.lower().endswith('.jpg')}
        masks = {osp.splitext(f)[0]: f for f in os.listdir(ann_dir) if f.lower().endswith('.png')}
        if not images:
            fatal.append(f'no .jpg images in {img_dir}')
        found[split] = SplitFiles([(osp.join(img_dir, images[k]), osp.join(ann_dir, masks[k]))
                                   for k in sorted(set(images) & set(masks))],
                                  [osp.join(img_dir, images[k]) for k in sorted(set(images) - set(masks))],
                                  [osp.join(ann_dir, masks[k]) for k in sorted(set(masks) - set(images))])
    return found, fatal


def _layout_error(src: str, problems: List[str]) -> LayoutError:
    return LayoutError(
        f'{src} is not the BDD100K 10k semantic segmentation layout '
        f'({IMG_DIR}/{{train,val}}/*.jpg, {ANN_DIR}/{{train,val}}/*.png):\n  - ' + '\n  - '.join(problems))


def check_layout(src: str, splits: Sequence[str] = SPLITS) -> Dict[str, SplitFiles]:
    """Pair every image with its mask; raise :class:`LayoutError` naming each missing folder or file."""
    found, problems = _scan(src, splits)
    for split, files in found.items():
        img_dir, ann_dir = osp.join(src, IMG_DIR, split), osp.join(src, ANN_DIR, split)
        for paths, what, where, other in ((files.no_mask, 'images', img_dir, f'no mask in {ann_dir}'),
                                          (files.no_image, 'masks', ann_dir, f'no image in {img_dir}')):
            names = [osp.splitext(osp.basename(p))[0] for p in paths]
            if names:
                problems.append(f'{len(names)} {what} in {where} have {other}: '
                                f'{", ".join(names[:5])}{" ..." if len(names) > 5 else ""}')
    if problems:
        raise _layout_error(src, problems)
    return found


def _describe(err: Exception) -> str:
    return f'cannot be read ({type(err).__name__}: {err})'


def _image_size(path: str) -> Optional[Tuple[int, int]]:
    """(W, H) from the header, or None if the file cannot be opened (the conversion then says why)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for bad files
        return None


def _save(arr: np.ndarray, out: str, **kwargs) -> None:
    """Write ``out`` under a temporary name and rename it: a crash leaves no half-written file."""
    from PIL import Image

    tmp = out + TMP_SUFFIX
    Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format=_FORMATS[osp.splitext(out)[1].lower()], **kwargs)
    os.replace(tmp, out)


def _convert(job: Tuple[str, str, str, str, int, Optional[Tuple[int, int]]]) -> List[str]:
    """Convert one pair; returns ``'path: problem'`` for each bad file of it (nothing is written then)."""
    from PIL import Image

    img_path, ann_path, img_out, ann_out, quality, size = job
    problems, img, ann = [], None, None
    try:
        with Image.open(img_path) as im:
            img = np.asarray(im.convert('RGB'))
    except Exception as e:  # noqa: BLE001
        problems.append(f'{img_path}: {_describe(e)}')
    try:
        with Image.open(ann_path) as im:
            if im.mode not in ('L', 'P', 'I', 'I;16'):
                problems.append(f'{ann_path}: mask mode {im.mode!r}, expected a single-channel label image')
            else:
                ann = np.asarray(im)
    except Exception as e:  # noqa: BLE001
        problems.append(f'{ann_path}: {_describe(e)}')
    if img is not None and size is not None and img.shape[1::-1] != size:
        problems.append(f'{img_path}: image size {img.shape[1::-1]}, the others are {size}')
        img = None
    if ann is not None:
        if img is not None and ann.shape != img.shape[:2]:
            problems.append(f'{ann_path}: mask size {ann.shape[::-1]} differs from image size {img.shape[1::-1]} '
                            f'({img_path})')
        bad = sorted(set(np.unique(ann).tolist()) - VALID_LABELS)
        if bad:
            problems.append(f'{ann_path}: label values {bad[:10]}{" ..." if len(bad) > 10 else ""} '
                            'outside 0-18 and 255')
    if problems or img is None or ann is None:
        return problems
    _save(subsample(img), img_out, quality=quality)
    _save(subsample(ann), ann_out)  # written last: a pair counts as done when its mask exists
    return []


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


def _save_npy(array: np.ndarray, path: str) -> None:
    tmp = path + TMP_SUFFIX
    with open(tmp, 'wb') as f:
        np.save(f, array)
    os.replace(tmp, path)


def convert_bdd100k(src: str, dst: str, splits: Sequence[str] = SPLITS, workers: int = 0, overwrite: bool = False,
                    quality: int = 95, progress: bool = True) -> PrepareSummary:
    """Write the 160x90 copy of ``src`` under ``dst`` in the same layout, plus ``dst/mean_image.npy`` (the
    per-pixel mean of the converted train images), and report every bad source file.

    Pairs whose outputs exist are kept unless ``overwrite``; the mean image is rewritten when a train
    pair was written or it is missing. Images must all have the size of most of them.

    Raises:
        LayoutError: a split folder is missing or holds no images (nothing is written then).
    """
    from tqdm import tqdm

    found, fatal = _scan(src, splits)
    if fatal:
        raise _layout_error(src, fatal)
    problems: List[str] = [u for files in found.values() for u in files.unpaired()]
    # The size most images have (BDD100K: 1280x720) is the size all must have: one mean image, equal batches.
    sizes = [_image_size(img) for files in found.values() for img, _ in files.pairs]
    common = Counter(s for s in sizes if s is not None).most_common(1)
    size = common[0][0] if common else None

    jobs, split_of = [], []
    kept = {split: 0 for split in found}
    for split, files in found.items():
        img_dir, ann_dir = osp.join(dst, IMG_DIR, split), osp.join(dst, ANN_DIR, split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for folder in (img_dir, ann_dir):  # leftovers of an interrupted run
            for f in os.listdir(folder):
                if f.endswith(TMP_SUFFIX):
                    os.remove(osp.join(folder, f))
        for img, ann in files.pairs:
            img_out, ann_out = osp.join(img_dir, osp.basename(img)), osp.join(ann_dir, osp.basename(ann))
            if not overwrite and osp.isfile(img_out) and osp.isfile(ann_out):
                kept[split] += 1
                continue
            jobs.append((img, ann, img_out, ann_out, quality, size))
            split_of.append(split)
    written = {split: 0 for split in found}
    bar = tqdm(total=len(jobs), desc='bdd100k -> 160x90', unit='img', disable=not progress)
    pool = ProcessPoolExecutor(workers) if workers > 0 else None
    try:
        results = pool.map(_convert, jobs, chunksize=16) if pool else map(_convert, jobs)
        for split, errors in zip(split_of, results):
            problems += errors
            written[split] += int(not errors)
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # on an interrupt, stop at the pairs under way
    summary = PrepareSummary({s: len(f.pairs) for s, f in found.items()}, written, kept, problems)
    mean_path = osp.join(dst, MEAN_IMAGE)
    train_dir = osp.join(dst, IMG_DIR, 'train')
    if 'train' in found and summary.done['train'] and (written['train'] or overwrite or not osp.isfile(mean_path)):
        _save_npy(mean_image(train_dir), mean_path)
        summary.mean_image = mean_path
        summary.mean_of = sum(f.lower().endswith('.jpg') for f in os.listdir(train_dir))
    return summary


def prepare_bdd100k(src: str, dst: str, splits: Sequence[str] = SPLITS, workers: int = 0, overwrite: bool = False,
                    quality: int = 95, progress: bool = True) -> Dict[str, int]:
    """:func:`convert_bdd100k`; returns the number of pairs per split.

    Raises:
        LayoutError: a split folder is missing or holds no images.
        ConversionError: some source files are bad (every other pair was converted); the message names each.
    """
    summary = convert_bdd100k(src, dst, splits, workers, overwrite, quality, progress)
    if summary.problems:
        raise ConversionError(summary)
    return summary.done
