"""timm model families; importing this module registers them with timm."""
from .cifar_resnet import CifarResNet
from .hamiltonian_net import HamiltonianNet, paper_geometry
from .mixing import insert_pide_blocks

__all__ = ['CifarResNet', 'HamiltonianNet', 'insert_pide_blocks', 'paper_geometry']
