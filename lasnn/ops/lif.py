"""``lasnn.lif``: the multi-step LIF neuron, fused on every backend.

Op schemas: csrc/ops.cpp (``lasnn::lif_fwd``, ``lasnn::lif_bwd``) and, for Triton,
``lasnn::lif_fwd_triton``/``lasnn::lif_bwd_triton`` (same schemas, registered below by
register_op_pair). Oracle: lasnn/reference/lif.py.
Kernels: csrc/cpu/lif.cpp, csrc/cuda/lif.cu, kernels/lif.py. Tests: tests/test_lif.py.
Bench: benches/bench_lif.py.
"""

from __future__ import annotations

import math

import torch

from lasnn import backends
from lasnn.checks import check_float, check_tensor
from lasnn.ops._common import inverse_permutation, memory_order, register_op_pair
from lasnn.reference.lif import SURROGATES, lif_reference

__all__ = ["LIFFunction", "lif"]

_FWD_SCHEMA = (
    "(Tensor x, Tensor? v_init, float tau, float v_threshold, float v_reset, bool soft_reset, "
    "bool decay_input) -> (Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor grad_spikes, Tensor? grad_v_last, Tensor x, Tensor? v_init, float tau, float v_threshold, "
    "float v_reset, bool soft_reset, bool decay_input, bool detach_reset, int surrogate, float alpha) "
    "-> (Tensor, Tensor)"
)


# The kernels return fresh contiguous tensors whatever the input's strides; the fakes say so (empty_like
# would keep a permuted input's strides).
def _fake_fwd(x, v_init, tau, v_threshold, v_reset, soft_reset, decay_input):
    return x.new_empty(x.shape), x.new_empty(x.shape[1:])


def _fake_bwd(grad_spikes, grad_v_last, x, v_init, *args):
    return x.new_empty(x.shape), x.new_empty(x.shape[1:])


_lib = register_op_pair("lif", _FWD_SCHEMA, _BWD_SCHEMA, _fake_fwd, _fake_bwd, "lif")


def _ops(backend: str):
    if backend == "triton":
        return torch.ops.lasnn.lif_fwd_triton, torch.ops.lasnn.lif_bwd_triton
    return torch.ops.lasnn.lif_fwd, torch.ops.lasnn.lif_bwd


class LIFFunction(torch.autograd.Function):
    """Autograd for the fused LIF: forward op, then backward op from the saved input.

    Saves only ``x`` (and ``v_init``), which autograd holds anyway: the backward recomputes H, the
    spikes and the surrogate, so training costs no extra ``[T, N]`` allocation. Saves nothing when no
    input requires grad.
    """

    @staticmethod
    def forward(ctx, x2d, v_init, tau, v_threshold, v_reset, soft_reset, decay_input, detach_reset, sg, alpha, backend):
        fwd, _ = _ops(backend)
        spikes, v_last = fwd(x2d, v_init, tau, v_threshold, v_reset, soft_reset, decay_input)
        ctx.needs = (ctx.needs_input_grad[0], v_init is not None and ctx.needs_input_grad[1])
        # An unused output (usually v_last) gets None, not a zero tensor that the kernel would read:
        # the ops take None for "zero gradient" (the torch profiler showed that fill at ~0.19 ms for
        # N = 2^20 in a training-like loop).
        ctx.set_materialize_grads(False)
        if any(ctx.needs):
            ctx.save_for_backward(x2d, v_init)
            ctx.args = (tau, v_threshold, v_reset, soft_reset, decay_input, detach_reset, sg, alpha)
            ctx.backend = backend
        return spikes, v_last

    @staticmethod
    def backward(ctx, grad_spikes, grad_v_last):
        x2d, v_init = ctx.saved_tensors
        _, bwd = _ops(ctx.backend)
        if grad_spikes is None:
            grad_spikes = torch.zeros_like(x2d)
        grad_x, grad_v = bwd(grad_spikes, grad_v_last, x2d, v_init, *ctx.args)
        return (
            grad_x if ctx.needs[0] else None,
            grad_v if ctx.needs[1] else None,
            *([None] * 9),
        )


def lif(
    x_seq: torch.Tensor,
    v_init: torch.Tensor | None = None,
    *,
    tau: float = 2.0,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
    surrogate: str = "sigmoid",
    alpha: float = 4.0,
    return_v: bool = False,
    backend: str = "auto",
):
    """Multi-step LIF neuron (SpikingJelly's ``LIFNode`` in multi-step mode), fused.

    Each step: charge ``H = V + (X - (V - V_reset)) / tau`` (``decay_input``) or
    ``H = V - (V - V_reset) / tau + X``; fire ``S = (H >= v_threshold)``; reset ``V = H - S·v_threshold``
    (soft, ``v_reset=None``) or ``V = S·v_reset + (1 - S)·H`` (hard). ``tau=inf`` is the IF neuron
    (``H = V + X``). Gradients use the surrogate of ``H - v_threshold``: ``sigmoid``, ``atan``,
    ``triangle`` or ``rect`` with sharpness ``alpha``; ``detach_reset`` stops the gradient through S in
    the reset. Computation is in fp32 for fp16/bf16 storage.

    Args:
        x_seq: ``[T, *]`` input current, fp16/bf16/fp32/fp64.
        v_init: ``[*]`` initial membrane (same dtype and device), or None for zeros.
        return_v: also return the membrane after the last step, ``[*]``; pass it back as ``v_init`` to
            run a long sequence in chunks.
        backend: ``auto``, ``reference``, ``cpu``, ``triton`` or ``cuda`` (``LASNN_BACKEND`` overrides auto).
    Returns:
        spikes ``[T, *]`` (0/1 in x's dtype), or ``(spikes, v_last)`` with ``return_v``. A dense ``x_seq`` whose
        time dim is outermost in memory (e.g. ``[T, B, C, H, W]`` with channels-last ``[B, C, H, W]`` steps)
        gets outputs with its own strides, without a copy; any other layout is copied to contiguous first and
        gets contiguous outputs.
    """
    check_tensor("x_seq", x_seq, min_dim=1)
    tau = check_float("tau", tau, positive=True, allow_inf=True)
    v_threshold = check_float("v_threshold", v_threshold)
    if v_reset is not None:
        v_reset = check_float("v_reset", v_reset)
    alpha = check_float("alpha", alpha, positive=True)
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {sorted(SURROGATES)}, got {surrogate!r}")
    if v_init is not None:
        if not isinstance(v_init, torch.Tensor):
            raise TypeError(f"v_init must be a torch.Tensor or None, got {type(v_init).__name__}")
        if v_init.shape != x_seq.shape[1:]:
            raise ValueError(
                f"v_init must have shape {tuple(x_seq.shape[1:])} (x_seq.shape[1:]), got {tuple(v_init.shape)}"
            )
        if v_init.dtype != x_seq.dtype:
            raise TypeError(f"v_init must have x_seq's dtype {x_seq.dtype}, got {v_init.dtype}")
        if v_init.device != x_seq.device:
            raise ValueError(f"v_init must be on x_seq's device {x_seq.device}, got {v_init.device}")
    name = backends.resolve_traced("lif", backend, x_seq.device, x_seq.dtype)
    if name == "reference":
        spikes, v_last = lif_reference(
            x_seq, v_init, tau=tau, v_threshold=v_threshold, v_reset=v_reset, decay_input=decay_input,
            detach_reset=detach_reset, surrogate=surrogate, alpha=alpha,
        )
    else:
        T = x_seq.shape[0]
        # A dense input in another memory order (channels-last, time still outermost) runs as it lies: the
        # kernel sees the neurons in memory order (each neuron's dynamics are independent of the others') and
        # the outputs come back with the input's strides, so a channels-last network stays channels-last
        # with no copy on either side (the next convolution and batch norm then take their fast path).
        perm = None if x_seq.is_contiguous() else memory_order(x_seq, fixed=1)
        if perm is not None:
            x_seq = x_seq.permute(perm)
            if v_init is not None:
                v_init = v_init.permute([p - 1 for p in perm[1:]])
        # math.prod, not -1: reshape cannot infer a dimension when T = 0.
        x2d = x_seq.reshape(T, math.prod(x_seq.shape[1:]))
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        v2d = None if v_init is None else v_init.reshape(-1)
        spikes, v_last = LIFFunction.apply(
            x2d, v2d, tau, v_threshold, 0.0 if v_reset is None else v_reset, v_reset is None,
            # tau != inf rather than math.isinf(tau): traceable when torch.compile(dynamic=True) makes tau symbolic
            bool(decay_input) and tau != math.inf, bool(detach_reset), SURROGATES[surrogate], alpha, name,
        )
        spikes = spikes.view(x_seq.shape)
        v_last = v_last.view(x_seq.shape[1:])
        if perm is not None:
            inv = inverse_permutation(perm)
            spikes = spikes.permute(inv)
            v_last = v_last.permute([p - 1 for p in inv[1:]])
    return (spikes, v_last) if return_v else spikes
