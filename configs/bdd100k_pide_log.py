# Nonlocal Hamiltonian-74 with log kernel (-Delta)^{-1} (Table 3: 84.95 / 66.26), 0.54 M parameters.
_base_ = ['./bdd100k_hamiltonian74.py']
model = dict(backbone=dict(block_cfg=dict(operator='log')))
