"""Compatibility module: the functional core moved to :mod:`pide_zoo.layers.ops` (one module per job).

Everything public here before is still importable; ``apply_kernel``, ``evaluate_kernel`` and
``evaluate_aggregate`` are deprecated (FutureWarning) in favour of :func:`nonlocal_aggregate` (its
``kernel_matrix=``) and :func:`pide_kernel`, and will be removed in pide_zoo 0.4.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

from torch import Tensor

from .ops import (  # noqa: F401  (re-exported)
    EULER_GAMMA,
    KERNEL_SCALES,
    KERNELS,
    METHOD_ALIASES,
    METHODS,
    NORMALIZERS,
    OPERATOR_ALIASES,
    OPERATORS,
    WIDTH_SCALE_TAU,
    check_kernel_args,
    check_normalizer,
    check_s,
    check_tile_size,
    default_s,
    embed_scale_for,
    ieee_fp32_matmul,
    nonlocal_aggregate,
    pide_constant,
    pide_kernel,
    query_tile,
    resolve_method,
    resolve_operator,
    width_scale,
)

__all__ = [
    'OPERATORS', 'OPERATOR_ALIASES', 'KERNELS', 'NORMALIZERS', 'METHODS', 'METHOD_ALIASES', 'EULER_GAMMA',
    'resolve_operator', 'default_s', 'check_s', 'check_normalizer', 'check_tile_size', 'pide_constant',
    'pide_kernel', 'apply_kernel', 'nonlocal_aggregate', 'resolve_method', 'query_tile', 'KERNEL_SCALES',
    'WIDTH_SCALE_TAU', 'check_kernel_args', 'width_scale', 'embed_scale_for', 'ieee_fp32_matmul',
    'evaluate_kernel', 'evaluate_aggregate',
]


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f'pide_zoo.layers.pide_ops.{old} is deprecated and will be removed in pide_zoo 0.4; use {new}',
                  FutureWarning, stacklevel=3)


def apply_kernel(kern: Tensor, v_query: Tensor, v_key: Tensor, *, operator: str,
                 normalizer: Union[str, float, None] = None, rowsum: Optional[Tensor] = None) -> Tensor:
    """Deprecated: ``nonlocal_aggregate(theta, phi, v_query, v_key, kernel_matrix=kern, ...)``."""
    _deprecated('apply_kernel', 'nonlocal_aggregate(..., kernel_matrix=kern)')
    from .ops.api import bind_kernel
    from .ops.dense import dense_aggregate
    return dense_aggregate(bind_kernel(operator), kern, v_query, v_key, check_normalizer(normalizer), rowsum)


def evaluate_kernel(theta: Tensor, phi: Tensor, **kwargs) -> Tensor:
    """Deprecated: :func:`pide_kernel`."""
    _deprecated('evaluate_kernel', 'pide_kernel')
    return pide_kernel(theta, phi, **kwargs)


def evaluate_aggregate(theta: Tensor, phi: Tensor, v_query: Tensor, v_key: Tensor, kern: Optional[Tensor] = None,
                       rowsum: Optional[Tensor] = None, **kwargs) -> Tensor:
    """Deprecated: :func:`nonlocal_aggregate` (``kernel_matrix=kern``)."""
    _deprecated('evaluate_aggregate', 'nonlocal_aggregate')
    return nonlocal_aggregate(theta, phi, v_query, v_key, kernel_matrix=kern, rowsum=rowsum, **kwargs)
