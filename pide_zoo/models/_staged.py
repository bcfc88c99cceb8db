"""timm's intermediate-feature API for models built as ``stem`` -> ``stages`` (-> ``final_norm``)."""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

from timm.models._features import feature_take_indices
from torch import Tensor, nn

__all__ = ['StagedFeaturesMixin']


class StagedFeaturesMixin:
    """``forward_intermediates`` and ``prune_intermediate_layers`` over ``self.stages``.

    A model may define ``final_norm`` (applied to the final features, removable by ``prune_norm``).
    """

    stem: nn.Module
    stages: nn.Sequential

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Final features and the outputs of the stages selected by ``indices`` (timm's convention)."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages[:max_index + 1] if stop_early else self.stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        final_norm = getattr(self, 'final_norm', None)
        return (final_norm(x) if final_norm is not None else x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm and getattr(self, 'final_norm', None) is not None:
            self.final_norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices
