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


@pytest.fixture(scope="session")
def bench_info() -> dict[str, str]:
    """Versions and thread count shared by every row."""
    info = versions()
    info["torch_threads"] = str(torch.get_num_threads())
    info["LASNN_CPU_ISA"] = os.environ.get("LASNN_CPU_ISA", "auto")
    return info


@pytest.fixture
def record(benchmark, bench_info):
    """``record(device, bytes_moved, copy_bytes, **extra)``: call after ``benchmark(...)`` to store the
    effective GB/s (bytes / median time), the same-size copy bandwidth and the ratio in extra_info."""

    def _record(device: torch.device, bytes_moved: int, copy_bytes: int, **extra) -> None:
        median = benchmark.stats.stats.median
        gbps = bytes_moved / median / 1e9
        cp = copy_gbps(device, copy_bytes)
        benchmark.extra_info.update(bench_info)
        benchmark.extra_info.update(
            device=device_name(device),
            bytes_moved=int(bytes_moved),
            gbps=round(gbps, 2),
            copy_gbps=round(cp, 2),
            fraction_of_copy_bw=round(gbps / cp, 3),
            median_ms=round(median * 1e3, 4),
            **extra,
        )

    return _record


@pytest.fixture
def run_timed(benchmark):
    """``run_timed(fn, setup=None, rounds=15)``: ``benchmark.pedantic`` with 2 warm-up rounds (they
    absorb torch.compile and autotuning); ``setup`` (untimed) returns the args of ``fn``."""

    def _run(fn: Callable[..., object], setup: Callable[[], tuple] | None = None, rounds: int = 15):
        if setup is None:
            return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=2)
        return benchmark.pedantic(fn, setup=lambda: (setup(), {}), rounds=rounds, warmup_rounds=2)

    return _run
