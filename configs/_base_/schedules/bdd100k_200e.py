# The authors' schedule: SGD momentum 0.9, lr 0.01 for the first epoch, then 0.1 divided by 10 at
# epochs 80, 120, 160, 180; 200 epochs of 875 iterations (7000 images, batch 8).
# Keras l2(2e-4) on the convolution kernels = weight_decay 4e-4 in SGD, none on biases and BN.
iters_per_epoch = 875
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=4e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
param_scheduler = [
    dict(type='ConstantLR', factor=0.1, begin=0, end=iters_per_epoch, by_epoch=False),
    dict(type='MultiStepLR', milestones=[e * iters_per_epoch for e in (80, 120, 160, 180)], gamma=0.1,
         by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=200 * iters_per_epoch, val_interval=5 * iters_per_epoch)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=5 * iters_per_epoch, max_keep_ckpts=3,
                    save_last=True),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
