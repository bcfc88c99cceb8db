"""pide_zoo: PIDE nonlocal blocks and Hamiltonian CNNs (Bohn, Griebel & Kannan 2021) for timm and mmseg.

Importing the package registers its timm models and allow-lists mmengine's checkpoint types for
``torch.load(weights_only=True)``. The mmsegmentation side lives in :mod:`pide_zoo.seg` and is
imported by configs through ``custom_imports``.
"""
__version__ = '0.1.0'

from . import compat as _compat  # noqa: E402
from .layers import (  # noqa: E402
    HamiltonianBlock,
    HamiltonianUnit,
    PIDEBlock,
    nonlocal_aggregate,
    pide_kernel,
    smoothness_penalty,
)
from .models import CifarResNet, HamiltonianNet, insert_pide_blocks  # noqa: E402  (registers the timm models)

_compat.allow_mmengine_checkpoints()

__all__ = [
    '__version__', 'CifarResNet', 'HamiltonianBlock', 'HamiltonianNet', 'HamiltonianUnit', 'PIDEBlock',
    'insert_pide_blocks', 'nonlocal_aggregate', 'pide_kernel', 'smoothness_penalty',
]
