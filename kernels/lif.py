"""Triton kernels of the fused multi-step LIF neuron (forward and backward from the saved input).

Recurrence per neuron, V_0 = v_init (or 0), computed in fp32 whatever the storage dtype::

    H_t = V + (X_t - (V - V_r)) / tau     (decay_input)      H_t = V - (V - V_r) / tau + X_t  (otherwise)
    S_t = [H_t >= V_th]                                       (V_r counts as 0 in the charge for soft reset)
    V   = H_t - S_t V_th                  (soft reset)        V   = S_t V_r + (1 - S_t) H_t    (hard reset)

Backward (surrogate dS/dH = sg(H - V_th)), walking t = T-1 .. 0 with g_V = dL/dV_t::

    dV/dH = 1 - V_th sg (soft) | 1 - S + (V_r - H) sg (hard); the sg terms are dropped with detach_reset
    g_H = g_S sg + g_V dV/dH;   dL/dX_t = g_H / tau (decay_input) or g_H;   g_V <- g_H (1 - 1/tau)

The same arithmetic as csrc/lasnn_math.h (C++ CPU/CUDA); oracle: lasnn/reference/lif.py.

Design: one program owns BLOCK neurons for the whole sequence and loops over T inside, membrane in
registers. Forward traffic is the minimum (read x, write spikes). The backward needs H_t in reverse
order, and a Triton program cannot index its registers by a run-time t. Two kernels:

- ``_lif_bwd_regs_kernel`` (T <= 32, the common case: SNNs run T = 1..16): the time loop is unrolled
  over a tile TC = next power of two >= T (a block size, so at most 6 variants; T stays a run-time
  argument and steps t >= T are masked). H_t is kept in a tuple of registers, so the backward moves
  the minimum: read x and grad_spikes, write grad_x (fp32 12 bytes per element, fp16/bf16 6).
- ``_lif_bwd_kernel`` (longer sequences): recompute H forward and store it in global memory, then read
  it back in the reverse loop: in the grad_x buffer itself for fp32 (each element is read right
  before being overwritten with dL/dX_t), in an fp32 [T, N] scratch for fp16/bf16 (rounding H to 16
  bits would flip spikes just below the threshold). Bytes per element: fp32 20 (x, H write, H read,
  grad_spikes, grad_x) against the minimum 12; fp16/bf16 14 against 6.

Launchers validate; kernels trust their inputs. Only block sizes (BLOCK, TC) and code-path flags are
constexpr (T, N, thresholds, tau and alpha are run-time arguments, so they never trigger a recompile;
T is also exempt from Triton's value specialisation). Offsets are int64 (pointers advance by N from an
int64 base, or t * N is formed in int64), so they never overflow 32 bits.
"""

from __future__ import annotations

import math
import os

import torch

from . import device_ctx

try:
    import triton
    import triton.language as tl
except Exception:  # lasnn.kernels must import without Triton; lasnn.backends reports why
    triton = None
    tl = None

__all__ = ["lif_bwd_triton", "lif_fwd_triton"]

_BLOCK = 1024
_NUM_WARPS = 4
# Longest sequence whose backward keeps H in registers (_lif_bwd_regs_kernel); longer ones use the
# global H scratch (_lif_bwd_kernel).
_MAX_TC = 32

if triton is not None:

    @triton.jit
    def _surrogate_grad(x, alpha, SURROGATE: tl.constexpr):
        """dS/dH at x = H - V_th: 0 sigmoid, 1 atan, 2 triangle, 3 rect (csrc/lasnn_math.h surrogate_grad)."""
        if SURROGATE == 0:
            s = tl.sigmoid(alpha * x)
            g = alpha * s * (1.0 - s)
        elif SURROGATE == 1:
            z = 1.5707963267948966 * alpha * x
            g = alpha / (2.0 * (1.0 + z * z))
        elif SURROGATE == 2:
            g = alpha - alpha * alpha * tl.abs(x)
            g = tl.where(g > 0.0, g, tl.where(x != x, x, 0.0))  # keep NaN, like the C++ kernels
        else:
            g = tl.where(tl.abs(x) < 0.5 / alpha, alpha, tl.where(x != x, x, 0.0))
        return g

    @triton.jit
    def _load_or_zero(ptr, offs, mask, HAS: tl.constexpr, BLOCK: tl.constexpr):
        """[BLOCK] fp32 values of an optional [N] tensor (v_init, grad_v_last); zeros when absent."""
        if HAS:
            r = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            r = tl.zeros([BLOCK], dtype=tl.float32)
        return r

    @triton.jit
    def _charge(v, x, inv_tau, v_r, DECAY_INPUT: tl.constexpr):
        # v_r is 0 for soft reset (the launcher passes it so).
        if DECAY_INPUT:
            h = v + (x - (v - v_r)) * inv_tau
        else:
            h = v - (v - v_r) * inv_tau + x
        return h

    @triton.jit
    def _fire_reset(h, v_th, v_r, SOFT_RESET: tl.constexpr):
        """S = [H >= V_th] and the membrane after the reset."""
        s = tl.where(h >= v_th, 1.0, 0.0)
        if SOFT_RESET:
            v = h - s * v_th
        else:
            v = s * v_r + (1.0 - s) * h
        return s, v

    @triton.jit
    def _backward_step(
        h,
        gs,
        gv,
        inv_tau,
        v_th,
        v_r,
        alpha,
        SOFT_RESET: tl.constexpr,
        DECAY_INPUT: tl.constexpr,
        DETACH_RESET: tl.constexpr,
        SURROGATE: tl.constexpr,
    ):
        """One reverse step (csrc/lasnn_math.h lif_backward_step): returns (dL/dX_t, dL/dV_{t-1})."""
        sg = _surrogate_grad(h - v_th, alpha, SURROGATE)
        if SOFT_RESET:
            if DETACH_RESET:
                dvdh = 1.0
            else:
                dvdh = 1.0 - v_th * sg
        else:
            s = tl.where(h >= v_th, 1.0, 0.0)
            if DETACH_RESET:
                dvdh = 1.0 - s
            else:
                dvdh = 1.0 - s + (v_r - h) * sg
        gh = gs * sg + gv * dvdh
        if DECAY_INPUT:
            gx = gh * inv_tau
        else:
            gx = gh
        return gx, gh * (1.0 - inv_tau)

    @triton.jit(do_not_specialize=["T"])
    def _lif_fwd_kernel(
        x_ptr,  # [T, N] contiguous
        v0_ptr,  # [N] (unused unless HAS_V0)
        s_ptr,  # [T, N] out: spikes in x's dtype
        vl_ptr,  # [N] out: membrane after the last step
        T,
        N,
        inv_tau,
        v_th,
        v_r,  # hard-reset value (0 for soft reset: it also enters the charge)
        HAS_V0: tl.constexpr,
        SOFT_RESET: tl.constexpr,
        DECAY_INPUT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Forward: spikes [T, N] and v_last [N] from x [T, N] and v_init [N]."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        v = _load_or_zero(v0_ptr, offs, mask, HAS_V0, BLOCK)
        row = offs  # t * N + n, int64
        for _ in range(T):
            x = tl.load(x_ptr + row, mask=mask, other=0.0).to(tl.float32)
            h = _charge(v, x, inv_tau, v_r, DECAY_INPUT)
            s, v = _fire_reset(h, v_th, v_r, SOFT_RESET)
            tl.store(s_ptr + row, s.to(s_ptr.dtype.element_ty), mask=mask)
            row += N
        tl.store(vl_ptr + offs, v.to(vl_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["T"])
    def _lif_bwd_kernel(
        gs_ptr,  # [T, N] dL/dS, contiguous; with GS_BCAST one value per step, at gs_ptr + t * gs_st
        gvl_ptr,  # [N] dL/dV_T (unused unless HAS_GVL)
        x_ptr,  # [T, N] saved input
        v0_ptr,  # [N] (unused unless HAS_V0)
        gx_ptr,  # [T, N] out: dL/dX
        gv0_ptr,  # [N] out: dL/dv_init
        h_ptr,  # [T, N] fp32 scratch for H (may be gx_ptr itself when x is fp32)
        T,
        N,
        gs_st,  # step stride of grad_spikes (read only with GS_BCAST)
        inv_tau,
        v_th,
        v_r,
        alpha,
        HAS_V0: tl.constexpr,
        HAS_GVL: tl.constexpr,
        SOFT_RESET: tl.constexpr,
        DECAY_INPUT: tl.constexpr,
        DETACH_RESET: tl.constexpr,
        SURROGATE: tl.constexpr,  # a 4-way code-path switch, like the booleans
        GS_BCAST: tl.constexpr,  # grad_spikes is an expanded view with neuron stride 0
        BLOCK: tl.constexpr,
    ):
        """Backward: grad_x [T, N], grad_v_init [N] from grad_spikes [T, N], grad_v_last [N], x, v_init."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        v = _load_or_zero(v0_ptr, offs, mask, HAS_V0, BLOCK)
        row = offs
        gst64 = gs_st.to(tl.int64)
        grow = gst64 * T  # grad_spikes' offset one step past the end (GS_BCAST)
        for _ in range(T):
            x = tl.load(x_ptr + row, mask=mask, other=0.0).to(tl.float32)
            h = _charge(v, x, inv_tau, v_r, DECAY_INPUT)
            tl.store(h_ptr + row, h, mask=mask)
            _, v = _fire_reset(h, v_th, v_r, SOFT_RESET)
            row += N
        # The H written above is read back below by this program; the barrier makes those global
        # writes visible across the program's threads whatever layout the compiler picks.
        tl.debug_barrier()
        gv = _load_or_zero(gvl_ptr, offs, mask, HAS_GVL, BLOCK)
        for _ in range(T):
            row -= N
            h = tl.load(h_ptr + row, mask=mask, other=0.0)
            if GS_BCAST:
                grow -= gst64
                gs = tl.load(gs_ptr + grow).to(tl.float32)  # one value for the step, broadcast over neurons
            else:
                gs = tl.load(gs_ptr + row, mask=mask, other=0.0).to(tl.float32)
            gx, gv = _backward_step(
                h, gs, gv, inv_tau, v_th, v_r, alpha, SOFT_RESET, DECAY_INPUT, DETACH_RESET, SURROGATE
            )
            tl.store(gx_ptr + row, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gv0_ptr + offs, gv.to(gv0_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["T"])
    def _lif_bwd_regs_kernel(
        gs_ptr,  # [T, N] dL/dS, contiguous; with GS_BCAST one value per step, at gs_ptr + t * gs_st
        gvl_ptr,  # [N] dL/dV_T (unused unless HAS_GVL)
        x_ptr,  # [T, N] saved input
        v0_ptr,  # [N] (unused unless HAS_V0)
        gx_ptr,  # [T, N] out: dL/dX
        gv0_ptr,  # [N] out: dL/dv_init
        T,  # run-time, 1 <= T <= TC
        N,
        gs_st,
        inv_tau,
        v_th,
        v_r,
        alpha,
        HAS_V0: tl.constexpr,
        HAS_GVL: tl.constexpr,
        SOFT_RESET: tl.constexpr,
        DECAY_INPUT: tl.constexpr,
        DETACH_RESET: tl.constexpr,
        SURROGATE: tl.constexpr,
        GS_BCAST: tl.constexpr,
        TC: tl.constexpr,  # time tile: a power of two >= T (a block size; T itself stays run-time)
        BLOCK: tl.constexpr,
    ):
        """Backward for T <= TC with H_t held in registers (a tuple filled by an unrolled time loop), so it
        moves the minimum: read x and grad_spikes, write grad_x. Steps t >= T are masked: no memory
        traffic, and they leave dL/dV untouched."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        n64 = N.to(tl.int64)  # so that t * N cannot overflow 32 bits
        gst64 = gs_st.to(tl.int64)
        v = _load_or_zero(v0_ptr, offs, mask, HAS_V0, BLOCK)
        hs = ()
        for t in tl.static_range(TC):
            x = tl.load(x_ptr + offs + t * n64, mask=mask & (t < T), other=0.0).to(tl.float32)
            h = _charge(v, x, inv_tau, v_r, DECAY_INPUT)
            _, v = _fire_reset(h, v_th, v_r, SOFT_RESET)
            hs = hs + (h,)  # noqa: RUF005  (the Triton frontend concatenates tuples; no starred unpacking)
        gv = _load_or_zero(gvl_ptr, offs, mask, HAS_GVL, BLOCK)
        for r in tl.static_range(TC - 1, -1, -1):
            live = r < T
            row = offs + r * n64
            if GS_BCAST:  # a dead step (r >= T) reads step 0, a valid address; its result is not used
                gs = tl.load(gs_ptr + tl.where(live, r * gst64, 0)).to(tl.float32)
            else:
                gs = tl.load(gs_ptr + row, mask=mask & live, other=0.0).to(tl.float32)
            gx, gv_prev = _backward_step(
                hs[r], gs, gv, inv_tau, v_th, v_r, alpha, SOFT_RESET, DECAY_INPUT, DETACH_RESET, SURROGATE
            )
            gv = tl.where(live, gv_prev, gv)
            tl.store(gx_ptr + row, gx.to(gx_ptr.dtype.element_ty), mask=mask & live)
        tl.store(gv0_ptr + offs, gv.to(gv0_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------
# Launchers


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_scalar(op: str, name: str, value: object, *, positive: bool = False, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not (allow_inf and v > 0)) or (positive and v <= 0):
        expected = "> 0" if positive else "finite"
        if allow_inf:
            expected += " (inf allowed)"
        raise ValueError(f"{op}: {name} must be {expected}, got {v}")
    return v


def _check_inputs(op: str, x: object, v_init: object, tau: object, v_threshold: object, v_reset: object) -> None:
    """Validate what both launchers share; messages name the argument and what was expected."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [T, N] (the caller flattens), got shape {tuple(x.shape)}")
    if x.device.type == "cuda":
        allowed = (torch.float32, torch.float16, torch.bfloat16)
    elif x.device.type == "cpu" and _interpret():
        # bf16 is not a supported interpreter dtype (DESIGN.md; lasnn.backends excludes it there too).
        allowed = (torch.float32, torch.float16)
    else:
        raise ValueError(
            f"{op}: x must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got one on {x.device}"
        )
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: x must be {names} on {x.device.type}, got {x.dtype}")
    if v_init is not None:
        if not isinstance(v_init, torch.Tensor):
            raise TypeError(f"{op}: v_init must be a torch.Tensor or None, got {type(v_init).__name__}")
        if v_init.shape != (x.shape[1],):
            raise ValueError(f"{op}: v_init must be [N] = [{x.shape[1]}], got shape {tuple(v_init.shape)}")
        if v_init.dtype != x.dtype:
            raise TypeError(f"{op}: v_init must have x's dtype {x.dtype}, got {v_init.dtype}")
        if v_init.device != x.device:
            raise ValueError(f"{op}: v_init must be on x's device {x.device}, got {v_init.device}")
    _check_scalar(op, "tau", tau, positive=True, allow_inf=True)
    _check_scalar(op, "v_threshold", v_threshold)
    _check_scalar(op, "v_reset", v_reset)


def _require_triton(op: str) -> None:
    if triton is None:
        raise RuntimeError(f"{op}: triton is not importable")


def _params(tau: float, v_reset: float, soft_reset: bool, decay_input: bool) -> tuple[float, float, bool]:
    """(1/tau, V_r as used by the kernels, decay_input) exactly as csrc/cpu/lif.cpp derives them."""
    inf = math.isinf(tau)
    inv_tau = 0.0 if inf else 1.0 / tau
    v_r = 0.0 if soft_reset else float(v_reset)
    return inv_tau, v_r, bool(decay_input) and not inf


def lif_fwd_triton(
    x: torch.Tensor,
    v_init: torch.Tensor | None,
    tau: float,
    v_threshold: float,
    v_reset: float,
    soft_reset: bool,
    decay_input: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LIF forward (implementation of ``lasnn::lif_fwd_triton``).

    Args:
        x: ``[T, N]`` input current (fp32/fp16/bf16 on CUDA; fp32/fp16 on CPU under TRITON_INTERPRET=1).
        v_init: ``[N]`` initial membrane in x's dtype and device, or None for zeros.
        tau: membrane time constant (> 0; ``inf`` is the IF neuron).
        v_threshold: firing threshold. v_reset: hard-reset value (ignored when ``soft_reset``).
        soft_reset: reset by subtracting the threshold. decay_input: ``H = V + (X - (V - V_r)) / tau``.
    Returns:
        ``(spikes [T, N] in x's dtype, v_last [N])``.
    """
    op = "lasnn::lif_fwd_triton"
    _check_inputs(op, x, v_init, tau, v_threshold, v_reset)
    _require_triton(op)
    x = x.contiguous()
    T, N = x.shape
    spikes = torch.empty_like(x)
    if v_init is not None:
        v_init = v_init.contiguous()
    if T == 0 or N == 0:
        v_last = v_init.clone() if v_init is not None else x.new_zeros(N)
        return spikes, v_last
    v_last = torch.empty(N, dtype=x.dtype, device=x.device)
    inv_tau, v_r, decay = _params(float(tau), float(v_reset), bool(soft_reset), bool(decay_input))
    grid = (triton.cdiv(N, _BLOCK),)
    with device_ctx(x):
        _lif_fwd_kernel[grid](
            x,
            v_init if v_init is not None else x,
            spikes,
            v_last,
            T,
            N,
            inv_tau,
            float(v_threshold),
            v_r,
            HAS_V0=v_init is not None,
            SOFT_RESET=bool(soft_reset),
            DECAY_INPUT=decay,
            BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
        )
    return spikes, v_last


def lif_bwd_triton(
    grad_spikes: torch.Tensor,
    grad_v_last: torch.Tensor | None,
    x: torch.Tensor,
    v_init: torch.Tensor | None,
    tau: float,
    v_threshold: float,
    v_reset: float,
    soft_reset: bool,
    decay_input: bool,
    detach_reset: bool,
    surrogate: int,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LIF backward from the saved input (implementation of ``lasnn::lif_bwd_triton``).

    Args:
        grad_spikes: ``[T, N]`` dL/dspikes (cast to x's dtype); an expanded view with neuron stride 0 (what
            ``spikes.sum()`` or ``spikes.mean()`` send back) is read in place, anything else made contiguous.
        grad_v_last: ``[N]`` dL/dv_last or None (zeros).
        x, v_init, tau, v_threshold, v_reset, soft_reset, decay_input: as given to :func:`lif_fwd_triton`.
        detach_reset: drop the surrogate term of the reset. surrogate: 0 sigmoid, 1 atan, 2 triangle, 3 rect.
        alpha: surrogate sharpness (> 0).
    Returns:
        ``(grad_x [T, N], grad_v_init [N])`` in x's dtype.
    """
    op = "lasnn::lif_bwd_triton"
    _check_inputs(op, x, v_init, tau, v_threshold, v_reset)
    _require_triton(op)
    if not isinstance(grad_spikes, torch.Tensor):
        raise TypeError(f"{op}: grad_spikes must be a torch.Tensor, got {type(grad_spikes).__name__}")
    if grad_spikes.shape != x.shape:
        raise ValueError(f"{op}: grad_spikes must match x's shape {tuple(x.shape)}, got {tuple(grad_spikes.shape)}")
    if grad_spikes.device != x.device:
        raise ValueError(f"{op}: grad_spikes must be on x's device {x.device}, got {grad_spikes.device}")
    if isinstance(surrogate, bool) or not isinstance(surrogate, int) or not 0 <= surrogate <= 3:
        raise ValueError(f"{op}: surrogate must be an int in 0..3 (sigmoid, atan, triangle, rect), got {surrogate!r}")
    alpha = _check_scalar(op, "alpha", alpha, positive=True)
    T, N = x.shape
    if grad_v_last is not None:
        if not isinstance(grad_v_last, torch.Tensor):
            raise TypeError(f"{op}: grad_v_last must be a torch.Tensor or None, got {type(grad_v_last).__name__}")
        if grad_v_last.shape != (N,):
            raise ValueError(f"{op}: grad_v_last must be [N] = [{N}], got shape {tuple(grad_v_last.shape)}")
        if grad_v_last.device != x.device:
            raise ValueError(f"{op}: grad_v_last must be on x's device {x.device}, got {grad_v_last.device}")
        grad_v_last = grad_v_last.to(x.dtype).contiguous()
    x = x.contiguous()
    # A stride-0 view stays one value per step: a [T, N] copy of it costs a fifth of the backward.
    gs = grad_spikes.to(x.dtype)
    gs_bcast = N > 1 and gs.stride(1) == 0
    if gs_bcast:
        gs_st = gs.stride(0) if T > 1 else 0
    else:
        gs, gs_st = gs.contiguous(), N
    if v_init is not None:
        v_init = v_init.contiguous()
    grad_x = torch.empty_like(x)
    if T == 0 or N == 0:
        # No step to go through: dL/dv_init = dL/dv_last (a fresh tensor: op outputs never alias inputs).
        grad_v = grad_v_last.clone() if grad_v_last is not None else x.new_zeros(N)
        return grad_x, grad_v
    grad_v = torch.empty(N, dtype=x.dtype, device=x.device)
    inv_tau, v_r, decay = _params(float(tau), float(v_reset), bool(soft_reset), bool(decay_input))
    flags = dict(
        HAS_V0=v_init is not None,
        HAS_GVL=grad_v_last is not None,
        SOFT_RESET=bool(soft_reset),
        DECAY_INPUT=decay,
        DETACH_RESET=bool(detach_reset),
        SURROGATE=int(surrogate),
        GS_BCAST=gs_bcast,
    )
    if T <= _MAX_TC:
        # H in registers: TC x (BLOCK / threads) fp32 per thread, kept at 32 by shrinking BLOCK as TC grows.
        tc = triton.next_power_of_2(T)
        block = max(128, min(_BLOCK, 4096 // tc))
        with device_ctx(x):
            _lif_bwd_regs_kernel[(triton.cdiv(N, block),)](
                gs,
                grad_v_last if grad_v_last is not None else x,
                x,
                v_init if v_init is not None else x,
                grad_x,
                grad_v,
                T,
                N,
                gs_st,
                inv_tau,
                float(v_threshold),
                v_r,
                alpha,
                **flags,
                TC=tc,
                BLOCK=block,
                num_warps=_NUM_WARPS,
            )
        return grad_x, grad_v
    hbuf = grad_x if x.dtype == torch.float32 else torch.empty((T, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, _BLOCK),)
    with device_ctx(x):
        _lif_bwd_kernel[grid](
            gs,
            grad_v_last if grad_v_last is not None else x,
            x,
            v_init if v_init is not None else x,
            grad_x,
            grad_v,
            hbuf,
            T,
            N,
            gs_st,
            inv_tau,
            float(v_threshold),
            v_r,
            alpha,
            **flags,
            BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
        )
    return grad_x, grad_v
