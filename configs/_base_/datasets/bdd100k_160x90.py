# BDD100K 10k semantic segmentation at the paper's 160x90 (tools/prepare_bdd100k.py writes it):
# no resizing or cropping, random horizontal flip, batch 8.
_base_ = ['mmseg::_base_/datasets/bdd100k.py']

dataset_type = 'BDD100KPaperDataset'
data_root = 'data/bdd100k_160x90/'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackSegInputs'),
]
# Images of any size are resized to the trained 160x90 (no-op on the prepared data); labels are
# loaded after the resize and predictions come back at the image's own size (mmseg's ori_shape).
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(160, 90), keep_ratio=False),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
# mmseg's test-time augmentation (test.py --tta) around the trained 160x90: every image is resized to it,
# then scaled (the per-pixel mean image is resized with it) and flipped; softmax averaged.
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(160, 90), keep_ratio=False),
    dict(
        type='TestTimeAug',
        transforms=[[dict(type='Resize', scale_factor=r, keep_ratio=True) for r in img_ratios],
                    [dict(type='RandomFlip', prob=0., direction='horizontal'),
                     dict(type='RandomFlip', prob=1., direction='horizontal')],
                    [dict(type='LoadAnnotations')], [dict(type='PackSegInputs')]])
]
train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    dataset=dict(type=dataset_type, data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=2,
    dataset=dict(type=dataset_type, data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
# mmseg's aAcc / mIoU and the paper's Table 3 soft IoU (sIoU)
val_evaluator = [dict(type='IoUMetric', iou_metrics=['mIoU']), dict(type='SoftIoUMetric')]
test_evaluator = val_evaluator
