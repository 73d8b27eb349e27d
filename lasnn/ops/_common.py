"""Pieces shared by the public ops: argument checks (messages name the argument and what was
expected) and the registration of each op's fake kernels and Triton ops."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch

from lasnn import _ext


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
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    if math.isinf(v) and not (allow_inf and v > 0):
        raise ValueError(f"{name} must be finite{' or +inf' if allow_inf else ''}, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def register_op_pair(
    op: str, fwd_schema: str, bwd_schema: str, fake_fwd: Callable, fake_bwd: Callable, kernel_module: str
) -> torch.library.Library:
    """Registers one op's forward/backward pair beyond its C++ schemas (csrc/ops.cpp).

    - The fake kernels of ``lasnn::{op}_fwd`` / ``lasnn::{op}_bwd``, when ``lasnn._C`` has them.
    - Opaque ops ``lasnn::{op}_fwd_triton`` / ``lasnn::{op}_bwd_triton`` with the same schemas and
      fakes, implemented for CPU and CUDA by ``{op}_fwd_triton`` / ``{op}_bwd_triton`` of
      ``lasnn.kernels.<kernel_module>``, imported on first call. Not ``triton_op``: those cannot be
      opcheck'ed or compiled on a GPU-less machine; the CPU impl only works under TRITON_INTERPRET=1.

    Returns the ``Library`` holding the Triton ops: the caller keeps it alive (a module global).
    """
    if _ext.c_has_op(f"{op}_fwd"):
        torch.library.register_fake(f"lasnn::{op}_fwd")(fake_fwd)
        torch.library.register_fake(f"lasnn::{op}_bwd")(fake_bwd)
    lib = torch.library.Library("lasnn", "FRAGMENT")
    for direction, schema, fake in (("fwd", fwd_schema, fake_fwd), ("bwd", bwd_schema, fake_bwd)):
        name = f"{op}_{direction}_triton"
        lib.define(name + schema)
        torch.library.register_fake(f"lasnn::{name}", lib=lib)(fake)

        def impl(*args, _name=name):
            return getattr(importlib.import_module(f"lasnn.kernels.{kernel_module}"), _name)(*args)

        for key in ("CPU", "CUDA"):
            lib.impl(name, impl, key)
    return lib
