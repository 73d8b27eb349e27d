"""Reference attention-transfer maps and losses: plain PyTorch, float64-capable, differentiable by autograd.

Attention transfer (Zagoruyko & Komodakis, ICLR 2017), as pinned in METHODS.md::

    raw map     m[b, s]    = mean_c |A[b, c, s]|^p                (A: one feature map, s = flattened space)
    SNN student A          = mean_t feat[t]     (time_mean)     or feat[t] for each t (per step)
    Q                      = m / max(||m||_2, eps)                per sample
    loss                   = mean_{b, s} (Q_s - Q_t)^2            (per step: also averaged over t)

If the spatial grids differ, the larger raw map is adaptively average-pooled (1-D or 2-D, on the
spatial grid) to the smaller one before normalisation.

``attention_map_raw_reference`` is the oracle of the fused ``lasnn::attention_map_fwd/bwd`` kernels
and the ``reference`` backend; the whole composition here (``attention_loss_reference``) is also the
unfused PyTorch baseline of benches/bench_attention.py. ``kd_loss_reference`` is the logit KD loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Normalisation floor: an all-zero map (a silent spiking layer) normalises to zeros instead of NaN.
# Spike-rate maps that are not all zero have norm >= (1/T)^p / C, far above it.
NORM_EPS: float = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype maps are computed and returned in: fp32 for fp16/bf16/fp32 input, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _AbsPow(torch.autograd.Function):
    """``|x|^p`` with derivative ``p |x|^(p-1) sign(x)``, defined as 0 at x = 0 for every p > 0.

    ``x.abs().pow(p)`` has a NaN gradient at 0 for p < 1 (0 * inf); the kernels use the convention
    above, so the oracle states it explicitly.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.p = p
        return x.abs().pow(p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * abs_pow_grad_reference(x, ctx.p), None


def abs_pow_grad_reference(x: torch.Tensor, p: float) -> torch.Tensor:
    """d|x|^p/dx = p |x|^(p-1) sign(x), 0 where x = 0 (elementwise, any shape)."""
    a = x.abs()
    nz = a > 0
    safe = torch.where(nz, a, torch.ones_like(a))
    return torch.where(nz, p * safe.pow(p - 1) * torch.sign(x), torch.zeros_like(x))


def attention_map_raw_reference(feat: torch.Tensor, p: float = 2.0, time_mean: bool = True) -> torch.Tensor:
    """Raw (unnormalised) attention map, the quantity the fused kernels compute.

    Args:
        feat: ``[T, B, C, S]`` features (T = 1 for ANN features, S = flattened spatial extent).
        p: exponent > 0.
        time_mean: average over T before ``|.|^p`` (firing-rate map) or keep every step.
    Returns:
        ``[B, S]`` = mean_c |mean_t feat|^p if ``time_mean`` else ``[T, B, S]`` = mean_c |feat_t|^p,
        in fp32 for fp16/bf16/fp32 input and fp64 for fp64.
    """
    if feat.dim() != 4:
        raise ValueError(f"feat must be [T, B, C, S], got shape {tuple(feat.shape)}")
    x = feat.to(compute_dtype(feat.dtype))
    if time_mean:
        x = x.mean(0)
    return _AbsPow.apply(x, float(p)).mean(-2)


def pool_maps_reference(
    m_s: torch.Tensor, grid_s: tuple[int, ...], m_t: torch.Tensor, grid_t: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool whichever raw map is larger to the common (smaller) spatial grid.

    Args:
        m_s: ``[*, S_s]`` raw maps on the grid ``grid_s`` (``(L,)`` or ``(H, W)``, product S_s).
        m_t: ``[*, S_t]`` raw maps on ``grid_t`` (same number of grid dimensions).
    Returns:
        both maps flattened on the grid ``min(grid_s, grid_t)`` (elementwise): ``[*, S]``.
    """
    target = tuple(min(a, b) for a, b in zip(grid_s, grid_t, strict=True))

    def pool(m: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        if grid == target:
            return m
        lead = m.shape[:-1]
        g = m.reshape(-1, 1, *grid)
        g = F.adaptive_avg_pool1d(g, target) if len(grid) == 1 else F.adaptive_avg_pool2d(g, target)
        return g.reshape(*lead, -1)

    return pool(m_s, grid_s), pool(m_t, grid_t)


def normalize_map_reference(m: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """``m / max(||m||_2, eps)`` over the last dimension (``[*, S] -> [*, S]``)."""
    return m / m.norm(dim=-1, keepdim=True).clamp_min(eps)


def attention_map_reference(feat: torch.Tensor, p: float = 2.0, spatial_dims: int = 2) -> torch.Tensor:
    """Normalised attention map of one feature tensor, averaged over T first when there is a T.

    Args:
        feat: ``[B, C, *grid]`` or ``[T, B, C, *grid]`` with ``len(grid) == spatial_dims``.
    Returns:
        ``[B, prod(grid)]`` in fp32 (fp64 for fp64 input), unit L2 norm per sample (zeros for a zero map).
    """
    lead = 3 if feat.dim() == spatial_dims + 3 else 2
    f = feat if lead == 3 else feat.unsqueeze(0)
    f = f.reshape(*f.shape[:3], -1)
    return normalize_map_reference(attention_map_raw_reference(f, p, True))


def attention_loss_reference(
    student: torch.Tensor, teacher: torch.Tensor, *, p: float = 2.0, time_reduce: str = "mean"
) -> torch.Tensor:
    """Attention-transfer loss between a (spiking) student and a teacher feature map, unfused.

    Args:
        student: ``[T, B, Cs, *grid_s]`` or ``[B, Cs, *grid_s]``.
        teacher: ``[B, Ct, *grid_t]``; its rank fixes the spatial rank (``grid`` is ``(H, W)`` or ``(L,)``).
        time_reduce: ``"mean"`` (map of the time-averaged student) or ``"per_step"`` (mean over t of
            the per-step losses against the same teacher map).
    Returns:
        scalar, mean over batch (and steps) and positions of ``(Q_s - Q_t)^2``.
    """
    nsp = teacher.dim() - 2
    s = student if student.dim() == teacher.dim() + 1 else student.unsqueeze(0)
    grid_s, grid_t = tuple(s.shape[3:]), tuple(teacher.shape[2:])
    m_s = attention_map_raw_reference(s.reshape(*s.shape[:3], -1), p, time_reduce == "mean")
    m_t = attention_map_raw_reference(teacher.unsqueeze(0).reshape(1, *teacher.shape[:2], -1), p, True)
    assert len(grid_s) == nsp
    m_s, m_t = pool_maps_reference(m_s, grid_s, m_t, grid_t)
    dt = torch.promote_types(m_s.dtype, m_t.dtype)
    q_s, q_t = normalize_map_reference(m_s.to(dt)), normalize_map_reference(m_t.to(dt))
    return (q_s - q_t).pow(2).mean()


def kd_loss_reference(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Hinton KD: ``KL(softmax(t/τ) || softmax(s/τ)) · τ²``, summed over classes, mean over the batch.

    Args:
        student_logits: ``[B, K]`` or ``[T, B, K]`` (averaged over T first).
        teacher_logits: ``[B, K]``.
    """
    s = student_logits.mean(0) if student_logits.dim() == 3 else student_logits
    tau = float(temperature)
    log_ps = torch.log_softmax(s / tau, dim=-1)
    log_pt = torch.log_softmax(teacher_logits / tau, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return kl.mean() * tau * tau
