"""Loads the compiled extension ``lasnn._C`` and Triton, if they are there, and remembers why not.

Importing lasnn never fails because either is missing: the reason is kept and shown by
``python -m lasnn info`` and by the error of an explicitly requested backend.
"""

from __future__ import annotations

import importlib
import os

import torch

C_ERROR: str | None = None
try:
    importlib.import_module("lasnn._C")
except Exception as e:  # ImportError, or an undefined-symbol OSError from an ABI mismatch
    C_ERROR = f"lasnn._C could not be imported ({type(e).__name__}: {e}); run `pip install -e .`"

HAS_C = C_ERROR is None


def _built_cuda_arch_list() -> str | None:
    try:
        from lasnn._build_info import CUDA_ARCH_LIST
    except ImportError:  # built before the file existed, or not built by setup.py
        return None
    return CUDA_ARCH_LIST


#: the TORCH_CUDA_ARCH_LIST the CUDA kernels were compiled for (None: unknown, or no CUDA kernels)
CUDA_ARCH_LIST: str | None = _built_cuda_arch_list()


def c_has_kernel(name: str, key: str = "CPU") -> bool:
    """Whether ``lasnn._C`` registered a kernel of ``lasnn::<name>`` for dispatch key ``key``."""
    if not HAS_C:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"lasnn::{name}", key)
    except Exception:  # op not defined at all
        return False


def c_has_op(name: str) -> bool:
    """Whether ``lasnn._C`` has a CPU kernel of ``lasnn::<name>``."""
    return c_has_kernel(name, "CPU")


def c_has_cuda_kernels(name: str = "lif_fwd") -> bool:
    """Whether ``lasnn._C`` was built with the CUDA kernel of ``lasnn::<name>``."""
    return c_has_kernel(name, "CUDA")


def cpu_lif_isa() -> str | None:
    """The instruction set of the fp32/bf16 CPU LIF kernels on this machine ("avx512", "avx2" or "base",
    after ``LASNN_CPU_ISA``; fp16 and fp64 run "base"), or None without ``lasnn._C``."""
    if not HAS_C:
        return None
    try:
        return torch.ops.lasnn.cpu_lif_isa()
    except (AttributeError, RuntimeError):  # an older build without the op
        return None


TRITON_ERROR: str | None = None
try:
    import triton
    import triton.language  # noqa: F401
except Exception as e:
    TRITON_ERROR = f"triton is not importable ({type(e).__name__}: {e})"

HAS_TRITON = TRITON_ERROR is None


def triton_interpret() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
