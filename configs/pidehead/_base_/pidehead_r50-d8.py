# The decode head that replaces NLHead in mmseg's nonlocal_r50-d8 configs: the same width, dropout, norm
# and loss, with a PIDE block (the paper's widths, starting as the identity) where NLHead has its NonLocal2d.
# Leaves use it as `decode_head=dict(_base_.pide_head, _delete_=True, block_cfg=dict(operator=...), num_classes=...)`.
custom_imports = dict(imports=['pide_zoo.seg'], allow_failed_imports=False)
pide_head = dict(
    type='PIDEHead',
    in_channels=2048,
    in_index=3,
    channels=512,
    dropout_ratio=0.1,
    norm_cfg=dict(type='SyncBN', requires_grad=True),
    align_corners=False,
    loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0))
