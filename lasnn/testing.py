"""Test helpers shared by every op's tests: input factories, the tolerance table, comparisons, skip marks.

Conventions (see DESIGN.md, "Tests"):

- Kernels are compared with their oracle in ``lasnn.reference``, never with a private copy.
- Spikes are binary and compared exactly, except neurons whose reference membrane H was within a tiny
  margin of the threshold at the first step where the two disagree. A flip changes that neuron's
  reset and so its whole future, so from that step on the neuron is excluded (from spikes and
  gradients alike); such neurons are counted and bounded, never ignored wholesale.
- Tolerances come from one table per dtype (``TOLERANCES``). fp16/bf16 kernels are bounded by a
  multiple of the error of the same-dtype reference against float64, not by magic numbers.

``pytest`` is imported lazily: importing ``lasnn.testing`` works without it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lasnn import _ext, backends

__all__ = [
    "TOLERANCES",
    "Tolerance",
    "assert_close_to_reference",
    "assert_spikes_match",
    "backend_device",
    "cuda_available",
    "make_currents",
    "peak_allocated_bytes",
    "skip_unless_backend",
    "spike_rate",
    "tolerance",
    "triton_runnable",
]


@dataclass(frozen=True)
class Tolerance:
    """Per-dtype tolerances.

    rtol/atol: for kernel vs same-dtype reference (``torch.testing.assert_close`` semantics).
    lowp_factor: fp16/bf16 kernels may be off from float64 by this multiple of the same-dtype
        reference's own max error against float64 (plus ``atol``).
    spike_margin: |H - v_threshold| below which a spike flip is a rounding tie, not a bug; scaled by
        max(1, |v_threshold|).
    """

    rtol: float
    atol: float
    lowp_factor: float
    spike_margin: float


# fp32: the kernels accumulate in fp32 in a different order than the reference (e.g. g * (1/tau) vs
# g / tau, a polynomial exp vs libm's), a few ulp per step, compounding over T steps of recursion.
# fp16/bf16: storage rounding dominates; the factor allows the kernel's own fp32->fp16 rounding of
# outputs on top of the reference's.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-10, atol=1e-12, lowp_factor=1.0, spike_margin=1e-12),
    torch.float32: Tolerance(rtol=2e-5, atol=2e-6, lowp_factor=1.0, spike_margin=1e-5),
    torch.float16: Tolerance(rtol=2e-3, atol=1e-3, lowp_factor=2.0, spike_margin=1e-5),
    torch.bfloat16: Tolerance(rtol=1.6e-2, atol=1e-2, lowp_factor=2.0, spike_margin=1e-5),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """The ``Tolerance`` row for ``dtype``; ValueError for a dtype without one."""
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype must be one of {list(TOLERANCES)}, got {dtype}")
    return TOLERANCES[dtype]


# ---------------------------------------------------------------------------------------------
# Input factories


def make_currents(
    T: int,
    shape: tuple[int, ...] | int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    mean: float = 1.0,
    std: float = 1.0,
    v_threshold: float = 1.0,
    noncontiguous: bool = False,
    requires_grad: bool = False,
) -> torch.Tensor:
    """Random input currents ``[T, *shape]`` that give a healthy mix of spikes and silence.

    Values are ``v_threshold * N(mean, std)`` drawn in float64 from a seeded CPU generator (identical
    on every device), so with the default LIF (tau=2, hard reset, threshold 1) about 25% of steps
    spike (about 50% for the IF neuron). ``noncontiguous=True`` returns a strided view (time moved from the last storage
    dimension, then every other element of the last neuron dimension), with the same values as the
    contiguous result for the same seed.
    """
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if T < 0 or any(s < 0 for s in shape):
        raise ValueError(f"T and shape must be non-negative, got T={T}, shape={shape}")
    if dtype not in TOLERANCES:
        raise TypeError(f"dtype must be one of {list(TOLERANCES)}, got {dtype}")
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn((T, *shape), generator=gen, dtype=torch.float64) * std + mean
    values = (values * v_threshold).to(dtype)
    if noncontiguous:
        if len(shape) == 0:
            raise ValueError("noncontiguous needs at least one neuron dimension")
        # Storage [*shape[:-1], 2*shape[-1], T]: the view has time as the innermost stride and the
        # last neuron dimension strided by 2, so no flattening of it can be a plain view.
        big_shape = (*shape[:-1], 2 * shape[-1], T)
        storage = torch.full(big_shape, float("nan"), dtype=dtype)
        perm = (len(shape), *range(len(shape)))
        view = storage.permute(perm)[..., ::2]
        view.copy_(values)
        out = storage.to(device).permute(perm)[..., ::2]
        assert not out.is_contiguous() or out.numel() <= 1
    else:
        out = values.to(device)
    if requires_grad:
        out.requires_grad_(True)
    return out


def cuda_available() -> bool:
    """Whether a CUDA GPU is visible."""
    return torch.cuda.is_available()


def triton_runnable() -> bool:
    """Whether Triton kernels can run here: importable, and a GPU or TRITON_INTERPRET=1."""
    return _ext.HAS_TRITON and (cuda_available() or _ext.triton_interpret())


def backend_device(backend: str) -> torch.device:
    """The device a test of ``backend`` runs on: CUDA for ``cuda``; for ``triton`` the GPU if there
    is one, else CPU (the interpreter); CPU otherwise."""
    if backend not in backends.BACKENDS:
        raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}")
    if backend == "cuda" or (backend == "triton" and cuda_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def skip_unless_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """``pytest.skip`` with ``lasnn.backends.unavailable_reason`` when ``backend`` cannot run here."""
    import pytest

    why = backends.unavailable_reason(op, backend, device, dtype)
    if why is None and device.type == "cuda" and not cuda_available():
        # unavailable_reason judges a CUDA tensor's backend as if the tensor existed; here it cannot.
        why = "no CUDA GPU is visible"
    if why is not None:
        pytest.skip(f"{op}/{backend} on {device.type} {dtype}: {why}")


# ---------------------------------------------------------------------------------------------
# Comparisons


def _first_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For [T, N] 0/1 tensors: per neuron, whether they ever differ and the first step they do."""
    diff = actual != expected
    ever = diff.any(dim=0)
    first = torch.where(ever, diff.to(torch.int8).argmax(dim=0), torch.full_like(ever, -1, dtype=torch.long))
    return ever, first


def assert_spikes_match(
    actual: torch.Tensor,
    expected: torch.Tensor,
    h_ref: torch.Tensor,
    v_threshold: float,
    *,
    dtype: torch.dtype | None = None,
    max_flip_fraction: float = 1e-3,
    max_flips: int = 2,
) -> torch.Tensor:
    """Compare spike trains ``[T, *]`` exactly up to counted near-threshold flips.

    A neuron may differ only if, at the first step where it does, the reference charge ``h_ref``
    (``[T, *]``, from ``lif_reference(..., return_h=True)``) was within ``spike_margin`` of the
    threshold. At most ``max(max_flips, max_flip_fraction * N)`` neurons may flip.

    Returns:
        keep: ``[*]`` bool, False for the neurons that flipped (exclude them from value/gradient checks).
    """
    if actual.shape != expected.shape or h_ref.shape != expected.shape:
        raise ValueError(
            f"actual, expected and h_ref must have one shape, got {tuple(actual.shape)}, "
            f"{tuple(expected.shape)}, {tuple(h_ref.shape)}"
        )
    dtype = dtype or expected.dtype
    tol = tolerance(dtype)
    a = (
        actual.detach().cpu().reshape(actual.shape[0], -1).double()
        if actual.dim() > 1
        else actual.detach().cpu()[:, None].double()
    )
    e = expected.detach().cpu().reshape(a.shape).double()
    h = h_ref.detach().cpu().reshape(a.shape).double()
    nonbinary = ~((a == 0) | (a == 1))
    if nonbinary.any():
        raise AssertionError(
            f"spikes must be 0/1; found {int(nonbinary.sum())} other values, e.g. {a[nonbinary][:5].tolist()}"
        )
    keep = torch.ones(a.shape[1], dtype=torch.bool)
    if a.shape[0] == 0 or a.shape[1] == 0:
        return keep.reshape(expected.shape[1:])
    ever, first = _first_mismatch(a, e)
    n_flip = int(ever.sum())
    if n_flip:
        idx = ever.nonzero().squeeze(1)
        h_at = h[first[idx], idx]
        dist = (h_at - v_threshold).abs()
        margin = tol.spike_margin * max(1.0, abs(v_threshold))
        far = dist > margin
        if far.any() or torch.isnan(dist).any():
            bad = idx[far | torch.isnan(dist)][:5].tolist()
            raise AssertionError(
                f"{int((far | torch.isnan(dist)).sum())} neuron(s) spike differently from the reference although the "
                f"reference H was not within {margin:g} of the threshold {v_threshold} (neurons {bad}, steps "
                f"{first[bad].tolist()}, |H - v_th| = {dist[far][:5].tolist()})"
            )
        limit = max(max_flips, int(max_flip_fraction * a.shape[1]))
        if n_flip > limit:
            raise AssertionError(
                f"{n_flip} near-threshold spike flips out of {a.shape[1]} neurons exceed the bound {limit}"
            )
        keep[idx] = False
    return keep.reshape(expected.shape[1:])


def assert_close_to_reference(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    expected64: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    name: str = "value",
    dtype: torch.dtype | None = None,
) -> None:
    """Assert a kernel output is as close to its oracle as ``TOLERANCES`` allows.

    Args:
        actual: kernel output, any shape.
        expected: the reference in the same dtype, same shape.
        expected64: the reference computed in float64 from the same inputs; required for fp16/bf16,
            whose bound is ``lowp_factor * max|expected - expected64| + atol`` on ``|actual - expected64|``.
        keep: bool mask broadcastable from the trailing dims of ``actual`` (e.g. the ``[*]`` neuron
            mask of ``assert_spikes_match``); masked-out elements are not compared.
        name: used in the failure message.
        dtype: the tolerance row (default: ``expected.dtype``).
    NaN must sit at the same places in ``actual`` and ``expected``.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"{name}: shape {tuple(actual.shape)} != reference shape {tuple(expected.shape)}")
    dtype = dtype or expected.dtype
    tol = tolerance(dtype)
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    if keep is not None:
        k = keep.detach().cpu().expand(a.shape)
        a, e = a[k], e[k]
        if expected64 is not None:
            expected64 = expected64.detach().cpu().expand(actual.shape)[k]
    if dtype in (torch.float16, torch.bfloat16):
        if expected64 is None:
            raise ValueError(f"{name}: fp16/bf16 comparisons need expected64 (the float64 reference)")
        e64 = expected64.detach().cpu().double().reshape(a.shape)
        nan = torch.isnan(e64)
        if not torch.equal(torch.isnan(a), nan):
            raise AssertionError(f"{name}: NaN pattern differs from the float64 reference")
        ref_err = (e[~nan] - e64[~nan]).abs().max().item() if (~nan).any() else 0.0
        err = (a[~nan] - e64[~nan]).abs()
        bound = tol.lowp_factor * ref_err + tol.atol
        if err.numel() and err.max().item() > bound:
            i = int(err.argmax())
            raise AssertionError(
                f"{name} ({dtype}): max |kernel - float64 ref| = {err.max().item():.3g} exceeds "
                f"{tol.lowp_factor} x the {dtype} reference's own error {ref_err:.3g} + {tol.atol:g} "
                f"(worst element: kernel {a[~nan][i].item():.6g}, float64 {e64[~nan][i].item():.6g})"
            )
        return
    torch.testing.assert_close(a, e, rtol=tol.rtol, atol=tol.atol, equal_nan=True, msg=lambda m: f"{name}: {m}")


def spike_rate(spikes: torch.Tensor) -> float:
    """Fraction of 1s in a spike tensor (NaN-free), for sanity checks of the input factories."""
    n = spikes.numel()
    return float(spikes.detach().float().sum().item() / n) if n else math.nan


def peak_allocated_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak of live bytes allocated above the starting point while ``fn`` runs on ``device``.

    GPU: ``torch.cuda.max_memory_allocated``. CPU: the profiler reports, with every allocation and free,
    the running total of bytes allocated while it records; its maximum minus the total before the first
    event is the peak.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = [e["args"] for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    if not mem:
        return 0
    return max(m["Total Allocated"] for m in mem) - (mem[0]["Total Allocated"] - mem[0]["Bytes"])
