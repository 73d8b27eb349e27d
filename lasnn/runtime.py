"""Process-level CPU settings that the kernels' speed depends on.

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

import ctypes
import ctypes.util
import sys

__all__ = ["keep_cpu_memory"]

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
