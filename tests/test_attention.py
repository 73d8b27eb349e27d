"""Attention-transfer distillation: the fused raw attention map on every backend against the oracle
lasnn/reference/attention.py, the public ``attention_map``/``attention_loss``/``kd_loss`` and the loss modules.

Comparison rule (DESIGN.md, lasnn.testing.TOLERANCES): fp32/fp64 results within the table's tolerance of
the same-dtype reference; fp16/bf16 within a multiple of that reference's own error against float64. The
post-processing (pooling, normalisation) is pinned by properties that any correct implementation has
and by a hand-computed example, not by a second copy of the formula.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import lasnn
from lasnn import _ext
from lasnn.ops.attention import AttentionMapFunction, attention_map_raw
from lasnn.reference.attention import (
    attention_loss_reference,
    attention_map_raw_reference,
    kd_loss_reference,
)
from lasnn.testing import assert_close_to_reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
HAS_CPU_KERNEL = _ext.c_has_op("attention_map_fwd")

_backend_params = [
    pytest.param("cpu", "cpu", marks=pytest.mark.skipif(not HAS_CPU_KERNEL, reason="lasnn._C lacks the CPU kernel")),
    pytest.param(
        "triton", "cuda" if HAS_CUDA else "cpu",
        marks=[
            pytest.mark.triton,
            pytest.mark.skipif(
                not _ext.HAS_TRITON or not (INTERPRET or HAS_CUDA),
                reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1 (set before import)",
            ),
        ],
    ),
    pytest.param(
        "cuda", "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not HAS_CUDA or not _ext.c_has_cuda_kernels("attention_map_fwd"),
                reason="needs a CUDA GPU and lasnn._C's CUDA kernels",
            ),
        ],
    ),
]


def _dtypes(backend: str) -> list[torch.dtype]:
    if backend == "triton":
        return [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
    return [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _nan_filled_outputs():
    """Fresh tensors come back NaN-filled, so an element a kernel forgets to write fails the comparison."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def _id(v) -> str:
    return str(v).replace("torch.", "")


def _randn(*shape, seed: int = 0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _spikes(*shape, rate: float = 0.3, seed: int = 0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < rate).to(dtype).to(device)


def _assert_bounded(name: str, got: torch.Tensor, ref_dt: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype):
    """The shared rule (lasnn.testing.TOLERANCES): ``dtype`` is the storage dtype of the inputs; fp16/bf16
    results must lie within a multiple of the same-dtype reference's own error against float64."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    if got.numel():
        assert not torch.isnan(got).any(), f"{name}: NaN in result (unwritten output?)"
    assert_close_to_reference(got, ref_dt, expected64=ref64, name=name, dtype=dtype)


def _raw_ops(backend: str):
    if backend == "triton":
        return torch.ops.lasnn.attention_map_fwd_triton, torch.ops.lasnn.attention_map_bwd_triton
    return torch.ops.lasnn.attention_map_fwd, torch.ops.lasnn.attention_map_bwd


def _ref_fwd_bwd(feat: torch.Tensor, grad: torch.Tensor, p: float, time_mean: bool, dtype: torch.dtype):
    """Oracle map and autograd gradient with the features stored in ``dtype`` (fp64 gives the truth)."""
    x = feat.detach().cpu().to(dtype).requires_grad_()
    m = attention_map_raw_reference(x, p, time_mean)
    (gx,) = torch.autograd.grad((m.double() * grad.cpu().double()).sum(), x)
    return m.detach(), gx


# ------------------------------------------------------------------------------------------------
# Raw fused op against the oracle (kernel level)

# (T, B, C, S): tile tails (S = 37, 300 > 256), T = 1, B = 1, C = 1, S = 1.
_SHAPES = [(4, 3, 5, 37), (1, 2, 3, 300), (3, 1, 1, 1), (2, 2, 16, 64)]
_P = [1.0, 2.0, 3.0, 0.5]


@pytest.mark.parametrize("backend,device", _backend_params)
@pytest.mark.parametrize("time_mean", [True, False], ids=["time_mean", "per_step"])
@pytest.mark.parametrize("p", _P, ids=lambda p: f"p{p:g}")
def test_raw_op_matches_reference(backend, device, time_mean, p):
    fwd, bwd = _raw_ops(backend)
    shapes = _SHAPES if backend != "triton" or not INTERPRET else _SHAPES[:2]
    for shape in shapes:
        for dtype in _dtypes(backend):
            feat = _randn(*shape, seed=1, dtype=dtype, device=device)
            m = fwd(feat, p, time_mean)
            T, B, _, S = shape
            assert m.shape == ((B, S) if time_mean else (T, B, S))
            assert m.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            grad = _randn(*m.shape, seed=2, dtype=m.dtype, device=device)
            gx = bwd(grad, feat, p, time_mean)
            assert gx.shape == feat.shape and gx.dtype == feat.dtype
            if time_mean and T > 1:  # the same gradient for every step: written once, expanded over T
                assert gx.stride(0) == 0
            ref_m, ref_g = _ref_fwd_bwd(feat, grad, p, time_mean, dtype)
            m64, g64 = _ref_fwd_bwd(feat, grad, p, time_mean, torch.float64)
            tag = f"{backend} {_id(dtype)} {shape}"
            _assert_bounded(f"map {tag}", m, ref_m, m64, dtype)
            # The gradient is rounded to the storage dtype once; the reference's gradient too.
            _assert_bounded(f"grad {tag}", gx, ref_g, g64, dtype)


@pytest.mark.parametrize("backend,device", _backend_params)
def test_raw_op_empty_and_zero(backend, device):
    fwd, bwd = _raw_ops(backend)
    for shape in [(2, 0, 3, 5), (2, 3, 4, 0), (0, 2, 3, 5)]:
        feat = torch.zeros(shape, device=device)
        for tm in (True, False):
            m = fwd(feat, 2.0, tm)
            ref = attention_map_raw_reference(feat.cpu(), 2.0, tm)
            assert m.shape == ref.shape
            # T = 0 in the time-mean mode is a mean over nothing: NaN, as in torch.
            torch.testing.assert_close(m.cpu(), ref, equal_nan=True)
            gx = bwd(torch.ones_like(m), feat, 2.0, tm)
            assert gx.shape == feat.shape
    # All-zero features: zero map, zero gradient for every p (the |x|^(p-1) of p < 1 is defined as 0 at 0).
    feat = torch.zeros(2, 3, 4, 10, device=device)
    for p in _P:
        for tm in (True, False):
            m = fwd(feat, p, tm)
            assert (m == 0).all()
            gx = bwd(torch.ones_like(m), feat, p, tm)
            assert (gx == 0).all()


@pytest.mark.parametrize("backend,device", _backend_params)
def test_raw_op_noncontiguous(backend, device):
    fwd, bwd = _raw_ops(backend)
    view = _randn(3, 2, 40, 9, seed=4, device=device).transpose(2, 3)  # [T, B, C=9, S=40], strided
    sliced = _randn(3, 2, 10, 33, seed=3, device=device)[:, :, ::2]  # every other channel
    assert not view.is_contiguous() and not sliced.is_contiguous()
    for f in (view, sliced):
        for tm in (True, False):
            m = fwd(f, 2.0, tm)
            torch.testing.assert_close(m, fwd(f.contiguous(), 2.0, tm), rtol=0, atol=0)
            g = torch.ones_like(m)
            torch.testing.assert_close(bwd(g, f, 2.0, tm), bwd(g, f.contiguous(), 2.0, tm), rtol=0, atol=0)
    # A non-contiguous grad_map (expanded) is read correctly.
    gm = torch.ones(1, 40, device=device).expand(2, 40)
    torch.testing.assert_close(bwd(gm, view, 2.0, True), bwd(gm.contiguous(), view, 2.0, True), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Public loss against the reference composition


_PAIRS = {
    # name: (student shape, teacher shape)
    "equal_2d": ((4, 2, 6, 8, 8), (2, 10, 8, 8)),
    "student_larger_2d": ((3, 2, 5, 8, 12), (2, 7, 4, 6)),
    "teacher_larger_2d": ((2, 3, 4, 5, 5), (3, 6, 10, 10)),
    "mixed_2d": ((2, 2, 3, 8, 4), (2, 5, 4, 8)),
    "odd_pool_2d": ((2, 2, 3, 7, 9), (2, 4, 3, 4)),
    "b1_ann_student": ((1, 4, 6, 6), (1, 8, 3, 3)),
    "equal_1d": ((4, 3, 6, 40), (3, 9, 40)),
    "mismatch_1d": ((3, 2, 5, 40), (2, 4, 10)),
    "b1_1d": ((2, 1, 3, 7), (1, 2, 7)),
}


def _pair(name: str, dtype=torch.float64, device="cpu", seed=0):
    s_shape, t_shape = _PAIRS[name]
    # Spikes when there is a T (the usual student), real-valued otherwise.
    s = _spikes(*s_shape, seed=seed, dtype=dtype, device=device) if len(s_shape) == len(t_shape) + 1 else None
    if s is None:
        s = _randn(*s_shape, seed=seed, dtype=dtype, device=device)
    t = _randn(*t_shape, seed=seed + 1, dtype=dtype, device=device).relu()
    return s, t


@pytest.mark.parametrize("backend,device", _backend_params)
@pytest.mark.parametrize("time_reduce", ["mean", "per_step"])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0], ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("pair", list(_PAIRS))
def test_attention_loss_matches_reference(backend, device, time_reduce, p, pair):
    dtype = torch.float32 if backend == "triton" else torch.float64
    s, t = _pair(pair, dtype=dtype, device=device)
    s.requires_grad_()
    t.requires_grad_()
    loss = lasnn.attention_loss(s, t, p=p, time_reduce=time_reduce, backend=backend)
    gs, gt = torch.autograd.grad(loss, (s, t))

    def ref(dt):
        sr = s.detach().cpu().to(dt).requires_grad_()
        tr = t.detach().cpu().to(dt).requires_grad_()
        lr = attention_loss_reference(sr, tr, p=p, time_reduce=time_reduce)
        return (lr, *torch.autograd.grad(lr, (sr, tr)))

    r_dt, r64 = ref(dtype), ref(torch.float64)
    assert loss.dim() == 0 and torch.isfinite(loss)
    _assert_bounded("loss", loss, r_dt[0], r64[0], dtype)
    _assert_bounded("grad student", gs, r_dt[1], r64[1], dtype)
    _assert_bounded("grad teacher", gt, r_dt[2], r64[2], dtype)


@pytest.mark.parametrize("backend,device", _backend_params)
@pytest.mark.parametrize("time_reduce", ["mean", "per_step"])
def test_low_precision_inputs_compute_in_fp32(backend, device, time_reduce):
    for dtype in _dtypes(backend):
        if dtype == torch.float64:
            continue
        s, t = _pair("student_larger_2d", dtype=dtype, device=device)
        s.requires_grad_()
        loss = lasnn.attention_loss(s, t, time_reduce=time_reduce, backend=backend)
        assert loss.dtype == torch.float32
        (gs,) = torch.autograd.grad(loss, s)
        assert gs.dtype == dtype
        sr = s.detach().cpu().requires_grad_()
        lr = attention_loss_reference(sr, t.cpu(), time_reduce=time_reduce)
        s64 = s.detach().cpu().double().requires_grad_()
        l64 = attention_loss_reference(s64, t.cpu().double(), time_reduce=time_reduce)
        _assert_bounded(f"loss {_id(dtype)}", loss, lr, l64, dtype)
        g_ref, g64 = torch.autograd.grad(lr, sr)[0], torch.autograd.grad(l64, s64)[0]
        _assert_bounded(f"grad {_id(dtype)}", gs, g_ref, g64, dtype)


@pytest.mark.parametrize("backend,device", _backend_params)
def test_all_zero_spike_maps_give_no_nan(backend, device):
    s = torch.zeros(4, 2, 6, 8, 8, device=device, requires_grad=True)
    t = _randn(2, 5, 8, 8, seed=5, device=device).relu().requires_grad_()
    for time_reduce in ("mean", "per_step"):
        loss = lasnn.attention_loss(s, t, time_reduce=time_reduce, backend=backend)
        gs, gt = torch.autograd.grad(loss, (s, t))
        # A zero map normalises to zeros, so the loss is mean(Q_t^2) = 1 / S.
        torch.testing.assert_close(loss.cpu(), torch.tensor(1 / 64))
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    both = lasnn.attention_loss(s, torch.zeros(2, 5, 8, 8, device=device), backend=backend)
    assert both.item() == 0.0
    q = lasnn.attention_map(torch.zeros(3, 2, 4, 5, 5, device=device), backend=backend)
    assert (q == 0).all()


@pytest.mark.parametrize("backend,device", _backend_params)
def test_noncontiguous_student(backend, device):
    base = _spikes(4, 2, 8, 8, 6, seed=6, device=device)  # channels-last storage
    s = base.permute(0, 1, 4, 2, 3)  # [T, B, C=6, 8, 8], not contiguous
    assert not s.is_contiguous()
    t = _randn(2, 3, 4, 4, seed=7, device=device)
    for time_reduce in ("mean", "per_step"):
        a = s.clone().requires_grad_()  # clone keeps the strides
        b = s.contiguous().requires_grad_()
        la = lasnn.attention_loss(a, t, time_reduce=time_reduce, backend=backend)
        lb = lasnn.attention_loss(b, t, time_reduce=time_reduce, backend=backend)
        torch.testing.assert_close(la, lb, rtol=0, atol=0)
        torch.testing.assert_close(torch.autograd.grad(la, a)[0], torch.autograd.grad(lb, b)[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Properties of the definition (independent of any implementation)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_hand_computed_example(backend):
    if backend == "cpu" and not HAS_CPU_KERNEL:
        pytest.skip("no CPU kernel")
    # One channel, two positions, p = 1: maps (3, 4)/5 and (4, 3)/5, loss = mean(0.2^2, 0.2^2) = 0.04.
    s = torch.tensor([[[3.0, 4.0]]], dtype=torch.float64)
    t = torch.tensor([[[4.0, 3.0]]], dtype=torch.float64)
    assert lasnn.attention_loss(s, t, p=1, backend=backend).item() == pytest.approx(0.04, rel=1e-12)
    # p = 2, two channels: m = mean_c x^2 = ((1+9)/2, (4+16)/2) = (5, 10) -> (1, 2)/sqrt(5).
    f = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64)
    q = lasnn.attention_map(f, 2, backend=backend)
    torch.testing.assert_close(q, torch.tensor([[1.0, 2.0]], dtype=torch.float64) / math.sqrt(5))
    # Time mean first: steps (1, 0) and (3, 0) of one channel average to (2, 0) -> (1, 0).
    ft = torch.tensor([[[[1.0, 0.0]]], [[[3.0, 0.0]]]], dtype=torch.float64)  # [T=2, B=1, C=1, L=2]
    torch.testing.assert_close(lasnn.attention_map(ft, 2, spatial_dims=1, backend=backend),
                               torch.tensor([[1.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_definition_properties(backend):
    if backend == "cpu" and not HAS_CPU_KERNEL:
        pytest.skip("no CPU kernel")
    kw = dict(backend=backend)
    f = _randn(3, 2, 5, 6, 7, seed=8, dtype=torch.float64)
    q = lasnn.attention_map(f, **kw)
    assert q.shape == (2, 42)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(2, dtype=torch.float64))
    # Scale invariance (the map scales by k^p, the normalisation removes it).
    torch.testing.assert_close(lasnn.attention_map(7.5 * f, **kw), q)
    # Identical features: zero loss; the loss is symmetric.
    t = _randn(2, 4, 6, 7, seed=9, dtype=torch.float64)
    assert lasnn.attention_loss(t, t, **kw).item() == pytest.approx(0.0, abs=1e-15)
    s = f[0].contiguous()
    assert lasnn.attention_loss(s, t, **kw).item() == pytest.approx(lasnn.attention_loss(t, s, **kw).item(), rel=1e-12)
    # Pooling: a 2x nearest-upsampled teacher pooled back is the teacher -> zero loss, both directions.
    up = t.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    assert lasnn.attention_loss(up, t, **kw).item() == pytest.approx(0.0, abs=1e-15)
    assert lasnn.attention_loss(t, up, **kw).item() == pytest.approx(0.0, abs=1e-15)
    t1 = _randn(2, 3, 10, seed=10, dtype=torch.float64)
    up1 = torch.stack([t1.repeat_interleave(4, dim=-1)] * 3)  # [T=3, B, C, 40], same every step
    assert lasnn.attention_loss(up1, t1, time_reduce="per_step", **kw).item() == pytest.approx(0.0, abs=1e-15)
    # per_step = mean over t of the single-step losses; identical steps make it equal to "mean".
    st = _spikes(4, 2, 5, 6, 7, seed=11, dtype=torch.float64)
    per = lasnn.attention_loss(st, t, time_reduce="per_step", **kw)
    each = torch.stack([lasnn.attention_loss(st[i], t, **kw) for i in range(4)]).mean()
    torch.testing.assert_close(per, each)
    same = st[:1].expand(4, -1, -1, -1, -1)
    torch.testing.assert_close(lasnn.attention_loss(same, t, time_reduce="per_step", **kw),
                               lasnn.attention_loss(same, t, time_reduce="mean", **kw))
    # The firing-rate map: "mean" uses the time average of the spikes.
    torch.testing.assert_close(lasnn.attention_loss(st, t, **kw), lasnn.attention_loss(st.mean(0), t, **kw))


def test_gradcheck_reference_float64():
    g = torch.Generator().manual_seed(12)
    # Mismatched grids (the student map is pooled), different channels; every p, both time modes.
    for time_reduce, p in (("mean", 2.0), ("per_step", 3.0), ("mean", 1.5)):
        s = torch.rand(2, 2, 3, 4, 4, generator=g, dtype=torch.float64).requires_grad_()
        t = torch.randn(2, 2, 2, 2, generator=g, dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda a, b: attention_loss_reference(a, b, p=p, time_reduce=time_reduce), (s, t),  # noqa: B023
            fast_mode=True,  # a random projection of the Jacobian: the full one is slow on a shared 2-core box
        )
    x = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64).requires_grad_()
    for tm in (True, False):
        assert torch.autograd.gradcheck(lambda a: attention_map_raw_reference(a, 0.7, tm), (x,))  # noqa: B023
    sl = torch.randn(3, 4, 5, generator=g, dtype=torch.float64).requires_grad_()
    tl = torch.randn(4, 5, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kd_loss_reference(a, b, 2.5), (sl, tl))


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no CPU kernel")
def test_gradcheck_fused_cpu_float64():
    g = torch.Generator().manual_seed(13)
    for time_reduce in ("mean", "per_step"):
        s = torch.rand(3, 2, 2, 4, 4, generator=g, dtype=torch.float64).requires_grad_()
        t = torch.randn(2, 2, 2, 2, generator=g, dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda a, b: lasnn.attention_loss(a, b, time_reduce=time_reduce, backend="cpu"), (s, t),  # noqa: B023
            fast_mode=True,
        )
        # The raw fused op alone, full Jacobian (small).
        x = torch.randn(2, 2, 3, 5, generator=g, dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda a: AttentionMapFunction.apply(a, 2.0, time_reduce == "mean", "cpu"), (x,)  # noqa: B023
        )


# ------------------------------------------------------------------------------------------------
# Autograd plumbing, opcheck, torch.compile


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no CPU kernel")
def test_saves_only_the_feature_tensor():
    packed = []

    def pack(t):
        packed.append(t)
        return t

    s = _spikes(4, 2, 6, 5, 5, seed=14)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        AttentionMapFunction.apply(s.flatten(3), 2.0, True, "cpu")
    assert packed == []  # nothing saved without grad
    s.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m = AttentionMapFunction.apply(s.flatten(3), 2.0, True, "cpu")
    assert len(packed) == 1 and packed[0].shape == (4, 2, 6, 25)
    assert m.requires_grad
    # The public op on a teacher without grad saves nothing for the teacher's (fused) map.
    assert not attention_map_raw(torch.ones(1, 2, 3, 4), 2.0, True, "cpu").requires_grad


@pytest.mark.parametrize("backend,device", _backend_params)
def test_opcheck(backend, device):
    fwd, bwd = _raw_ops(backend)
    feat = _randn(3, 2, 4, 10, seed=15, device=device)
    for tm in (True, False):
        for p in (2.0, 0.5):
            torch.library.opcheck(fwd, (feat, p, tm))
            m = fwd(feat, p, tm)
            torch.library.opcheck(bwd, (torch.ones_like(m), feat, p, tm))


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no CPU kernel")
def test_torch_compile_fullgraph():
    s = _spikes(4, 2, 6, 8, 8, seed=16).requires_grad_()
    t = _randn(2, 5, 4, 4, seed=17)

    def f(a, b):
        return lasnn.attention_loss(a, b, time_reduce="mean", backend="cpu")

    torch._dynamo.reset()
    _assert_compiled_matches(torch.compile(f, fullgraph=True, backend="aot_eager"), f, s, t)


def _assert_compiled_matches(cf, f, s, t) -> None:
    """Loss and gradient of ``cf(s, t)`` equal to eager ``f(s, t)``."""
    loss = cf(s, t)
    (g,) = torch.autograd.grad(loss, s)
    loss_e = f(s, t)
    (g_e,) = torch.autograd.grad(loss_e, s)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(g, g_e)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no CPU kernel")
def test_torch_compile_inductor_dynamic_two_sizes_without_recompiling():
    def f(a, b):
        return lasnn.attention_loss(a, b, time_reduce="mean", backend="cpu")

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for i, (shape, tshape) in enumerate((((4, 2, 6, 8, 8), (2, 5, 4, 4)), ((4, 3, 6, 8, 8), (3, 5, 4, 4)))):
        s = _spikes(*shape, seed=20 + i).requires_grad_()
        t = _randn(*tshape, seed=30 + i)
        with torch._dynamo.config.patch(error_on_recompile=bool(i)):
            _assert_compiled_matches(cf, f, s, t)


# ------------------------------------------------------------------------------------------------
# Modules, KD loss, backend selection


def test_attention_transfer_loss_module():
    pairs = [_pair("student_larger_2d", dtype=torch.float32, seed=k) for k in range(2)] + [
        _pair("mismatch_1d", dtype=torch.float32)
    ]
    m = lasnn.nn.AttentionTransferLoss(beta=500.0, time_reduce="per_step")
    want = 500.0 * sum(lasnn.attention_loss(s, t, time_reduce="per_step") for s, t in pairs)
    torch.testing.assert_close(m(pairs), want)
    torch.testing.assert_close(m(*pairs[0]), 500.0 * lasnn.attention_loss(*pairs[0], time_reduce="per_step"))
    assert "beta=500" in repr(m) and "per_step" in repr(m)
    with pytest.raises(ValueError, match="pairs"):
        m([])
    with pytest.raises(ValueError, match="time_reduce"):
        lasnn.nn.AttentionTransferLoss(time_reduce="sum")
    with pytest.raises(ValueError, match="p must be > 0"):
        lasnn.nn.AttentionTransferLoss(p=0)


def test_kd_loss():
    g = torch.Generator().manual_seed(18)
    s = torch.randn(4, 8, 10, generator=g, requires_grad=True)  # [T, B, K]
    t = torch.randn(8, 10, generator=g, requires_grad=True)
    loss = lasnn.kd_loss(s, t)
    ref = kd_loss_reference(s, t, 4.0)
    torch.testing.assert_close(loss, ref)
    gs, gt = torch.autograd.grad(loss, (s, t))
    rs, rt = torch.autograd.grad(ref, (s, t))
    torch.testing.assert_close(gs, rs)
    torch.testing.assert_close(gt, rt)
    # Equal logits: zero loss; [B, K] students work; fp16 logits are computed in fp32.
    assert lasnn.kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(lasnn.kd_loss(s.mean(0), t, 2.0), kd_loss_reference(s.mean(0), t, 2.0))
    assert lasnn.kd_loss(s.half(), t.half()).dtype == torch.float32
    torch.testing.assert_close(lasnn.nn.KDLoss(3.0)(s, t), kd_loss_reference(s, t, 3.0))


def test_auto_backend_accepts_float64_on_cpu():
    s, t = _pair("equal_2d", dtype=torch.float64)
    loss = lasnn.attention_loss(s, t)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, attention_loss_reference(s, t))


def test_explicit_unavailable_backend_raises():
    s, t = _pair("equal_2d", dtype=torch.float32)
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="cuda"):
            lasnn.attention_loss(s, t, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        lasnn.attention_loss(s, t, backend="fastest")


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_errors_name_the_argument():
    s, t = _pair("equal_2d", dtype=torch.float32)
    with pytest.raises(ValueError, match="teacher must be"):
        lasnn.attention_loss(s, t[0, 0])  # 2-D teacher
    with pytest.raises(ValueError, match="teacher"):
        lasnn.attention_loss(s, t.unsqueeze(0))  # 5-D teacher
    with pytest.raises(ValueError, match="student"):
        lasnn.attention_loss(s.flatten(0, 1).flatten(1, 3), t)  # 2-D student
    with pytest.raises(ValueError, match="batch"):
        lasnn.attention_loss(s, t[:1])
    for bad_p in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="p must"):
            lasnn.attention_loss(s, t, p=bad_p)
    with pytest.raises(TypeError, match="p must be a float"):
        lasnn.attention_loss(s, t, p="2")
    with pytest.raises(ValueError, match="time_reduce"):
        lasnn.attention_loss(s, t, time_reduce="sum")
    with pytest.raises(TypeError, match="student"):
        lasnn.attention_loss(s.to(torch.int64), t)
    with pytest.raises(TypeError, match="teacher"):
        lasnn.attention_loss(s, t.to(torch.uint8))
    with pytest.raises(TypeError, match="student"):
        lasnn.attention_loss(s.numpy(), t)
    with pytest.raises(ValueError, match="student must not be empty"):
        lasnn.attention_loss(s[:, :, :0], t)
    with pytest.raises(ValueError, match="feat"):
        lasnn.attention_map(torch.ones(2, 3))
    with pytest.raises(ValueError, match="spatial_dims"):
        lasnn.attention_map(torch.ones(2, 3, 4), spatial_dims=3)
    with pytest.raises(TypeError, match="feat"):
        lasnn.attention_map(torch.ones(2, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="p must"):
        lasnn.attention_map(torch.ones(2, 3, 4), p=-2)
    with pytest.raises(ValueError, match="teacher_logits"):
        lasnn.kd_loss(torch.ones(4, 10), torch.ones(4, 9))
    with pytest.raises(ValueError, match="student_logits"):
        lasnn.kd_loss(torch.ones(10), torch.ones(4, 10))
    with pytest.raises(ValueError, match="temperature"):
        lasnn.kd_loss(torch.ones(4, 10), torch.ones(4, 10), temperature=0.0)
    with pytest.raises(TypeError, match="teacher_logits"):
        lasnn.kd_loss(torch.ones(4, 10), torch.ones(4, 10, dtype=torch.long))


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no CPU kernel")
def test_raw_op_errors_name_the_argument():
    fwd, bwd = _raw_ops("cpu")
    with pytest.raises(ValueError, match="feat must be"):
        fwd(torch.ones(2, 3, 4), 2.0, True)
    with pytest.raises(TypeError, match="feat must be a floating"):
        fwd(torch.ones(1, 2, 3, 4, dtype=torch.int32), 2.0, True)
    with pytest.raises(ValueError, match="p must be"):
        fwd(torch.ones(1, 2, 3, 4), 0.0, True)
    with pytest.raises(ValueError, match="grad_map must have shape"):
        bwd(torch.ones(3, 4), torch.ones(1, 2, 3, 4), 2.0, True)
