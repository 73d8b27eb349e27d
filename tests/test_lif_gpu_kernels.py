"""Kernel-level checks of the LIF GPU kernels (kernels/lif.py Triton, csrc/cuda/lif.cu CUDA) against the
oracle lasnn/reference/lif.py.

The Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (fp32, fp16) and on CUDA tensors on a
GPU machine (fp32, fp16, bf16); the CUDA C++ kernels only on a GPU machine. tests/test_lif.py covers the
public op on every backend; this file targets the kernels' own paths: masked tails, the vectorised and
scalar CUDA paths, the shared-memory and global-scratch backward, launcher validation.

Comparison rules (DESIGN.md): spikes exactly, except neurons whose float64 membrane comes within a
margin of the threshold, which are counted, bounded, and excluded; gradients against autograd through
the reference, with an error bound of a multiple of the same-dtype reference's own error against float64.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lasnn import _ext
from lasnn.reference.lif import SURROGATES, lif_reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

triton_only = pytest.mark.skipif(
    not _ext.HAS_TRITON or not (INTERPRET or HAS_CUDA),
    reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (CPU tensors)",
)
cuda_kernels = pytest.mark.skipif(
    not HAS_CUDA or not _ext.c_has_cuda_kernels("lif_bwd"), reason="needs a CUDA GPU and lasnn._C's CUDA kernels"
)

# Where the Triton kernels run here: CPU tensors in the interpreter, else the GPU.
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
TRITON_DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# Membrane margin (in float64 units of the threshold's scale) inside which fp32 arithmetic may legally
# decide a spike differently from float64; such neurons are counted, bounded, and left out.
NEAR_MARGIN = 1e-4
MAX_NEAR_FRACTION = 0.005  # of the T x N elements
# v_last against the same-dtype reference: both compute in fp32 and round once to the storage dtype, so
# they differ by fp32 op-order noise (fp32) or at most about one rounding step (fp16/bf16).
V_LAST_TOL = {
    torch.float32: 1e-5,
    torch.float64: 1e-12,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
}
# Floor of the gradient error bound, relative to the gradient's scale (fp32 op-order noise).
GRAD_FLOOR = 1e-5


@pytest.fixture(autouse=True)
def _nan_filled_outputs():
    """Fresh tensors come back NaN-filled, so an element a kernel forgets to write fails the comparison."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)


def _id(v) -> str:
    return str(v).replace("torch.", "")


def _inputs(T: int, N: int, dtype: torch.dtype, device: str, seed: int = 0, v_init: bool = True):
    g = torch.Generator().manual_seed(seed)
    # Scale 1.5 makes most neurons fire at some step and many stay silent at others.
    x = (1.5 * torch.randn(T, N, generator=g)).to(dtype)
    v0 = (0.4 * torch.randn(N, generator=g)).to(dtype) if v_init else None
    return x.to(device), (v0.to(device) if v0 is not None else None)


def _kw(tau, soft, decay, v_reset=-0.1):
    return dict(tau=tau, v_threshold=1.0, v_reset=None if soft else v_reset, decay_input=decay)


def _near_neurons(x: torch.Tensor, v0: torch.Tensor | None, kw: dict) -> torch.Tensor:
    """[N] bool: neurons whose float64 membrane comes within NEAR_MARGIN of the threshold at some step."""
    _, _, h = lif_reference(x.double().cpu(), None if v0 is None else v0.double().cpu(), return_h=True, **kw)
    if h.shape[0] == 0:
        return torch.zeros(x.shape[1:], dtype=torch.bool)
    near_el = (h - kw["v_threshold"]).abs() < NEAR_MARGIN
    near = near_el.any(dim=0)
    if near.numel():
        # Bounded, never ignored wholesale: few such elements, and most neurons still compared.
        assert near_el.float().mean().item() <= MAX_NEAR_FRACTION, f"{int(near_el.sum())} near-threshold elements"
        assert near.float().mean().item() <= 0.5, f"{int(near.sum())} of {near.numel()} neurons near the threshold"
    return near


def _check_forward(fwd, x, v0, kw):
    tau, soft = kw["tau"], kw["v_reset"] is None
    spikes, v_last = fwd(x, v0, tau, 1.0, 0.0 if soft else kw["v_reset"], soft, kw["decay_input"])
    assert spikes.shape == x.shape and spikes.dtype == x.dtype and spikes.device == x.device
    assert v_last.shape == x.shape[1:] and v_last.dtype == x.dtype
    rs, rv = lif_reference(x.cpu(), None if v0 is None else v0.cpu(), **kw)  # same dtype: fp32 compute
    near = _near_neurons(x, v0, kw)
    ok = ~near
    assert torch.equal(spikes.cpu()[:, ok], rs[:, ok])
    assert set(spikes.cpu().unique().tolist()) <= {0.0, 1.0}
    # v_last: fp32 compute in both, one rounding to the storage dtype at the end.
    tol = V_LAST_TOL[x.dtype]
    torch.testing.assert_close(v_last.cpu()[ok], rv[ok], rtol=tol, atol=tol)
    return near


def _ref_grads(x, v0, gs, gv, kw, surrogate, alpha, detach, dtype):
    """Autograd through the reference at ``dtype`` (its compute dtype is fp32 for fp16/bf16, fp64 for fp64)."""
    xr = x.cpu().to(dtype).requires_grad_()
    vr = None if v0 is None else v0.cpu().to(dtype).requires_grad_()
    s, v = lif_reference(xr, vr, detach_reset=detach, surrogate=surrogate, alpha=alpha, **kw)
    loss = (s.double() * gs.cpu().double()).sum()
    if gv is not None:
        loss = loss + (v.double() * gv.cpu().double()).sum()
    inputs = [xr] + ([vr] if vr is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    return grads[0].double(), (grads[1].double() if vr is not None else None)


def _assert_grad(name, got, ref_dtype, ref64, ok):
    """|got - ref64| <= 2 * |ref_dtype - ref64| + floor, over the neurons not excluded as near-threshold."""
    got, ref_dtype, ref64 = got.cpu().double()[..., ok], ref_dtype[..., ok], ref64[..., ok]
    if got.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{name}: non-finite gradient"
    err = (got - ref64).abs().max().item()
    ref_err = (ref_dtype - ref64).abs().max().item()
    floor = GRAD_FLOOR * max(1.0, ref64.abs().max().item())
    assert err <= 2 * ref_err + floor, f"{name}: max error {err:.3g} > 2 x reference error {ref_err:.3g} + {floor:.1g}"


def _check_backward(bwd, x, v0, kw, surrogate, alpha, detach, with_gvl=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    T, N = x.shape
    gs = torch.randn(T, N, generator=g).to(x.dtype).to(x.device)
    gv = torch.randn(N, generator=g).to(x.dtype).to(x.device) if with_gvl else None
    soft = kw["v_reset"] is None
    gx, gvi = bwd(
        gs,
        gv,
        x,
        v0,
        kw["tau"],
        1.0,
        0.0 if soft else kw["v_reset"],
        soft,
        kw["decay_input"],
        detach,
        SURROGATES[surrogate],
        alpha,
    )
    assert gx.shape == x.shape and gx.dtype == x.dtype and gvi.shape == (N,) and gvi.dtype == x.dtype
    r_dt = _ref_grads(x, v0, gs, gv, kw, surrogate, alpha, detach, x.dtype)
    r64 = _ref_grads(x, v0, gs, gv, kw, surrogate, alpha, detach, torch.float64)
    ok = ~_near_neurons(x, v0, kw)
    _assert_grad("grad_x", gx, r_dt[0], r64[0], ok)
    if v0 is not None:
        _assert_grad("grad_v_init", gvi, r_dt[1], r64[1], ok)
    else:
        # dL/dv_init is still defined (membrane starts at 0): compare against a zero v_init reference.
        z = torch.zeros(N, dtype=x.dtype)
        r_dt0 = _ref_grads(x, z, gs, gv, kw, surrogate, alpha, detach, x.dtype)
        r640 = _ref_grads(x, z, gs, gv, kw, surrogate, alpha, detach, torch.float64)
        _assert_grad("grad_v_init", gvi, r_dt0[1], r640[1], ok)


def _triton():
    from lasnn.kernels.lif import lif_bwd_triton, lif_fwd_triton

    return lif_fwd_triton, lif_bwd_triton


def _cuda():
    return torch.ops.lasnn.lif_fwd.default, torch.ops.lasnn.lif_bwd.default


# --------------------------------------------------------------------------------------------------
# Triton kernels

# N=1030 spans two programs of 1024 with a masked tail; 37 is odd; T=1 is a single step.
SHAPES = [(1, 1), (4, 37), (3, 1030)]
# The backward keeps H in registers up to T = 32 (time tile TC = 32 for T = 17..32, steps >= T masked) and
# goes through a global H scratch beyond (T = 33: in grad_x for fp32, in an fp32 buffer for fp16).
BWD_SHAPES = [*SHAPES, (5, 300), (32, 37), (33, 37)]


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}N{s[1]}")
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("decay", [True, False], ids=["decay", "nodecay"])
@pytest.mark.parametrize("has_v0", [True, False], ids=["v0", "nov0"])
def test_triton_forward(dtype, shape, soft, decay, has_v0):
    fwd, _ = _triton()
    x, v0 = _inputs(*shape, dtype, TRITON_DEVICE, v_init=has_v0)
    _check_forward(fwd, x, v0, _kw(2.0, soft, decay))


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("surrogate", list(SURROGATES))
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("detach", [False, True], ids=["attached", "detach"])
@pytest.mark.parametrize("decay", [True, False], ids=["decay", "nodecay"])
@pytest.mark.parametrize("T", [5, 33], ids=["regs", "scratch"])
def test_triton_backward_fp32_all_flags(surrogate, soft, detach, decay, T):
    _, bwd = _triton()
    x, v0 = _inputs(T, 37, torch.float32, TRITON_DEVICE)
    _check_backward(bwd, x, v0, _kw(2.0, soft, decay), surrogate, 2.0 if surrogate != "sigmoid" else 4.0, detach)


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=_id)
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=lambda s: f"T{s[0]}N{s[1]}")
@pytest.mark.parametrize("surrogate", ["sigmoid", "triangle"])
@pytest.mark.parametrize("has_v0,with_gvl", [(True, True), (False, False)], ids=["v0-gvl", "nov0-nogvl"])
def test_triton_backward_dtypes_shapes(dtype, shape, surrogate, has_v0, with_gvl):
    _, bwd = _triton()
    x, v0 = _inputs(*shape, dtype, TRITON_DEVICE, v_init=has_v0)
    _check_backward(
        bwd, x, v0, _kw(2.0, False, True), surrogate, 4.0 if surrogate == "sigmoid" else 1.0, False, with_gvl=with_gvl
    )


@pytest.mark.triton
@triton_only
def test_triton_if_neuron_and_soft_reset():
    """tau = inf is the IF neuron (H = V + X) whatever decay_input says."""
    fwd, bwd = _triton()
    x, v0 = _inputs(6, 33, torch.float32, TRITON_DEVICE, seed=3)
    for decay in (True, False):
        kw = _kw(math.inf, True, decay)
        _check_forward(fwd, x, v0, kw)
        _check_backward(bwd, x, v0, kw, "atan", 2.0, False)


def _check_fires_at_threshold(fwd, bwd, device, dtype):
    """H == v_threshold must fire (S = [H >= V_th]). Dyadic inputs into the IF neuron make every sum exact in
    every dtype, so the membrane lands exactly on the threshold and no element is ambiguous."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randint(0, 5, (8, 64), generator=g) * 0.25).to(dtype)
    for soft in (False, True):
        kw = _kw(math.inf, soft, False, v_reset=0.0)
        _, _, h = lif_reference(x.double(), return_h=True, **kw)
        assert (h == 1.0).sum() > 10  # the case under test does occur
        s, v = fwd(x.to(device), None, math.inf, 1.0, 0.0, soft, False)
        rs, rv = lif_reference(x, **kw)
        assert torch.equal(s.cpu(), rs) and torch.equal(v.cpu(), rv)
        # The surrogate is evaluated at x = 0 there; rect/triangle peak exactly at it.
        gx, _ = bwd(
            torch.ones_like(x).to(device), None, x.to(device), None, math.inf, 1.0, 0.0, soft, False, True, 3, 1.0
        )
        xr = x.double().requires_grad_()
        sr, _ = lif_reference(xr, detach_reset=True, surrogate="rect", alpha=1.0, **kw)
        sr.sum().backward()
        torch.testing.assert_close(gx.cpu().double(), xr.grad, rtol=0, atol=0)


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=_id)
def test_triton_fires_at_threshold(dtype):
    _check_fires_at_threshold(*_triton(), TRITON_DEVICE, dtype)


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)], ids=["T0", "N0", "T0N0"])
def test_triton_empty(shape):
    fwd, bwd = _triton()
    T, N = shape
    x = torch.zeros(T, N, device=TRITON_DEVICE)
    v0 = torch.full((N,), 0.25, device=TRITON_DEVICE)
    s, v = fwd(x, v0, 2.0, 1.0, 0.0, False, True)
    assert s.shape == (T, N)
    if T == 0:  # with no step, v_last = v_init, returned as a fresh tensor (op outputs never alias inputs)
        assert torch.equal(v.cpu(), v0.cpu()) and (N == 0 or v.data_ptr() != v0.data_ptr())
    _, v = fwd(x, None, 2.0, 1.0, 0.0, False, True)
    assert torch.equal(v.cpu(), torch.zeros(N))
    gvl = torch.full((N,), -0.5, device=TRITON_DEVICE)
    gx, gv = bwd(torch.zeros_like(x), gvl, x, v0, 2.0, 1.0, 0.0, False, True, False, 0, 4.0)
    assert gx.shape == (T, N)
    assert gv.shape == (N,)
    if T == 0:  # with no step, dL/dv_init = dL/dv_last
        assert torch.equal(gv.cpu(), gvl.cpu())
    _, gv = bwd(torch.zeros_like(x), None, x, None, 2.0, 1.0, 0.0, False, True, False, 0, 4.0)
    assert torch.equal(gv.cpu(), torch.zeros(N))


@pytest.mark.triton
@triton_only
def test_triton_noncontiguous_and_nan():
    fwd, bwd = _triton()
    x, _ = _inputs(40, 6, torch.float32, TRITON_DEVICE, seed=5)
    xt = x.t()  # [6, 40] view, not contiguous
    assert not xt.is_contiguous()
    kw = _kw(2.0, False, True)
    _check_forward(fwd, xt, None, kw)
    # NaN in x propagates through the membrane of that neuron only; no crash, other neurons unaffected.
    xn = x[:5].clone()
    xn[1, 2] = float("nan")
    s, v = fwd(xn, None, 2.0, 1.0, -0.1, False, True)
    rs, rv = lif_reference(xn.cpu(), **kw)
    assert torch.equal(s.cpu(), rs)
    torch.testing.assert_close(v.cpu(), rv, equal_nan=True)
    assert torch.isnan(v[2]) and torch.isfinite(v[torch.arange(6) != 2]).all()
    gx, _ = bwd(torch.ones_like(xn), None, xn, None, 2.0, 1.0, -0.1, False, True, False, 0, 4.0)
    assert torch.isnan(gx[:2, 2]).all() and torch.isfinite(gx[:, torch.arange(6) != 2]).all()


@pytest.mark.triton
@triton_only
def test_lif_triton_end_to_end_autograd():
    """lasnn.lif(backend="triton") forward + backward through autograd equals the reference backend."""
    import lasnn

    g = torch.Generator().manual_seed(7)
    x = (1.5 * torch.randn(4, 3, 5, generator=g)).to(TRITON_DEVICE)
    v0 = (0.3 * torch.randn(3, 5, generator=g)).to(TRITON_DEVICE)
    gs = torch.randn(4, 3, 5, generator=g).to(TRITON_DEVICE)
    gv = torch.randn(3, 5, generator=g).to(TRITON_DEVICE)
    out = {}
    for backend in ("triton", "reference"):
        xi, vi = x.clone().requires_grad_(), v0.clone().requires_grad_()
        s, v = lasnn.lif(xi, vi, tau=2.0, v_reset=None, surrogate="atan", alpha=2.0, return_v=True, backend=backend)
        ((s * gs).sum() + (v * gv).sum()).backward()
        out[backend] = (s.detach(), v.detach(), xi.grad, vi.grad)
    assert _near_neurons(x.reshape(4, -1), v0.reshape(-1), _kw(2.0, True, True)).sum() == 0
    assert torch.equal(out["triton"][0], out["reference"][0])
    for a, b in zip(out["triton"][1:], out["reference"][1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Launcher validation (no kernel runs: these need neither a GPU nor the interpreter)


def _bad_calls():
    x = torch.zeros(3, 4)
    v = torch.zeros(4)
    f = ("fwd", lambda fwd, bwd, o: fwd(*_merge((x, v, 2.0, 1.0, 0.0, False, True), o)))
    b = ("bwd", lambda fwd, bwd, o: bwd(*_merge((x, None, x, v, 2.0, 1.0, 0.0, False, True, False, 0, 4.0), o)))
    return [
        ("x_1d", f, {0: torch.zeros(3)}, ValueError, "x must be [T, N]"),
        ("x_int", f, {0: torch.zeros(3, 4, dtype=torch.int32)}, TypeError, "x must be"),
        ("x_fp64", f, {0: torch.zeros(3, 4, dtype=torch.float64)}, TypeError, "x must be"),
        ("x_bf16_interp", f, {0: torch.zeros(3, 4, dtype=torch.bfloat16), 1: None}, TypeError, "x must be"),
        ("v_shape", f, {1: torch.zeros(5)}, ValueError, "v_init must be [N]"),
        ("v_dtype", f, {1: torch.zeros(4, dtype=torch.float16)}, TypeError, "v_init must have x's dtype"),
        ("tau_nan", f, {2: float("nan")}, ValueError, "tau must be"),
        ("tau_neg", f, {2: -1.0}, ValueError, "tau must be"),
        ("vth_inf", f, {3: float("inf")}, ValueError, "v_threshold must be"),
        ("gs_shape", b, {0: torch.zeros(3, 5)}, ValueError, "grad_spikes must match"),
        ("gvl_shape", b, {1: torch.zeros(3)}, ValueError, "grad_v_last must be [N]"),
        ("surrogate", b, {10: 4}, ValueError, "surrogate must be"),
        ("alpha_zero", b, {11: 0.0}, ValueError, "alpha must be"),
    ]


def _merge(args, over):
    args = list(args)
    for i, val in over.items():
        args[i] = val
    return args


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_triton_launcher_validation(case, monkeypatch):
    from lasnn.kernels.lif import lif_bwd_triton, lif_fwd_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the launcher reads it per call: CPU tensors pass the device check
    _, (_, call), over, exc, msg = case
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
        call(lif_fwd_triton, lif_bwd_triton, over)


def test_triton_launcher_rejects_cpu_without_interpreter(monkeypatch):
    from lasnn.kernels.lif import lif_fwd_triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensor"):
        lif_fwd_triton(torch.zeros(2, 3), None, 2.0, 1.0, 0.0, False, True)


def test_kernels_package_imports_without_triton_symbols():
    """lasnn.kernels is importable and advertises lif; only kernels/lif.py imports triton, lazily guarded."""
    import lasnn.kernels

    assert "lif" in lasnn.kernels.AVAILABLE


# --------------------------------------------------------------------------------------------------
# CUDA C++ kernels (GPU machines only). Shapes pick the kernel paths: N % VEC == 0 -> 16-byte vectors,
# otherwise scalar; T small -> H in shared memory; T = 300 -> the global H scratch (grad_x itself for
# fp32/fp64, an fp32 buffer for fp16/bf16).
CUDA_SHAPES = [(1, 1), (4, 1024), (5, 1031), (300, 64), (300, 67)]


@pytest.mark.cuda
@cuda_kernels
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=_id)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"T{s[0]}N{s[1]}")
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_cuda_forward_backward(dtype, shape, soft):
    fwd, bwd = _cuda()
    x, v0 = _inputs(*shape, dtype, "cuda")
    kw = _kw(2.0, soft, True)
    _check_forward(fwd, x, v0, kw)
    _check_backward(bwd, x, v0, kw, "sigmoid", 4.0, False)


@pytest.mark.cuda
@cuda_kernels
@pytest.mark.parametrize("surrogate", list(SURROGATES))
@pytest.mark.parametrize("detach", [False, True], ids=["attached", "detach"])
@pytest.mark.parametrize("decay", [True, False], ids=["decay", "nodecay"])
def test_cuda_backward_flags(surrogate, detach, decay):
    _, bwd = _cuda()
    x, v0 = _inputs(6, 4096, torch.float32, "cuda")
    for soft in (False, True):
        _check_backward(bwd, x, v0, _kw(2.0, soft, decay), surrogate, 2.0, detach, with_gvl=decay)


@pytest.mark.cuda
@cuda_kernels
def test_cuda_misaligned_and_empty():
    fwd, bwd = _cuda()
    x, _ = _inputs(4, 1024, torch.float32, "cuda")
    # A contiguous [4, 1024] view one element into its storage: N is a multiple of the vector width but
    # the data is not 16-byte aligned, so the launcher must take the scalar path.
    buf = torch.empty(4 * 1024 + 1, device="cuda")
    buf[1:] = x.reshape(-1)
    xv = buf[1:].view(4, 1024)
    assert xv.data_ptr() % 16 != 0
    kw = _kw(2.0, False, True)
    _check_forward(fwd, xv, None, kw)
    _check_backward(bwd, xv, None, kw, "triangle", 1.0, False)
    for shape in [(0, 5), (3, 0)]:
        z = torch.zeros(shape, device="cuda")
        s, v = fwd(z, None, 2.0, 1.0, 0.0, False, True)
        assert s.shape == shape and torch.equal(v, torch.zeros(shape[1], device="cuda"))
        gx, gv = bwd(z, None, z, None, 2.0, 1.0, 0.0, False, True, False, 0, 4.0)
        assert gx.shape == shape and torch.equal(gv, torch.zeros(shape[1], device="cuda"))


@pytest.mark.cuda
@cuda_kernels
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=_id)
def test_cuda_fires_at_threshold(dtype):
    _check_fires_at_threshold(*_cuda(), "cuda", dtype)


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("has_v0", [True, False], ids=["v0", "nov0"])
def test_triton_ops_opcheck(has_v0):
    """The raw ops lasnn::lif_{fwd,bwd}_triton (registered in lasnn/ops/lif.py, run by these launchers) pass
    opcheck: schema, fake tensors, no aliasing of outputs with inputs."""
    import lasnn.ops.lif  # noqa: F401  (registers the ops)

    x, v0 = _inputs(3, 37, torch.float32, TRITON_DEVICE, v_init=has_v0)
    torch.library.opcheck(torch.ops.lasnn.lif_fwd_triton.default, (x, v0, 2.0, 1.0, 0.0, False, True))
    gs = torch.randn_like(x)
    gvl = torch.randn(37, device=TRITON_DEVICE) if has_v0 else None
    args = (gs, gvl, x, v0, 2.0, 1.0, -0.1, False, True, False, 1, 2.0)
    torch.library.opcheck(torch.ops.lasnn.lif_bwd_triton.default, args)


@pytest.mark.skipif(not _ext.HAS_TRITON or INTERPRET, reason="needs triton's compiler (not the interpreter)")
@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the Triton tests above compile and run the kernels for real")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_kernels_compile_for_hopper(dtype):
    """Ahead-of-time compile both kernels to sm_90 machine code (no GPU needed), so that code the interpreter
    accepts but the real compiler rejects fails here and not first on a GPU machine. With 16-byte aligned
    pointers and N % 16 == 0 (what the JIT specialises on) the fp32 loads must become 16-byte vector loads."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # these entry points moved between Triton releases
        pytest.skip(f"this Triton has no ASTSource/GPUTarget: {e}")
    from lasnn.kernels import lif as K

    target = GPUTarget("cuda", 90, 32)
    p = f"*{dtype}"
    fwd_sig = dict.fromkeys(["x_ptr", "v0_ptr", "s_ptr", "vl_ptr"], p)
    fwd_sig |= {"T": "i32", "N": "i32", "inv_tau": "fp32", "v_th": "fp32", "v_r": "fp32"}
    fwd_const = {"HAS_V0": True, "SOFT_RESET": False, "DECAY_INPUT": True, "BLOCK": 1024}
    fwd_sig |= dict.fromkeys(fwd_const, "constexpr")
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 5)}
    k = triton.compile(ASTSource(K._lif_fwd_kernel, fwd_sig, fwd_const, aligned), target=target)
    if dtype == "fp32":
        assert "ld.global.v4" in k.asm["ptx"]
    bwd_sig = dict.fromkeys(["gs_ptr", "gvl_ptr", "x_ptr", "v0_ptr", "gx_ptr", "gv0_ptr"], p) | {"h_ptr": "*fp32"}
    bwd_sig |= {"T": "i32", "N": "i32", "gs_st": "i32"}
    bwd_sig |= {"inv_tau": "fp32", "v_th": "fp32", "v_r": "fp32", "alpha": "fp32"}
    bwd_const = {"HAS_V0": True, "HAS_GVL": False, "SOFT_RESET": False, "DECAY_INPUT": True}
    bwd_const |= {"DETACH_RESET": False, "SURROGATE": 0, "GS_BCAST": False, "BLOCK": 1024}
    bwd_sig |= dict.fromkeys(bwd_const, "constexpr")
    k = triton.compile(ASTSource(K._lif_bwd_kernel, bwd_sig, bwd_const), target=target)
    assert "bar.sync" in k.asm["ptx"]  # the barrier between the H stores and the reverse loop survived
    # an expanded grad_spikes (one value per step) compiles too, in both kernels
    k = triton.compile(ASTSource(K._lif_bwd_kernel, bwd_sig, bwd_const | {"GS_BCAST": True}), target=target)
    assert "bar.sync" in k.asm["ptx"]
    del bwd_sig["h_ptr"]
    bwd_sig["TC"] = "constexpr"
    for bcast in (False, True):
        const = bwd_const | {"TC": 8, "BLOCK": 512, "GS_BCAST": bcast}
        k = triton.compile(ASTSource(K._lif_bwd_regs_kernel, bwd_sig, const), target=target)
        # H stays in registers: no local-memory (stack/spill) traffic, each step loads x and grad_spikes once.
        ptx = k.asm["ptx"]
        assert "ld.local" not in ptx and "st.local" not in ptx, bcast


# --------------------------------------------------------------------------------------------------
# CUDA C++ kernels executed on the CPU. csrc/cuda/lif.cu compiles its kernels as host code under
# LASNN_LIF_HOST_EMULATION; the harness below runs every thread of every block one after another (a
# valid schedule: the kernels have no barriers and each thread owns its scratch slots), with shared
# memory NaN-filled per block. This checks the kernels' indexing, vector packs, tails, the shared-memory
# layout, the in-place H-in-grad_x path, the fp32 scratch of fp16/bf16 and the launch plan, on machines
# without a GPU. It cannot check what only hardware shows (fast-math rounding, the memory model).

ROOT = Path(__file__).resolve().parents[1]
_EMU_SRC = r"""
// Host emulation harness of csrc/cuda/lif.cu (see LASNN_LIF_HOST_EMULATION there).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

struct LasnnEmuDim {
  unsigned int x = 0, y = 0, z = 0;
};
static LasnnEmuDim threadIdx, blockIdx, blockDim;
static unsigned char* lasnn_emu_smem = nullptr;

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define LASNN_LIF_HOST_EMULATION
#define LASNN_DYNAMIC_SMEM(name) unsigned char* name = lasnn_emu_smem
#include "cuda/lif.cu"

namespace {
using lasnn::LIFParams;
using lasnn::Storage;

template <typename S>
constexpr int kVecOf = 16 / sizeof(S);

template <typename S, int VEC>
void fwd_grid(const S* x, const S* v0, S* s, S* vl, int64_t T, int64_t N,
              const LIFParams<typename Storage<S>::acc_t>& P) {
  const int threads = lasnn::kThreads;
  const int64_t blocks = lasnn::ceil_div(lasnn::ceil_div(N, VEC), threads);
  blockDim.x = threads;
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx.x = static_cast<unsigned int>(b);
    for (int t = 0; t < threads; ++t) {
      threadIdx.x = t;
      lasnn::lif_fwd_kernel<S, VEC>(x, v0, s, vl, T, N, P);
    }
  }
}

template <typename S>
int fwd(bool force_scalar, const void* x, const void* v0, void* s, void* vl, int64_t T, int64_t N, double tau,
        double vth, double vr, bool soft, bool decay) {
  using acc_t = typename Storage<S>::acc_t;
  const auto P = lasnn::make_params<acc_t>(tau, vth, vr, soft, decay, false, 0, 1.0);
  constexpr int kVec = kVecOf<S>;
  const bool vec = !force_scalar && N % kVec == 0 && lasnn::aligned16(x) && lasnn::aligned16(v0) &&
                   lasnn::aligned16(s) && lasnn::aligned16(vl);
  if (vec) {
    fwd_grid<S, kVec>((const S*)x, (const S*)v0, (S*)s, (S*)vl, T, N, P);
    return kVec;
  }
  fwd_grid<S, 1>((const S*)x, (const S*)v0, (S*)s, (S*)vl, T, N, P);
  return 1;
}

template <typename S, int VEC>
void bwd_grid(int threads, bool smem, const S* gs, const S* gvl, const S* x, const S* v0, S* gx, S* gv0,
              typename Storage<S>::acc_t* hbuf, int64_t T, int64_t N, bool gs_bcast, int64_t gs_step,
              const LIFParams<typename Storage<S>::acc_t>& P) {
  using acc_t = typename Storage<S>::acc_t;
  const int64_t blocks = lasnn::ceil_div(lasnn::ceil_div(N, VEC), threads);
  std::vector<acc_t> block_smem(smem ? static_cast<size_t>(threads) * VEC * T : 0);
  blockDim.x = threads;
  for (int64_t b = 0; b < blocks; ++b) {
    // Fresh garbage for every block: a slot read before being written shows up as NaN.
    std::fill(block_smem.begin(), block_smem.end(), std::numeric_limits<acc_t>::quiet_NaN());
    lasnn_emu_smem = reinterpret_cast<unsigned char*>(block_smem.data());
    blockIdx.x = static_cast<unsigned int>(b);
    for (int t = 0; t < threads; ++t) {
      threadIdx.x = t;
      if (smem) {
        lasnn::lif_bwd_kernel<S, VEC, true>(gs, gvl, x, v0, gx, gv0, nullptr, T, N, gs_bcast, gs_step, P);
      } else {
        lasnn::lif_bwd_kernel<S, VEC, false>(gs, gvl, x, v0, gx, gv0, hbuf, T, N, gs_bcast, gs_step, P);
      }
    }
  }
}

// Returns vec * 10000 + threads * 10 + smem: the path the real launcher would take (or the forced one).
template <typename S>
int bwd(bool force_scalar, bool force_global, const void* gs_, bool gs_bcast, int64_t gs_step, const void* gvl_,
        const void* x_, const void* v0_, void* gx_, void* gv0_, int64_t T, int64_t N, double tau, double vth,
        double vr, bool soft, bool decay, bool detach, int64_t surrogate, double alpha) {
  using acc_t = typename Storage<S>::acc_t;
  constexpr int kVec = kVecOf<S>;
  const auto P = lasnn::make_params<acc_t>(tau, vth, vr, soft, decay, detach, surrogate, alpha);
  auto gs = (const S*)gs_, gvl = (const S*)gvl_, x = (const S*)x_, v0 = (const S*)v0_;
  auto gx = (S*)gx_, gv0 = (S*)gv0_;
  const bool can_vec = !force_scalar && N % kVec == 0 && (gs_bcast || lasnn::aligned16(gs)) && lasnn::aligned16(gvl) &&
                       lasnn::aligned16(x) && lasnn::aligned16(v0) && lasnn::aligned16(gx) && lasnn::aligned16(gv0);
  lasnn::BwdPlan plan = lasnn::plan_bwd(T, can_vec ? kVec : 1, sizeof(acc_t));
  if (force_global) plan = {can_vec ? kVec : 1, lasnn::kThreads, false};
  std::vector<float> scratch;
  acc_t* hbuf = nullptr;
  if (!plan.smem) {
    if constexpr (sizeof(S) == sizeof(acc_t)) {
      hbuf = reinterpret_cast<acc_t*>(gx);
    } else {
      scratch.assign(static_cast<size_t>(T * N), std::numeric_limits<float>::quiet_NaN());
      hbuf = reinterpret_cast<acc_t*>(scratch.data());
    }
  }
  if (plan.vec == kVec && kVec > 1) {
    bwd_grid<S, kVec>(plan.threads, plan.smem, gs, gvl, x, v0, gx, gv0, hbuf, T, N, gs_bcast, gs_step, P);
  } else {
    bwd_grid<S, 1>(plan.threads, plan.smem, gs, gvl, x, v0, gx, gv0, hbuf, T, N, gs_bcast, gs_step, P);
  }
  return plan.vec * 10000 + plan.threads * 10 + (plan.smem ? 1 : 0);
}
}  // namespace

extern "C" int lasnn_emu_fwd(int dtype, int force_scalar, const void* x, const void* v0, void* s, void* vl, int64_t T,
                             int64_t N, double tau, double vth, double vr, int soft, int decay) {
  switch (dtype) {
    case 0: return fwd<float>(force_scalar, x, v0, s, vl, T, N, tau, vth, vr, soft, decay);
    case 1: return fwd<double>(force_scalar, x, v0, s, vl, T, N, tau, vth, vr, soft, decay);
    case 2: return fwd<__half>(force_scalar, x, v0, s, vl, T, N, tau, vth, vr, soft, decay);
    default: return fwd<__nv_bfloat16>(force_scalar, x, v0, s, vl, T, N, tau, vth, vr, soft, decay);
  }
}

extern "C" int lasnn_emu_bwd(int dtype, int force_scalar, int force_global, const void* gs, int gs_bcast,
                             int64_t gs_step, const void* gvl, const void* x, const void* v0, void* gx, void* gv0,
                             int64_t T, int64_t N, double tau, double vth, double vr, int soft, int decay, int detach,
                             int64_t surrogate, double alpha) {
#define LASNN_EMU_BWD(S)                                                                                      \
  bwd<S>(force_scalar, force_global, gs, gs_bcast, gs_step, gvl, x, v0, gx, gv0, T, N, tau, vth, vr, soft, decay, \
         detach, surrogate, alpha)
  switch (dtype) {
    case 0: return LASNN_EMU_BWD(float);
    case 1: return LASNN_EMU_BWD(double);
    case 2: return LASNN_EMU_BWD(__half);
    default: return LASNN_EMU_BWD(__nv_bfloat16);
  }
}
"""
_EMU_DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _cuda_include_dir() -> str | None:
    """A directory with cuda_fp16.h (the kernels' half types work in host code too)."""
    cands = [os.path.join(os.environ[k], "include") for k in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(k)]
    cands.append("/usr/local/cuda/include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    return next((c for c in cands if os.path.exists(os.path.join(c, "cuda_fp16.h"))), None)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = _cuda_include_dir()
    if cxx is None or inc is None:
        pytest.skip("needs a C++ compiler and the CUDA headers (cuda_fp16.h)")
    d = tmp_path_factory.mktemp("lif_cuda_emu")
    (d / "emu.cpp").write_text(_EMU_SRC)
    cmd = [cxx, "-O1", "-std=c++20", "-shared", "-fPIC", "-fno-strict-aliasing", f"-I{ROOT / 'csrc'}", f"-I{inc}"]
    subprocess.run([*cmd, str(d / "emu.cpp"), "-o", str(d / "emu.so")], check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(d / "emu.so"))
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
    lib.lasnn_emu_fwd.argtypes = [i, i, p, p, p, p, i64, i64, f, f, f, i, i]
    lib.lasnn_emu_bwd.argtypes = [i, i, i, p, i, i64, p, p, p, p, p, i64, i64, f, f, f, i, i, i, i64, f]
    return lib


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _emu_ops(lib, force_scalar: bool, force_global: bool, paths: list):
    """(fwd, bwd) with the signatures of lasnn::lif_fwd / lif_bwd, running the emulated CUDA kernels."""

    def fwd(x, v0, tau, vth, vr, soft, decay):
        T, N = x.shape
        s, vl = torch.empty_like(x), torch.empty(N, dtype=x.dtype)
        args = (_ptr(x), _ptr(v0), _ptr(s), _ptr(vl), T, N, tau, vth, vr, soft, decay)
        paths.append(("fwd", lib.lasnn_emu_fwd(_EMU_DT[x.dtype], force_scalar, *args)))
        return s, vl

    def bwd(gs, gvl, x, v0, tau, vth, vr, soft, decay, detach, surrogate, alpha):
        T, N = x.shape
        gx, gv = torch.empty_like(x), torch.empty(N, dtype=x.dtype)
        # what lif_launch.h prepare_lif_bwd(row_broadcast=true) hands the CUDA launcher
        bcast = gs.dtype == x.dtype and N > 1 and gs.stride(1) == 0
        step = (gs.stride(0) if T > 1 else 0) if bcast else 0
        gs = gs if bcast else gs.to(x.dtype).contiguous()
        paths.append(("gs_bcast", bcast))
        args = (_ptr(gs), bcast, step, _ptr(gvl), _ptr(x), _ptr(v0), _ptr(gx), _ptr(gv), T, N, tau, vth, vr, soft,
                decay)
        code = lib.lasnn_emu_bwd(_EMU_DT[x.dtype], force_scalar, force_global, *args, detach, surrogate, alpha)
        paths.append(("bwd", (code // 10000, code % 10000 // 10, bool(code % 10))))
        return gx, gv

    return fwd, bwd


# (T, N): N = 64 is a multiple of every vector width, 37 / 1031 of none; T = 30 needs 64-thread blocks
# for fp32 vectors, T = 100 the scalar 64-thread shared-memory path, T = 200 the global H scratch.
EMU_SHAPES = [(1, 1), (4, 37), (4, 64), (30, 64), (100, 64), (200, 16), (3, 1031)]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=_id)
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: f"T{s[0]}N{s[1]}")
@pytest.mark.parametrize("mode", ["plan", "scalar", "global"])
def test_cuda_kernels_host_emulation(emu, dtype, shape, mode):
    paths: list = []
    fwd, bwd = _emu_ops(emu, mode == "scalar", mode == "global", paths)
    x, v0 = _inputs(*shape, dtype, "cpu", seed=sum(shape))
    for soft in (False, True):
        kw = _kw(2.0, soft, True)
        _check_forward(fwd, x, v0, kw)
        _check_backward(bwd, x, v0, kw, "sigmoid", 4.0, False, with_gvl=soft)
    if mode == "global":
        assert all(not p[1][2] for p in paths if p[0] == "bwd")


@pytest.mark.parametrize("surrogate", list(SURROGATES))
@pytest.mark.parametrize("detach", [False, True], ids=["attached", "detach"])
@pytest.mark.parametrize("decay", [True, False], ids=["decay", "nodecay"])
@pytest.mark.parametrize("mode", ["plan", "global"])
def test_cuda_kernels_host_emulation_flags(emu, surrogate, detach, decay, mode):
    _, bwd = _emu_ops(emu, False, mode == "global", [])
    x, v0 = _inputs(6, 64, torch.float32, "cpu", seed=2)
    for soft in (False, True):
        _check_backward(bwd, x, v0, _kw(2.0, soft, decay), surrogate, 2.0, detach, with_gvl=decay)
    x, _ = _inputs(7, 64, torch.float32, "cpu", seed=4)
    _check_backward(bwd, x, None, _kw(math.inf, True, decay), surrogate, 2.0, detach)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(4, 64), (30, 64), (200, 16), (3, 1031)], ids=lambda s: f"T{s[0]}N{s[1]}")
@pytest.mark.parametrize("mode", ["plan", "scalar", "global"])
def test_cuda_kernels_host_emulation_expanded_grads(emu, dtype, shape, mode):
    # An expanded (neuron stride 0) grad_spikes is read in place, one value per step, and gives exactly the
    # gradients of its materialised copy; the vector path stays on even when that one value is misaligned.
    paths: list = []
    _, bwd = _emu_ops(emu, mode == "scalar", mode == "global", paths)
    T, N = shape
    x, v0 = _inputs(T, N, dtype, "cpu", seed=T + N)
    per_step = torch.linspace(-0.6, 0.9, T).to(dtype)
    buf = torch.zeros(T + 1, dtype=dtype)
    buf[1:] = per_step
    one = torch.full((), 0.37, dtype=dtype)
    for ge in (per_step[:, None].expand(T, N), one.expand(T, N), buf[1:, None].expand(T, N)):
        args = (None, x, v0, 2.0, 1.0, -0.1, False, True, False, 0, 4.0)
        got = bwd(ge, *args)
        assert paths[-2] == ("gs_bcast", True)
        want = bwd(ge.contiguous(), *args)
        assert paths[-2] == ("gs_bcast", False)
        assert paths[-1] == paths[-3]  # the same launch plan
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "dtype,T,N,plan",
    [
        (torch.float32, 4, 64, (4, 128, True)),  # 16-byte vectors, 128 threads, H in shared memory
        (torch.float32, 30, 64, (4, 64, True)),
        (torch.float32, 100, 64, (1, 64, True)),
        (torch.float32, 200, 64, (4, 128, False)),  # global H scratch (grad_x itself)
        (torch.float32, 4, 37, (1, 128, True)),  # N not a multiple of 4: scalar
        (torch.float16, 4, 64, (8, 128, True)),  # 8 halves per 16-byte pack, fp32 H
        (torch.float16, 16, 64, (8, 64, True)),  # 128 x 8 x 16 x 4 bytes = 64 KiB > 48 KiB: 64 threads
        (torch.bfloat16, 300, 64, (8, 128, False)),  # global: an fp32 H scratch
        (torch.float64, 4, 64, (2, 128, True)),
    ],
    ids=lambda v: _id(v) if isinstance(v, torch.dtype) else str(v),
)
def test_cuda_backward_launch_plan(emu, dtype, T, N, plan):
    paths: list = []
    _, bwd = _emu_ops(emu, False, False, paths)
    x, v0 = _inputs(T, N, dtype, "cpu")
    bwd(torch.ones_like(x), None, x, v0, 2.0, 1.0, 0.0, False, True, False, 0, 4.0)
    assert paths[-1][1] == plan
