# Hamiltonian-74 without pooling (the paper's segmentation network), a 1x1 conv head, the
# weight-smoothness loss (4.8) and per-pixel mean subtraction. Leaf configs import pide_zoo.seg.
# The mean image is model state: PixelMeanHook reads mean_image.npy in the train dataloader's
# data_root when training starts and checkpoints carry it (mean_image=PATH overrides it).
data_preprocessor = dict(
    type='PixelMeanSegDataPreProcessor',
    size_divisor=1,  # batches of equal-size images: no padding
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='PIDEEncoderDecoder',
    smoothness_weight=1e-8,
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='PIDEHamiltonianNet',
        depths=(6, 6, 6),
        widths=(32, 64, 112),
        h=0.06,
        downsample=False,
        # no nonlocal blocks; leaf configs add block_cfg=dict(operator=...) (stages 2, subsample 3 by default)
        out_indices=(2, )),
    decode_head=dict(
        type='FCNHead',
        in_channels=112,
        channels=112,
        in_index=0,
        num_convs=0,
        concat_input=False,
        dropout_ratio=0.0,
        num_classes=19,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
custom_hooks = [dict(type='PixelMeanHook')]
