"""pide_zoo: PIDE nonlocal blocks and Hamiltonian CNNs (Bohn, Griebel & Kannan 2021) for timm and mmseg.

Importing the package registers its timm models and needs only torch and timm. The mmsegmentation side
lives in :mod:`pide_zoo.seg` (which also allow-lists mmengine's checkpoint types for
``torch.load(weights_only=True)``) and is imported by configs through ``custom_imports``; where mmseg is
installed, ``import pide_zoo`` has it imported along with mmseg's models (at once if they are already
imported), so configs written for 0.1 (``custom_imports=dict(imports=['pide_zoo'])``) keep working.
"""
__version__ = '0.2.0'

from ._seg_autoload import install as _install_seg_autoload  # noqa: E402
from .layers import (  # noqa: E402
    HamiltonianBlock,
    HamiltonianUnit,
    PIDEBlock,
    nonlocal_aggregate,
    pide_kernel,
    smoothness_penalty,
)
from .models import CifarResNet, HamiltonianNet, insert_pide_blocks  # noqa: E402  (registers the timm models)

__all__ = [
    '__version__', 'CifarResNet', 'HamiltonianBlock', 'HamiltonianNet', 'HamiltonianUnit', 'PIDEBlock',
    'insert_pide_blocks', 'nonlocal_aggregate', 'pide_kernel', 'smoothness_penalty',
]

_install_seg_autoload()
