"""``lasnn.ops.avg_pool``: non-overlapping average pooling (kernel = stride, no padding, floor mode).

Why an op of our own: a spikify'd body pools its spiking layers' outputs on time-folded tensors
``[T*B, C, H, W]``, T times the ANN's, and ATen's generic NCHW CPU kernel cost about as much as the
convolution beside it (fwd + bwd of a 2x2 pool of ``[512, 16, 28, 28]``: 46 ms on one thread). The op
is also lighter on memory: its backward needs only the input's shape, so it saves nothing (ATen's keeps
the input, the spikes).

Op schemas: csrc/ops.cpp (``lasnn::avg_pool_fwd``, ``lasnn::avg_pool_bwd``); CPU kernels:
csrc/cpu/avg_pool.cpp; oracle: ``torch.nn.functional.avg_pool1d/2d`` with ``stride = kernel``
(:func:`avg_pool_reference`), which the kernels match bit for bit, channels-last input included (pooled as it
lies, output channels-last). On other devices, for other non-contiguous input, or without the extension,
:func:`avg_pool` calls that oracle. Modules: ``lasnn.nn.AvgPool1d`` /
``AvgPool2d`` (``spikify`` puts them in place of eligible torch pools). Tests: tests/test_avg_pool.py.
Bench: benches/bench_avg_pool.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lasnn import _ext
from lasnn.ops._common import is_channels_last_4d  # the kernels' test for a channels-last input

__all__ = ["AvgPoolFunction", "avg_pool", "avg_pool_reference", "check_kernel"]

# read once: a constant to torch.compile (the dispatcher query is not traceable)
HAS_KERNEL = _ext.c_has_op("avg_pool_fwd")

if HAS_KERNEL:

    @torch.library.register_fake("lasnn::avg_pool_fwd")
    def _fake_fwd(x, kernel):
        fmt = torch.channels_last if len(kernel) == 2 and is_channels_last_4d(x) else torch.contiguous_format
        return x.new_empty(_out_shape(x.shape, kernel)).contiguous(memory_format=fmt)

    @torch.library.register_fake("lasnn::avg_pool_bwd")
    def _fake_bwd(grad_out, input_sizes, kernel, channels_last=False):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return grad_out.new_empty(input_sizes).contiguous(memory_format=fmt)



def _out_shape(shape: Sequence[int], kernel: Sequence[int]) -> list[int]:
    d = len(kernel)
    return [*shape[: len(shape) - d], *(s // k for s, k in zip(shape[len(shape) - d :], kernel, strict=True))]


def check_kernel(kernel_size: int | Sequence[int], dims: int) -> list[int]:
    """``kernel_size`` (an int or ``dims`` ints, each >= 1) as a list of ``dims`` ints; ValueError otherwise."""
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    ks = [kernel_size] * dims if isinstance(kernel_size, int) else list(kernel_size)
    if len(ks) != dims or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"kernel_size must be an int >= 1 or {dims} such ints, got {kernel_size!r}")
    return ks


def avg_pool_reference(x: torch.Tensor, kernel_size: int | Sequence[int]) -> torch.Tensor:
    """The oracle: ATen's average pooling with ``stride = kernel_size``, no padding, floor mode.

    x: ``[N, C, L]`` with one kernel size, ``[N, C, H, W]`` with two -> ``[N, C, L // k]`` /
    ``[N, C, H // kh, W // kw]``.
    """
    ks = check_kernel(kernel_size, x.dim() - 2)
    if len(ks) == 1:
        return F.avg_pool1d(x, ks, ks)
    return F.avg_pool2d(x, ks, ks)


class AvgPoolFunction(torch.autograd.Function):
    """Autograd for the CPU pooling kernels: saves only the input's shape and layout (the backward spreads
    ``grad_out / (kh*kw)`` over each window and needs no data); the input gradient has the input's layout."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: list[int]) -> torch.Tensor:
        ctx.input_shape = list(x.shape)
        ctx.kernel = kernel
        ctx.channels_last = len(kernel) == 2 and is_channels_last_4d(x)
        return torch.ops.lasnn.avg_pool_fwd(x, kernel)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return torch.ops.lasnn.avg_pool_bwd(grad_out, ctx.input_shape, ctx.kernel, ctx.channels_last), None


def _use_kernel(x: torch.Tensor) -> bool:
    return HAS_KERNEL and x.device.type == "cpu" and (x.is_contiguous() or is_channels_last_4d(x))


def avg_pool(x: torch.Tensor, kernel_size: int | Sequence[int]) -> torch.Tensor:
    """Average pooling over non-overlapping windows (stride = kernel size, no padding, floor mode).

    Args:
        x: ``[N, C, L]`` (1-d pooling) or ``[N, C, H, W]`` (2-d) floating tensor.
        kernel_size: window size: an int (as many sizes as ``x`` has spatial dims) or one/two ints.
    Returns:
        ``[N, C, L // k]`` or ``[N, C, H // kh, W // kw]``, bit-identical to
        ``F.avg_pool1d/2d(x, kernel_size, kernel_size)`` and differentiable.

    The fused CPU kernel runs for contiguous and channels-last (4-d) CPU tensors, and keeps the input's
    layout; elsewhere ATen's pooling does.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be [N, C, L] or [N, C, H, W], got shape {tuple(x.shape)}")
    dims = x.dim() - 2
    ks = check_kernel(kernel_size, dims)
    for s, k in zip(x.shape[2:], ks, strict=True):
        if s < k:
            raise ValueError(f"x's spatial sizes {tuple(x.shape[2:])} are smaller than kernel_size {tuple(ks)}")
    if _use_kernel(x):
        return AvgPoolFunction.apply(x, ks)
    return F.avg_pool1d(x, ks, ks) if dims == 1 else F.avg_pool2d(x, ks, ks)
