"""lasnn.keep_cpu_memory: glibc keeps freed memory, so a large CPU tensor allocated again is not
page-faulted in afresh. Runs in subprocesses: the setting is process-wide."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lasnn

# Eight rounds of: allocate and write two 64 MiB tensors (above glibc's largest adaptive mmap
# threshold, 32 MiB), free them. Prints the minor page faults of the last four rounds: ~16k 4 KiB
# pages per tensor when each block is mapped afresh, about none once kept memory is reused (the heap
# reaches its steady state within 2-3 rounds: c10's 64-byte-aligned allocations fragment it at first).
_SCRIPT = """
import resource, sys, torch
import lasnn
applied = lasnn.keep_cpu_memory() if sys.argv[1] == "keep" else None
n = 16 << 20
faults = []
for _ in range(8):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(n); a.fill_(1.0); b = torch.empty(n); b.fill_(2.0)
    del a, b
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(applied, sum(faults[4:]))
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], check=True, capture_output=True, text=True, timeout=120)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_keep_cpu_memory_reuses_pages():
    applied, kept = _faults("keep")
    if applied != "True":
        pytest.skip("the C library is not glibc (keep_cpu_memory returned False)")
    _, default = _faults("default")
    pages = 4 * 2 * (64 << 20) // 4096  # four rounds of two fresh 64 MiB blocks
    assert default > pages // 2, f"glibc default: expected ~{pages} faults for fresh 64 MiB blocks, got {default}"
    assert kept < pages // 20, f"with keep_cpu_memory the 64 MiB blocks should be reused, got {kept} faults"


def test_keep_cpu_memory_bad_input():
    with pytest.raises(ValueError, match="mmap_threshold"):
        lasnn.keep_cpu_memory(1024)
    with pytest.raises(ValueError, match="mmap_threshold"):
        lasnn.keep_cpu_memory(1 << 40)
    with pytest.raises(TypeError, match="mmap_threshold"):
        lasnn.keep_cpu_memory(1.5e9)


def test_commands_keep_cpu_memory_only_for_cpu_runs():
    from lasnn.cli import _runs_on_cpu, build_parser

    p = build_parser()
    assert not _runs_on_cpu(p.parse_args(["info"]))
    assert not _runs_on_cpu(p.parse_args(["train-snn", "--out", "x", "--device", "cuda"]))
    assert not _runs_on_cpu(p.parse_args(["demo", "--out", "x", "--device", "cuda:1"]))
    assert _runs_on_cpu(p.parse_args(["distill", "--out", "x", "--device", "cpu"]))
    auto = p.parse_args(["train-teacher", "--out", "x"])  # --device auto: the CPU unless a GPU is visible
    assert _runs_on_cpu(auto) == (not torch.cuda.is_available())


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]
    assert commands == ["make demo", "make test"]
    ci = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci
    makefile = (root / "Makefile").read_text()
    # the targets exist, and the test target runs the README's test commands
    test_recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "pytest" in test_recipe and "TRITON_INTERPRET=1" in test_recipe and "ruff check" in test_recipe
    assert "\ndemo:" in makefile and "lasnn demo" in makefile


def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    from lasnn.files import atomic_write, atomic_write_text

    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "old")
    assert target.read_text() == "old"

    def torn(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, torn)
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_text() == "new"
    with pytest.raises(TypeError, match="text must be a str"):
        atomic_write_text(target, b"bytes")
    with pytest.raises(TypeError, match="write must be a callable"):
        atomic_write(target, "not callable")
