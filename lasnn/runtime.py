"""Process-level state: the CPU settings the kernels' speed depends on, and the global RNG streams.

``rng_state()`` / ``set_rng_state()`` / ``preserved_rng()``: every global RNG a run draws from (torch CPU
and CUDA, numpy's legacy global RNG, Python's ``random``), captured as weights_only-safe tensors (what
checkpoints hold) or saved and restored around a block (so library calls leave the caller's streams alone).

``keep_cpu_memory()``: on glibc, large ``malloc`` blocks (>= 128 KiB, adaptively up to 32 MiB) are
fresh ``mmap`` regions, unmapped again on ``free``. Every new CPU tensor of that size is then
page-faulted in (the kernel zeroes each 4 KiB page) inside whichever op writes it first. At
``[16, 2^20]`` fp32 (64 MiB) this costs more than the LIF kernels themselves. Measured on a 2-core EPYC
with ``benches/bench_lif.py`` (medians, three runs each): forward + backward 53-60 ms with glibc's
defaults and 14.6-17.2 ms with memory kept; ``torch.compile``'s loop went from 99-123 to 61-64 ms.

This is what the ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables do, and
what preloading jemalloc or tcmalloc gives, but it can be done from inside a running process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["cpu_has_native_bf16", "keep_cpu_memory", "preserved_rng", "rng_state", "set_rng_state"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def keep_cpu_memory(mmap_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed memory, so that large CPU tensors reuse pages already mapped.

    Process-wide: after the call, blocks smaller than ``mmap_threshold`` bytes come from the heap and,
    once freed, stay in the process for reuse (no trimming). Resident memory then stays at its peak
    instead of shrinking after each step. The effect is the same as starting Python with
    ``MALLOC_MMAP_THRESHOLD_=<mmap_threshold> MALLOC_TRIM_THRESHOLD_=2147483647``. The ``lasnn``
    commands call it when they start, unless ``LASNN_KEEP_CPU_MEMORY=0``.

    Args:
        mmap_threshold: blocks of at least this many bytes are still mmapped afresh (and unmapped on
            free); between 1 MiB and 2^31 - 1.
    Returns:
        True if the settings were applied. False, with nothing changed, where the C library is not glibc
        (macOS, Windows, musl) or refuses the values.
    """
    if isinstance(mmap_threshold, bool) or not isinstance(mmap_threshold, int):
        raise TypeError(f"mmap_threshold must be an int (bytes), got {type(mmap_threshold).__name__}")
    if not (1 << 20) <= mmap_threshold <= _INT_MAX:
        raise ValueError(f"mmap_threshold must be between 1 MiB and 2^31 - 1 bytes, got {mmap_threshold}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only; musl has mallopt as a no-op stub
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
        return False
    return mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1




def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), where bf16 autocast (``cpu_amp``) makes
    oneDNN's convolutions faster; elsewhere bf16 is emulated and slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(c()) for c in checks if callable(c))


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as tensors/primitives (weights_only-safe)."""
    # The legacy global numpy RNG is what third-party code draws from; capture it as well.
    np_state = np.random.get_state()  # noqa: NPY002
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_meta": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_version": int(py_state[0]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block with the caller's RNG streams saved and restored afterwards (torch CPU and CUDA, numpy's
    global RNG, Python's ``random``): what a library call seeds or draws inside does not leak out."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"].cpu())
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    pos, has_gauss, cached = state["numpy_meta"]
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(cached)))  # noqa: NPY002
    random.setstate((int(state["python_version"]), tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
