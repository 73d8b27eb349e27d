"""Attention-transfer distillation: ``lasnn.attention_map``, ``lasnn.attention_loss``, ``lasnn.kd_loss``.

Only the raw attention map touches the big ``[T, B, C, H, W]`` student tensor, so only it is fused:
``lasnn::attention_map_fwd``/``lasnn::attention_map_bwd`` (schemas in csrc/ops.cpp; Triton twins
``lasnn::attention_map_{fwd,bwd}_triton`` below) read the features once, reduce time, ``|.|^p`` and
channels in one pass, and write one gradient in one pass. Everything after that (adaptive average
pooling, L2 normalisation, the squared difference) runs on tiny ``[B, S]`` maps in plain differentiable
PyTorch. Oracle: lasnn/reference/attention.py. Kernels: csrc/cpu/attention.cpp, csrc/cuda/attention.cu,
kernels/attention.py. Tests: tests/test_attention.py. Bench: benches/bench_attention.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lasnn import backends
from lasnn.checks import check_float, check_tensor
from lasnn.ops._common import register_op_pair
from lasnn.reference.attention import (
    attention_map_raw_reference,
    compute_dtype,
    normalize_map_reference,
    pool_maps_reference,
)

__all__ = ["AttentionMapFunction", "attention_loss", "attention_map", "attention_map_raw", "kd_loss"]

TIME_REDUCE: tuple[str, ...] = ("mean", "per_step")

_FWD_SCHEMA = "(Tensor feat, float p, bool time_mean) -> Tensor"
_BWD_SCHEMA = "(Tensor grad_map, Tensor feat, float p, bool time_mean) -> Tensor"


def _fake_fwd(feat, p, time_mean):
    shape = (feat.shape[1], feat.shape[3]) if time_mean else (feat.shape[0], feat.shape[1], feat.shape[3])
    return feat.new_empty(shape, dtype=compute_dtype(feat.dtype))


def _fake_bwd(grad_map, feat, p, time_mean):
    # Time mean: every step has the same gradient; the kernels write one step and expand it over T.
    if time_mean:
        return feat.new_empty((1, *feat.shape[1:])).expand(feat.shape)
    return torch.empty_like(feat, memory_format=torch.contiguous_format)


_lib = register_op_pair("attention_map", _FWD_SCHEMA, _BWD_SCHEMA, _fake_fwd, _fake_bwd, "attention")


def _ops(backend: str):
    if backend == "triton":
        return torch.ops.lasnn.attention_map_fwd_triton, torch.ops.lasnn.attention_map_bwd_triton
    return torch.ops.lasnn.attention_map_fwd, torch.ops.lasnn.attention_map_bwd


class AttentionMapFunction(torch.autograd.Function):
    """Autograd for the fused raw attention map (``feat [T, B, C, S]`` -> ``[B, S]`` or ``[T, B, S]``).

    Saves only ``feat`` (which autograd keeps alive anyway), nothing when it does not require grad;
    the backward recomputes the time mean from it in the same pass that writes the gradient.
    """

    @staticmethod
    def forward(ctx, feat: torch.Tensor, p: float, time_mean: bool, backend: str) -> torch.Tensor:
        fwd, _ = _ops(backend)
        out = fwd(feat, p, time_mean)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(feat)
            ctx.p, ctx.time_mean, ctx.backend = p, time_mean, backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_map: torch.Tensor):
        (feat,) = ctx.saved_tensors
        _, bwd = _ops(ctx.backend)
        return bwd(grad_map, feat, ctx.p, ctx.time_mean), None, None, None


def attention_map_raw(
    feat: torch.Tensor, p: float = 2.0, time_mean: bool = True, backend: str = "auto"
) -> torch.Tensor:
    """Raw (unnormalised) attention map of ``feat: [T, B, C, S]``, differentiable, on the chosen backend.

    Returns ``[B, S]`` = mean_c |mean_t feat|^p (``time_mean``) or ``[T, B, S]`` = mean_c |feat_t|^p, in
    fp32 for fp16/bf16/fp32 input (fp64 for fp64). Arguments are assumed valid (the public functions
    check them); non-contiguous input is copied once.
    """
    name = backends.resolve_traced("attention_map", backend, feat.device, feat.dtype)
    if name == "reference":
        return attention_map_raw_reference(feat, p, time_mean)
    if not feat.is_contiguous():
        feat = feat.contiguous()
    return AttentionMapFunction.apply(feat, p, time_mean, name)


def _check_p(p: object) -> float:
    return check_float("p", p, positive=True)


def _check_nonempty(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def attention_map(
    feat: torch.Tensor, p: float = 2.0, *, spatial_dims: int | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Normalised attention map (attention transfer, Zagoruyko & Komodakis 2017) of one feature tensor.

    ``Q = m / max(||m||_2, eps)`` per sample with ``m = mean_c |A|^p`` and ``A`` the features averaged
    over T first when they carry a T (the firing-rate map of a spiking layer). An all-zero map gives zeros.

    Args:
        feat: ``[B, C, H, W]`` / ``[T, B, C, H, W]`` (2-D space) or ``[B, C, L]`` / ``[T, B, C, L]`` (1-D).
        p: exponent > 0 (2 in the paper).
        spatial_dims: 2 or 1; None infers it from the rank (3-D: ``[B, C, L]``, 4-D: ``[B, C, H, W]``,
            5-D: ``[T, B, C, H, W]``). Pass 1 for a ``[T, B, C, L]`` signal, which a 4-D rank cannot tell apart.
        backend: ``auto``, ``reference``, ``cpu``, ``triton`` or ``cuda`` (``LASNN_BACKEND`` overrides auto).
    Returns:
        ``[B, H*W]`` (or ``[B, L]``), fp32 (fp64 for fp64 input).
    """
    check_tensor("feat", feat)
    if spatial_dims is None:
        if feat.dim() not in (3, 4, 5):
            raise ValueError(
                f"feat must be [B, C, L], [B, C, H, W] or [T, B, C, H, W] (3 to 5 dims), got shape {tuple(feat.shape)}"
            )
        spatial_dims = 1 if feat.dim() == 3 else 2
    elif spatial_dims not in (1, 2):
        raise ValueError(f"spatial_dims must be 1, 2 or None, got {spatial_dims!r}")
    if feat.dim() not in (spatial_dims + 2, spatial_dims + 3):
        raise ValueError(
            f"feat must have {spatial_dims + 2} or {spatial_dims + 3} dims for spatial_dims={spatial_dims} "
            f"([B, C, *space] or [T, B, C, *space]), got shape {tuple(feat.shape)}"
        )
    p = _check_p(p)
    _check_nonempty("feat", feat)
    f = feat if feat.dim() == spatial_dims + 3 else feat.unsqueeze(0)
    m = attention_map_raw(f.flatten(3), p, True, backend)
    return normalize_map_reference(m)


def attention_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    p: float = 2.0,
    time_reduce: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Attention-transfer loss between a spiking student's features and a teacher's, fused where it matters.

    The student map is taken from the time-averaged features (``time_reduce="mean"``) or per step
    (``"per_step"``: the mean over t of the per-step losses against the same teacher map). When the
    spatial grids differ, the larger raw map ``mean_c |A|^p`` is adaptively average-pooled to the
    smaller grid, then both are L2-normalised per sample (``Q``). Channel counts may differ. The loss is
    ``mean_{b, s} (Q_s - Q_t)^2`` (multiply by beta ~ 1e3 as in the paper, see
    ``lasnn.nn.AttentionTransferLoss``). Gradients reach the student, and the teacher if it requires grad.

    Args:
        student: ``[T, B, Cs, Hs, Ws]`` (spikes or membrane) or ``[B, Cs, Hs, Ws]``; for signals
            ``[T, B, Cs, Ls]`` or ``[B, Cs, Ls]``.
        teacher: ``[B, Ct, Ht, Wt]`` or ``[B, Ct, Lt]``; its rank decides 2-D vs 1-D space.
        p: exponent > 0.
        time_reduce: ``"mean"`` or ``"per_step"``.
        backend: backend of the fused map for both tensors (``auto`` picks per tensor).
    Returns:
        scalar loss, fp32 (fp64 when either input is fp64).
    """
    check_tensor("student", student)
    check_tensor("teacher", teacher)
    if teacher.dim() not in (3, 4):
        raise ValueError(
            f"teacher must be [B, C, H, W] or [B, C, L] (4 or 3 dims), got shape {tuple(teacher.shape)}"
        )
    nsp = teacher.dim() - 2
    if student.dim() not in (teacher.dim(), teacher.dim() + 1):
        space = "H, W" if nsp == 2 else "L"
        raise ValueError(
            f"student must be [T, B, C, {space}] or [B, C, {space}] to match teacher of shape "
            f"{tuple(teacher.shape)}, got shape {tuple(student.shape)}"
        )
    p = _check_p(p)
    if time_reduce not in TIME_REDUCE:
        raise ValueError(f"time_reduce must be one of {TIME_REDUCE}, got {time_reduce!r}")
    s = student if student.dim() == teacher.dim() + 1 else student.unsqueeze(0)
    if s.shape[1] != teacher.shape[0]:
        raise ValueError(
            f"student batch size {s.shape[1]} (shape {tuple(student.shape)}) != teacher batch size "
            f"{teacher.shape[0]} (shape {tuple(teacher.shape)})"
        )
    if student.device != teacher.device:
        raise ValueError(f"student is on {student.device} but teacher is on {teacher.device}")
    _check_nonempty("student", student)
    _check_nonempty("teacher", teacher)

    m_s = attention_map_raw(s.flatten(3), p, time_reduce == "mean", backend)
    m_t = attention_map_raw(teacher.unsqueeze(0).flatten(3), p, True, backend)
    m_s, m_t = pool_maps_reference(m_s, tuple(s.shape[3:]), m_t, tuple(teacher.shape[2:]))
    dt = torch.promote_types(m_s.dtype, m_t.dtype)
    q_s = normalize_map_reference(m_s.to(dt))
    q_t = normalize_map_reference(m_t.to(dt))
    # per_step: q_s is [T, B, S] and q_t [B, S] broadcasts; the mean over [T, B, S] is the mean over t
    # of the per-step losses.
    return (q_s - q_t).pow(2).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Logit distillation (Hinton et al.): ``KL(softmax(t/τ) || softmax(s/τ)) · τ²``, batch-mean.

    Args:
        student_logits: ``[B, K]`` or ``[T, B, K]`` (a spiking network's per-step logits, averaged over T first).
        teacher_logits: ``[B, K]``.
        temperature: τ > 0 (LaSNN uses 4).
    Returns:
        scalar, fp32 for fp16/bf16/fp32 logits (fp64 for fp64). Gradients reach both inputs.
    """
    check_tensor("student_logits", student_logits, dims=(2, 3))
    check_tensor("teacher_logits", teacher_logits, dims=(2,))
    tau = check_float("temperature", temperature, positive=True)
    s = student_logits.mean(0) if student_logits.dim() == 3 else student_logits
    if s.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} must be [B, K] or [T, B, K] matching "
            f"teacher_logits [B, K] = {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits is on {student_logits.device} but teacher_logits is on {teacher_logits.device}"
        )
    _check_nonempty("student_logits", student_logits)
    dt = torch.promote_types(compute_dtype(s.dtype), compute_dtype(teacher_logits.dtype))
    log_ps = F.log_softmax(s.to(dt) / tau, dim=-1)
    log_pt = F.log_softmax(teacher_logits.to(dt) / tau, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * (tau * tau)
