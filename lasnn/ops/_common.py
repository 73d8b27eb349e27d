"""Pieces shared by the public ops: the registration of each op's fake kernels and Triton ops, and the
memory-order permutation of dense tensors (the argument checks live in ``lasnn.checks``, shared with every
other layer)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from lasnn import _ext


def memory_order(t: torch.Tensor, fixed: int = 0) -> list[int] | None:
    """The permutation of ``t``'s dims that makes it contiguous, its first ``fixed`` dims kept in place, or
    None when there is none (the elements overlap or have gaps, or a kept dim is not outer to the rest).

    For a channels-last ``[N, C, H, W]`` it is ``[0, 2, 3, 1]``: ``t.permute(perm)`` is then a contiguous view
    of the same memory, so an elementwise kernel can run on it and its output be permuted back to ``t``'s
    strides, with no copy either way. Already contiguous: the identity.
    """
    nd = t.dim()
    rest = sorted(range(fixed, nd), key=lambda d: -t.stride(d))  # stable: ties (size-1 dims) keep their order
    perm = [*range(fixed), *rest]
    return perm if t.permute(perm).is_contiguous() else None


def is_channels_last_4d(t: torch.Tensor) -> bool:
    """Whether ``t`` is a 4-d tensor in channels-last order and not also contiguous (``C = 1`` or ``H = W = 1``
    are both: the same memory either way, taken as contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def inverse_permutation(perm: list[int]) -> list[int]:
    """``inv`` with ``t.permute(perm).permute(inv)`` equal to ``t``."""
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


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
