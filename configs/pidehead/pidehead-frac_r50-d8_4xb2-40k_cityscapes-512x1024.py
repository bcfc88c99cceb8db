_base_ = ['./pidehead-diffusion_r50-d8_4xb2-40k_cityscapes-512x1024.py']
model = dict(decode_head=dict(block_cfg=dict(operator='frac_laplacian')))
