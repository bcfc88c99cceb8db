"""Reusable layers: the PIDE operators, the nonlocal block and Hamiltonian blocks."""
from .hamiltonian import HamiltonianBlock, HamiltonianUnit, hamiltonian_units, reversible_chain, smoothness_penalty
from .nonlocal_block import PIDEBlock
from .pide_ops import (
    EULER_GAMMA,
    KERNEL_SCALES,
    KERNELS,
    METHODS,
    NORMALIZERS,
    OPERATOR_ALIASES,
    OPERATORS,
    apply_kernel,
    check_s,
    default_s,
    nonlocal_aggregate,
    pide_constant,
    pide_kernel,
    resolve_method,
    resolve_operator,
    width_scale,
)

__all__ = [
    'HamiltonianBlock', 'HamiltonianUnit', 'hamiltonian_units', 'reversible_chain', 'smoothness_penalty',
    'PIDEBlock', 'EULER_GAMMA', 'KERNEL_SCALES', 'KERNELS', 'METHODS', 'NORMALIZERS', 'OPERATOR_ALIASES', 'OPERATORS',
    'apply_kernel', 'check_s', 'default_s', 'nonlocal_aggregate', 'pide_constant', 'pide_kernel',
    'resolve_method', 'resolve_operator', 'width_scale',
]
