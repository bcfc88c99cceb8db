"""Runner hook that gives :class:`PixelMeanSegDataPreProcessor` its mean image from the data."""
from __future__ import annotations

import os.path as osp
from typing import Optional

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmseg.registry import HOOKS

from .data_preprocessor import PREPARE_COMMAND, PixelMeanSegDataPreProcessor

__all__ = ['PixelMeanHook']

MEAN_IMAGE_FILE = 'mean_image.npy'


def _data_root(dataloader) -> Optional[str]:
    dataset = getattr(dataloader, 'dataset', None)
    while dataset is not None and not hasattr(dataset, 'data_root') and hasattr(dataset, 'dataset'):
        dataset = dataset.dataset  # dataset wrappers (RepeatDataset, ...)
    return getattr(dataset, 'data_root', None)


@HOOKS.register_module()
class PixelMeanHook(Hook):
    """Set the per-pixel mean image of the model's :class:`PixelMeanSegDataPreProcessor`.

    When training starts (after ``--resume`` / ``load_from`` restored the model), in this order:
    the preprocessor's explicit ``mean_image`` path; ``mean_image.npy`` in the train dataloader's
    ``data_root`` (where ``tools/prepare_bdd100k.py`` writes it); the mean the model already holds
    (restored from a checkpoint). Otherwise one error names the file looked for and the command that
    writes it. Before validation and testing it only fills a mean still missing (checkpoints written
    before the mean was model state), from the explicit path or that dataloader's ``data_root``.
    The mean is then part of the state dict, so checkpoints carry it.
    """

    priority = 'VERY_HIGH'

    @staticmethod
    def _preprocessor(runner) -> PixelMeanSegDataPreProcessor:
        model = runner.model
        while is_model_wrapper(model) or isinstance(model, BaseTTAModel):  # DDP, --tta's SegTTAModel
            model = model.module
        pre = getattr(model, 'data_preprocessor', None)
        if not isinstance(pre, PixelMeanSegDataPreProcessor):
            raise TypeError(f'PixelMeanHook needs model.data_preprocessor of type PixelMeanSegDataPreProcessor, '
                            f'got {type(pre).__name__}; drop the hook from custom_hooks')
        return pre

    def _set(self, pre: PixelMeanSegDataPreProcessor, path: str, why: str) -> None:
        pre.set_mean_image(path)
        print_log(f'mean image {tuple(pre.pixel_mean.shape)} from {path} ({why})', logger='current')

    def before_train(self, runner) -> None:
        pre = self._preprocessor(runner)
        if pre.mean_image_path is not None:
            self._set(pre, pre.mean_image_path, 'model.data_preprocessor.mean_image')
            return
        data_root = _data_root(runner.train_dataloader)
        path = osp.join(data_root or '', MEAN_IMAGE_FILE)
        if osp.isfile(path):
            self._set(pre, path, "the train dataloader's data_root")
        elif pre.has_mean:
            print_log(f'mean image {tuple(pre.pixel_mean.shape)} from the loaded checkpoint ({path} not found)',
                      logger='current')
        else:
            raise FileNotFoundError(
                f"mean image {path!r} not found in the train dataloader's data_root {data_root!r}: it is written "
                f'by `{PREPARE_COMMAND.format(dst=data_root or "data/bdd100k_160x90")}` (or set '
                'model.data_preprocessor.mean_image to its path)')

    def _fill_missing(self, runner, dataloader) -> None:
        pre = self._preprocessor(runner)
        if pre.has_mean or pre.mean_image_path is not None:  # the path is read on first use
            return
        data_root = _data_root(dataloader)
        path = osp.join(data_root or '', MEAN_IMAGE_FILE)
        if not osp.isfile(path):
            raise FileNotFoundError(
                f'the model has no mean image (a checkpoint written before it was model state?) and {path!r} '
                f'does not exist: set model.data_preprocessor.mean_image to the mean_image.npy of its training '
                f'data (written by `{PREPARE_COMMAND.format(dst=data_root or "data/bdd100k_160x90")}`)')
        self._set(pre, path, 'the checkpoint has none')

    def before_val(self, runner) -> None:
        self._fill_missing(runner, runner.val_dataloader)

    def before_test(self, runner) -> None:
        self._fill_missing(runner, runner.test_dataloader)
