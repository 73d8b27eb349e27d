"""Lossless low-memory BPTT: saved spikes kept as bits, saved batch-norm outputs recomputed.

A spiking layer's output is exactly 0 or 1, yet the conv/linear (or pooling, or attention loss) that reads it
saves it for its backward as a full float tensor, ``T`` times larger than in the ANN. And the neuron after a
batch norm saves the batch norm's output, while the batch norm itself saves its input: two float ``[T, ...]``
tensors per layer where one determines the other. Inside :func:`spike_bits` (which ``lasnn.nn.SNN`` enters in
every forward that builds a graph, unless its ``low_memory`` is False), a
``torch.autograd.graph.saved_tensors_hooks`` pair changes what autograd keeps:

- every spike tensor a LIF/IF site emits is registered, and a registered tensor that autograd saves is stored as
  one bit per element (uint8 words), unpacked to the same dtype when the backward needs it;
- with ``recompute_batch_norm`` (``snn.low_memory = "recompute"``), the output of every ``nn.BatchNorm1d/2d/3d``
  in training mode (batch statistics) is registered with its input, weight and bias, and when autograd saves it
  (the neuron's backward needs it), only that reference is kept: the backward recomputes it with the same
  batch-norm forward on the same input, which the batch norm's own backward keeps anyway.

The values are the same, so gradients are bit-identical (tested on the zoo models). The saved copy of spikes
shrinks 32x (fp32) at no measurable cost; that of a batch-norm output to nothing, for one more batch-norm
forward per layer in the backward (+12-18% step time on a CPU, measured: hence not the default). Tensors that
are neither are saved as usual; so is either kind changed in place after it was made.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from lasnn.ops._common import inverse_permutation, memory_order
from lasnn.ops.spike_bits import pack_bits, unpack_bits

__all__ = ["mark_spikes", "spike_bits"]

_ACTIVE: contextvars.ContextVar[_SpikeBits | None] = contextvars.ContextVar("lasnn_spike_bits", default=None)


class _Packed:
    """Bits of a saved spike tensor, in its memory order when it is dense (a channels-last one included), so
    the unpacked tensor has the saved one's strides: the backward that reads it (a convolution's weight
    gradient) then runs the same kernel on the same layout as without packing."""

    __slots__ = ("bits", "dtype", "perm", "shape")

    def __init__(self, t: torch.Tensor) -> None:
        self.perm = None if t.is_contiguous() else memory_order(t)
        if self.perm is not None:
            t = t.permute(self.perm)
        self.bits, self.shape, self.dtype = pack_bits(t), t.shape, t.dtype

    def tensor(self) -> torch.Tensor:
        t = unpack_bits(self.bits, self.shape, self.dtype)
        return t if self.perm is None else t.permute(inverse_permutation(self.perm))


class _BNOutput:
    """What a saved batch-norm output is recomputed from: ``F.batch_norm`` in training mode on the same input
    (batch statistics; the running statistics are not touched again)."""

    __slots__ = ("bias", "bias_version", "cache", "eps", "weight", "weight_version", "x", "x_version")

    def __init__(self, x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> None:
        self.x, self.x_version = x, x._version
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps
        self.weight_version = None if bn.weight is None else bn.weight._version
        self.bias_version = None if bn.bias is None else bn.bias._version
        self.cache: weakref.ref[torch.Tensor] | None = None

    def output(self) -> torch.Tensor:
        y = self.cache() if self.cache is not None else None
        if y is not None:
            return y
        for name, t, v in (("input", self.x, self.x_version), ("weight", self.weight, self.weight_version),
                           ("bias", self.bias, self.bias_version)):
            if t is not None and t._version != v:
                raise RuntimeError(
                    f"lasnn low-memory BPTT: a batch norm's {name} was modified in place between the forward and "
                    "the backward, so its output cannot be recomputed (set snn.low_memory = False to save it instead)"
                )
        with torch.no_grad():
            y = F.batch_norm(self.x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        self.cache = weakref.ref(y)
        return y


class _Recompute:
    __slots__ = ("offset", "shape", "source", "stride")

    def __init__(self, t: torch.Tensor, source: _BNOutput) -> None:
        self.source, self.shape, self.stride, self.offset = source, t.shape, t.stride(), t.storage_offset()

    def tensor(self) -> torch.Tensor:
        return self.source.output().as_strided(self.shape, self.stride, self.offset)


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _registered(entry: tuple[Any, ...] | None, t: torch.Tensor, ptr: int) -> bool:
    """Whether ``t`` (storage address ``ptr``) is the registered tensor of ``entry`` (weak ref, version, ...) or a
    view of it: that tensor still lives on the same storage, device and dtype, unchanged since registration."""
    r = entry[0]() if entry is not None else None
    return (r is not None and r.untyped_storage().data_ptr() == ptr and r.device == t.device and r.dtype == t.dtype
            and t._version == entry[1])


class _SpikeBits:
    def __init__(self) -> None:
        # storage address -> the spike tensor, weakly: an address is trusted only while its spikes live
        # (while they do, their storage cannot be freed and reused). Any view of that storage (a reshape, the
        # unsqueeze inside a 1-d pool) holds spikes only, so it is packed too.
        # The version counter (shared by views) at marking: a spike tensor changed in place since then is
        # no longer 0/1 and is saved as usual.
        self.spikes: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        # storage address -> (the batch-norm output, weakly; its version; how to recompute it). Only the tensor
        # itself (same storage, same version) is recomputed: a view into it is recovered by as_strided.
        self.bn_outputs: dict[int, tuple[weakref.ref[torch.Tensor], int, _BNOutput]] = {}

    def mark_bn(self, bn: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if type(bn) not in _BN_TYPES or not bn.training or len(args) != 1:
            return
        x = args[0]
        if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)) or x.device.type == "meta":
            return
        if not (x.requires_grad or any(p is not None and p.requires_grad for p in (bn.weight, bn.bias))):
            return  # the batch norm saves nothing, so its input would be kept alive for us alone
        if torch.is_autocast_enabled(x.device.type) or out.untyped_storage().data_ptr() == 0:
            return
        self.bn_outputs[out.untyped_storage().data_ptr()] = (weakref.ref(out), out._version, _BNOutput(x, bn))

    def mark(self, t: torch.Tensor) -> None:
        if t.device.type != "meta" and t.untyped_storage().data_ptr() != 0:
            self.spikes[t.untyped_storage().data_ptr()] = (weakref.ref(t), t._version)

    def pack(self, t: torch.Tensor) -> Any:
        if t.layout != torch.strided or t.numel() == 0 or t.device.type == "meta" or not t.is_floating_point():
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr == 0:  # no real storage (meta, fake tensors): addresses say nothing
            return t
        if _registered(self.spikes.get(ptr), t, ptr):
            return _Packed(t)
        bn_entry = self.bn_outputs.get(ptr)
        if _registered(bn_entry, t, ptr):
            return _Recompute(t, bn_entry[2])
        return t

    @staticmethod
    def unpack(p: Any) -> torch.Tensor:
        return p.tensor() if isinstance(p, (_Packed, _Recompute)) else p


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
def spike_bits(recompute_batch_norm: bool = False) -> Iterator[None]:
    """Inside the block, spikes registered by ``mark_spikes`` that autograd saves are stored as bits, and with
    ``recompute_batch_norm`` saved outputs of training-mode batch norms are recomputed in the backward (see the
    module docstring).

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
    # a global module hook (removed with the block) sees every batch norm the block runs, whoever built it; it
    # acts only for this block's context (other threads have their own)
    handle = register_module_forward_hook(functools.partial(_mark_bn_hook, state)) if recompute_batch_norm else None
    try:
        with torch.autograd.graph.saved_tensors_hooks(state.pack, state.unpack):
            yield
    finally:
        if handle is not None:
            handle.remove()
        _ACTIVE.reset(token)
        # the registries may outlive the block (autograd keeps the hooks with what they saved): drop what they
        # reference, or a batch norm's input would live until the whole backward ends
        state.spikes.clear()
        state.bn_outputs.clear()


def _mark_bn_hook(state: _SpikeBits, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
    if _ACTIVE.get() is state:
        state.mark_bn(module, args, out)
