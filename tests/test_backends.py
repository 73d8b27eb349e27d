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


# The op schemas as they are today. Ops may grow (new arguments at the end, each with a default), never
# change: a renamed, retyped, reordered or removed argument breaks every caller and saved graph.
PINNED_SCHEMAS = {
    "lif_fwd": "lasnn::lif_fwd(Tensor x, Tensor? v_init, float tau, float v_threshold, float v_reset, "
               "bool soft_reset, bool decay_input) -> (Tensor, Tensor)",
    "lif_bwd": "lasnn::lif_bwd(Tensor grad_spikes, Tensor? grad_v_last, Tensor x, Tensor? v_init, float tau, "
               "float v_threshold, float v_reset, bool soft_reset, bool decay_input, bool detach_reset, "
               "int surrogate, float alpha) -> (Tensor, Tensor)",
    "attention_map_fwd": "lasnn::attention_map_fwd(Tensor feat, float p, bool time_mean) -> Tensor",
    "attention_map_bwd": "lasnn::attention_map_bwd(Tensor grad_map, Tensor feat, float p, bool time_mean) -> Tensor",
}


def _args(schema) -> list[tuple[str, str]]:
    return [(a.name, str(a.type)) for a in schema.arguments]


@pytest.mark.parametrize("name", sorted(PINNED_SCHEMAS))
def test_schemas_only_grow_and_the_triton_twins_match_the_cpp_ops(name):
    from lasnn import _ext

    pinned = torch._C.parse_schema(PINNED_SCHEMAS[name])
    twin = torch.ops.lasnn.__getattr__(f"{name}_triton").default._schema  # defined in Python (lasnn/ops)
    schemas = {"triton twin": twin}
    if _ext.c_has_op(name):  # the C++ schema of csrc/ops.cpp, when the extension is built
        schemas["C++"] = torch.ops.lasnn.__getattr__(name).default._schema
    for what, schema in schemas.items():
        args = _args(schema)
        assert args[: len(pinned.arguments)] == _args(pinned), (what, str(schema))
        assert all(a.default_value is not None for a in schema.arguments[len(pinned.arguments):]), (what, str(schema))
        assert [str(r.type) for r in schema.returns] == [str(r.type) for r in pinned.returns], (what, str(schema))
    if "C++" in schemas:  # the twin is the same op on another backend: identical arguments and returns
        cpp = schemas["C++"]
        assert _args(twin) == _args(cpp) and [str(r.type) for r in twin.returns] == [str(r.type) for r in cpp.returns]


def test_arch_covers_follows_cuda_binary_and_ptx_compatibility():
    cases = {
        ("9.0+PTX", (9, 0)): True,   # our default build on an H100/H200
        ("9.0+PTX", (10, 0)): True,  # PTX is compiled by the driver for newer GPUs
        ("9.0+PTX", (8, 0)): False,  # an A100 is older than the build
        ("9.0", (10, 0)): False,     # a binary without PTX runs only within its major version
        ("8.0", (8, 6)): True,       # same major, newer minor
        ("8.6", (8, 0)): False,
        ("7.5;8.0 9.0", (7, 5)): True,
        ("Hopper", (9, 0)): False,   # names are not understood: no claim of coverage
    }
    for (arch, cap), want in cases.items():
        assert backends.arch_covers(arch, cap) is want, (arch, cap)


def test_resolution_is_cached_and_follows_the_env_var(monkeypatch):
    dev = torch.device("cpu")
    backends._resolve.cache_clear()
    first = backends.resolve("lif", None, dev, torch.float32)
    assert backends.resolve("lif", None, dev, torch.float32) == first
    assert backends._resolve.cache_info().hits >= 1
    monkeypatch.setenv("LASNN_BACKEND", "reference")  # a new key, not a stale answer
    assert backends.resolve("lif", None, dev, torch.float32) == "reference"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_this_gpu_is_covered_by_the_build_or_refused_with_the_fix():
    from lasnn import _ext

    why = backends.unavailable_reason("lif", "cuda", torch.device("cuda"), torch.float32)
    cap = torch.cuda.get_device_capability()
    if _ext.CUDA_ARCH_LIST and not backends.arch_covers(_ext.CUDA_ARCH_LIST, cap):
        assert why is not None and "TORCH_CUDA_ARCH_LIST" in why
    elif _ext.c_has_cuda_kernels("lif_fwd"):
        assert why is None
