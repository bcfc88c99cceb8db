# Nonlocal Hamiltonian-74 with fractional Laplacian (-Delta)^{1/2} (Table 3: 85.24 / 66.71), 0.54 M parameters.
_base_ = ['./bdd100k_hamiltonian74.py']
model = dict(backbone=dict(block_cfg=dict(operator='frac_laplacian')))
