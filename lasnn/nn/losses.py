"""Distillation losses as modules: thin wrappers over ``lasnn.attention_loss`` and ``lasnn.kd_loss``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lasnn.checks import check_float
from lasnn.ops.attention import TIME_REDUCE, attention_loss, kd_loss

__all__ = ["AttentionTransferLoss", "KDLoss"]


class AttentionTransferLoss(nn.Module):
    """``beta * sum_k attention_loss(student_k, teacher_k)`` over distilled layer pairs.

    Each pair is a student feature ``[T, B, Cs, *space_s]`` (or ``[B, Cs, *space_s]``) and a teacher
    feature ``[B, Ct, *space_t]``, with ``space`` = ``(H, W)`` or ``(L,)``; see ``lasnn.attention_loss``.

    Call as ``loss(pairs)`` with an iterable of ``(student, teacher)`` tuples, or ``loss(student, teacher)``
    for one pair.
    """

    def __init__(self, beta: float = 1000.0, p: float = 2.0, time_reduce: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        self.beta = check_float("beta", beta)
        self.p = check_float("p", p, positive=True)
        if time_reduce not in TIME_REDUCE:
            raise ValueError(f"time_reduce must be one of {TIME_REDUCE}, got {time_reduce!r}")
        self.time_reduce = time_reduce
        self.backend = backend

    def forward(
        self,
        pairs: Iterable[tuple[torch.Tensor, torch.Tensor]] | torch.Tensor,
        teacher: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns the scalar ``beta * sum`` of the per-pair attention losses."""
        if isinstance(pairs, torch.Tensor):
            if teacher is None:
                raise TypeError("teacher is required when the first argument is a student tensor")
            pairs = [(pairs, teacher)]
        elif teacher is not None:
            raise TypeError("pass either (student, teacher) tensors or one iterable of pairs, not both")
        total = None
        n = 0
        for k, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"pairs[{k}] must be a (student, teacher) pair, got {type(pair).__name__}")
            term = attention_loss(pair[0], pair[1], p=self.p, time_reduce=self.time_reduce, backend=self.backend)
            total = term if total is None else total + term
            n += 1
        if n == 0:
            raise ValueError("pairs must contain at least one (student, teacher) pair")
        return self.beta * total

    def extra_repr(self) -> str:
        s = f"beta={self.beta:g}, p={self.p:g}, time_reduce={self.time_reduce}"
        if self.backend != "auto":
            s += f", backend={self.backend}"
        return s


class KDLoss(nn.Module):
    """Logit distillation ``KL(softmax(t/τ) || softmax(s/τ)) · τ²`` (batch-mean); see ``lasnn.kd_loss``.

    ``student_logits``: ``[B, K]`` or ``[T, B, K]`` (averaged over T first); ``teacher_logits``: ``[B, K]``.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = check_float("temperature", temperature, positive=True)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Returns the scalar KD loss."""
        return kd_loss(student_logits, teacher_logits, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}"
