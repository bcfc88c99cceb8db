# The README's demo: the same small Hamiltonian network with a nonlocal diffusion block in every
# Unit, which sees the whole image and labels the blob by the strip's colour. No download; CPU.
#   python tools/train.py configs/demo_longrange.py
_base_ = ['./demo_longrange_local.py']
model = dict(backbone=dict(nonlocal_operator='diffusion'))
