"""Lossless low-memory BPTT: spikes that autograd saves for the backward are kept as bits.

A spiking layer's output is exactly 0 or 1, yet the conv/linear (or pooling, or attention loss) that reads it
saves it for its backward as a full float tensor, ``T`` times larger than in the ANN. Inside
:func:`spike_bits` (which ``lasnn.nn.SNN`` enters in every forward that builds a graph, unless its
``low_memory`` is False), every spike tensor a LIF/IF site emits is registered, and a
``torch.autograd.graph.saved_tensors_hooks`` pair stores any registered tensor that autograd saves as one
bit per element (uint8 words), and unpacks it to the same dtype when the backward needs it. The values are
the same, so gradients are bit-identical; only the saved copy shrinks 32x (fp32). Tensors that are not
registered spikes are saved as usual.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from lasnn.ops.spike_bits import pack_bits, unpack_bits

__all__ = ["mark_spikes", "spike_bits"]

_ACTIVE: contextvars.ContextVar[_SpikeBits | None] = contextvars.ContextVar("lasnn_spike_bits", default=None)


class _Packed:
    __slots__ = ("bits", "dtype", "shape")

    def __init__(self, t: torch.Tensor) -> None:
        self.bits, self.shape, self.dtype = pack_bits(t), t.shape, t.dtype


class _SpikeBits:
    def __init__(self) -> None:
        # storage address -> the spike tensor, weakly: an address is trusted only while its spikes live
        # (while they do, their storage cannot be freed and reused). Any view of that storage (a reshape, the
        # unsqueeze inside a 1-d pool) holds spikes only, so it is packed too.
        # The version counter (shared by views) at marking: a spike tensor changed in place since then is
        # no longer 0/1 and is saved as usual.
        self.spikes: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}

    def mark(self, t: torch.Tensor) -> None:
        if t.device.type != "meta" and t.untyped_storage().data_ptr() != 0:
            self.spikes[t.untyped_storage().data_ptr()] = (weakref.ref(t), t._version)

    def pack(self, t: torch.Tensor) -> Any:
        if t.layout != torch.strided or t.numel() == 0 or t.device.type == "meta" or not t.is_floating_point():
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr == 0:  # no real storage (meta, fake tensors): addresses say nothing
            return t
        entry = self.spikes.get(ptr)
        s = entry[0]() if entry is not None else None
        if (s is not None and s.untyped_storage().data_ptr() == ptr and s.device == t.device and s.dtype == t.dtype
                and t._version == entry[1]):
            return _Packed(t)
        return t

    @staticmethod
    def unpack(p: Any) -> torch.Tensor:
        return unpack_bits(p.bits, p.shape, p.dtype) if isinstance(p, _Packed) else p


def _other_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # an older torch without the query: assume someone might, and stay out of the way
        return True
    return top(False) is not None


def mark_spikes(t: torch.Tensor) -> None:
    """Register ``t`` (exactly 0/1 values) as spikes for the active :func:`spike_bits` block; no-op outside one."""
    active = _ACTIVE.get()
    if active is not None:
        active.mark(t)


@contextlib.contextmanager
def spike_bits() -> Iterator[None]:
    """Inside the block, spikes registered by ``mark_spikes`` that autograd saves are stored as bits.

    Nested blocks share the outer one. Where other saved-tensor hooks are already active (activation
    checkpointing, ``torch.autograd.graph.save_on_cpu``, ...) the block does nothing, so theirs keep working
    (autograd applies only the innermost pair). Leaves nothing behind: the hooks and the registry end with
    the block.
    """
    if _ACTIVE.get() is not None or _other_hooks_active():
        yield
        return
    state = _SpikeBits()
    token = _ACTIVE.set(state)
    try:
        with torch.autograd.graph.saved_tensors_hooks(state.pack, state.unpack):
            yield
    finally:
        _ACTIVE.reset(token)
