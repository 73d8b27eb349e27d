"""Backend selection, shared by every op.

Backends: ``reference`` (pure PyTorch, the oracle), ``cpu`` (fused C++), ``triton`` (fused Triton),
``cuda`` (fused CUDA C++). ``backend="auto"`` (or the ``LASNN_BACKEND`` env var) picks the fastest
available one for the tensor's device and dtype; an explicitly named backend that is unavailable
raises a ``RuntimeError`` listing why each backend was rejected.
"""

from __future__ import annotations

import functools
import os

import torch

from lasnn import _ext

BACKENDS: tuple[str, ...] = ("reference", "cpu", "triton", "cuda")
# Fastest first, per device type.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_TRITON_DTYPES_GPU = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_DTYPES_INTERP = (torch.float32, torch.float16)  # bf16 fails in the interpreter
_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# ops implemented by each backend: op name -> (C op name used to detect the kernels).
OPS: dict[str, str] = {"lif": "lif_fwd", "attention_map": "attention_map_fwd"}


def unavailable_reason(op: str, backend: str, device: torch.device | None, dtype: torch.dtype | None) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device``/``dtype``; None if it can.

    ``device``/``dtype`` None means "in general" (used by ``python -m lasnn info``).
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    dev = device.type if device is not None else None
    if backend == "reference":
        return None
    if backend == "cpu":
        if not _ext.HAS_C:
            return _ext.C_ERROR
        if not _ext.c_has_op(OPS[op]):
            return f"lasnn._C has no kernel for lasnn::{OPS[op]} (rebuild with `pip install -e .`)"
        if dev is not None and dev != "cpu":
            return f"the cpu backend runs on CPU tensors, got a {dev} tensor"
        if dtype is not None and dtype not in _CPU_DTYPES:
            return f"the cpu backend supports {_names(_CPU_DTYPES)}, got {dtype}"
        return None
    if backend == "cuda":
        if not _ext.HAS_C:
            return _ext.C_ERROR
        if not _ext.c_has_cuda_kernels(OPS[op]):
            return "lasnn._C was built without CUDA kernels (needs nvcc and a CUDA build of torch at build time)"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        if dev is not None and dev != "cuda":
            return f"the cuda backend runs on CUDA tensors, got a {dev} tensor"
        if dtype is not None and dtype not in _CUDA_DTYPES:
            return f"the cuda backend supports {_names(_CUDA_DTYPES)}, got {dtype}"
        if dev == "cuda":
            return _arch_not_covered(device)
        return None
    # triton
    if not _ext.HAS_TRITON:
        return _ext.TRITON_ERROR
    if not _triton_kernels_present(op):
        return f"no Triton kernel for {op}"
    interp = _ext.triton_interpret()
    if dev is None:
        if not torch.cuda.is_available() and not interp:
            return "no CUDA GPU is visible and TRITON_INTERPRET=1 is not set"
        return None
    if dev == "cuda":
        allowed = _TRITON_DTYPES_GPU
    elif dev == "cpu" and interp:
        allowed = _TRITON_DTYPES_INTERP
    else:
        return f"Triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a {dev} tensor"
    if dtype is not None and dtype not in allowed:
        return f"the triton backend supports {_names(allowed)} on {dev}, got {dtype}"
    return None


def arch_covers(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether kernels compiled for ``arch_list`` run on a GPU of compute ``capability`` ``(major, minor)``.

    ``arch_list`` is a ``TORCH_CUDA_ARCH_LIST`` value (``"8.0 9.0+PTX"``, ``;`` or space separated). A
    binary for X.Y runs on X.Y' with Y' >= Y (same major); ``+PTX`` code is compiled by the driver for any
    GPU of at least X.Y.
    """
    major, minor = capability
    for entry in arch_list.replace(";", " ").split():
        ptx = entry.endswith("+PTX")
        num = entry[: -len("+PTX")] if ptx else entry
        try:
            a_major, a_minor = (int(v) for v in num.split(".")[:2])
        except ValueError:
            continue  # a named arch ("Hopper") or a typo: say nothing rather than guess
        if (a_major == major and a_minor <= minor) or (ptx and (a_major, a_minor) <= (major, minor)):
            return True
    return False


def _arch_not_covered(device: torch.device | None) -> str | None:
    built = _ext.CUDA_ARCH_LIST
    if not built:  # unknown (an older build): let the kernel launch tell
        return None
    idx = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(idx)
    if arch_covers(built, cap):
        return None
    return (f"lasnn._C's CUDA kernels were built for TORCH_CUDA_ARCH_LIST={built!r}, which does not cover this GPU "
            f"(compute capability {cap[0]}.{cap[1]}); rebuild with TORCH_CUDA_ARCH_LIST=\"{cap[0]}.{cap[1]}\" "
            "pip install --no-build-isolation -e .")


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _triton_kernels_present(op: str) -> bool:
    try:
        from lasnn import kernels
    except Exception:
        return False
    return op in getattr(kernels, "AVAILABLE", ())


def resolve(op: str, backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """Return the backend that will run ``op`` for a tensor on ``device`` with ``dtype``.

    ``backend`` None or ``"auto"`` consults ``LASNN_BACKEND`` and then picks the fastest available.
    Raises ``ValueError`` for an unknown name and ``RuntimeError`` (listing the reasons) when the
    requested backend cannot run. Answers are cached per (op, request, LASNN_BACKEND, TRITON_INTERPRET,
    device, dtype): what the process can run does not change while it runs.
    """
    return _resolve(op, backend, os.environ.get("LASNN_BACKEND"), _ext.triton_interpret(), device, dtype)


@functools.lru_cache(maxsize=512)
def _resolve(op: str, backend: str | None, _env: str | None, _interp: bool, device: torch.device,
             dtype: torch.dtype) -> str:
    # _env and _interp are part of the cache key only (the checks below read them themselves)
    if backend is None or backend == "auto":
        backend = os.environ.get("LASNN_BACKEND", "auto").strip() or "auto"
        source = "LASNN_BACKEND"
    else:
        source = "backend"
    if not isinstance(backend, str) or backend not in ("auto", *BACKENDS):
        raise ValueError(f"{source} must be one of {('auto', *BACKENDS)}, got {backend!r}")
    if backend != "auto":
        why = unavailable_reason(op, backend, device, dtype)
        if why is not None:
            reasons = "; ".join(
                f"{b}: {unavailable_reason(op, b, device, dtype) or 'available'}" for b in BACKENDS
            )
            raise RuntimeError(
                f"{source}={backend!r} cannot run {op} on a {device.type} {dtype} tensor: {why}. "
                f"Backends: {reasons}"
            )
        return backend
    for b in _AUTO_ORDER.get(device.type, ("reference",)):
        if unavailable_reason(op, b, device, dtype) is None:
            return b
    return "reference"


def table() -> list[tuple[str, str, str]]:
    """Rows (op, backend, status) describing what can run here; used by ``python -m lasnn info``."""
    rows = []
    for op in OPS:
        for b in BACKENDS:
            why = unavailable_reason(op, b, None, None)
            rows.append((op, b, "available" if why is None else f"unavailable: {why}"))
    return rows


@torch.compiler.assume_constant_result
def resolve_traced(op: str, backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """``resolve`` as seen by ``torch.compile``: evaluated once at trace time and baked in as a constant.

    The selector asks the dispatcher which kernels exist and reads ``LASNN_BACKEND`` (calls Dynamo
    cannot trace); its answer is fixed for a given device and dtype, on which Dynamo already guards.
    Changing ``LASNN_BACKEND`` after a function was compiled does not recompile it.
    """
    return resolve(op, backend, device, dtype)
