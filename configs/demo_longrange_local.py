# The long-range demo with a purely local Hamiltonian network (3 Units x 2 blocks, receptive field
# about 25 px): it finds the grey blob but cannot see the strip, 32 px away, that decides its class.
_base_ = ['./_base_/datasets/longrange_demo.py', 'mmseg::_base_/default_runtime.py']
custom_imports = dict(imports=['pide_zoo.seg'], allow_failed_imports=False)
model = dict(
    type='PIDEEncoderDecoder',
    smoothness_weight=1e-8,
    data_preprocessor=dict(
        type='SegDataPreProcessor', mean=[127.5] * 3, std=[64.0] * 3, bgr_to_rgb=True, size_divisor=1, pad_val=0,
        seg_pad_val=255),
    backbone=dict(
        type='PIDEHamiltonianNet',
        depths=(2, 2, 2),
        widths=(16, 32, 32),
        h=0.1,
        downsample=False,
        nonlocal_operator=None,
        nonlocal_subsample=2,
        out_indices=(2, )),
    decode_head=dict(
        type='FCNHead',
        in_channels=32,
        channels=32,
        in_index=0,
        num_convs=0,
        concat_input=False,
        dropout_ratio=0.0,
        num_classes=4,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=4e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
param_scheduler = [dict(type='MultiStepLR', milestones=[300], gamma=0.1, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=400, val_interval=400)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=200, max_keep_ckpts=2, save_last=True),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
