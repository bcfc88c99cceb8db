_base_ = ['mmseg::nonlocal_net/nonlocal_r50-d8_4xb4-80k_ade20k-512x512.py', './_base_/pidehead_r50-d8.py']
model = dict(decode_head=dict(_base_.pide_head, _delete_=True, block_cfg=dict(operator='diffusion'), num_classes=150))
