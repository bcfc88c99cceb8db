"""``nonlocal_aggregate`` (lowrank, fused, dense) and :class:`PIDEBlock` on the device against float64 on the CPU,
values and gradients, in three precision modes (the dense float64 path is pinned to the paper's equations by
test_pide_ops.py and test_nonlocal_block.py):

* ``fp32``: float32 with TF32 off;
* ``tf32``: float32 matmul precision 'high' and cuDNN TF32 on (the usual GPU training setting);
* ``bf16``: TF32 on and bf16 autocast on the device.

The ``cuda`` cases run with ``pytest -m cuda`` on a GPU and skip elsewhere; fp32 also runs on the CPU (TF32 is for
the GPU's tensor cores; bf16 autocast on the CPU rounds differently and is not pinned here).
"""
import copy
import math
from contextlib import contextmanager, nullcontext

import pytest
import torch

from pide_zoo.layers import PIDEBlock, nonlocal_aggregate

# Largest accepted max|got - ref| / max|ref| per mode: float32 sums of a few hundred terms; TF32 products keep 10
# mantissa bits (1e-3 relative per product); bf16 autocast rounds values to 8 bits. A block under bf16 autocast
# (its 1x1 convolutions, batch norms and ReLUs in bf16) lands further off, up to 1.4e-1 for the parameter
# gradients (ReLU masks flip, batch-norm sums cancel): its bound guards against gross errors only.
TOLERANCE = {'fp32': 1e-4, 'tf32': 2e-2, 'bf16': 4e-2, 'bf16 block': 2.5e-1}
CUDA = {mode: pytest.param('cuda', mode, marks=pytest.mark.cuda, id=f'cuda-{mode}') for mode in TOLERANCE
        if ' ' not in mode}
DEVICE_MODES = [('cpu', 'fp32'), *CUDA.values()]
# nonlocal_aggregate: (operator, kernel, normalizer, method); lowrank serves the dot diffusion kernel only.
AGGREGATE_CASES = [
    (operator, kernel, normalizer, method)
    for operator, kernel, methods in (
        ('diffusion', 'dot', ('lowrank', 'fused', 'dense')), ('diffusion', 'embedded_gaussian', ('fused', 'dense')),
        ('frac_laplacian', 'dot', ('fused', 'dense')), ('inv_frac_laplacian', 'dot', ('fused', 'dense')),
        ('log', 'dot', ('fused', 'dense')))
    for normalizer in (('key', 'rowsum') if operator in ('diffusion', 'frac_laplacian') else ('key',))
    for method in methods if not (method == 'lowrank' and normalizer == 'rowsum')]
BLOCK_CASES = [('diffusion', 'lowrank'), ('diffusion', 'fused'), ('diffusion', 'dense')] + [
    (operator, method) for operator in ('frac_laplacian', 'inv_frac_laplacian', 'log') for method in ('fused', 'dense')]
B, E, C, HW, POOLED = 2, 16, 8, (24, 24), (12, 12)


@contextmanager
def precision(mode: str, device: torch.device):
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision('highest' if mode == 'fp32' else 'high')
    torch.backends.cudnn.allow_tf32 = mode != 'fp32'
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16) if mode == 'bf16' else nullcontext():
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64 on the CPU."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref.abs().max().item()
    return (got - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def _inputs(coincident: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """theta, phi, v_query, v_key (float64) and the weight of the loss sum(out * weight); ``coincident``: half the
    keys sit on queries (theta_i == phi_j: a kernel that is exactly zero there)."""
    g = torch.Generator().manual_seed(0)
    n_q, n_k = HW[0] * HW[1], POOLED[0] * POOLED[1]
    inputs = [torch.randn(B, k, p, generator=g, dtype=torch.float64)
              for k, p in ((E, n_q), (E, n_k), (C, n_q), (C, n_k))]
    if coincident:
        inputs[1][:, :, : n_k // 2] = inputs[0][:, :, : n_k // 2]
    return inputs, torch.randn(B, C, n_q, generator=g, dtype=torch.float64)


def _aggregate_errors(inputs, weight, device, mode: str, **kw) -> dict[str, float]:
    """Relative errors of ``nonlocal_aggregate(**kw)`` on the device (the value and the input gradients of
    sum(out * weight)) against the dense path in float64 on the CPU from the same (rounded) inputs."""
    dtype = torch.bfloat16 if mode == 'bf16' else torch.float32
    dev_in = [t.to(device=device, dtype=dtype).requires_grad_() for t in inputs]
    ref_in = [t.detach().to('cpu', torch.float64).requires_grad_() for t in dev_in]
    ref = nonlocal_aggregate(*ref_in, **dict(kw, method='dense'))
    # allow_unused: v_query takes no part in the inverse fractional and log operators.
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_in, allow_unused=True)
    with precision(mode, device):
        out = nonlocal_aggregate(*dev_in, **kw)
        grads = torch.autograd.grad((out.float() * weight.to(device, torch.float32)).sum(), dev_in, allow_unused=True)
    return _errors(out, ref, grads, ref_grads)


def _errors(out, ref, grads, ref_grads) -> dict[str, float]:
    errs = {'out': rel_err(out, ref)}
    for name, got, want in zip(('theta', 'phi', 'v_query', 'v_key'), grads, ref_grads):
        if got is not None or want is not None:
            errs[f'grad_{name}'] = math.inf if got is None or want is None else rel_err(got, want)
    return errs


def _check(errs: dict[str, float], tolerance: float, record_property) -> None:
    worst = max(errs.values())
    record_property('max_rel_err', f'{worst:.2e}')  # in gpu_check.json, beside the test's outcome
    assert worst <= tolerance, {k: f'{v:.2e}' for k, v in errs.items()}


@pytest.mark.parametrize('device,mode', DEVICE_MODES, indirect=['device'])
@pytest.mark.parametrize('operator,kernel,normalizer,method', AGGREGATE_CASES)
def test_aggregate_matches_float64(device, mode, operator, kernel, normalizer, method, record_property):
    inputs, weight = _inputs()
    # Tiles of 40 queries: several per batch on the fused path.
    kw = dict(operator=operator, kernel=kernel, normalizer=normalizer, method=method, lam=0.3,
              tile_size=40 if method == 'fused' else None)
    _check(_aggregate_errors(inputs, weight, device, mode, **kw), TOLERANCE[mode], record_property)


@pytest.mark.parametrize('device,mode', DEVICE_MODES, indirect=['device'])
@pytest.mark.parametrize('method', ['fused', 'dense'])
@pytest.mark.parametrize('operator', ['frac_laplacian', 'inv_frac_laplacian', 'log'])
def test_coincident_points_match_float64(device, mode, operator, method, record_property):
    """Distances of exactly zero with the matrix products in TF32 and bf16 (|q|^2 + |k|^2 - 2 q.k rounds)."""
    inputs, weight = _inputs(coincident=True)
    errs = _aggregate_errors(inputs, weight, device, mode, operator=operator, method=method, tile_size=None)
    _check(errs, TOLERANCE[mode], record_property)


@pytest.mark.parametrize('device,mode', DEVICE_MODES, indirect=['device'])
@pytest.mark.parametrize('operator,method', BLOCK_CASES)
def test_block_matches_float64(device, mode, operator, method, record_property):
    """PIDEBlock in training mode (2 stages, keys pooled 2x2) against its float64 copy on the CPU: output, input
    gradient and parameter gradients."""
    torch.manual_seed(1)
    block = PIDEBlock(16, operator=operator, method=method, subsample=2, ls_init_value=1.0)  # not the identity
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, *HW, generator=g)
    weight = torch.randn(2, 16, *HW, generator=g, dtype=torch.float64)
    ref_block = copy.deepcopy(block).to('cpu', torch.float64).train()
    dev_block = copy.deepcopy(block).to(device).train()
    ref_x = x.double().requires_grad_()
    ref = ref_block(ref_x)
    (ref * weight).sum().backward()
    dev_x = x.to(device).requires_grad_()
    with precision(mode, device):
        out = dev_block(dev_x)
        (out.float() * weight.to(device, torch.float32)).sum().backward()
    # Parameter gradients against the largest one, leaving out those that are zero up to float64 rounding (the
    # biases of the convolutions before a norm, which removes a constant): their bf16 gradient is noise.
    params = dict(ref_block.named_parameters())
    top = max(p.grad.abs().max().item() for p in params.values())
    diff = [(p.grad.double().cpu() - params[n].grad).abs().max().item() for n, p in dev_block.named_parameters()
            if params[n].grad.abs().max().item() > 1e-9 * top]
    errs = {'out': rel_err(out, ref), 'grad_x': rel_err(dev_x.grad, ref_x.grad),
            'grad_params': max(diff) / top}
    _check(errs, TOLERANCE['bf16 block' if mode == 'bf16' else mode], record_property)


@pytest.mark.cuda
@pytest.mark.parametrize('mode', ['fp32', 'tf32'])
@pytest.mark.parametrize('operator', ['frac_laplacian', 'inv_frac_laplacian', 'log'])
def test_fused_at_bdd_size_matches_dense_float64(device, mode, operator, record_property):
    """The BDD100K 160x90 size (batch 4, E = 56, C = 112, N = 14,400 queries, keys pooled 3x3: M = 1,590): the fused
    path in float32 against the dense path in float64 on the GPU."""
    g = torch.Generator(device=device).manual_seed(0)
    b, e, c, n_q, n_k = 4, 56, 112, 90 * 160, 30 * 53
    inputs = [torch.randn(b, k, p, generator=g, device=device, dtype=torch.float64)
              for k, p in ((e, n_q), (e, n_k), (c, n_q), (c, n_k))]
    weight = torch.randn(b, c, n_q, generator=g, device=device, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in inputs]
    ref = nonlocal_aggregate(*ref_in, operator=operator, method='dense')
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_in, allow_unused=True)  # v_query: frac only
    dev_in = [t.float().requires_grad_() for t in inputs]
    with precision(mode, device):
        out = nonlocal_aggregate(*dev_in, operator=operator, method='fused')
        grads = torch.autograd.grad((out * weight.float()).sum(), dev_in, allow_unused=True)
    _check(_errors(out, ref, grads, ref_grads), TOLERANCE[mode], record_property)
