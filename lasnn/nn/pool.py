"""Average pools on lasnn's pooling op: drop-in subclasses of ``nn.AvgPool1d`` / ``nn.AvgPool2d``.

``spikify`` puts them in place of the ANN's torch pools whose windows do not overlap (stride = kernel,
no padding, floor mode, no divisor override), so the time-folded body pools with the fused CPU kernel
(``lasnn.ops.avg_pool``: bit-identical results, no saved input). Any other configuration, and any
non-CPU tensor, runs the torch pool's own forward. Being subclasses, they keep the torch pool's
attributes, ``repr``, state dict (none) and ``isinstance`` checks (NIR export).

``AdaptiveAvgPool2d`` (also put in by ``spikify``) is ATen's adaptive pool, forward and backward, with one
change: its backward gets the incoming gradient in the input's memory order. A channels-last network's head
(``adaptive pool -> flatten -> linear``) hands back a contiguous gradient, with which ATen's backward copies
the input to another layout (5.1 ms vs 0.7 ms for ``[512, 64, 7, 7]`` -> 2x2, one thread).
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from lasnn.ops._common import is_channels_last_4d
from lasnn.ops.avg_pool import avg_pool

__all__ = ["AdaptiveAvgPool2d", "AvgPool1d", "AvgPool2d", "fast_pool"]


def _pair(v: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return (v,) * n if isinstance(v, int) else tuple(v)


def _plain_windows(m: nn.AvgPool1d | nn.AvgPool2d, dims: int) -> tuple[int, ...] | None:
    """The kernel if ``m``'s windows tile its input (stride = kernel, no padding, floor mode, plain divisor)."""
    k = _pair(m.kernel_size, dims)
    stride = _pair(m.stride, dims) if m.stride is not None and m.stride != () else k
    if (len(k) != dims or stride != k or any(p != 0 for p in _pair(m.padding, dims)) or m.ceil_mode
            or getattr(m, "divisor_override", None) is not None):
        return None
    return k


class AvgPool1d(nn.AvgPool1d):
    """``nn.AvgPool1d`` that pools ``[N, C, L]`` CPU tensors with the fused kernel when its windows tile the
    input (stride = kernel, no padding, floor mode); otherwise exactly ``nn.AvgPool1d``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``[N, C, L]`` -> ``[N, C, L_out]`` (``[C, L]`` unbatched: torch's pool)."""
        k = _plain_windows(self, 1)
        if k is None or isinstance(input, torch.fx.Proxy) or input.dim() != 3:  # fx tracing: torch's
            return super().forward(input)
        return avg_pool(input, list(k))


class AvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` that pools ``[N, C, H, W]`` CPU tensors with the fused kernel when its windows tile
    the input (stride = kernel, no padding, floor mode, no divisor override); otherwise exactly
    ``nn.AvgPool2d``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, C, H_out, W_out]`` (``[C, H, W]`` unbatched: torch's pool)."""
        k = _plain_windows(self, 2)
        if k is None or isinstance(input, torch.fx.Proxy) or input.dim() != 4:  # fx tracing: torch's
            return super().forward(input)
        return avg_pool(input, list(k))


class _AdaptiveAvgPool2dFunction(torch.autograd.Function):
    """ATen's adaptive average pool; the backward first brings the gradient to the input's layout."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.ops.aten._adaptive_avg_pool2d(x, output_size)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=torch.channels_last if is_channels_last_4d(x) else
                                       torch.contiguous_format)
        return torch.ops.aten._adaptive_avg_pool2d_backward(grad_out, x), None


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` whose backward runs in the input's memory order (see the module docstring);
    the same values bit for bit. Unbatched input, ``None`` in the output size, fx tracing and ``torch.compile``
    run the torch pool's own forward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, C, *output_size]``."""
        size = (self.output_size,) * 2 if isinstance(self.output_size, int) else tuple(self.output_size)
        if (isinstance(input, torch.fx.Proxy) or torch.compiler.is_compiling() or input.dim() != 4
                or any(s is None for s in size) or not (input.requires_grad and torch.is_grad_enabled())):
            return super().forward(input)
        return _AdaptiveAvgPool2dFunction.apply(input, size)


def fast_pool(m: nn.Module) -> nn.Module | None:
    """The lasnn pool that computes what ``m`` does (same arguments), or None when ``m`` is neither a plain
    ``nn.AvgPool1d``/``nn.AvgPool2d`` whose windows tile its input (stride = kernel, no padding, floor mode)
    nor an ``nn.AdaptiveAvgPool2d``, or has hooks (subclasses and lasnn pools are left as they are)."""
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return None  # a hook someone registered on this module object would be lost
    if type(m) is nn.AdaptiveAvgPool2d:
        new_a = AdaptiveAvgPool2d(m.output_size)
        new_a.train(m.training)
        return new_a
    if type(m) not in (nn.AvgPool1d, nn.AvgPool2d) or _plain_windows(m, 1 if type(m) is nn.AvgPool1d else 2) is None:
        return None
    if type(m) is nn.AvgPool1d:
        new: nn.Module = AvgPool1d(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)
    elif type(m) is nn.AvgPool2d:
        new = AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)
    else:
        return None
    new.train(m.training)
    return new
