"""Multi-step spiking neurons as modules: thin wrappers over ``lasnn.lif``."""

from __future__ import annotations

import math

import torch
from torch import nn

from lasnn.checks import check_float
from lasnn.ops.lif import lif
from lasnn.reference.lif import SURROGATES

_F32_EXACT = 1 << 24  # every integer up to 2^24 is exact in float32


def count_spikes(spikes: torch.Tensor) -> torch.Tensor:
    """Exact number of spikes in a binary spike tensor, without a host sync or a float64 copy.

    Args:
        spikes: ``[T, B, *]`` (any shape) of 0/1 values, any floating dtype, any device.
    Returns:
        a 0-dim float64 tensor on ``spikes``' device: the sum of ``spikes``. Rows along the first dimension are
        summed in float32 (exact: each row's count is below 2^24) and the row counts in float64, which is
        5x faster on a CPU than summing the whole tensor in float64 (that copies it first).
    """
    if not isinstance(spikes, torch.Tensor) or not spikes.is_floating_point():
        raise TypeError(f"spikes must be a floating-point tensor, got {type(spikes).__name__}"
                        + (f" of dtype {spikes.dtype}" if isinstance(spikes, torch.Tensor) else ""))
    s = spikes.detach()
    if s.numel() < _F32_EXACT:
        return s.sum(dtype=torch.float32).double()
    rows = s.reshape(s.shape[0], -1) if s.dim() > 1 else s.reshape(1, -1)
    if rows.shape[1] >= _F32_EXACT:
        return s.sum(dtype=torch.float64)
    return rows.sum(1, dtype=torch.float32).sum(dtype=torch.float64)


class LIF(nn.Module):
    """Multi-step LIF neuron: ``[T, *] -> [T, *]`` spikes, usable in place of ``nn.ReLU``.

    Stateless between calls: every forward starts from ``v_init`` (None: 0; see ``lasnn.lif`` for the
    recurrence and the arguments). ``forward_stateful`` also returns the membrane after the last step,
    which is how a streaming :class:`lasnn.nn.SNN` carries state from chunk to chunk; a subclass with other
    dynamics overrides both.
    """

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        decay_input: bool = True,
        detach_reset: bool = False,
        surrogate: str = "sigmoid",
        alpha: float = 4.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.tau = check_float("tau", tau, positive=True, allow_inf=True)
        self.v_threshold = check_float("v_threshold", v_threshold)
        self.v_reset = None if v_reset is None else check_float("v_reset", v_reset)
        self.alpha = check_float("alpha", alpha, positive=True)
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {sorted(SURROGATES)}, got {surrogate!r}")
        self.decay_input = bool(decay_input)
        self.detach_reset = bool(detach_reset)
        self.surrogate = surrogate
        self.backend = backend

    def forward(self, x_seq: torch.Tensor, v_init: torch.Tensor | None = None) -> torch.Tensor:
        """x_seq: ``[T, *]`` (and ``v_init`` ``[*]`` or None) -> spikes ``[T, *]``."""
        return self.forward_stateful(x_seq, v_init)[0]

    def forward_stateful(
        self, x_seq: torch.Tensor, v_init: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_seq: ``[T, *]``, v_init: ``[*]`` or None (zeros) -> ``(spikes [T, *], last membrane [*])``."""
        return lif(
            x_seq, v_init, tau=self.tau, v_threshold=self.v_threshold, v_reset=self.v_reset,
            decay_input=self.decay_input, detach_reset=self.detach_reset, surrogate=self.surrogate,
            alpha=self.alpha, return_v=True, backend=self.backend,
        )

    def extra_repr(self) -> str:
        reset = "soft" if self.v_reset is None else f"hard({self.v_reset:g})"
        tau = "inf" if math.isinf(self.tau) else f"{self.tau:g}"
        s = f"tau={tau}, v_threshold={self.v_threshold:g}, reset={reset}"
        if not math.isinf(self.tau):
            s += f", decay_input={self.decay_input}"
        s += f", detach_reset={self.detach_reset}, surrogate={self.surrogate}(alpha={self.alpha:g})"
        if self.backend != "auto":
            s += f", backend={self.backend}"
        return s


class IF(LIF):
    """Multi-step integrate-and-fire neuron (LIF with tau = inf: ``H = V + X``)."""

    def __init__(
        self,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        detach_reset: bool = False,
        surrogate: str = "sigmoid",
        alpha: float = 4.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            tau=math.inf, v_threshold=v_threshold, v_reset=v_reset, decay_input=False,
            detach_reset=detach_reset, surrogate=surrogate, alpha=alpha, backend=backend,
        )
