"""PIDEHead (pide_zoo.seg.heads) forward and backward under bf16 autocast on the device, every operator: the mmseg face
on a GPU (``pytest -m cuda``), and at a small size on the CPU."""
import math

import pytest
import torch

pytest.importorskip('mmseg', reason='the mmseg face needs the seg extra: pip install -e .[seg]')
try:
    import mmcv.ops  # noqa: F401  (compiled against one torch build: it may not load under this one)
except Exception as exc:
    pytest.skip(f'mmcv.ops does not import here: {type(exc).__name__}: {exc}'[:300], allow_module_level=True)

from pide_zoo.layers import OPERATORS  # noqa: E402
from pide_zoo.seg.heads import PIDEHead  # noqa: E402

# (batch, feature map): BDD100K's 160x90 features at the GPU's batch; a small map on the CPU.
SIZES = {'cpu': (2, (16, 32)), 'cuda': (8, (90, 160))}


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.cuda)], indirect=True)
@pytest.mark.parametrize('operator', OPERATORS)
def test_head_trains_under_bf16_autocast(device, operator):
    torch.manual_seed(0)
    head = PIDEHead(in_channels=64, channels=32, num_classes=19, norm_cfg=dict(type='BN'),
                    block_cfg=dict(operator=operator, subsample=2, ls_init_value=1.0)).to(device).train()
    batch, size = SIZES[device.type]
    x = torch.randn(batch, 64, *size, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = head([x])
    loss = out.float().square().mean()
    loss.backward()
    assert out.shape == (batch, 19, *size)
    assert math.isfinite(loss.item())
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
