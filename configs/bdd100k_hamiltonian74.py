# Hamiltonian-74 on BDD100K 160x90 (Table 3: 0.49 M parameters, 84.47 pixel accuracy).
_base_ = [
    './_base_/models/pide_hamiltonian74.py', './_base_/datasets/bdd100k_160x90.py',
    'mmseg::_base_/default_runtime.py', './_base_/schedules/bdd100k_200e.py'
]
custom_imports = dict(imports=['pide_zoo.seg'], allow_failed_imports=False)
