"""The segmentor branch of :func:`pide_zoo.checkpoint.load_model`: an mmseg config (and checkpoint) to a model."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch import nn

__all__ = ['load_segmentor']


def load_segmentor(config: str, checkpoint: Optional[str], cfg_options: Optional[Dict[str, Any]],
                    device: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """An mmseg segmentor (``mmseg.apis.init_model``) and its input size where the data preprocessor knows it."""
    from mmengine.config import Config
    from mmseg.apis import init_model

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    segmentor = init_model(cfg, checkpoint, device=str(device)).eval()
    pre = segmentor.data_preprocessor
    if getattr(pre, 'size', None):
        size = (3, *pre.size)
    else:
        images = [t for t in pre.state_dict().values() if t.dim() == 3]  # a per-pixel mean image (3, H, W)
        size = tuple(int(n) for n in images[0].shape) if images else None
    return segmentor, dict(kind='segmentor', config=config, source=checkpoint or 'initialisation',
                           input_size=size, fixed_input_size=False)
