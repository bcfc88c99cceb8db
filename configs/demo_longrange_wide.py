# The long-range demo with a wide last Unit (16/32/256 channels: 128-dim embeddings in its nonlocal block),
# where the paper's distance kernels fall below batch norm's eps; the width-aware kernel scale that
# demo_longrange.py sets keeps every operator learning. No download; CPU, about 1-3 s per iteration.
#   python tools/train.py configs/demo_longrange_wide.py --cfg-options model.backbone.block_cfg.operator=log
_base_ = ['./demo_longrange.py']
model = dict(backbone=dict(widths=(16, 32, 256)), decode_head=dict(in_channels=256, channels=256))
