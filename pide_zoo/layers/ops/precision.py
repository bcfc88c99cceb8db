"""The precision scope of the kernels: float32 or float64 compute, autocast off, IEEE float32 products.

|a|^2 - 2 a.b + |b|^2 cancels, so the distance kernels need exact float32 products whatever the user set
globally (``torch.set_float32_matmul_precision``, TF32, oneDNN bf16), and half precision overflows |d|^-3.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ['ieee_fp32_matmul', 'compute_dtype', 'autocast_off', 'full_precision', 'is_compiling']


def _fp32_backends() -> list:
    # torch >= 2.9 sets matmul precision per backend; 'none' defers to the global setting.
    return [b for b in (getattr(torch.backends.cuda, 'matmul', None), getattr(torch.backends.mkldnn, 'matmul', None))
            if hasattr(b, 'fp32_precision')]


@contextmanager
def ieee_fp32_matmul():
    """Float32 matrix products in IEEE float32 inside the block, whatever the user chose globally
    (``torch.set_float32_matmul_precision('high'/'medium')``, TF32 on NVIDIA GPUs, bf16 on oneDNN CPUs):
    |a|^2 - 2 a.b + |b|^2 cancels, and a TF32 or bf16 product of a.b leaves errors of 1e-3 relative.

    The setting is process-wide: matmuls of other threads that run meanwhile are exact too. Restored on
    exit, also after an exception. A no-op while torch.compile or torch.export traces (the setting in force
    when the compiled program runs applies there).
    """
    if is_compiling():
        yield
        return
    backends = _fp32_backends()
    if backends:
        saved = [b.fp32_precision for b in backends]
        try:
            for b in backends:
                b.fp32_precision = 'ieee'
            yield
        finally:
            for b, v in zip(backends, saved):
                b.fp32_precision = v
        return
    saved = torch.get_float32_matmul_precision()  # torch < 2.9
    try:
        torch.set_float32_matmul_precision('highest')
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def is_compiling() -> bool:
    """Whether torch.compile, torch.export or the TorchScript tracer is tracing."""
    compiling = getattr(torch.compiler, 'is_compiling', None)  # torch >= 2.3
    return bool(compiling and compiling()) or torch.jit.is_tracing()


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if an input is float64, else float32 (half-precision kernels overflow or lose the cancellation)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def autocast_off(t: Tensor):
    """Autocast disabled on ``t``'s device; a no-op where the device has no autocast (meta: shape-only runs)."""
    kind = t.device.type
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else nullcontext()


class _NestedGraph(torch.autograd.Function):
    """``fn(*tensors)`` with its forward and backward run under :func:`ieee_fp32_matmul` (autograd would run
    the backward under the user's global precision). Differentiable once."""

    @staticmethod
    def forward(ctx, fn, *tensors):
        with torch.enable_grad(), ieee_fp32_matmul():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
            out = fn(*inputs)
        ctx.graph = (inputs, out)
        return out.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        inputs, out = ctx.graph
        del ctx.graph
        wanted = [t for t in inputs if t.requires_grad]
        with autocast_off(grad), ieee_fp32_matmul():
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None,) + tuple(next(grads) if t.requires_grad else None for t in inputs)


def full_precision(fn, *tensors: Tensor) -> Tensor:
    """``fn(*tensors)`` with IEEE float32 products in the forward and the backward pass. Where they are so
    already (the default), or nothing needs a gradient, plain autograd (twice differentiable) runs it."""
    if _matmul_is_ieee() or not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        with ieee_fp32_matmul():
            return fn(*tensors)
    return _NestedGraph.apply(fn, *tensors)


def _matmul_is_ieee() -> bool:
    backends = _fp32_backends()
    if backends and any(b.fp32_precision != 'none' for b in backends):
        return all(b.fp32_precision in ('ieee', 'none') for b in backends) and _global_precision_is_highest()
    return _global_precision_is_highest()


def _global_precision_is_highest() -> bool:
    try:
        return torch.get_float32_matmul_precision() == 'highest'
    except RuntimeError:  # legacy and per-backend settings mixed
        return False
