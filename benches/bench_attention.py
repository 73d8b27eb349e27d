"""Benchmark of the attention-transfer loss: fused raw map (cpu / triton / cuda backends) against the unfused
PyTorch composition (the ``reference`` backend, lasnn/reference/attention.py), forward + backward.

Run: ``pytest benches/ -k attention --benchmark-json=out.json`` (``-k "attention and cpu"`` etc. to select
rows; naming the file directly collects it twice through benches/conftest.py's collection hook).

Cases (issue 3): student spikes ``[T=4, B=64, C=128, 32, 32]`` against a teacher ``[64, 256, 32, 32]``
(equal grids) and against a teacher ``[64, 256, 16, 16]`` (mismatched: the student's raw map is pooled),
in both time modes. The student requires grad, the teacher is frozen (as in distillation).

Each row records in ``extra_info``:
- ``peak_fwd_bytes`` / ``peak_fwdbwd_bytes``: peak of live bytes allocated above the starting point during
  one forward (one forward + backward), from the allocator's running total as torch.profiler
  (``profile_memory=True``) records it for CPU, or ``torch.cuda.max_memory_allocated`` on a GPU;
  ``*_over_student`` divides them by the student's size. The backward must return a student-sized
  gradient, so a fused fwd+bwd peak of about 1.0x the student is the minimum; the forward should stay
  far below 1.0x ("no temporary of the student's full size");
- ``gbps`` (and ``copy_gbps``, ``fraction_of_copy_bw`` from benches/conftest.py's ``record``): effective
  bandwidth of the minimal design, bytes = 2 reads of the student + 1 write of its gradient (1/T of it
  in the time-mean mode, where the gradient is one step expanded over T) + 1 read of the teacher;
- ``speedup_vs_reference``: median of the reference row / median of this row, same case, same run;
- device, versions, thread count (``record``), and ``thp_mem_alloc`` (THP_MEM_ALLOC_ENABLE).
"""

from __future__ import annotations

import os

import pytest
import torch

import lasnn
from lasnn import backends

STUDENT = (4, 64, 128, 32, 32)
TEACHERS = {"equal": (64, 256, 32, 32), "mismatch": (64, 256, 16, 16)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = int(os.environ.get("LASNN_BENCH_ROUNDS", "5"))

_medians: dict[tuple[str, str], float] = {}


def _backends() -> list[str]:
    # The reference first, so that the fused rows can report their speed-up against it.
    rows = ["reference"]
    for b in ("cpu", "cuda", "triton"):
        if backends.unavailable_reason("attention_map", b, torch.device(DEVICE), torch.float32) is None:
            rows.append(b)
    return rows


def _inputs(case: str):
    g = torch.Generator().manual_seed(0)
    s = (torch.rand(STUDENT, generator=g) < 0.2).float().to(DEVICE).requires_grad_()
    t = torch.randn(TEACHERS[case], generator=g).relu().to(DEVICE)
    return s, t


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peaks(peak_bytes, backend: str, time_reduce: str, s: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    student_bytes = s.numel() * s.element_size()

    def fwd():
        with torch.no_grad():
            lasnn.attention_loss(s, t, time_reduce=time_reduce, backend=backend)

    def fwdbwd():
        loss = lasnn.attention_loss(s, t, time_reduce=time_reduce, backend=backend)
        torch.autograd.grad(loss, s)

    pf, pfb = peak_bytes(fwd, DEVICE), peak_bytes(fwdbwd, DEVICE)
    return dict(
        student_bytes=student_bytes,
        peak_fwd_bytes=pf,
        peak_fwdbwd_bytes=pfb,
        peak_fwd_over_student=round(pf / student_bytes, 4),
        peak_fwdbwd_over_student=round(pfb / student_bytes, 4),
    )


@pytest.mark.parametrize("time_reduce", ["mean", "per_step"])
@pytest.mark.parametrize("case", list(TEACHERS))
@pytest.mark.parametrize("backend", _backends())
def test_attention_loss_fwd_bwd(benchmark, record, peak_bytes, backend, case, time_reduce):
    s, t = _inputs(case)
    device = torch.device(DEVICE)

    def step():
        loss = lasnn.attention_loss(s, t, time_reduce=time_reduce, backend=backend)
        torch.autograd.grad(loss, s)
        _sync()

    benchmark.group = f"attention fwd+bwd {case} {time_reduce}"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    _medians[(backend, case + time_reduce)] = median
    extra = {}
    ref = _medians.get(("reference", case + time_reduce))
    if ref is not None and backend != "reference":
        extra["speedup_vs_reference"] = round(ref / median, 2)
    student_bytes = s.numel() * s.element_size()
    # Minimal design: the student read by the forward and again by the backward, its gradient written
    # (a [1, B, C, S] slab expanded over T in the time-mean mode), the teacher read once.
    grad_bytes = student_bytes // s.shape[0] if time_reduce == "mean" else student_bytes
    moved = 2 * student_bytes + grad_bytes + t.numel() * t.element_size()
    record(
        device, moved, student_bytes,
        backend=backend, case=case, time_reduce=time_reduce, student=list(STUDENT), teacher=list(TEACHERS[case]),
        # Transparent huge pages for large CPU tensors (c10 reads THP_MEM_ALLOC_ENABLE): fewer page faults
        # when a fresh gradient buffer is first written, which weighs on every row's backward on CPU.
        thp_mem_alloc=os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        **extra,
        **_peaks(peak_bytes, backend, time_reduce, s, t),
    )
