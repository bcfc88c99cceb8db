# The README's demo: the same small Hamiltonian network with a nonlocal diffusion block in every
# Unit, which sees the whole image and labels the blob by the strip's colour. No download; CPU.
#   python tools/train.py configs/demo_longrange.py
# Other operators: --cfg-options model.backbone.block_cfg.operator=frac_laplacian (inv_frac_laplacian, log).
# kernel_scale='width' keeps every operator's signal above batch norm's eps (the backbone's default is the
# paper's exact kernel, under which the fractional Laplacian learns nothing here).
_base_ = ['./demo_longrange_local.py']
model = dict(backbone=dict(block_cfg=dict(operator='diffusion', subsample=2, h=0.5, kernel_scale='width')))
