"""Lossless low-memory BPTT: saved spikes kept as bits, saved module outputs recomputed.

A spiking layer's output is exactly 0 or 1, yet the conv/linear (or pooling, or attention loss) that reads it
saves it for its backward as a full float tensor, ``T`` times larger than in the ANN. And the neuron after a
batch norm saves the batch norm's output, while the batch norm itself saves its input: two float ``[T, ...]``
tensors per layer where one determines the other. Inside :func:`spike_bits` (which ``lasnn.nn.SNN`` enters in
every forward that builds a graph, unless its ``low_memory`` is False), a
``torch.autograd.graph.saved_tensors_hooks`` pair changes what autograd keeps:

- every spike tensor a LIF/IF site emits is registered, and a registered tensor that autograd saves is stored as
  one bit per element (uint8 words), unpacked to the same dtype when the backward needs it;
- at level ``"recompute"`` (``snn.low_memory = "recompute"``), the output of every ``nn.BatchNorm1d/2d/3d``
  in training mode (batch statistics) is registered with its input, weight and bias, and when autograd saves it
  (the neuron's backward needs it), only that reference is kept: the backward recomputes it with the same
  batch-norm forward on the same input, which the batch norm's own backward keeps anyway;
- at level ``"recompute_all"`` (``snn.low_memory = "recompute_all"``), also the outputs of convolutions, linear layers
  and average pools are registered when their input can be had without keeping anything more: spikes (their
  bits), another registered output, or (convolution, linear) the input it saves for its weight gradient anyway
  (the analog first layer's). The batch norm's input, the next convolution's pooled input, ... are then
  recomputed too, in a chain that starts from bits and the network's input. Each recomputed tensor is a
  reference-counted node: computed at its first use in the backward, cached until its last, so a convolution's
  output (read by the batch norm's backward and by the batch norm's recomputation) is computed once.

Each recomputation runs the module's own op under the autocast state the module ran under (so under
``torch.autocast`` too, a convolution recomputes in the same low precision from the same inputs). The values are
the same, so gradients are bit-identical (tested on the zoo models, in fp32 and under bf16 autocast). The saved
copy of spikes shrinks 32x (fp32) at no measurable cost; that of a batch-norm output to nothing, for one more
batch-norm forward per layer in the backward (+5% to +22% step time on a CPU, by model and layout: hence not the
default); with
``recompute_all`` what autograd keeps per spiking layer is about its bits, for one more forward of every
convolution too. Tensors that are none of these are saved as usual; so is any changed in place after it was
made.
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


class _Node:
    """A tensor the backward recomputes: ``compute(*inputs)`` (no grad) on its inputs, each a ``_Packed`` (spike
    bits), another ``_Node`` or a tensor kept anyway (the module saves it for its own backward).

    Reference-counted: every saved tensor that points here, and every node computed from it, is one use, taken
    when it is first needed (``acquire``: when autograd first saves it, or a dependent node becomes needed). The
    value is cached from its first computation until its last use, so a tensor needed twice in the backward
    (a convolution's output: by the batch norm's backward and for its own output's recomputation) is computed
    once, and freed as soon as autograd would have freed the saved original. A use beyond the counted ones (a
    second backward through a retained graph) recomputes it."""

    __slots__ = ("amp", "cache", "compute", "inputs", "live", "name", "users", "versions")

    def __init__(self, name: str, compute: Any, inputs: tuple[Any, ...],
                 versions: tuple[tuple[str, torch.Tensor | None], ...],
                 amp: tuple[str, bool, torch.dtype] | None = None) -> None:
        self.name, self.compute, self.inputs = name, compute, inputs
        # the autocast state the module ran under, (device type, enabled, dtype): the recomputation runs under the
        # same one, whatever autocast state the backward runs in, so each op sees the dtypes it saw in the forward
        self.amp = amp
        # tensors the recomputation reads (weights, inputs kept as is) and their versions now: changed in place
        # before the backward, they would give another value, so that is an error
        self.versions = tuple((what, t, None if t is None else t._version) for what, t in versions)
        self.users, self.live, self.cache = 0, False, None

    def acquire(self) -> None:
        self.users += 1
        if not self.live:  # first needed: so are its inputs, once each
            self.live = True
            for i in self.inputs:
                if isinstance(i, _Node):
                    i.acquire()

    def get(self) -> torch.Tensor:
        """The value, for one use."""
        v = self.cache
        if v is None:
            for what, t, version in self.versions:
                if t is not None and t._version != version:
                    raise RuntimeError(
                        f"lasnn low-memory BPTT: a {self.name}'s {what} was modified in place between the forward and "
                        "the backward, so its output cannot be recomputed (set snn.low_memory = False or True to save "
                        "it instead)"
                    )
            args = [i.get() if isinstance(i, _Node) else i.tensor() if isinstance(i, _Packed) else i
                    for i in self.inputs]
            with torch.no_grad(), (contextlib.nullcontext() if self.amp is None else
                                   torch.autocast(self.amp[0], dtype=self.amp[2], enabled=self.amp[1])):
                v = self.compute(*args)
        self.users -= 1
        self.cache = v if self.users > 0 else None
        return v


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _batch_norm_node(bn: nn.modules.batchnorm._BatchNorm, x: Any, x_tensor: torch.Tensor) -> _Node:
    """A training-mode batch norm's output, recomputed with batch statistics (the running ones not touched)."""
    w, b, eps = bn.weight, bn.bias, bn.eps
    return _Node("batch norm", lambda xv: F.batch_norm(xv, None, None, w, b, True, 0.0, eps), (x,),
                 (("input", x_tensor if not isinstance(x, _Node) else None), ("weight", w), ("bias", b)),
                 _autocast_state(x_tensor.device.type))


def _module_node(m: nn.Module, x: Any, device_type: str) -> _Node:
    """A convolution's, linear layer's or pool's output, recomputed by the module's own forward on its input."""
    amp = _autocast_state(device_type)
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        w, b = m.weight, m.bias
        return _Node(type(m).__name__, lambda xv: m._conv_forward(xv, w, b), (x,), (("weight", w), ("bias", b)), amp)
    if isinstance(m, nn.Linear):
        w, b = m.weight, m.bias
        return _Node("Linear", lambda xv: F.linear(xv, w, b), (x,), (("weight", w), ("bias", b)), amp)
    forward = type(m).forward  # a parameter-free pool: its forward, without the module's hooks
    return _Node(type(m).__name__, lambda xv: forward(m, xv), (x,), (), amp)


class _Recompute:
    """A saved tensor that is (a view of) a ``_Node``'s value: recovered by ``as_strided`` on it."""

    __slots__ = ("offset", "shape", "source", "stride")

    def __init__(self, t: torch.Tensor, source: _Node) -> None:
        self.source, self.shape, self.stride, self.offset = source, t.shape, t.stride(), t.storage_offset()
        source.acquire()

    def tensor(self) -> torch.Tensor:
        return self.source.get().as_strided(self.shape, self.stride, self.offset)


_LEVELS = ("bits", "recompute", "recompute_all")
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LINEAR_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_POOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
               nn.AdaptiveAvgPool3d)


def _registered(entry: tuple[Any, ...] | None, t: torch.Tensor, ptr: int) -> bool:
    """Whether ``t`` (storage address ``ptr``) is the registered tensor of ``entry`` (weak ref, version, ...) or a
    view of it: that tensor still lives on the same storage, device and dtype, unchanged since registration."""
    r = entry[0]() if entry is not None else None
    return (r is not None and r.untyped_storage().data_ptr() == ptr and r.device == t.device and r.dtype == t.dtype
            and t._version == entry[1])


def _real(t: Any) -> bool:
    return (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel() > 0 and t.device.type != "meta"
            and t.is_floating_point() and t.untyped_storage().data_ptr() != 0)


class _SpikeBits:
    def __init__(self, level: str) -> None:
        self.recompute = level in ("recompute", "recompute_all")
        self.recompute_all = level == "recompute_all"
        # storage address -> the spike tensor, weakly: an address is trusted only while its spikes live
        # (while they do, their storage cannot be freed and reused). Any view of that storage (a reshape, the
        # unsqueeze inside a 1-d pool) holds spikes only, so it is packed too.
        # The version counter (shared by views) at marking: a spike tensor changed in place since then is
        # no longer 0/1 and is saved as usual. The third item holds the bits of each view of it packed so far,
        # shared by every save of that view and every node recomputed from it.
        self.spikes: dict[int, tuple[weakref.ref[torch.Tensor], int, dict[tuple[Any, ...], _Packed]]] = {}
        # storage address -> (a module's output, weakly; its version; how to recompute it: a _Node)
        self.derived: dict[int, tuple[weakref.ref[torch.Tensor], int, _Node]] = {}

    def _bits(self, t: torch.Tensor, ptr: int) -> _Packed:
        """The bits of ``t``, a view of the registered spike tensor at ``ptr``."""
        views = self.spikes[ptr][2]
        key = (tuple(t.shape), t.stride(), t.storage_offset())
        p = views.get(key)
        if p is None:
            p = views[key] = _Packed(t)
        return p

    def _source(self, t: torch.Tensor) -> Any:
        """What ``t`` can be recovered from without keeping it: its bits (spikes), a node (a registered module
        output, or a view of one), or None."""
        ptr = t.untyped_storage().data_ptr()
        if _registered(self.spikes.get(ptr), t, ptr):
            return self._bits(t, ptr)
        entry = self.derived.get(ptr)
        if _registered(entry, t, ptr):
            node = entry[2]
            r = entry[0]()
            if (t.shape, t.stride(), t.storage_offset()) == (r.shape, r.stride(), r.storage_offset()):
                return node
            shape, stride, offset = t.shape, t.stride(), t.storage_offset()
            return _Node("view", lambda v: v.as_strided(shape, stride, offset), (node,), ())
        return None

    def mark_module(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        """Register ``out`` as recomputable when ``m`` is a module whose output the backward can recompute from
        what is kept anyway (see ``spike_bits``)."""
        # the hook sees every module call of the forward: the cheap type tests first
        kind = type(m)
        is_bn = kind in _BN_TYPES  # exactly torch's: a subclass may compute otherwise
        if not (is_bn or (self.recompute_all and (kind in _LINEAR_TYPES or isinstance(m, _POOL_TYPES)))):
            return
        if len(args) != 1 or not (_real(args[0]) and _real(out)):
            return
        x = args[0]
        if is_bn:
            if not m.training:
                return
            if not (x.requires_grad or any(p is not None and p.requires_grad for p in (m.weight, m.bias))):
                return  # the batch norm saves nothing, so its input would be kept alive for us alone
            src = self._source(x) if self.recompute_all else None
            node = _batch_norm_node(m, x if src is None or isinstance(src, _Packed) else src, x)
        elif kind in _LINEAR_TYPES:
            src = self._source(x)
            if src is None and not m.weight.requires_grad:
                return  # its input is not saved: keeping it would cost what recomputing saves
            node = _module_node(m, x if src is None else src, x.device.type)
        else:  # an average pool
            src = self._source(x)
            if src is None:
                return
            node = _module_node(m, src, x.device.type)
        self.derived[out.untyped_storage().data_ptr()] = (weakref.ref(out), out._version, node)

    def mark(self, t: torch.Tensor) -> None:
        if t.device.type != "meta" and t.untyped_storage().data_ptr() != 0:
            self.spikes[t.untyped_storage().data_ptr()] = (weakref.ref(t), t._version, {})

    def pack(self, t: torch.Tensor) -> Any:
        if not _real(t):
            return t
        ptr = t.untyped_storage().data_ptr()
        if _registered(self.spikes.get(ptr), t, ptr):
            return self._bits(t, ptr)
        entry = self.derived.get(ptr)
        if _registered(entry, t, ptr):
            return _Recompute(t, entry[2])
        return t

    @staticmethod
    def unpack(p: Any) -> torch.Tensor:
        return p.tensor() if isinstance(p, (_Packed, _Recompute)) else p

    def clear(self) -> None:
        self.spikes.clear()
        self.derived.clear()


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
def spike_bits(level: str = "bits") -> Iterator[None]:
    """Inside the block, autograd saves less (see the module docstring), by ``level``:

    - ``"bits"``: spikes registered by ``mark_spikes`` that autograd saves are stored as bits;
    - ``"recompute"``: also the saved outputs of training-mode batch norms are recomputed in the backward, from
      the batch norm's input (kept anyway);
    - ``"recompute_all"``: also the outputs of convolutions, linear layers and average pools that read spikes,
      recomputable tensors or an input they keep anyway.

    Recomputations run under the autocast state their module ran under, so gradients are the same bit for bit
    with and without the block, under autocast too. Nested blocks share the outer one. Where other saved-tensor
    hooks are already active (activation checkpointing, ``torch.autograd.graph.save_on_cpu``, ...) the block does
    nothing, so theirs keep working (autograd applies only the innermost pair). Leaves nothing behind: the hooks
    and the registry end with the block.
    """
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")
    if _ACTIVE.get() is not None or _other_hooks_active():
        yield
        return
    state = _SpikeBits(level)
    token = _ACTIVE.set(state)
    # a global module hook (removed with the block) sees every module the block runs, whoever built it; it acts
    # only for this block's context (other threads have their own)
    handle = (register_module_forward_hook(functools.partial(_mark_module_hook, state))
              if state.recompute else None)
    try:
        with torch.autograd.graph.saved_tensors_hooks(state.pack, state.unpack):
            yield
    finally:
        if handle is not None:
            handle.remove()
        _ACTIVE.reset(token)
        # the registries may outlive the block (autograd keeps the hooks with what they saved): drop what they
        # reference, or a batch norm's input would live until the whole backward ends
        state.clear()


def _mark_module_hook(state: _SpikeBits, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
    if _ACTIVE.get() is state:
        state.mark_module(module, args, out)
