"""Triton kernels of the raw attention map (forward) and its gradient (backward).

    feat [T, B, C, S] -> time_mean: m[b, s]    = 1/C sum_c |1/T sum_t feat[t, b, c, s]|^p
                         per step:  m[t, b, s] = 1/C sum_c |feat[t, b, c, s]|^p
    backward:           grad_feat = grad_m / (C T) * p |mean_t feat|^(p-1) sign(.)   (same for every t:
                                    one [1, B, C, S] slab is written and returned expanded over T)
                                  = grad_m[t] / C  * p |feat_t|^(p-1) sign(.)         (per step)

One program per (row, spatial block): rows are b (time mean) or t*B + b (per step, where T' = 1 since
[T, B, C, S] contiguous is [T*B, C, S]); it loops over C and T with fp32 accumulators, so the features
are read once and no temporary of their size exists. The exponent is specialised (POW = 1, 2, 3, or 0
for a general p through exp2/log2). Pointers advance by increments so offsets stay 64-bit.
Oracle: lasnn/reference/attention.py; C++ twins: csrc/cpu/attention.cpp, csrc/cuda/attention.cu.
Launchers validate; kernels trust their inputs.
"""

from __future__ import annotations

import math

import torch

from . import device_ctx

try:
    import triton
    import triton.language as tl
except Exception:  # lasnn.kernels must import without Triton; lasnn.backends reports why
    triton = None
    tl = None

__all__ = ["attention_map_bwd_triton", "attention_map_fwd_triton"]


def _pow_kind(p: float) -> int:
    return {1.0: 1, 2.0: 2, 3.0: 3}.get(float(p), 0)


if triton is not None:

    @triton.jit
    def _abs_pow(x, p, POW: tl.constexpr):
        a = tl.abs(x)
        if POW == 1:
            r = a
        elif POW == 2:
            r = x * x
        elif POW == 3:
            r = a * x * x
        else:
            # a^p = 2^(p log2 a); a = 0 gives 2^-inf = 0, made explicit to avoid relying on it.
            r = tl.where(a > 0, tl.exp2(p * tl.log2(tl.where(a > 0, a, 1.0))), 0.0)
        return r

    @triton.jit
    def _abs_pow_grad(x, p, POW: tl.constexpr):
        # d|x|^p/dx = p |x|^(p-1) sign(x), 0 at x = 0 for every p > 0.
        sgn = (x > 0).to(tl.float32) - (x < 0).to(tl.float32)
        if POW == 1:
            r = sgn
        elif POW == 2:
            r = 2.0 * x
        elif POW == 3:
            r = 3.0 * x * tl.abs(x)
        else:
            a = tl.abs(x)
            r = tl.where(a > 0, p * tl.exp2((p - 1.0) * tl.log2(tl.where(a > 0, a, 1.0))) * sgn, 0.0)
        return r

    @triton.jit
    def _time_sum(pc, mask, TT, tstride, BLOCK: tl.constexpr):
        """[BLOCK] fp32 sum over the TT steps (tstride apart) of the values at pc."""
        tm = tl.zeros([BLOCK], dtype=tl.float32)
        pt = pc
        for _t in range(0, TT):
            tm += tl.load(pt, mask=mask, other=0.0).to(tl.float32)
            pt += tstride
        return tm

    @triton.jit
    def _attention_map_fwd_kernel(
        x_ptr, out_ptr, C, S, TT, tstride, p, inv_c, inv_t, POW: tl.constexpr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        pc = x_ptr + row * C * S + offs
        for _c in range(0, C):
            tm = _time_sum(pc, mask, TT, tstride, BLOCK)
            acc += _abs_pow(tm * inv_t, p, POW)
            pc += S
        tl.store(out_ptr + row * S + offs, acc * inv_c, mask=mask)

    @triton.jit
    def _attention_map_bwd_kernel(
        g_ptr, x_ptr, gx_ptr, C, S, TT, tstride, p, scale, POW: tl.constexpr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S
        inv_t = 1.0 / TT
        gs = tl.load(g_ptr + row * S + offs, mask=mask, other=0.0).to(tl.float32) * scale
        base = row * C * S + offs
        pc = x_ptr + base
        qc = gx_ptr + base
        for _c in range(0, C):
            tm = _time_sum(pc, mask, TT, tstride, BLOCK)
            # The same gradient for every step: one store, the launcher expands it over T.
            tl.store(qc, (gs * _abs_pow_grad(tm * inv_t, p, POW)).to(gx_ptr.dtype.element_ty), mask=mask)
            pc += S
            qc += S


def _check(feat: torch.Tensor, p: float, op: str) -> None:
    if triton is None:
        raise RuntimeError(f"{op}: triton is not importable")
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4:
        raise ValueError(f"{op}: feat must be a [T, B, C, S] tensor, got {getattr(feat, 'shape', type(feat))}")
    if feat.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: feat must be float32/float16/bfloat16 for Triton, got {feat.dtype}")
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"{op}: p must be finite and > 0, got {p}")


def _block(S: int) -> int:
    return max(16, min(256, triton.next_power_of_2(max(S, 1))))


def attention_map_fwd_triton(feat: torch.Tensor, p: float, time_mean: bool) -> torch.Tensor:
    """Raw attention map of ``feat: [T, B, C, S]`` -> ``[B, S]`` (time_mean) or ``[T, B, S]``, fp32."""
    _check(feat, p, "attention_map_fwd_triton")
    feat = feat.contiguous()
    T, B, C, S = feat.shape
    shape = (B, S) if time_mean else (T, B, S)
    out = torch.empty(shape, dtype=torch.float32, device=feat.device)
    if out.numel() == 0:
        return out
    if T == 0:  # the mean over zero steps, as torch's mean of an empty dimension
        return out.fill_(float("nan"))
    rows, tt = (B, T) if time_mean else (T * B, 1)
    blk = _block(S)
    grid = (rows, triton.cdiv(S, blk))
    with device_ctx(feat):
        _attention_map_fwd_kernel[grid](
            feat, out, C, S, tt, B * C * S, float(p), 1.0 / C if C else float("inf"), 1.0 / tt,
            POW=_pow_kind(p), BLOCK=blk,
        )
    return out


def attention_map_bwd_triton(grad_map: torch.Tensor, feat: torch.Tensor, p: float, time_mean: bool) -> torch.Tensor:
    """Gradient of the raw attention map: ``grad_map`` (the forward's shape) -> ``grad_feat`` like ``feat``."""
    _check(feat, p, "attention_map_bwd_triton")
    T, B, C, S = feat.shape
    shape = (B, S) if time_mean else (T, B, S)
    if tuple(grad_map.shape) != shape:
        raise ValueError(f"attention_map_bwd_triton: grad_map must have shape {shape}, got {tuple(grad_map.shape)}")
    feat = feat.contiguous()
    g = grad_map.to(torch.float32).contiguous()
    # Time mean: every step has the same gradient, so one [1, B, C, S] slab is written and expanded.
    if time_mean:
        grad_feat = torch.empty((1, B, C, S), dtype=feat.dtype, device=feat.device)
    else:
        grad_feat = torch.empty_like(feat, memory_format=torch.contiguous_format)
    if grad_feat.numel() == 0 or feat.numel() == 0:
        return grad_feat.expand(feat.shape) if time_mean else grad_feat
    rows, tt = (B, T) if time_mean else (T * B, 1)
    blk = _block(S)
    grid = (rows, triton.cdiv(S, blk))
    with device_ctx(feat):
        _attention_map_bwd_kernel[grid](
            g, feat, grad_feat, C, S, tt, B * C * S, float(p), 1.0 / (C * tt), POW=_pow_kind(p), BLOCK=blk,
        )
    return grad_feat.expand(feat.shape) if time_mean else grad_feat
