"""Backend selection: ``python -m lasnn info``, ``auto``, ``LASNN_BACKEND``, unavailable backends."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lasnn
from lasnn import backends
from lasnn.testing import make_currents

CPU = torch.device("cpu")


def _uses_fused_op(t: torch.Tensor) -> bool:
    """Whether the autograd graph of ``t`` contains the fused op's node (outputs are views of it)."""
    stack, seen = [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "LIFFunction" in type(fn).__name__:
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


def test_info_lists_every_op_and_backend():
    out = subprocess.run([sys.executable, "-m", "lasnn", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split(None, 2) for line in out.stdout.splitlines() if line.startswith("  ")]
    table = {(r[0], r[1]): r[2] for r in rows if len(r) == 3}
    for op in backends.OPS:
        for b in backends.BACKENDS:
            status = table[(op, b)]
            why = backends.unavailable_reason(op, b, None, None)
            if why is None:
                assert status == "available"
            else:
                # The reason is printed, not just "unavailable".
                assert status.startswith("unavailable: ") and why in status
    assert table[("lif", "reference")] == "available"
    assert "extension lasnn._C:" in out.stdout and "triton:" in out.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_auto_picks_fastest_available(no_backend_env, dtype):
    chosen = backends.resolve("lif", "auto", CPU, dtype)
    cpu_ok = backends.unavailable_reason("lif", "cpu", CPU, dtype) is None
    assert chosen == ("cpu" if cpu_ok else "reference")
    # auto accepts every dtype some backend supports: fp64 reaches a kernel or the reference.
    x = make_currents(3, (5,), dtype=dtype)
    assert lasnn.lif(x).dtype == dtype


def test_auto_on_cuda_tensor_order():
    # On a CUDA tensor auto prefers cuda, then triton, then the reference; checked without a GPU
    # by asking for the decision only.
    chosen = backends.resolve("lif", "auto", torch.device("cuda"), torch.float32)
    for b in ("cuda", "triton", "reference"):
        if backends.unavailable_reason("lif", b, torch.device("cuda"), torch.float32) is None:
            assert chosen == b
            break


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("LASNN_BACKEND", "reference")
    assert backends.resolve("lif", "auto", CPU, torch.float32) == "reference"
    x = make_currents(3, (5,), requires_grad=True)
    s = lasnn.lif(x)
    assert s.grad_fn is not None and not _uses_fused_op(s)  # the reference's autograd graph
    # An explicit backend= wins over the env var.
    if backends.unavailable_reason("lif", "cpu", CPU, torch.float32) is None:
        assert backends.resolve("lif", "cpu", CPU, torch.float32) == "cpu"
        assert _uses_fused_op(lasnn.lif(x, backend="cpu"))


def test_env_var_bad_name(monkeypatch):
    monkeypatch.setenv("LASNN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="LASNN_BACKEND"):
        lasnn.lif(torch.randn(2, 3))


def test_unknown_backend_argument(no_backend_env):
    with pytest.raises(ValueError, match="backend must be one of"):
        lasnn.lif(torch.randn(2, 3), backend="CPU")


@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu"])
def test_explicit_unavailable_backend_lists_reasons(no_backend_env, backend):
    # Pick a tensor the backend rejects on every machine: a CPU tensor for cuda, bf16 or a meta tensor for
    # triton, a meta tensor for cpu (which runs every CPU dtype once the extension is built).
    x = torch.randn(2, 3)
    for cand in (x, x.to(torch.bfloat16), torch.empty(2, 3, device="meta")):
        if backends.unavailable_reason("lif", backend, cand.device, cand.dtype) is not None:
            x = cand
            break
    else:
        raise AssertionError(f"{backend} accepts a meta tensor")
    with pytest.raises(RuntimeError) as err:
        lasnn.lif(x, backend=backend)
    msg = str(err.value)
    assert f"backend={backend!r}" in msg
    for b in backends.BACKENDS:  # every backend is listed with its status
        assert f"{b}: " in msg


def test_env_var_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv("LASNN_BACKEND", "cuda")
    if backends.unavailable_reason("lif", "cuda", CPU, torch.float32) is None:
        pytest.skip("cuda backend accepts CPU tensors?")
    with pytest.raises(RuntimeError, match="LASNN_BACKEND='cuda'"):
        lasnn.lif(torch.randn(2, 3))


def test_unavailable_reason_rejects_unknown_names():
    with pytest.raises(ValueError, match="op"):
        backends.unavailable_reason("conv", "cpu", None, None)
    with pytest.raises(ValueError, match="backend"):
        backends.unavailable_reason("lif", "opencl", None, None)
