"""lasnn.lif on every backend against the oracle lasnn.reference.lif_reference (and SpikingJelly 2.0).

Backends that cannot run here are skipped with the reason from ``lasnn.backends.unavailable_reason``:
Triton runs on CPU under ``TRITON_INTERPRET=1`` (set before import), CUDA on a GPU machine.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

import lasnn
from lasnn import backends
from lasnn.reference import SURROGATES, lif_reference
from lasnn.testing import (
    assert_close_to_reference,
    assert_spikes_match,
    backend_device,
    make_currents,
    peak_allocated_bytes,
    skip_unless_backend,
    spike_rate,
)

pytestmark = pytest.mark.usefixtures("nan_fill")


def _marks(backend: str):
    return {"triton": [pytest.mark.triton], "cuda": [pytest.mark.cuda]}.get(backend, [])


BACKEND_PARAMS = [pytest.param(b, id=b, marks=_marks(b)) for b in backends.BACKENDS]
KERNEL_PARAMS = [pytest.param(b, id=b, marks=_marks(b)) for b in backends.BACKENDS if b != "reference"]


def _setup(backend: str, dtype: torch.dtype = torch.float32) -> torch.device:
    device = backend_device(backend)
    skip_unless_backend("lif", backend, device, dtype)
    return device


def run_and_compare(
    backend: str,
    *,
    T: int = 6,
    shape: tuple[int, ...] = (37,),
    dtype: torch.dtype = torch.float32,
    with_v0: bool = True,
    noncontiguous: bool = False,
    seed: int = 0,
    x: torch.Tensor | None = None,
    **flags,
) -> None:
    """Forward spikes/v_last and grads of x and v_init, kernel vs reference (and float64 for fp16/bf16)."""
    device = _setup(backend, dtype)
    if x is None:
        x = make_currents(T, shape, dtype=dtype, device=device, seed=seed, noncontiguous=noncontiguous)
    else:
        x = x.to(device=device, dtype=dtype)
    T, shape = x.shape[0], tuple(x.shape[1:])
    gen = torch.Generator().manual_seed(seed + 1)
    v0 = (
        (0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
        if with_v0
        else None
    )
    g_s = torch.randn((T, *shape), generator=gen, dtype=torch.float64)
    g_v = torch.randn(shape, generator=gen, dtype=torch.float64)

    def fwd_bwd(fn, x_in, v_in, grad_dtype):
        x_in = x_in.detach().requires_grad_(True)
        v_in = None if v_in is None else v_in.detach().requires_grad_(True)
        out = fn(x_in, v_in)
        spikes, v_last = out[0], out[1]
        loss = (spikes * g_s.to(spikes)).sum() + (v_last * g_v.to(v_last)).sum()
        inputs = [x_in] + ([v_in] if v_in is not None else [])
        grads = torch.autograd.grad(loss, inputs) if loss.requires_grad else [torch.zeros_like(t) for t in inputs]
        return out, grads

    def kernel(x_in, v_in):
        return lasnn.lif(x_in, v_in, return_v=True, backend=backend, **flags)

    def ref(x_in, v_in):
        return lif_reference(x_in, v_in, return_h=True, **flags)

    (s_k, v_k), g_k = fwd_bwd(kernel, x, v0, dtype)
    (s_r, v_r, h_r), g_r = fwd_bwd(ref, x, v0, dtype)
    assert s_k.shape == x.shape and s_k.dtype == dtype and s_k.device.type == device.type
    assert v_k.shape == x.shape[1:] and v_k.dtype == dtype
    vth = flags.get("v_threshold", 1.0)
    keep = assert_spikes_match(s_k, s_r, h_r, vth, dtype=dtype)
    r64 = None
    if dtype in (torch.float16, torch.bfloat16):
        (s_64, v_64, h_64), g_64 = fwd_bwd(ref, x.double(), None if v0 is None else v0.double(), torch.float64)
        keep = keep & assert_spikes_match(s_r.double(), s_64, h_64, vth, dtype=torch.float64)
        r64 = (v_64, g_64)
    assert_close_to_reference(v_k, v_r, expected64=r64 and r64[0], keep=keep, name="v_last")
    names = ["grad x", "grad v_init"]
    for i, (a, e) in enumerate(zip(g_k, g_r, strict=True)):
        assert_close_to_reference(a, e, expected64=r64 and r64[1][i], keep=keep, name=names[i])


# ---------------------------------------------------------------------------------------------
# Correctness against the reference

RESETS = {"hard": 0.0, "hard-0.3": -0.3, "soft": None}
FLAG_CASES = [
    pytest.param(
        dict(v_reset=r, decay_input=d, detach_reset=dt, surrogate=sg), id=f"{rn}-decay{int(d)}-detach{int(dt)}-{sg}"
    )
    for (rn, r), d, dt, sg in itertools.product(RESETS.items(), (True, False), (False, True), SURROGATES)
]


@pytest.mark.parametrize("flags", FLAG_CASES)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_flags_fp32(backend, flags):
    run_and_compare(backend, T=5, shape=(67,), **flags)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_dtypes(backend, dtype, reset):
    run_and_compare(backend, T=7, shape=(4, 33), dtype=dtype, v_reset=RESETS[reset], surrogate="atan", alpha=2.0)


@pytest.mark.parametrize(
    "T,shape",
    [
        pytest.param(1, (5,), id="T1"),
        pytest.param(4, (1,), id="N1"),
        pytest.param(3, (2, 3, 5), id="multidim"),
        pytest.param(5, (67,), id="N67-not-vector-multiple"),
        pytest.param(3, (2500,), id="N2500-blocks"),
        pytest.param(2, (20000,), id="N20000-threads"),
        pytest.param(150, (70,), id="T150-heap-scratch"),
    ],
)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_shapes(backend, T, shape):
    run_and_compare(backend, T=T, shape=shape)


@pytest.mark.parametrize("with_v0", [False, True], ids=["zeros", "v_init"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_noncontiguous(backend, with_v0):
    run_and_compare(backend, T=4, shape=(3, 41), noncontiguous=True, with_v0=with_v0, v_reset=None)


@pytest.mark.parametrize("with_v0", [False, True], ids=["zeros", "v_init"])
@pytest.mark.parametrize("backend", KERNEL_PARAMS)
def test_channels_last_runs_as_it_lies(backend, with_v0):
    """Steps in channels-last order (``[T, B, C, H, W]`` folded from a channels-last ``[T*B, C, H, W]``): the
    kernel reads the input's own memory (no copy), spikes, membrane and gradients equal those of the contiguous
    input exactly, and the outputs and the input gradient keep the input's strides."""
    device = _setup(backend)
    T, B, C, H, W = 4, 3, 5, 6, 7
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(T * B, C, H, W, generator=g) * 1.5).to(device)
    x_cl = x.contiguous(memory_format=torch.channels_last).view(T, B, C, H, W).requires_grad_(True)
    x_c = x.view(T, B, C, H, W).clone().requires_grad_(True)
    v0 = torch.rand(B, C, H, W, generator=g).to(device) if with_v0 else None
    kw = dict(tau=2.0, v_reset=0.0, surrogate="triangle", alpha=1.0, return_v=True, backend=backend)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.data_ptr()) or t, lambda t: t):
        s_cl, v_cl = lasnn.lif(x_cl, None if v0 is None else v0.contiguous(memory_format=torch.channels_last), **kw)
    s_c, v_c = lasnn.lif(x_c, v0, **kw)
    assert x_cl.data_ptr() in seen, "the kernel's saved input is not the input's own memory (a copy was made)"
    assert s_cl.stride() == x_cl.stride() and v_cl.stride() == x_cl.stride()[1:]
    assert torch.equal(s_cl, s_c) and torch.equal(v_cl, v_c)
    assert 0 < s_c.mean() < 1
    gs = torch.randn(T * B, C, H, W, generator=g).to(device)  # the next layer's gradient, channels-last too
    gs_cl = gs.contiguous(memory_format=torch.channels_last).view(T, B, C, H, W)
    (gx_cl,) = torch.autograd.grad(s_cl, x_cl, gs_cl)
    (gx_c,) = torch.autograd.grad(s_c, x_c, gs.view(T, B, C, H, W))
    assert gx_cl.stride() == x_cl.stride()
    assert torch.equal(gx_cl, gx_c)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize(
    "params",
    [
        pytest.param(dict(tau=math.inf, decay_input=True), id="IF-hard"),
        pytest.param(dict(tau=math.inf, v_reset=None), id="IF-soft"),
        pytest.param(dict(tau=1.3, v_threshold=0.5, alpha=1.5, surrogate="sigmoid"), id="tau1.3-th0.5"),
        pytest.param(
            dict(tau=10.0, v_threshold=-0.2, v_reset=-1.0, surrogate="triangle", alpha=0.7), id="neg-threshold"
        ),
    ],
)
def test_neuron_parameters(backend, params):
    run_and_compare(backend, T=6, shape=(53,), **params)


def test_factory_gives_a_mix_of_spikes():
    x = make_currents(8, (4096,), seed=3)
    rate = spike_rate(lif_reference(x)[0])
    assert 0.15 < rate < 0.6, rate
    nc = make_currents(8, (4, 64), seed=3, noncontiguous=True)
    assert not nc.is_contiguous() and torch.equal(nc, make_currents(8, (4, 64), seed=3))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_if_module_matches_tau_inf(backend):
    device = _setup(backend)
    x = make_currents(5, (3, 17), device=device, seed=5)
    out = lasnn.nn.IF(v_reset=None, backend=backend)(x)
    torch.testing.assert_close(out, lasnn.lif(x, tau=math.inf, v_reset=None, backend=backend), rtol=0, atol=0)
    assert "tau=inf" in repr(lasnn.nn.IF())


@pytest.mark.parametrize("shape", [(0, 7), (4, 0), (0, 0, 3)], ids=["T0", "N0", "T0-N0"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_empty(backend, shape):
    device = _setup(backend)
    x = torch.zeros(shape, device=device, requires_grad=True)
    v0 = torch.full(shape[1:], 0.25, device=device, requires_grad=True)
    s, v = lasnn.lif(x, v0, return_v=True, backend=backend)
    assert s.shape == x.shape and v.shape == x.shape[1:]
    if shape[0] == 0:
        torch.testing.assert_close(v, v0.detach())  # no step: the membrane is untouched
    (s.sum() + v.sum()).backward()
    # No element of x: its gradient is absent (the reference's graph skips it) or empty.
    assert x.grad is None or (x.grad.shape == x.shape and x.grad.numel() == 0)
    assert v0.grad.shape == v0.shape
    if shape[0] == 0:
        torch.testing.assert_close(v0.grad, torch.ones_like(v0))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_return_v_and_chunked_run(backend):
    device = _setup(backend)
    x = make_currents(9, (2, 45), device=device, seed=11)
    v0 = torch.rand(2, 45, device=device)
    one = lasnn.lif(x, v0, backend=backend)
    assert isinstance(one, torch.Tensor)
    s_all, v_all = lasnn.lif(x, v0, return_v=True, backend=backend)
    torch.testing.assert_close(s_all, one, rtol=0, atol=0)

    xa = x.clone().requires_grad_(True)
    s1, v1 = lasnn.lif(xa[:4], v0, return_v=True, backend=backend)
    s2, v2 = lasnn.lif(xa[4:], v1, return_v=True, backend=backend)
    torch.testing.assert_close(torch.cat([s1, s2]), s_all, rtol=0, atol=0)
    torch.testing.assert_close(v2, v_all, rtol=0, atol=0)
    # Gradients flow through the chunk boundary exactly as through one run.
    xb = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    s_b, v_b = lasnn.lif(xb, v0, return_v=True, backend=backend)
    ((s_b * g).sum() + v_b.sum()).backward()
    ((torch.cat([s1, s2]) * g).sum() + v2.sum()).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_nan_propagates(backend):
    device = _setup(backend)
    x = make_currents(6, (40,), seed=2)
    x[2, 3] = float("nan")
    x[0, 17] = float("nan")
    x[5, 30] = float("inf")
    x = x.to(device)
    s, v = lasnn.lif(x, return_v=True, backend=backend)
    s_r, v_r = lif_reference(x)
    torch.testing.assert_close(s, s_r, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v, v_r, equal_nan=True)
    assert torch.isnan(v[3]) and torch.isnan(v[17])
    assert torch.isfinite(v[[i for i in range(40) if i not in (3, 17, 30)]]).all()


def test_nan_fill_reaches_dispatcher_allocations():
    """The fixture really fills fresh memory: at::empty/empty_like (what the C++ launchers call)
    go through these dispatcher entries."""
    x = torch.ones(3, 5)
    assert torch.isnan(torch.ops.aten.empty_like.default(x)).all()
    assert torch.isnan(torch.ops.aten.empty.memory_format([7])).all()


# ---------------------------------------------------------------------------------------------
# Autograd plumbing


@pytest.mark.parametrize("backend", KERNEL_PARAMS)
def test_inference_saves_nothing(backend):
    device = _setup(backend)
    x = make_currents(4, (3, 8), device=device)
    s, v = lasnn.lif(x, torch.zeros(3, 8, device=device), return_v=True, backend=backend)
    assert s.grad_fn is None and v.grad_fn is None and not s.requires_grad
    with torch.no_grad():
        s = lasnn.lif(x.clone().requires_grad_(True), backend=backend)
    assert s.grad_fn is None
    # Training: exactly the input (and v_init) are saved; no [T, *] tensor of spikes or H.
    xg = x.clone().requires_grad_(True)
    s = lasnn.lif(xg, backend=backend)
    node = s.grad_fn
    while "LIFFunction" not in type(node).__name__:  # the outputs are views of the op's outputs
        node = node.next_functions[0][0]
    saved = [t for t in node.saved_tensors if t is not None]
    assert len(saved) == 1 and saved[0].shape == (4, 24) and saved[0].data_ptr() == xg.data_ptr()


@pytest.mark.parametrize("backend", KERNEL_PARAMS)
def test_grad_only_to_v_init(backend):
    device = _setup(backend)
    x = make_currents(5, (29,), device=device)
    v0 = torch.rand(29, device=device, requires_grad=True)
    s = lasnn.lif(x, v0, backend=backend, surrogate="atan", alpha=2.0)
    s.sum().backward()
    v0r = v0.detach().clone().requires_grad_(True)
    lif_reference(x, v0r, surrogate="atan", alpha=2.0)[0].sum().backward()
    assert_close_to_reference(v0.grad, v0r.grad, name="grad v_init")


@pytest.mark.parametrize("backend", KERNEL_PARAMS)
def test_opcheck(backend):
    device = _setup(backend)
    fwd = torch.ops.lasnn.lif_fwd_triton if backend == "triton" else torch.ops.lasnn.lif_fwd
    bwd = torch.ops.lasnn.lif_bwd_triton if backend == "triton" else torch.ops.lasnn.lif_bwd
    x = make_currents(4, (50,), device=device)
    v0 = torch.rand(50, device=device)
    torch.library.opcheck(fwd, (x, v0, 2.0, 1.0, 0.0, False, True))
    torch.library.opcheck(fwd, (x, None, math.inf, 1.0, 0.0, True, False))
    g = torch.randn_like(x)
    torch.library.opcheck(bwd, (g, torch.randn(50, device=device), x, v0, 2.0, 1.0, 0.0, False, True, False, 0, 4.0))
    torch.library.opcheck(bwd, (g, None, x, None, 2.0, 1.0, 0.0, True, True, True, 1, 2.0))
    # non-contiguous (permuted) inputs: the fakes must describe the contiguous outputs the kernels return
    xp = x.t().contiguous().t()  # [T, N] with strides (1, T)
    assert not xp.is_contiguous()
    torch.library.opcheck(fwd, (xp, None, 2.0, 1.0, 0.0, False, True))
    torch.library.opcheck(bwd, (torch.randn_like(xp), None, xp, None, 2.0, 1.0, 0.0, False, True, False, 0, 4.0))
    # expanded (stride-0) incoming gradients, one value in all or one per step
    for ge in (torch.full((), 0.3, device=device).expand(4, 50), torch.randn(4, 1, device=device).expand(4, 50)):
        torch.library.opcheck(bwd, (ge, None, x, v0, 2.0, 1.0, 0.0, False, True, False, 0, 4.0))


# Backends whose LIF backward reads a stride-0 incoming gradient in place (the others copy it first).
IN_PLACE_EXPANDED_GRADS = {"cpu", "cuda", "triton"}


@pytest.mark.parametrize("T", [4, 40], ids=["T4", "T40"])  # Triton: H in registers (T <= 32) / the scratch kernel
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_expanded_grads_are_exact_and_not_materialised(backend, T):
    # spikes.sum() / spikes.mean(dims) send back stride-0 gradients: same result as the materialised one
    device = _setup(backend)
    N = 1 << 14 if T == 4 else 999
    x = make_currents(T, (N,), device=device).requires_grad_(True)
    v0 = torch.rand(N, device=device)
    per_step = torch.linspace(-0.5, 0.5, T, device=device)
    for ge in (
        torch.full((), 0.37, device=device).expand(T, N),  # one value for all
        per_step[:, None].expand(T, N),  # one value per step
        per_step[None, :].t().expand(T, N),  # the same, another stride pattern
        torch.randn(N, T, device=device).t(),  # permuted, not expanded
        torch.randn(T, 1, device=device).expand(T, N)[:, 5:],  # an expanded slice
    ):
        xs = x[:, : ge.shape[1]]
        got = torch.autograd.grad(lasnn.lif(xs, v0[: ge.shape[1]], backend=backend), x, ge)[0]
        want = torch.autograd.grad(lasnn.lif(xs, v0[: ge.shape[1]], backend=backend), x, ge.contiguous())[0]
        assert torch.equal(got, want)
    if backend in IN_PLACE_EXPANDED_GRADS:  # the backward allocates grad_x and grad_v only
        s = lasnn.lif(x, backend=backend)
        ge = torch.full((), 1.0, device=device).expand(T, N)
        peak = peak_allocated_bytes(lambda: torch.autograd.grad(s, x, ge), device)
        assert peak <= (T * N + N) * 4 + 4096, peak


@pytest.mark.parametrize("backend", KERNEL_PARAMS)
def test_torch_compile_fullgraph(backend):
    device = _setup(backend)
    torch._dynamo.reset()

    def f(x, v0):
        s, v = lasnn.lif(x * 1.5, v0, return_v=True, backend=backend, surrogate="sigmoid")
        return s.sum(0) + v

    x = make_currents(4, (6, 16), device=device, seed=4)
    v0 = torch.rand(6, 16, device=device)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager = f(xe, v0)
    compiled = torch.compile(f, fullgraph=True)(xc, v0)
    torch.testing.assert_close(compiled, eager)
    eager.sum().backward()
    compiled.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)


# ---------------------------------------------------------------------------------------------
# SpikingJelly 2.0 equality (the convention we promise to keep)


def _sj_surrogate(name: str, alpha: float):
    sj = pytest.importorskip("spikingjelly.activation_based.surrogate")
    return {"sigmoid": sj.Sigmoid, "atan": sj.ATan, "triangle": sj.PiecewiseQuadratic}[name](alpha=alpha)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize(
    "surrogate,alpha,v_reset,decay_input,detach_reset",
    [
        ("sigmoid", 4.0, 0.0, True, False),
        ("sigmoid", 4.0, None, False, True),
        ("atan", 2.0, 0.0, False, False),
        ("atan", 2.0, None, True, False),
        ("triangle", 1.0, 0.0, True, True),
    ],
)
def test_matches_spikingjelly(backend, surrogate, alpha, v_reset, decay_input, detach_reset):
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    device = _setup(backend)
    node = neuron.LIFNode(
        tau=2.0,
        decay_input=decay_input,
        v_threshold=1.0,
        v_reset=v_reset,
        surrogate_function=_sj_surrogate(surrogate, alpha),
        detach_reset=detach_reset,
        step_mode="m",
    )
    x = make_currents(6, (4, 33), device=device, seed=7)
    g = torch.randn_like(x)
    x_sj = x.clone().requires_grad_(True)
    s_sj = node(x_sj)
    (s_sj * g).sum().backward()
    x_k = x.clone().requires_grad_(True)
    flags = dict(v_reset=v_reset, decay_input=decay_input, detach_reset=detach_reset, surrogate=surrogate, alpha=alpha)
    s_k, v_k = lasnn.lif(x_k, return_v=True, backend=backend, **flags)
    (s_k * g).sum().backward()
    _, _, h_r = lif_reference(x, return_h=True, **flags)
    keep = assert_spikes_match(s_k, s_sj, h_r, 1.0)
    assert_close_to_reference(v_k, node.v, keep=keep, name="v_last vs SpikingJelly")
    assert_close_to_reference(x_k.grad, x_sj.grad, keep=keep, name="grad x vs SpikingJelly")


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument


def _bad_calls():
    x = torch.randn(3, 4)
    return [
        ("0-d", lambda: lasnn.lif(torch.tensor(1.0)), ValueError, "x_seq"),
        ("int", lambda: lasnn.lif(torch.ones(3, 4, dtype=torch.int32)), TypeError, "x_seq"),
        ("not-tensor", lambda: lasnn.lif([[1.0]]), TypeError, "x_seq"),
        ("v_init-shape", lambda: lasnn.lif(x, torch.zeros(5)), ValueError, "v_init"),
        ("v_init-dtype", lambda: lasnn.lif(x, torch.zeros(4, dtype=torch.float64)), TypeError, "v_init"),
        ("v_init-device", lambda: lasnn.lif(x, torch.zeros(4, device="meta")), ValueError, "v_init"),
        ("v_init-type", lambda: lasnn.lif(x, 0.5), TypeError, "v_init"),
        ("surrogate", lambda: lasnn.lif(x, surrogate="relu"), ValueError, "surrogate"),
        ("tau-zero", lambda: lasnn.lif(x, tau=0.0), ValueError, "tau"),
        ("tau-negative", lambda: lasnn.lif(x, tau=-2.0), ValueError, "tau"),
        ("tau-nan", lambda: lasnn.lif(x, tau=float("nan")), ValueError, "tau"),
        ("alpha-zero", lambda: lasnn.lif(x, alpha=0.0), ValueError, "alpha"),
        ("alpha-negative", lambda: lasnn.lif(x, alpha=-1.0), ValueError, "alpha"),
        ("threshold-nan", lambda: lasnn.lif(x, v_threshold=float("nan")), ValueError, "v_threshold"),
        ("backend", lambda: lasnn.lif(x, backend="tpu"), ValueError, "backend"),
        ("module-surrogate", lambda: lasnn.nn.LIF(surrogate="x"), ValueError, "surrogate"),
        ("module-tau", lambda: lasnn.nn.LIF(tau=-1.0), ValueError, "tau"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input(case):
    _, call, exc, arg = case
    with pytest.raises(exc, match=arg):
        call()


@pytest.mark.parametrize("backend", KERNEL_PARAMS)
def test_raw_op_checks(backend):
    device = _setup(backend)
    fwd = torch.ops.lasnn.lif_fwd_triton if backend == "triton" else torch.ops.lasnn.lif_fwd
    x = torch.randn(3, 4, device=device)
    # C++ launchers raise RuntimeError (TORCH_CHECK), Python launchers ValueError: either names the argument.
    with pytest.raises((RuntimeError, ValueError), match="v_init"):
        fwd(x, torch.zeros(5, device=device), 2.0, 1.0, 0.0, False, True)
    with pytest.raises((RuntimeError, ValueError), match="tau"):
        fwd(x, None, -1.0, 1.0, 0.0, False, True)


# ---------------------------------------------------------------------------------------------
# The CPU kernel's instruction-set paths (baseline, AVX2, AVX-512) must agree bit for bit.

_ISA_SCRIPT = """
import itertools, math, sys, torch, lasnn
from lasnn.testing import make_currents
outs = []
# N = 300: a partial last vector; 5000: several 1024-neuron blocks split over the threads, with a
# tail. fp32 and bf16 are the dtypes with AVX builds.
for N, dtype in ((300, torch.float32), (5000, torch.float32), (300, torch.bfloat16)):
    x = make_currents(5, (N,), seed=9)
    # Special values: exactly at threshold (x = 2 charges an empty neuron to H = 1), signed zeros,
    # NaN and +-inf (the reference's NaN behaviour of the arithmetic reset), huge and tiny currents.
    x[0, :8] = torch.tensor([2.0, -0.0, 0.0, float("nan"), float("inf"), -float("inf"), 1e30, 1e-30])
    x[3, 8:12] = torch.tensor([2.0, -0.0, 200.0, -200.0])
    g = torch.randn(5, N, generator=torch.Generator().manual_seed(1))
    g[2, :4] = torch.tensor([0.0, -0.0, float("nan"), 1e30])
    v0 = torch.randn(N, generator=torch.Generator().manual_seed(2))
    for sg, v_reset, decay, detach, tau in itertools.product(
        ("sigmoid", "atan", "triangle", "rect"), (0.0, -0.5, None), (True, False), (False, True), (2.0, math.inf)
    ):
        for with_v0 in (False, True):
            xx = x.to(dtype).clone().requires_grad_(True)
            vi = v0.to(dtype).clone().requires_grad_(True) if with_v0 else None
            s, v = lasnn.lif(xx, vi, return_v=True, backend="cpu", surrogate=sg, v_reset=v_reset, tau=tau,
                             decay_input=decay, detach_reset=detach, alpha=3.0)
            ((s.float() * g).sum() + (v.float() * g[0]).sum()).backward()
            outs += [s, v, xx.grad] + ([vi.grad] if with_v0 else [])
torch.save([torch.ops.lasnn.cpu_lif_isa()] + outs, sys.argv[1])
"""


@pytest.mark.slow
def test_cpu_isa_paths_agree(tmp_path):
    if backends.unavailable_reason("lif", "cpu", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("no cpu backend")
    results = {}
    for isa in ("base", "avx2", "default"):
        env = dict(os.environ)
        env.pop("LASNN_CPU_ISA", None)
        if isa != "default":
            env["LASNN_CPU_ISA"] = isa
        out = tmp_path / f"{isa}.pt"
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(out)], check=True, env=env, timeout=120)
        results[isa] = torch.load(out)
    names = {isa: results[isa].pop(0) for isa in results}
    assert names["base"] == "base" and names["avx2"] in ("avx2", "base"), names
    if len(set(names.values())) == 1:
        pytest.skip(f"this CPU has one LIF kernel build only ({names['default']}): nothing to compare")
    # 3 (size, dtype) x 96 neuron configurations x (s, v, grad_x without v_init + s, v, grad_x, grad_v_init)
    assert len(results["default"]) == 3 * 96 * 7
    for isa in ("base", "avx2"):
        for k, (a, b) in enumerate(zip(results[isa], results["default"], strict=True)):
            # Bit for bit, signed zeros included; NaN where NaN (its payload may depend on operand order).
            nan = torch.isnan(b)
            assert torch.equal(torch.isnan(a), nan), f"{isa} vs default, output {k}: NaN positions differ"
            ints = torch.int32 if a.dtype == torch.float32 else torch.int16
            a_bits, b_bits = a.view(ints)[~nan], b.view(ints)[~nan]
            bad = (a_bits != b_bits).nonzero().flatten()
            assert bad.numel() == 0, (
                f"{isa} vs default, output {k}: {bad.numel()} values differ, e.g. {a[~nan][bad[:4]].tolist()} vs "
                f"{b[~nan][bad[:4]].tolist()}"
            )


def test_torch_compile_dynamic_two_sizes_without_recompiling():
    # Inductor, fullgraph, dynamic shapes: the fake kernels must describe any size, so a second size
    # reuses the graph (no recompile) and both match eager, gradients included.
    torch._dynamo.reset()

    def f(x, v0):
        s, v = lasnn.lif(x * 1.5, v0, return_v=True, surrogate="sigmoid")
        return s.sum(0) + v

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for i, shape in enumerate(((6, 16), (5, 24))):
        x = make_currents(4, shape, seed=5 + i)
        v0 = torch.rand(*shape)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        eager = f(xe, v0)
        ctx = torch._dynamo.config.patch(error_on_recompile=True) if i else contextlib.nullcontext()
        with ctx:
            out = compiled(xc, v0)
        torch.testing.assert_close(out, eager)
        eager.sum().backward()
        out.sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad)
