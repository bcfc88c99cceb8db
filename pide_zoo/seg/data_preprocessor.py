"""Per-pixel mean subtraction (the paper's BDD100K preprocessing) as an mmseg data preprocessor."""
from __future__ import annotations

import os.path as osp
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmseg.models.data_preprocessor import SegDataPreProcessor
from mmseg.registry import MODELS

__all__ = ['PixelMeanSegDataPreProcessor', 'PREPARE_COMMAND', 'load_mean_image']

PREPARE_COMMAND = 'python tools/prepare_bdd100k.py --src data/bdd100k --dst {dst}'


def load_mean_image(path: str) -> np.ndarray:
    """The (3, H, W) float32 mean image saved at ``path``, with errors that name the file."""
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'mean image {path!r} not found: it is written by '
            f'`{PREPARE_COMMAND.format(dst=osp.dirname(path) or ".")}`')
    mean = np.load(path)
    if mean.ndim != 3 or mean.shape[0] != 3:
        raise ValueError(f'mean image {path!r} must have shape (3, H, W), got {mean.shape}')
    return mean.astype(np.float32)


@MODELS.register_module()
class PixelMeanSegDataPreProcessor(SegDataPreProcessor):
    """Scale images to [0, 1] and subtract the train set's mean image (3, H, W), pixel by pixel.

    The mean image is the persistent buffer ``pixel_mean``: saved in every checkpoint and restored by
    ``load_checkpoint`` / ``mmseg.apis.init_model``, so a checkpoint and its config are all inference
    needs. It is empty until set: by :class:`~pide_zoo.seg.hooks.PixelMeanHook` when training starts
    (``mean_image.npy`` of the train dataloader's ``data_root``, written by
    ``tools/prepare_bdd100k.py``), by loading a checkpoint, or from the explicit ``mean_image`` path.
    Images must have the mean image's size; the test pipeline resizes photos of other sizes to it. At test
    time an image that is a rescale of that size (the same aspect ratio: test-time augmentation's scale
    factors) has the mean image resized bilinearly to its size, like the image.

    Args:
        mean_image: optional path of a ``.npy`` mean image. When given it wins over the data root's at
            training start, and it is read on first use when no mean was set otherwise (checkpoints
            written before the mean was part of the state dict).
        scale: factor applied to the raw pixel values before the subtraction.
        bgr_to_rgb: convert mmcv's BGR images to RGB first (the mean image is RGB).
        **kwargs: further ``SegDataPreProcessor`` arguments (``size``, ``pad_val``, ``seg_pad_val``...).
    """

    def __init__(self, mean_image: Optional[str] = None, scale: float = 1 / 255, bgr_to_rgb: bool = True,
                 **kwargs: Any):
        if kwargs.get('mean') is not None or kwargs.get('std') is not None:
            raise ValueError('mean/std are replaced by mean_image in PixelMeanSegDataPreProcessor; do not pass them')
        kwargs.pop('mean', None), kwargs.pop('std', None)
        if mean_image is not None and not isinstance(mean_image, str):
            raise TypeError(f'mean_image must be a path (str) or None, got {type(mean_image).__name__}')
        super().__init__(mean=None, std=None, bgr_to_rgb=bgr_to_rgb, **kwargs)
        self.mean_image_path = mean_image
        self.scale = scale
        # Empty until set: its shape is known only from the data or a checkpoint.
        self.register_buffer('pixel_mean', torch.empty(0), persistent=True)

    @property
    def has_mean(self) -> bool:
        return self.pixel_mean.numel() > 0

    def set_mean_image(self, mean: Union[str, np.ndarray, torch.Tensor]) -> None:
        """Set the mean image from a ``.npy`` path or a (3, H, W) array, resizing the buffer in place."""
        if isinstance(mean, str):
            mean = load_mean_image(mean)
        mean = torch.as_tensor(np.asarray(mean, np.float32) if isinstance(mean, np.ndarray) else mean)
        if mean.ndim != 3 or mean.shape[0] != 3:
            raise ValueError(f'the mean image must have shape (3, H, W), got {tuple(mean.shape)}')
        # In place, so wrappers holding the buffer (DDP) see the new values.
        with torch.no_grad():
            self.pixel_mean.resize_(mean.shape).copy_(mean)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + 'pixel_mean'
        if key in state_dict:
            self.pixel_mean.resize_(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key not in state_dict and key in missing_keys:
            # A checkpoint from before the mean was model state: fall back to the mean_image path.
            missing_keys.remove(key)
            print_log(f'the checkpoint has no {key}; the mean image comes from '
                      f'{self.mean_image_path or "the data root (PixelMeanHook)"}', logger='current')

    def forward(self, data: dict, training: bool = False) -> Dict[str, Any]:
        data = super().forward(data, training)
        if not self.has_mean:
            if self.mean_image_path is None:
                raise RuntimeError(
                    'PixelMeanSegDataPreProcessor has no mean image: load a checkpoint trained with it, train '
                    'with custom_hooks=[dict(type="PixelMeanHook")] (reads mean_image.npy in the train '
                    'dataloader\'s data_root), or set model.data_preprocessor.mean_image to a mean_image.npy '
                    f'(written by `{PREPARE_COMMAND.format(dst="data/bdd100k_160x90")}`)')
            self.set_mean_image(self.mean_image_path)
        inputs = data['inputs']
        mean = self.pixel_mean.to(inputs.dtype)
        size, mean_size = tuple(inputs.shape[-2:]), tuple(mean.shape[-2:])
        if size != mean_size:
            if training or not _is_rescale(size, mean_size):
                raise ValueError(
                    f'images of size {size} (H, W) do not match the mean image of size {mean_size}: resize them '
                    f'to it in the pipeline (dict(type="Resize", scale=({mean_size[1]}, {mean_size[0]}), '
                    'keep_ratio=False)); at test time a rescale of it (the same aspect ratio, as test-time '
                    'augmentation scale factors give) is also accepted')
            # test-time scales: the mean image rescaled like the image
            mean = F.interpolate(mean[None], size=size, mode='bilinear', align_corners=False)[0]
        data['inputs'] = inputs * self.scale - mean
        return data


def _is_rescale(size: Tuple[int, int], mean_size: Tuple[int, int]) -> bool:
    """Whether ``size`` is ``mean_size`` times one factor, each side rounded to whole pixels."""
    (h, w), (mh, mw) = size, mean_size
    return abs(h * mw - w * mh) <= (mh + mw) / 2
