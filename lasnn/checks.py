"""Argument checks shared by every layer of lasnn (ops, modules, models, conversion, profiling): the
messages name the argument and what was expected. A leaf module: it imports nothing from lasnn."""

from __future__ import annotations

import math

import torch

__all__ = ["check_float", "check_tensor"]


def check_tensor(name: str, t: object, *, min_dim: int = 0, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """Require a floating-point tensor; raise TypeError/ValueError naming ``name`` otherwise."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")
    return t


def check_float(name: str, value: object, *, positive: bool = False, allow_inf: bool = False) -> float:
    """Require a real number (not NaN; finite unless ``allow_inf``; > 0 if ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        else:
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    # comparisons, not math.isnan/isinf: under torch.compile(dynamic=True) a float argument is symbolic, and
    # Dynamo traces comparisons (as guards) but not the math functions
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    if abs(v) == math.inf and not (allow_inf and v > 0):
        raise ValueError(f"{name} must be finite{' or +inf' if allow_inf else ''}, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v
