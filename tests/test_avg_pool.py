"""``lasnn.ops.avg_pool`` (CPU kernels csrc/cpu/avg_pool.cpp) against its oracle, ATen's average pooling
with stride = kernel: bit-identical forward and backward; the modules and spikify's use of them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lasnn
from lasnn import _ext
from lasnn.nn import AvgPool1d, AvgPool2d
from lasnn.nn.pool import fast_pool
from lasnn.ops.avg_pool import avg_pool, avg_pool_reference

needs_kernel = pytest.mark.skipif(not _ext.c_has_op("avg_pool_fwd"), reason="lasnn._C without lasnn::avg_pool_fwd")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CASES = [  # (input shape, kernel)
    ((4, 3, 28, 28), [2, 2]),
    ((2, 5, 7, 9), [2, 2]),  # odd sizes: the floor mode drops the last row and column
    ((3, 2, 9, 10), [3, 2]),
    ((2, 3, 6, 6), [1, 3]),
    ((1, 1, 5, 5), [5, 5]),  # one window per plane
    ((0, 4, 8, 8), [2, 2]),  # empty batch
    ((4, 3, 40), [2]),
    ((2, 3, 11), [3]),
    ((1, 1, 1), [1]),
]


def _id(case):
    shape, k = case
    return f"{'x'.join(map(str, shape))}-k{'x'.join(map(str, k))}"


def _pair(shape, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    out_shape = avg_pool_reference(x.double(), k).shape
    grad = torch.randn(out_shape, generator=g, dtype=torch.float64).to(dtype)
    return x, grad


def _grads(fn, x, grad):
    xr = x.clone().requires_grad_(True)
    y = fn(xr)
    (gx,) = torch.autograd.grad(y, xr, grad) if y.numel() else (torch.zeros_like(x),)
    return y.detach(), gx


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_bit_identical_to_aten(case, dtype, nan_fill):
    shape, k = case
    x, grad = _pair(shape, k, dtype, seed=len(shape) * 7 + k[0])
    y, gx = _grads(lambda t: avg_pool(t, k), x, grad)
    y_ref, gx_ref = _grads(lambda t: avg_pool_reference(t, k), x, grad)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert torch.equal(y, y_ref), (y - y_ref).abs().max()
    assert torch.equal(gx, gx_ref), (gx - gx_ref).abs().max()
    # the kernel really ran (not the fallback): its backward node is ours
    if x.numel():
        assert type(avg_pool(x.clone().requires_grad_(True), k).grad_fn).__name__ == "AvgPoolFunctionBackward"


CL_CASES = [c for c in CASES if len(c[1]) == 2]


@needs_kernel
@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CL_CASES, ids=_id)
def test_channels_last_is_pooled_as_it_lies(case, dtype, grad_layout, nan_fill):
    """A channels-last input runs the kernel without a copy, gives ATen's values bit for bit and keeps its
    layout in the output and in the input gradient, whatever the incoming gradient's layout."""
    shape, k = case
    x, grad = _pair(shape, k, dtype, seed=len(shape) * 5 + k[1])
    y_ref, gx_ref = _grads(lambda t: avg_pool_reference(t, k), x, grad)
    x = x.contiguous(memory_format=torch.channels_last)
    if grad_layout == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    y, gx = _grads(lambda t: avg_pool(t, k), x, grad)
    assert torch.equal(y, y_ref), (y - y_ref).abs().max()
    assert torch.equal(gx, gx_ref), (gx - gx_ref).abs().max()
    if not x.is_contiguous():  # C = 1 or an empty batch: one memory order for both layouts
        cl = torch.channels_last
        assert y.is_contiguous(memory_format=cl) and gx.is_contiguous(memory_format=cl)
        assert type(avg_pool(x.clone().requires_grad_(True), k).grad_fn).__name__ == "AvgPoolFunctionBackward"


@needs_kernel
def test_channels_last_one_window_per_plane_keeps_the_gradient_layout():
    """A global 2-d pool of a channels-last input: its output ``[N, C, 1, 1]`` is both contiguous and
    channels-last, so the input gradient's layout comes from the recorded input layout, not from the gradient."""
    x = torch.randn(3, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = avg_pool(x, 6)
    assert y.shape == (3, 4, 1, 1) and y.is_contiguous()
    (gx,) = torch.autograd.grad(y, x, torch.randn(3, 4, 1, 1))
    assert gx.is_contiguous(memory_format=torch.channels_last) and not gx.is_contiguous()


@needs_kernel
def test_spike_input_and_rows_dropped_by_floor_get_zero_gradient(nan_fill):
    x = (torch.rand(6, 4, 13, 15, generator=torch.Generator().manual_seed(1)) < 0.3).float().requires_grad_(True)
    y = avg_pool(x, 2)
    assert set(y.unique().tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(gx[..., 12, :], torch.zeros_like(gx[..., 12, :]))
    assert torch.equal(gx[..., :, 14], torch.zeros_like(gx[..., :, 14]))
    assert torch.equal(gx[..., :12, :14], torch.full_like(gx[..., :12, :14], 0.25))


@needs_kernel
def test_expanded_and_non_contiguous_gradients():
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    y = avg_pool(x, 2)
    (g_expanded,) = torch.autograd.grad(y, x, torch.full((), 2.0).expand_as(y), retain_graph=True)
    assert torch.equal(g_expanded, torch.full_like(x, 0.5))
    gt = torch.randn(3, 4, 4, 4).transpose(2, 3)  # non-contiguous
    (g_t,) = torch.autograd.grad(y, x, gt)
    assert torch.equal(g_t, _grads(lambda t: avg_pool_reference(t, 2), x.detach(), gt.contiguous())[1])


def test_non_contiguous_input_and_other_devices_use_aten():
    x = torch.randn(2, 3, 8, 10).transpose(2, 3)  # [2, 3, 10, 8], non-contiguous
    y = avg_pool(x.requires_grad_(True), [2, 2])
    assert torch.equal(y, avg_pool_reference(x.detach(), [2, 2]))
    assert "AvgPoolFunction" not in type(y.grad_fn).__name__


@needs_kernel
def test_saves_nothing_for_backward():
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(8, 4, 16, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        avg_pool(x, 2)
    assert saved == []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        avg_pool_reference(x, 2)
    assert saved, "ATen's pool saves its input (the check above would not catch a saving kernel otherwise)"


@needs_kernel
def test_opcheck():
    x = torch.randn(2, 3, 6, 7)
    torch.library.opcheck(torch.ops.lasnn.avg_pool_fwd.default, (x, [2, 2]))
    torch.library.opcheck(torch.ops.lasnn.avg_pool_fwd.default, (torch.randn(2, 3, 9), [3]))
    g = torch.randn(2, 3, 3, 3)
    torch.library.opcheck(torch.ops.lasnn.avg_pool_bwd.default, (g, [2, 3, 6, 7], [2, 2]))
    cl = torch.channels_last
    torch.library.opcheck(torch.ops.lasnn.avg_pool_fwd.default, (x.contiguous(memory_format=cl), [2, 2]))
    torch.library.opcheck(torch.ops.lasnn.avg_pool_bwd.default, (g, [2, 3, 6, 7], [2, 2], True))
    torch.library.opcheck(torch.ops.lasnn.avg_pool_bwd.default, (g.contiguous(memory_format=cl), [2, 3, 6, 7], [2, 2],
                                                                 True))


@needs_kernel
def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(x):
        return avg_pool(x * 2.0, 2).sum(dim=(2, 3))

    x = torch.randn(4, 3, 8, 8)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager = f(xe)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(xc)
    assert torch.equal(compiled, eager)
    eager.sum().backward()
    compiled.sum().backward()
    assert torch.equal(xc.grad, xe.grad)


@needs_kernel
def test_raw_op_errors_name_the_argument():
    with pytest.raises(ValueError, match="kernel must have 1 or 2 sizes"):
        torch.ops.lasnn.avg_pool_fwd(torch.randn(2, 3, 4, 4), [2, 2, 2])
    with pytest.raises(ValueError, match="smaller than the kernel"):
        torch.ops.lasnn.avg_pool_fwd(torch.randn(2, 3, 1, 4), [2, 2])
    with pytest.raises(ValueError, match="grad_out must have sizes"):
        torch.ops.lasnn.avg_pool_bwd(torch.randn(2, 3, 3, 3), [2, 3, 8, 8], [2, 2])
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        torch.ops.lasnn.avg_pool_fwd(torch.ones(2, 3, 4, 4, dtype=torch.int64), [2, 2])
    with pytest.raises(ValueError, match="channels_last needs a 2-d pool of a 4-d input"):
        torch.ops.lasnn.avg_pool_bwd(torch.randn(2, 3, 4), [2, 3, 8], [2], True)


def test_python_errors_name_the_argument():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        avg_pool(torch.ones(2, 3, 4, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"x must be \[N, C, L\] or \[N, C, H, W\]"):
        avg_pool(torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1 or 2 such ints"):
        avg_pool(torch.randn(1, 1, 4, 4), [2, 2, 2])
    with pytest.raises(ValueError, match="kernel_size must be"):
        avg_pool(torch.randn(1, 1, 4, 4), 0)
    with pytest.raises(ValueError, match="smaller than kernel_size"):
        avg_pool(torch.randn(1, 1, 4, 4), 5)


# ---------------------------------------------------------------------------------------------
# modules and spikify


@pytest.mark.parametrize(
    "torch_pool",
    [nn.AvgPool2d(2), nn.AvgPool2d((2, 3)), nn.AvgPool2d(2, stride=1), nn.AvgPool2d(3, padding=1),
     nn.AvgPool2d(2, ceil_mode=True), nn.AvgPool2d(2, divisor_override=3), nn.AvgPool1d(2), nn.AvgPool1d(3, 2)],
    ids=repr,
)
def test_modules_compute_what_torch_pools_do(torch_pool):
    dims = 1 if isinstance(torch_pool, nn.AvgPool1d) else 2
    shape = (3, 4, 11) if dims == 1 else (3, 4, 11, 9)
    cls = AvgPool1d if dims == 1 else AvgPool2d
    args = [torch_pool.kernel_size, torch_pool.stride, torch_pool.padding, torch_pool.ceil_mode,
            torch_pool.count_include_pad] + ([torch_pool.divisor_override] if dims == 2 else [])
    ours = cls(*args)
    x = torch.randn(shape)
    y = _grads(ours, x, torch.randn(torch_pool(x).shape))[0]
    y_ref = _grads(torch_pool, x, torch.randn(torch_pool(x).shape))[0]
    assert torch.equal(y, y_ref)
    gref = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_grads(ours, x, gref)[1], _grads(torch_pool, x, gref)[1])
    assert repr(ours) == repr(torch_pool)
    assert torch.equal(ours(x[0]), torch_pool(x[0]))  # unbatched input: torch's own forward
    tiles = fast_pool(torch_pool)
    plain = torch_pool.padding in (0, (0,)) and not torch_pool.ceil_mode and torch_pool.stride in (
        torch_pool.kernel_size, (torch_pool.kernel_size,) if dims == 1 else torch_pool.kernel_size)
    if dims == 2:
        plain = plain and torch_pool.divisor_override is None
    assert (tiles is not None) == plain, (tiles, plain)


def test_fast_pool_leaves_hooked_and_other_modules():
    hooked = nn.AvgPool2d(2)
    hooked.register_forward_hook(lambda *a: None)
    assert fast_pool(hooked) is None
    assert fast_pool(nn.MaxPool2d(2)) is None
    assert fast_pool(AvgPool2d(2)) is None
    assert isinstance(fast_pool(nn.AvgPool2d(2)), AvgPool2d)


def _torch_pools(snn: nn.Module) -> nn.Module:
    """The same SNN with ATen's pools back in place of lasnn's."""
    for parent in list(snn.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, AvgPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride))
            elif isinstance(child, AvgPool1d):
                setattr(parent, name, nn.AvgPool1d(child.kernel_size, child.stride))
    return snn


@needs_kernel
@pytest.mark.parametrize("model", ["fashion_cnn_small", "mnist1d_cnn_small"])
def test_spikify_uses_them_with_identical_training_step(model):
    from lasnn.models import create, model_info

    info = model_info(model)
    torch.manual_seed(0)
    ann = create(model)
    snn = lasnn.spikify(ann, T=2)
    pools = [m for m in snn.modules() if isinstance(m, (AvgPool1d, AvgPool2d))]
    assert len(pools) == 2 and not any(isinstance(m, (AvgPool1d, AvgPool2d)) for m in ann.modules())
    import copy

    plain = _torch_pools(copy.deepcopy(snn))
    x = torch.randn(8, *info.input_shape, generator=torch.Generator().manual_seed(2)) * 3
    outs, grads = [], []
    for net in (snn, plain):
        net.zero_grad()
        out = net(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in net.parameters()])
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_fx_symbolic_trace_sees_torch_pooling():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), AvgPool2d(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 2))
    traced = torch.fx.symbolic_trace(net)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(traced(x), net(x))
