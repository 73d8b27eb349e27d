"""QCFS activation (quantisation-clip-floor-shift; Bu et al., ICLR 2022) for conversion-friendly ANNs.

``h(x) = λ/L · clip(floor(x·L/λ + φ), 0, L)`` with ``φ = 0.5`` and a trainable clip ``λ`` per layer.
An ANN trained with QCFS in place of ReLU converts to IF neurons (threshold ``θ = λ``, soft reset,
membrane starting at ``θ/2``) whose expected firing rate matches ``h`` at low T; see ``lasnn.convert``.
"""

from __future__ import annotations

import torch
from torch import nn

from lasnn.checks import check_float

__all__ = ["QCFS"]


class _FloorSTE(torch.autograd.Function):
    """floor(x) forward, identity backward (straight-through estimator): floor has zero gradient a.e."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class QCFS(nn.Module):
    """Quantisation-clip-floor-shift activation, a drop-in replacement for ``nn.ReLU`` in the ANN.

    Computes ``λ · y`` with ``y = floor_ste(x·L/λ + φ) / L`` clipped to ``[0, 1]``: ``L + 1`` output levels
    ``0, λ/L, ..., λ``. Gradients (straight-through for the floor), defined explicitly rather than by
    ``torch.clamp``'s boundary convention: where ``0 < y < 1``, ``dh/dx = 1`` and ``dh/dλ = y − x/λ`` (the
    quantisation residual); where the output is ``λ`` (clipped from above), ``dh/dx = 0`` and ``dh/dλ = 1``;
    where it is 0, both are 0. Works on any shape (elementwise), single-step ANN tensors ``[B, *]``.

    Args:
        levels: quantisation steps ``L`` (an int >= 1; 4 for CIFAR-10, 8 for CIFAR-100 in the paper).
        init_clip: initial value of the trainable clip ``λ`` (> 0).
        shift: ``φ``; 0.5 minimises the expected conversion error with initial membrane ``θ/2``.
    """

    def __init__(self, levels: int = 4, init_clip: float = 8.0, shift: float = 0.5) -> None:
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be an int >= 1, got {levels!r}")
        self.levels = levels
        self.shift = check_float("shift", shift)
        self.clip = nn.Parameter(torch.tensor(check_float("init_clip", init_clip, positive=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[*]`` -> ``[*]`` quantised, clipped activations in ``[0, λ]``."""
        # no type check here: it would stop torch.fx (used by BN folding) from tracing models that use QCFS
        lam = self.clip.to(x.dtype)
        y = _FloorSTE.apply(x * (self.levels / lam) + self.shift) / self.levels
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(y <= 0, zero, torch.where(y >= 1, lam, y * lam))

    def extra_repr(self) -> str:
        return f"levels={self.levels}, clip={float(self.clip.detach()):.4g}, shift={self.shift:g}"
