"""Reusable layers: the PIDE operators, the nonlocal block and Hamiltonian blocks."""
from .hamiltonian import HamiltonianBlock, HamiltonianUnit, hamiltonian_units, reversible_chain, smoothness_penalty
from .nonlocal_block import PAPER_WIDTHS, PIDEBlock
from .ops import (
    AGGREGATE_FORMS,
    EULER_GAMMA,
    KERNEL_SCALES,
    KERNELS,
    METHODS,
    NORMALIZERS,
    OPERATOR_ALIASES,
    OPERATORS,
    Operator,
    check_s,
    default_s,
    get_operator,
    nonlocal_aggregate,
    operator_names,
    pide_constant,
    pide_kernel,
    register_operator,
    resolve_method,
    resolve_operator,
    width_scale,
)
from .pide_ops import apply_kernel

__all__ = [
    'HamiltonianBlock', 'HamiltonianUnit', 'hamiltonian_units', 'reversible_chain', 'smoothness_penalty',
    'PIDEBlock', 'PAPER_WIDTHS', 'AGGREGATE_FORMS', 'EULER_GAMMA', 'KERNEL_SCALES', 'KERNELS', 'METHODS', 'NORMALIZERS',
    'OPERATOR_ALIASES', 'OPERATORS', 'Operator', 'apply_kernel', 'check_s', 'default_s', 'get_operator',
    'nonlocal_aggregate', 'operator_names', 'pide_constant', 'pide_kernel', 'register_operator', 'resolve_method',
    'resolve_operator', 'width_scale',
]
