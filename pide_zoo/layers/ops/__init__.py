"""Functional core of the PIDE nonlocal operators (Bohn, Griebel & Kannan 2021, Sections 3 and 4.2-4.4).

* :mod:`.table`: the operator table, one row per operator, and :func:`register_operator`;
* :mod:`.api`: the public entry points :func:`nonlocal_aggregate` and :func:`pide_kernel`, where every argument
  is checked once, and the dispatch to the three exact paths:
* :mod:`.lowrank` (the dot-product diffusion kernel has rank E), :mod:`.fused` (any kernel, tiles of queries
  with a hand-written backward, memory linear in N; :mod:`.tiles` what the tiles share, :mod:`.compiled` the
  opt-in compiled tiles) and :mod:`.dense` (the N x M kernel, as the paper);
* :mod:`.precision`: float32 compute with IEEE products whatever the global matmul precision or autocast.
"""
from .api import (
    KERNEL_SCALES,
    METHOD_ALIASES,
    METHODS,
    NORMALIZERS,
    bind_kernel,
    check_compile_tiles,
    check_kernel_args,
    check_normalizer,
    check_s,
    default_s,
    embed_scale_for,
    nonlocal_aggregate,
    pide_constant,
    pide_kernel,
    resolve_method,
    width_scale,
)
from .precision import ieee_fp32_matmul
from .table import (
    AGGREGATE_FORMS,
    EULER_GAMMA,
    KERNELS,
    OPERATOR_ALIASES,
    OPERATORS,
    WIDTH_SCALE_TAU,
    BoundKernel,
    Operator,
    get_operator,
    operator_names,
    register_operator,
    resolve_operator,
)
from .tiles import check_tile_size, query_tile

__all__ = [
    'AGGREGATE_FORMS', 'EULER_GAMMA', 'KERNELS', 'KERNEL_SCALES', 'METHODS', 'METHOD_ALIASES', 'NORMALIZERS',
    'OPERATORS', 'OPERATOR_ALIASES', 'WIDTH_SCALE_TAU', 'BoundKernel', 'Operator', 'bind_kernel',
    'check_compile_tiles', 'check_kernel_args', 'check_normalizer', 'check_s', 'check_tile_size', 'default_s',
    'embed_scale_for',
    'get_operator', 'ieee_fp32_matmul', 'nonlocal_aggregate', 'operator_names', 'pide_constant', 'pide_kernel',
    'query_tile', 'register_operator', 'resolve_method', 'resolve_operator', 'width_scale',
]
