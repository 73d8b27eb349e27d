"""Input encoders: a static input ``[B, ...]`` becomes a sequence of ``T`` steps ``[T, B, ...]``.

``DirectEncoder`` repeats the analog input at every step (the first layer then acts as the spike
generator; the LaSNN default). ``PoissonEncoder`` draws Bernoulli spikes whose probability is the input
intensity scaled to [0, 1] (rate coding), from its own seeded generator.
"""

from __future__ import annotations

import torch
from torch import nn

from lasnn.checks import check_tensor

__all__ = ["DirectEncoder", "PoissonEncoder", "check_T"]


def check_T(T: object) -> int:
    """Require an integer number of time steps ``T >= 1`` (bools rejected); return it as ``int``."""
    if isinstance(T, bool) or not isinstance(T, int):
        raise TypeError(f"T must be an int >= 1, got {type(T).__name__}")
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    return T


class DirectEncoder(nn.Module):
    """Direct (analog) encoding: the input repeated ``T`` times, ``[B, ...] -> [T, B, ...]``.

    The result is an expanded view (no copy); time-folding code reshapes it to ``[T*B, ...]``.
    """

    def __init__(self, T: int) -> None:
        super().__init__()
        self.T = check_T(T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, ...]`` floating -> ``[T, B, ...]``."""
        check_tensor("x", x, min_dim=1)
        return x.unsqueeze(0).expand(self.T, *x.shape)

    def extra_repr(self) -> str:
        return f"T={self.T}"


_SCALES = ("minmax", "clamp", "none")


class PoissonEncoder(nn.Module):
    """Rate (Poisson / Bernoulli) encoding, ``[B, ...] -> [T, B, ...]`` spikes in {0, 1}.

    At every step each element fires with probability ``p``, the input intensity scaled to [0, 1]:

    - ``scale="minmax"`` (default): per sample, ``p = (x - min) / (max - min)`` (a constant sample gives
      ``p = 0``), so normalised images (mean/std) work unchanged;
    - ``scale="clamp"``: ``p = clamp(x, 0, 1)``, for inputs already in [0, 1];
    - ``scale="none"``: ``x`` must already be a probability (values outside [0, 1] raise).

    Randomness: with ``seed`` set, the encoder owns one ``torch.Generator`` per device, seeded once
    with ``seed`` on first use; successive calls continue that stream, so a run is reproducible while
    every call (every training batch) draws fresh spikes. ``reseed()`` restarts the stream. With
    ``seed=None`` the global torch RNG is used.

    ``torch.compile`` cannot trace the encoder's own generator: with ``seed`` set, encoding is a graph
    break (an error under ``fullgraph=True``). Encode outside the compiled region and pass the spikes,
    e.g. ``torch.compile(snn, fullgraph=True)(snn.encode(x))``; ``seed=None`` traces.

    Shapes: ``[B, ...]`` -> ``[T, B, ...]``, spikes in {0, 1} with x's dtype and device.
    """

    def __init__(self, T: int, *, seed: int | None = None, scale: str = "minmax") -> None:
        super().__init__()
        self.T = check_T(T)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if scale not in _SCALES:
            raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
        self.seed = seed
        self.scale = scale
        self._generators: dict[str, torch.Generator] = {}

    def reseed(self, seed: int | None = None) -> None:
        """Restart the random stream (from ``seed`` if given, else from the constructor's seed)."""
        if seed is not None:
            self.seed = int(seed)
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return g

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Firing probability per element, ``[B, ...]`` in [0, 1] (see the class docstring)."""
        check_tensor("x", x, min_dim=1)
        if self.scale == "clamp":
            return x.clamp(0, 1)
        if self.scale == "none":
            if x.numel() and (x.min() < 0 or x.max() > 1):
                raise ValueError("x must lie in [0, 1] with scale='none' (use scale='minmax' or 'clamp')")
            return x
        flat = x.reshape(x.shape[0], -1)
        lo = flat.amin(dim=1, keepdim=True) if flat.shape[1] else flat.new_zeros(flat.shape[0], 1)
        hi = flat.amax(dim=1, keepdim=True) if flat.shape[1] else lo
        span = hi - lo
        p = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(flat))
        return p.view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, ...]`` floating -> spikes ``[T, B, ...]`` (0/1 in x's dtype)."""
        p = self.probabilities(x).detach()
        p = p.unsqueeze(0).expand(self.T, *p.shape).contiguous()
        return torch.bernoulli(p, generator=self._generator(x.device))

    def extra_repr(self) -> str:
        return f"T={self.T}, scale={self.scale}, seed={self.seed}"
