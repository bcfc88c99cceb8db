# The long-range demo with a purely local Hamiltonian network (3 Units x 2 blocks, receptive field
# about 25 px): it finds the grey blob but cannot see the strip, 32 px away, that decides its class.
_base_ = [
    './_base_/models/pide_hamiltonian74.py', './_base_/datasets/longrange_demo.py',
    'mmseg::_base_/default_runtime.py', './_base_/schedules/bdd100k_200e.py'
]
custom_imports = dict(imports=['pide_zoo.seg'], allow_failed_imports=False)
# top level too: mmseg's test.py --tta hands the top-level one to the TTA model
data_preprocessor = dict(
    _delete_=True, type='SegDataPreProcessor', mean=[127.5] * 3, std=[64.0] * 3, bgr_to_rgb=True, size_divisor=1,
    pad_val=0, seg_pad_val=255)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        depths=(2, 2, 2),
        widths=(16, 32, 32),
        h=0.1,
        bn_tf=False,  # not the paper's network: PyTorch's batch norm, for which kernel_scale='width' is calibrated
        nonlocal_after=1),  # demo_longrange.py's blocks go mid-Unit: the Hamiltonian blocks use what they bring
    decode_head=dict(in_channels=32, channels=32, num_classes=4))
custom_hooks = []  # no per-pixel mean image here
optim_wrapper = dict(optimizer=dict(lr=0.05))
param_scheduler = [dict(type='MultiStepLR', milestones=[450], gamma=0.1, by_epoch=False)]
train_cfg = dict(max_iters=600, val_interval=600)
default_hooks = dict(checkpoint=dict(interval=300, max_keep_ckpts=2))
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
