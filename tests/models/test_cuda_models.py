"""The registered timm models trained a few SGD steps under bf16 autocast on the device, eager and under
``torch.compile`` (inductor): the losses stay finite. Step times go to the JUnit properties (tools/gpu_check.py
puts them in its JSON). On a GPU with ``pytest -m cuda``; the eager steps also run on the CPU, on tiny networks."""
import math
import statistics
import time

import pytest
import timm
import torch
import torch.nn.functional as F

import pide_zoo  # noqa: F401  (registers the models)

MODELS = ('nl_hamiltonian74', 'nl_hamiltonian74_frac', 'hamiltonian74', 'nl_hamiltonian74_invfrac',
          'nl_hamiltonian74_log', 'nl_hamiltonian74_4stage')
# One compile of the forward and backward graphs takes most of a minute: the low-rank (diffusion) and the fused
# (fractional) paths.
COMPILED = MODELS[:2]
STEPS = 5  # timed, after one warm-up (or compiling) step
# (batch, model arguments): CIFAR at a GPU training batch; a tiny network on the CPU.
SETUPS = {'cuda': (128, {}), 'cpu': (4, dict(depths=(1, 1, 1), widths=(8, 8, 8)))}
EAGER = [pytest.param(name, 'cpu', id=f'{name}-cpu') for name in MODELS[:2]] + [
    pytest.param(name, 'cuda', marks=pytest.mark.cuda, id=f'{name}-cuda') for name in MODELS]


@pytest.fixture
def tf32():
    """float32 matmuls in TF32, as GPU training runs (restored after the test)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('high')
    yield
    torch.set_float32_matmul_precision(saved)


def _train(name: str, device: torch.device, compiled: bool = False) -> tuple[list[float], list[float]]:
    """1 + STEPS SGD steps of a fresh model on a fixed random batch: the losses and each step's seconds."""
    batch, kwargs = SETUPS[device.type]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    if compiled:
        torch._dynamo.reset()  # each model compiles from scratch (same code objects, other modules)
        model = torch.compile(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    losses, seconds = [], []
    for _ in range(1 + STEPS):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())  # waits for the device
        seconds.append(time.perf_counter() - start)
    return losses, seconds


@pytest.mark.parametrize('name,device', EAGER, indirect=['device'])
def test_model_trains_under_bf16_autocast(name, device, tf32, record_property):
    losses, seconds = _train(name, device)
    record_property('step_ms', round(statistics.median(seconds[1:]) * 1e3, 2))
    assert all(math.isfinite(v) for v in losses), losses


@pytest.mark.cuda
@pytest.mark.parametrize('name', COMPILED)
def test_compiled_model_trains_under_bf16_autocast(name, device, tf32, record_property):
    pytest.importorskip('triton', reason='inductor compiles CUDA kernels with triton')
    if torch.cuda.get_device_capability(device) < (7, 0):
        pytest.skip('triton needs a GPU of compute capability 7.0 or newer')
    losses, seconds = _train(name, device, compiled=True)
    record_property('first_step_s', round(seconds[0], 1))  # compiles the forward and backward graphs
    record_property('step_ms', round(statistics.median(seconds[1:]) * 1e3, 2))
    assert all(math.isfinite(v) for v in losses), losses
