# Nonlocal Hamiltonian-74 with nonlocal diffusion L (Table 3: 84.80 / 67.01), 0.54 M parameters.
_base_ = ['./bdd100k_hamiltonian74.py']
model = dict(backbone=dict(block_cfg=dict(operator='diffusion')))
