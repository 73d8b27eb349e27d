"""Whole-tensor batching and batch-level augmentation (no DataLoader workers, no per-sample Python).

Everything is driven by explicit seeds instead of a stateful generator, so that any batch of any epoch
can be recomputed from ``(seed, epoch, step)`` alone: resuming a run mid-epoch then replays exactly the
batches an uninterrupted run would have seen, without saving generator states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

__all__ = ["TensorLoader", "random_crop", "random_hflip", "shard_indices"]

# Distinct odd multipliers keep the per-(seed, epoch, step) generator seeds apart.
_EPOCH_MULT = 1_000_003
_STEP_MULT = 7_919


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * _EPOCH_MULT + int(p) + 1) % (2**62)
    return torch.Generator().manual_seed(seed)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding, one offset per sample, on a whole batch.

    Args:
        x: ``[B, C, H, W]`` images or ``[B, C, L]`` signals (the spatial size is kept).
        padding: zero padding on each side of every spatial axis (0: return ``x``).
        generator: CPU generator drawing the offsets.
    Returns:
        tensor of ``x``'s shape and dtype.
    """
    if padding <= 0 or x.shape[0] == 0:
        return x
    spatial = x.shape[2:]
    b = x.shape[0]
    pad = [padding] * (2 * len(spatial))
    xp = torch.nn.functional.pad(x, pad)
    offsets = torch.randint(0, 2 * padding + 1, (b, len(spatial)), generator=generator).to(x.device)
    bi = torch.arange(b, device=x.device)
    ci = torch.arange(x.shape[1], device=x.device)
    if len(spatial) == 1:
        cols = offsets[:, 0, None] + torch.arange(spatial[0], device=x.device)  # [B, L]
        return xp[bi[:, None, None], ci[None, :, None], cols[:, None, :]]
    rows = offsets[:, 0, None] + torch.arange(spatial[0], device=x.device)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(spatial[1], device=x.device)  # [B, W]
    return xp[bi[:, None, None, None], ci[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each sample of ``x`` ``[B, C, ..., W]`` along its last axis with probability 1/2."""
    if x.shape[0] == 0:
        return x
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def shard_indices(order: torch.Tensor, rank: int, world_size: int, *, pad: bool) -> torch.Tensor:
    """This rank's share of ``order`` (``[N]`` int64), as ``torch.utils.data.DistributedSampler`` does.

    With ``pad`` the order is first extended by wrapping around to a multiple of ``world_size`` so that
    every rank gets the same number of samples (training); without it ranks may differ by one sample
    and every sample is seen exactly once over all ranks (evaluation, where totals are all-reduced).
    """
    if world_size == 1:
        return order
    if pad and order.numel() % world_size:
        extra = world_size - order.numel() % world_size
        reps = (extra + order.numel() - 1) // max(order.numel(), 1)
        order = torch.cat([order, order.repeat(max(reps, 1))[:extra]])
    return order[rank::world_size]


class TensorLoader:
    """Iterates ``(x, y)`` batches over in-memory tensors; a drop-in for a DataLoader in training loops.

    Args:
        x: ``[N, ...]`` samples (any dtype; ``transform`` turns a raw batch into model input).
        y: ``[N]`` int64 labels.
        batch_size: samples per batch *per process*.
        shuffle: draw a fresh permutation per epoch from ``(seed, epoch)``.
        transform: ``f(x_batch, generator) -> x_batch`` applied to each batch (augmentation and
            normalisation); the generator is seeded from ``(seed, epoch, step)``.
        seed: base seed of the order and of the transform's randomness.
        rank, world_size: shard like DistributedSampler (see ``shard_indices``).
        drop_last: drop the trailing incomplete batch (default: ``shuffle``; training with batch norm
            should not see a batch of one).
        device: where batches are moved (the whole data set stays on the CPU).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("x and y must be torch.Tensors")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must hold the same number of samples, got {x.shape[0]} and {y.shape[0]}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.transform = transform
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.drop_last = shuffle if drop_last is None else drop_last
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration replays."""
        self.epoch = int(epoch)

    def _indices(self) -> torch.Tensor:
        n = self.x.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, self.epoch))
        else:
            order = torch.arange(n)
        return shard_indices(order, self.rank, self.world_size, pad=self.drop_last or self.shuffle)

    def __len__(self) -> int:
        n = self._indices().numel()
        if self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return (n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(
        self, start_step: int, *, with_index: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches ``start_step, start_step + 1, ...`` of the current epoch (for a mid-epoch resume).

        ``with_index``: yield ``(x, y, index)``, ``index`` ``[B]`` int64 the batch's rows of the data set's ``x``
        (on ``x``'s device), so that per-sample values computed once (a frozen teacher's outputs) can be looked up.
        """
        if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        idx = self._indices()
        nb = len(self)
        for step in range(start_step, nb):
            sel = idx[step * self.batch_size : (step + 1) * self.batch_size]
            if sel.device != self.x.device:  # the data set may live on the GPU; orders are drawn on the CPU
                sel = sel.to(self.x.device)
            xb, yb = self.x[sel], self.y[sel]
            if self.device is not None:
                xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            if self.transform is not None:
                xb = self.transform(xb, _generator(self.seed, self.epoch, step * _STEP_MULT + 1))
            if with_index:
                yield xb, yb, sel
            else:
                yield xb, yb
