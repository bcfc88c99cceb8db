"""The paper's tables (Bohn, Griebel & Kannan 2021): the numbers ``tools/flops.py`` prints beside its counts.

Data for the tools and the tests, not part of the package. Parameters and FLOPs are the paper's, truncated as it
prints them: Tables 1-3 to two decimals (ResNet-44 on CIFAR-100 has 0.6687 M, listed as 0.66), Table 4 to one.
"""
from typing import Dict, Tuple

# The columns of Tables 1, 2 and 4, in their order.
COLUMNS = ('cifar10', 'cifar100', 'stl10')

# The paper's names of the networks.
PAPER_NAMES: Dict[str, str] = {
    'resnet44_cifar': 'ResNet-44',
    'preresnet20_cifar': 'PreResNet-20',
    'hamiltonian74': 'Hamiltonian-74',
    'nl_hamiltonian74': 'Nonlocal diffusion L',
    'nl_hamiltonian74_frac': '(-Delta)^{1/2}',
    'nl_hamiltonian74_invfrac': '(-Delta)^{-1/2}',
    'nl_hamiltonian74_log': '(-Delta)^{-1}',
    'nl_hamiltonian74_4stage': 'Diffusion L, 4 stages',
}

# Table 4: FLOPs in M multiply-adds, for CIFAR-10, CIFAR-100, STL-10.
PAPER_TABLE4: Dict[str, Tuple[float, float, float]] = {
    'resnet44_cifar': (98.3, 98.3, 879.5),
    'hamiltonian74': (159.6, 159.9, 1432.5),
    'nl_hamiltonian74': (192.9, 193.2, 2003.7),
    'nl_hamiltonian74_frac': (193.4, 193.7, 2012.5),
    'nl_hamiltonian74_invfrac': (193.2, 193.5, 2011.0),
    'nl_hamiltonian74_log': (193.6, 193.9, 2019.5),
}

# Tables 1 and 2: parameters in M, for CIFAR-10, CIFAR-100, STL-10.
PAPER_PARAMS: Dict[str, Tuple[float, float, float]] = {
    'resnet44_cifar': (0.66, 0.66, 0.66),
    'preresnet20_cifar': (0.57, 0.59, 0.57),
    'hamiltonian74': (0.50, 0.67, 0.50),
    'nl_hamiltonian74': (0.56, 0.72, 0.55),
    'nl_hamiltonian74_frac': (0.56, 0.72, 0.55),
    'nl_hamiltonian74_invfrac': (0.56, 0.72, 0.55),
    'nl_hamiltonian74_log': (0.56, 0.72, 0.55),
    'nl_hamiltonian74_4stage': (0.59, 0.76, 0.59),
}
ALL_MODELS = tuple(PAPER_PARAMS)

# Table 3 (BDD100K segmentation, no pooling, 1x1 conv head to 20 classes): parameters in M.
PAPER_SEG_PARAMS: Dict[str, float] = {
    'resnet44_cifar': 0.66,
    'preresnet20_cifar': 0.57,
    'hamiltonian74': 0.49,
    'nl_hamiltonian74': 0.54,
    'nl_hamiltonian74_frac': 0.54,
    'nl_hamiltonian74_invfrac': 0.54,
    'nl_hamiltonian74_log': 0.54,
}
