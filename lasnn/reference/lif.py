"""Reference multi-step LIF neuron: a plain PyTorch time loop (SpikingJelly's multi-step LIFNode).

Each step, with V starting at ``v_init`` (or 0)::

    charge  H = V + (X - (V - V_reset)) / tau     if decay_input
            H = V - (V - V_reset) / tau + X       otherwise      (V_reset = 0 in the charge for soft reset)
            H = V + X                             when tau = inf (the IF neuron)
    fire    S = (H >= v_threshold)
    reset   V = H - S * v_threshold               soft   (v_reset None)
            V = S * v_reset + (1 - S) * H         hard

Backward: dS/dH is the surrogate of x = H - v_threshold (see ``surrogate_grad_reference``);
``detach_reset`` stops the gradient through S in the reset. Computation is in fp32 for fp16/bf16.
"""

from __future__ import annotations

import math

import torch

SURROGATES: dict[str, int] = {"sigmoid": 0, "atan": 1, "triangle": 2, "rect": 3}


def surrogate_grad_reference(x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """dS/dH evaluated at ``x = H - v_threshold`` (any shape, elementwise).

    sigmoid: a·σ(ax)(1-σ(ax)); atan: a / (2(1 + (π/2·a·x)²)); triangle: max(0, a - a²|x|);
    rect: a·[|x| < 0.5/a].
    """
    if surrogate == "sigmoid":
        s = torch.sigmoid(alpha * x)
        return alpha * s * (1 - s)
    if surrogate == "atan":
        return alpha / (2 * (1 + (math.pi / 2 * alpha * x) ** 2))
    if surrogate == "triangle":
        return torch.clamp(alpha - alpha * alpha * x.abs(), min=0)
    if surrogate == "rect":
        return alpha * (x.abs() < 0.5 / alpha).to(x.dtype)
    raise ValueError(f"surrogate must be one of {sorted(SURROGATES)}, got {surrogate!r}")


class _HeavisideSurrogate(torch.autograd.Function):
    """S = (x >= 0) forward; the surrogate dS/dx backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * surrogate_grad_reference(x, ctx.surrogate, ctx.alpha), None, None


def lif_reference(
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
    return_h: bool = False,
):
    """Reference LIF over time.

    Args:
        x_seq: ``[T, *]`` input current, floating dtype.
        v_init: ``[*]`` initial membrane, or None for zeros.
    Returns:
        ``(spikes [T, *], v_last [*])`` in x's dtype; with ``return_h`` also ``H [T, *]`` (compute dtype),
        which tests use to find near-threshold elements.
    """
    out_dtype = x_seq.dtype
    cdtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    x = x_seq.to(cdtype)
    v = torch.zeros_like(x[0]) if v_init is None else v_init.to(cdtype)
    vr = 0.0 if v_reset is None else float(v_reset)
    if_neuron = math.isinf(tau)
    spikes, hs = [], []
    for t in range(x.shape[0]):
        xt = x[t]
        if if_neuron:
            h = v + xt
        elif decay_input:
            h = v + (xt - (v - vr)) / tau
        else:
            h = v - (v - vr) / tau + xt
        s = _HeavisideSurrogate.apply(h - v_threshold, surrogate, alpha)
        sr = s.detach() if detach_reset else s
        v = h - sr * v_threshold if v_reset is None else sr * vr + (1 - sr) * h
        spikes.append(s)
        hs.append(h)
    if spikes:
        out = torch.stack(spikes).to(out_dtype)
        h_all = torch.stack(hs)
    else:
        out = x_seq.new_empty(x_seq.shape)
        h_all = x.new_empty(x.shape)
    v_last = v.to(out_dtype)
    if return_h:
        return out, v_last, h_all
    return out, v_last
