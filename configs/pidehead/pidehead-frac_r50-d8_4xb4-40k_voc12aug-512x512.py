_base_ = ['./pidehead-diffusion_r50-d8_4xb4-40k_voc12aug-512x512.py']
model = dict(decode_head=dict(block_cfg=dict(operator='frac_laplacian')))
