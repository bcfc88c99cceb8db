"""Per-pixel mean subtraction (the paper's BDD100K preprocessing) as an mmseg data preprocessor."""
from __future__ import annotations

import os.path as osp
from typing import Any, Dict

import numpy as np
import torch
from mmseg.models.data_preprocessor import SegDataPreProcessor
from mmseg.registry import MODELS

__all__ = ['PixelMeanSegDataPreProcessor']


@MODELS.register_module()
class PixelMeanSegDataPreProcessor(SegDataPreProcessor):
    """Scale images to [0, 1] and subtract the train set's mean image (3, H, W), pixel by pixel.

    ``tools/prepare_bdd100k.py`` writes the mean image (``mean_image.npy``, RGB, float32) next to
    the prepared data. It is read on first use, so building a model needs no data.

    Args:
        mean_image: path of the ``.npy`` mean image.
        scale: factor applied to the raw pixel values before the subtraction.
        bgr_to_rgb: convert mmcv's BGR images to RGB first (the mean image is RGB).
        **kwargs: further ``SegDataPreProcessor`` arguments (``size``, ``pad_val``, ``seg_pad_val``...).
    """

    def __init__(self, mean_image: str, scale: float = 1 / 255, bgr_to_rgb: bool = True, **kwargs: Any):
        if kwargs.get('mean') is not None or kwargs.get('std') is not None:
            raise ValueError('mean/std are replaced by mean_image in PixelMeanSegDataPreProcessor; do not pass them')
        kwargs.pop('mean', None), kwargs.pop('std', None)
        super().__init__(mean=None, std=None, bgr_to_rgb=bgr_to_rgb, **kwargs)
        self.mean_image_path = mean_image
        self.scale = scale
        self._mean_image = None

    def mean_image(self, device: torch.device) -> torch.Tensor:
        if self._mean_image is None:
            if not osp.isfile(self.mean_image_path):
                raise FileNotFoundError(
                    f'mean image {self.mean_image_path!r} not found: it is written by '
                    f'`python tools/prepare_bdd100k.py --src data/bdd100k --dst data/bdd100k_160x90`; set '
                    f'model.data_preprocessor.mean_image to its path')
            mean = np.load(self.mean_image_path)
            if mean.ndim != 3 or mean.shape[0] != 3:
                raise ValueError(f'mean image {self.mean_image_path!r} must have shape (3, H, W), got {mean.shape}')
            self._mean_image = torch.from_numpy(mean.astype(np.float32))
        return self._mean_image.to(device)

    def forward(self, data: dict, training: bool = False) -> Dict[str, Any]:
        data = super().forward(data, training)
        inputs = data['inputs']
        mean = self.mean_image(inputs.device)
        if tuple(inputs.shape[-2:]) != tuple(mean.shape[-2:]):
            raise ValueError(f'images of size {tuple(inputs.shape[-2:])} do not match the mean image '
                             f'{self.mean_image_path!r} of size {tuple(mean.shape[-2:])}')
        data['inputs'] = inputs * self.scale - mean
        return data
