"""Image classification data with the preprocessing of Bohn, Griebel & Kannan (2021), Section 5.1.

CIFAR-10, CIFAR-100 and STL-10 are read from torchvision's on-disk layouts (the original pickle and
binary files; torchvision downloads them when asked), and scikit-learn's bundled handwritten digits
(8x8, upscaled to 32x32) serve as a dataset that needs no files at all.

Preprocessing as the paper and the authors' code: images scaled to [0, 1], minus the per-pixel mean
of the **train** split (subtracted from the test split too), then zero padding (4 px at 32 px, 12 px
at 96 px), a random crop back to the input size and a random horizontal flip. Padding after the mean
subtraction pads with the mean image's value, as the authors' code does.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    'DATASETS', 'SPLITS', 'DatasetInfo', 'DatasetNotFoundError', 'DatasetCorruptError', 'ClassificationDataset',
    'PadCropFlip',
    'dataset_info', 'load_split', 'load_digits_split', 'per_pixel_mean', 'build_dataset',
]

SPLITS = ('train', 'test')
DIGITS_TEST_SIZE = 360  # of 1797 images: 1437 train / 360 test, stratified, fixed seed
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class DatasetInfo:
    """What the tools need to know about a dataset.

    Args:
        name: dataset name.
        title: name for messages.
        num_classes: classes.
        img_size: input size (square).
        pad: zero padding before the random crop (the paper: 4 at 32 px, 12 at 96 px).
        hflip: random horizontal flips (off for digits, where a flip changes the class).
        folder: torchvision's folder under the data directory (None: no files needed).
        files: files expected in ``folder`` per split.
    """
    name: str
    title: str
    num_classes: int
    img_size: int
    pad: int
    hflip: bool
    folder: Optional[str]
    files: Dict[str, Tuple[str, ...]]

    def layout(self, root: str = 'DATA_DIR') -> str:
        """The expected on-disk layout, for messages."""
        if self.folder is None:
            return 'bundled with scikit-learn (no files needed)'
        names = sorted({f for fs in self.files.values() for f in fs})
        return f"{os.path.join(root, self.folder)}/{{{', '.join(names)}}}"


DATASETS: Dict[str, DatasetInfo] = {
    'cifar10': DatasetInfo(
        'cifar10', 'CIFAR-10', 10, 32, 4, True, 'cifar-10-batches-py',
        {'train': tuple(f'data_batch_{i}' for i in range(1, 6)), 'test': ('test_batch',)}),
    'cifar100': DatasetInfo(
        'cifar100', 'CIFAR-100', 100, 32, 4, True, 'cifar-100-python', {'train': ('train',), 'test': ('test',)}),
    'stl10': DatasetInfo(
        'stl10', 'STL-10', 10, 96, 12, True, 'stl10_binary',
        {'train': ('train_X.bin', 'train_y.bin'), 'test': ('test_X.bin', 'test_y.bin')}),
    'digits': DatasetInfo('digits', 'scikit-learn digits', 10, 32, 4, False, None, {'train': (), 'test': ()}),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where it was expected; the message names the layout and the alternatives."""


class DatasetCorruptError(ValueError):
    """A dataset file cannot be read or holds something else than the format promises; the message names the
    file, what is wrong and how to get a good copy."""


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (one of :data:`DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f'dataset must be one of {tuple(DATASETS)}, got {name!r}')
    return DATASETS[name]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')


def missing_message(info: DatasetInfo, root: Optional[str], split: str) -> str:
    where = repr(root) if root else '(no data directory given)'
    missing = '' if not root else ', '.join(
        f for f in info.files[split] if not os.path.isfile(os.path.join(root, info.folder, f)))
    return (f'{info.title} {split} split not found under {where}: expected the torchvision layout '
            f'{info.layout(root or "DATA_DIR")}' + (f' (missing: {missing})' if missing else '') + '. '
            'Pass --download (download=True) to fetch it into the data directory, or use --dataset digits, '
            'which trains on scikit-learn\'s bundled digits and needs no files.')


def _download(info: DatasetInfo, root: str) -> None:
    import torchvision.datasets as tvd

    os.makedirs(root, exist_ok=True)
    if info.name == 'cifar10':
        tvd.CIFAR10(root, train=True, download=True)
    elif info.name == 'cifar100':
        tvd.CIFAR100(root, train=True, download=True)
    elif info.name == 'stl10':
        tvd.STL10(root, split='train', download=True)


def _corrupt(path: str, problem: str, info: DatasetInfo) -> DatasetCorruptError:
    return DatasetCorruptError(
        f'{path}: {problem}; it is not a valid {info.title} file (truncated or corrupt?). Delete '
        f'{os.path.dirname(path)} and pass --download to fetch {info.title} again.')


def _check_labels(path: str, labels: np.ndarray, n_images: int, low: int, info: DatasetInfo) -> None:
    if len(labels) != n_images:
        raise _corrupt(path, f'{len(labels)} labels for {n_images} images', info)
    if len(labels) and (labels.min() < low or labels.max() >= low + info.num_classes):
        raise _corrupt(path, f'label values {labels.min()}..{labels.max()} outside {low}..'
                             f'{low + info.num_classes - 1}', info)


def _read_cifar(path: str, label_key: str, info: DatasetInfo) -> Tuple[np.ndarray, np.ndarray]:
    """One CIFAR python pickle: images uint8 (N, 3, 32, 32) and labels; a bad file raises
    :class:`DatasetCorruptError` naming it."""
    try:
        with open(path, 'rb') as f:
            entry = pickle.load(f, encoding='latin1')
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises anything from EOFError to KeyError
        raise _corrupt(path, f'cannot be unpickled ({type(e).__name__}: {e})', info) from None
    if not isinstance(entry, dict) or 'data' not in entry or label_key not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise _corrupt(path, f"holds no 'data' and {label_key!r} entries (found: {keys})", info)
    data = np.asarray(entry['data'])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _corrupt(path, f"'data' is {data.dtype} of shape {data.shape}, not uint8 rows of 3072 values", info)
    labels = np.asarray(entry[label_key], dtype=np.int64)
    _check_labels(path, labels, len(data), 0, info)
    return data.reshape(-1, 3, 32, 32), labels


def _read_stl10(folder: str, split: str, info: DatasetInfo) -> Tuple[np.ndarray, np.ndarray]:
    """The STL-10 binaries of one split; a bad file raises :class:`DatasetCorruptError` naming it."""
    x_path, y_path = os.path.join(folder, f'{split}_X.bin'), os.path.join(folder, f'{split}_y.bin')
    per_image = 3 * 96 * 96
    raw = np.fromfile(x_path, dtype=np.uint8)
    if raw.size == 0 or raw.size % per_image:
        raise _corrupt(x_path, f'{raw.size} bytes, not a positive multiple of 3 x 96 x 96 = {per_image}', info)
    # The binary files store each image column-major: (N, C, W, H).
    images = raw.reshape(-1, 3, 96, 96)
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
    _check_labels(y_path, labels, len(images), 1, info)
    return np.ascontiguousarray(images.transpose(0, 1, 3, 2)), labels - 1


def load_digits_split(split: str, img_size: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits (8x8, values 0..16), bilinearly upscaled to ``img_size`` and
    repeated to 3 channels, as uint8 (N, 3, H, W); a fixed stratified split of 1437 train / 360 test."""
    _check_split(split)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(digits.target)), test_size=DIGITS_TEST_SIZE, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED)
    idx = idx_train if split == 'train' else idx_test
    x = torch.from_numpy(digits.images[idx] / 16.0).float().unsqueeze(1)
    x = F.interpolate(x, size=(img_size, img_size), mode='bilinear', align_corners=False).clamp_(0, 1)
    images = (x * 255).round_().to(torch.uint8).expand(-1, 3, -1, -1).contiguous().numpy()
    return images, digits.target[idx].astype(np.int64)


def load_split(name: str, root: Optional[str] = None, split: str = 'train',
               download: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 3, H, W) and labels as int64 (N,) of one split.

    Args:
        name: one of :data:`DATASETS`.
        root: data directory holding torchvision's folder (``cifar-10-batches-py``, ...).
        split: ``'train'`` or ``'test'``.
        download: fetch the dataset with torchvision first if it is missing.

    Raises:
        DatasetNotFoundError: the files are missing (and ``download`` is False).
        DatasetCorruptError: a file cannot be read or does not hold the format's images and labels.
    """
    info = dataset_info(name)
    _check_split(split)
    if info.folder is None:
        return load_digits_split(split, info.img_size)
    folder = os.path.join(root, info.folder) if root else None
    present = folder is not None and all(os.path.isfile(os.path.join(folder, f)) for f in info.files[split])
    if not present and download and root:
        _download(info, root)
        present = all(os.path.isfile(os.path.join(folder, f)) for f in info.files[split])
    if not present:
        raise DatasetNotFoundError(missing_message(info, root, split))
    if name == 'stl10':
        return _read_stl10(folder, split, info)
    label_key = 'labels' if name == 'cifar10' else 'fine_labels'
    parts = [_read_cifar(os.path.join(folder, f), label_key, info) for f in info.files[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def per_pixel_mean(images: np.ndarray) -> Tensor:
    """Per-pixel (and per-channel) mean (C, H, W) of uint8 images (N, C, H, W), in [0, 1] units.

    Pass the **train** split only: the paper subtracts the train-set mean from train and test images.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f'images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}')
    total = np.zeros(images.shape[1:], dtype=np.float64)
    for start in range(0, len(images), 4096):  # chunks keep float64 copies small
        total += images[start:start + 4096].sum(0, dtype=np.float64)
    return torch.from_numpy(total / (255.0 * len(images))).float()


class PadCropFlip:
    """Zero padding by ``pad``, a random crop back to the input size and an optional random horizontal flip,
    on one (C, H, W) tensor. Draws from torch's global generator (seeded per epoch by the training tool)."""

    def __init__(self, pad: int = 4, hflip: bool = True):
        if not isinstance(pad, int) or pad < 0:
            raise ValueError(f'pad must be a non-negative int, got {pad!r}')
        self.pad, self.hflip = pad, hflip

    def __call__(self, x: Tensor) -> Tensor:
        if self.pad:
            h, w = x.shape[-2:]
            x = F.pad(x, (self.pad,) * 4)
            i, j = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[..., i:i + h, j:j + w]
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.contiguous()

    def __repr__(self) -> str:
        return f'{type(self).__name__}(pad={self.pad}, hflip={self.hflip})'


class ClassificationDataset(Dataset):
    """uint8 images (N, C, H, W) served as float tensors in [0, 1] minus ``mean``, then ``transform``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: Tensor,
                 transform: Optional[Callable[[Tensor], Tensor]] = None):
        if len(images) != len(labels):
            raise ValueError(f'images and labels differ in length: {len(images)} and {len(labels)}')
        if tuple(mean.shape) != tuple(images.shape[1:]):
            raise ValueError(f'mean must have the image shape {tuple(images.shape[1:])}, got {tuple(mean.shape)}')
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.mean = mean.float()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        x = self.images[index].float().div_(255).sub_(self.mean)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[index])


def build_dataset(name: str, split: str, root: Optional[str] = None, download: bool = False,
                  mean: Optional[Tensor] = None, augment: Optional[bool] = None) -> ClassificationDataset:
    """One split with the paper's preprocessing.

    Args:
        name: one of :data:`DATASETS`.
        split: ``'train'`` or ``'test'``.
        root: data directory.
        download: fetch the dataset if it is missing.
        mean: the per-pixel mean to subtract; None computes it from the **train** split (loading it if
            ``split`` is ``'test'``).
        augment: pad-crop-flip; default: on for the train split only.
    """
    info = dataset_info(name)
    images, labels = load_split(name, root, split, download)
    if mean is None:
        mean = per_pixel_mean(images if split == 'train' else load_split(name, root, 'train', download)[0])
    augment = split == 'train' if augment is None else augment
    transform = PadCropFlip(info.pad, info.hflip) if augment else None
    return ClassificationDataset(images, labels, mean, transform)
