"""Shared benchmark fixtures (pytest-benchmark). Run with ``pytest benches/`` (plain ``pytest`` only
collects ``tests/``); save with ``--benchmark-json out.json``.

Every row records in ``extra_info``: the bytes the minimal design moves and the effective GB/s
(from the median), the memory-copy bandwidth measured in the same process on a tensor of the same
size (``copy_gbps``) and the ratio, the device name and library versions.
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from lasnn import _ext
from lasnn.testing import peak_allocated_bytes


def pytest_addoption(parser):
    parser.addoption(
        "--keep-cpu-memory",
        action="store_true",
        help="call lasnn.keep_cpu_memory() first: glibc keeps freed memory, so large CPU outputs are not "
        "page-faulted in afresh on every call (lasnn/runtime.py); applies to every row alike",
    )


def pytest_configure(config):
    if config.getoption("--keep-cpu-memory", default=False):
        import lasnn

        if not lasnn.keep_cpu_memory():
            raise pytest.UsageError("--keep-cpu-memory: the C library is not glibc, nothing to set")


def pytest_collect_file(file_path, parent):
    # Benchmark files are named bench_<op>.py; collect them like test modules (a file named on the
    # command line is already collected by pytest itself).
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timed callable measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model (from /proc/cpuinfo) and the number of torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    """Versions of torch, lasnn and the peers, 'absent' for those not installed."""
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("lasnn", "triton", "spikingjelly", "snntorch"):
        try:
            m = importlib.import_module(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except Exception:
            out[mod] = "absent"
    if out.get("spikingjelly") == "installed":
        try:
            from importlib.metadata import version

            out["spikingjelly"] = version("spikingjelly")
        except Exception:
            pass
    return out


def copy_gbps(device: torch.device, nbytes: int, reps: int = 15) -> float:
    """Median memory-copy bandwidth (read + write bytes per second / 1e9) for ``dst.copy_(src)`` of
    ``nbytes`` bytes on ``device``. Measured afresh right after each row (a few ms): on a shared
    machine the load changes within a run, and the ratio is only meaningful under the same load."""
    n = max(nbytes // 4, 1)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 3:  # warm-up: page faults, caches, clocks
            times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times) / 1e9


# Buffers for the machine's memory-copy bandwidth: well beyond any CPU's last-level cache (and an
# H200's 60 MB L2), so the copy runs at DRAM/HBM speed whatever ran before.
DRAM_COPY_BYTES = 256 << 20


@pytest.fixture(scope="session")
def bench_info(request) -> dict[str, str]:
    """Versions, thread count and allocator setting shared by every row."""
    info = versions()
    info["torch_threads"] = str(torch.get_num_threads())
    info["LASNN_CPU_ISA"] = os.environ.get("LASNN_CPU_ISA", "auto")
    info["cpu_lif_isa"] = str(_ext.cpu_lif_isa())
    info["keep_cpu_memory"] = str(bool(request.config.getoption("--keep-cpu-memory", default=False)))
    return info


@pytest.fixture(scope="session")
def dram_copy_gbps() -> dict[str, float]:
    """Memory-copy bandwidth of the device with 256 MiB buffers (GB/s, median), one per device type,
    measured once per session: the "machine's memory-copy bandwidth" the kernel targets refer to."""
    cache: dict[str, float] = {}
    return cache


@pytest.fixture
def record(benchmark, bench_info, dram_copy_gbps):
    """``record(device, bytes_moved, copy_bytes, **extra)``: call after ``benchmark(...)`` to store in
    extra_info the effective GB/s (bytes / median time) and two yardsticks with their ratios:

    - ``copy_gbps`` / ``fraction_of_copy_bw``: a copy of ``copy_bytes`` (same size as the row's
      tensors), measured right after the row. Tensors that fit the last-level cache copy at cache
      speed here (measured on a 32 MB-L3 EPYC: 86-143 GB/s for 16 MB depending on what ran before).
    - ``dram_copy_gbps`` / ``fraction_of_dram_copy_bw``: the device's memory-copy bandwidth (256 MiB
      buffers, once per session), the yardstick of the issue's "% of copy bandwidth" targets.
    """

    def _record(device: torch.device, bytes_moved: int, copy_bytes: int, **extra) -> None:
        median = benchmark.stats.stats.median
        gbps = bytes_moved / median / 1e9
        cp = copy_gbps(device, copy_bytes)
        if device.type not in dram_copy_gbps:
            dram_copy_gbps[device.type] = copy_gbps(device, DRAM_COPY_BYTES, reps=7)
        dram = dram_copy_gbps[device.type]
        benchmark.extra_info.update(bench_info)
        benchmark.extra_info.update(
            device=device_name(device),
            bytes_moved=int(bytes_moved),
            gbps=round(gbps, 2),
            copy_gbps=round(cp, 2),
            fraction_of_copy_bw=round(gbps / cp, 3),
            dram_copy_gbps=round(dram, 2),
            fraction_of_dram_copy_bw=round(gbps / dram, 3),
            median_ms=round(median * 1e3, 4),
            **extra,
        )

    return _record


@pytest.fixture
def peak_bytes():
    """``peak_bytes(fn, device)``: :func:`peak_allocated_bytes` (the benches read it as a fixture)."""
    return peak_allocated_bytes


@pytest.fixture
def run_timed(benchmark):
    """``run_timed(fn, setup=None, rounds=15)``: ``benchmark.pedantic`` with 2 warm-up rounds (they
    absorb torch.compile and autotuning); ``setup`` (untimed) returns the args of ``fn``."""

    def _run(fn: Callable[..., object], setup: Callable[[], tuple] | None = None, rounds: int = 15):
        if setup is None:
            return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=2)
        return benchmark.pedantic(fn, setup=lambda: (setup(), {}), rounds=rounds, warmup_rounds=2)

    return _run
