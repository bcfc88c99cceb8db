# Nonlocal Hamiltonian-74 with inverse fractional Laplacian (-Delta)^{-1/2} (Table 3: 85.21 / 66.52), 0.54 M parameters.
_base_ = ['./bdd100k_hamiltonian74.py']
model = dict(backbone=dict(block_cfg=dict(operator='inv_frac_laplacian')))
