"""EncoderDecoder with the paper's weight-smoothness decay (4.8) as its own loss term."""
from __future__ import annotations

from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS

from ..layers.hamiltonian import smoothness_penalty

__all__ = ['PIDEEncoderDecoder']


@MODELS.register_module()
class PIDEEncoderDecoder(EncoderDecoder):
    """mmseg's ``EncoderDecoder`` plus ``loss_smooth`` = :func:`smoothness_penalty` of the backbone.

    Args:
        smoothness_weight: alpha_2 of (4.8) (the authors' code: 1e-8); 0 disables the term.
        **kwargs: ``EncoderDecoder`` arguments.
    """

    def __init__(self, smoothness_weight: float = 1e-8, **kwargs):
        if smoothness_weight < 0:
            raise ValueError(f'smoothness_weight must be >= 0, got {smoothness_weight!r}')
        super().__init__(**kwargs)
        self.smoothness_weight = smoothness_weight

    def loss(self, inputs, data_samples) -> dict:
        losses = super().loss(inputs, data_samples)
        if self.smoothness_weight > 0:
            losses['loss_smooth'] = smoothness_penalty(self.backbone, self.smoothness_weight)
        return losses
