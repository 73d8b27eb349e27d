"""``spikify``: one-call conversion of an ANN's architecture into a multi-step SNN.

How it works (and why unmodified forward code such as torchvision's ResNet/VGG keeps working):

- the SNN holds a copy of the ANN (``body``; weights copied, or shared with ``copy=False``) in which
  every activation module (``nn.ReLU`` by default) is replaced by a :class:`FoldedNeuron` wrapping a
  multi-step spiking neuron, and every ``nn.AvgPool1d``/``nn.AvgPool2d`` whose windows tile its input
  (stride = kernel, no padding) by ``lasnn.nn.AvgPool1d``/``AvgPool2d``: the same results from a fused CPU
  kernel that saves nothing for the backward;
- input ``[B, ...]`` is encoded to ``[T, B, ...]`` and folded to ``[T*B, ...]``; the body's own
  ``forward`` then runs every stateless layer (conv, linear, batch norm, pooling, dropout, flatten,
  residual additions) on all T steps at once, batch norm sharing its statistics over time;
- each :class:`FoldedNeuron` unfolds ``[T*B, ...] -> [T, B, ...]``, runs the neuron over time with one
  fused ``lasnn.lif`` call, and folds the spikes back;
- the body's output ``[T*B, classes]`` is unfolded to per-step logits ``[T, B, classes]`` and averaged.

Every forward starts from the neurons' initial membrane (zero for ``lasnn.nn.LIF``/``IF``), so no
state leaks between calls and nothing needs resetting. For streaming (a long input in chunks) use
:meth:`SNN.streaming`, which carries each neuron's membrane from one chunk to the next.

Consequences of folding worth knowing: a module the forward calls twice (torchvision's BasicBlock
reuses one ``ReLU``) is one neuron module that runs a separate multi-step pass per call; dropout
draws an independent mask per time step (SpikingJelly shares one mask over time); every replaced
activation type (``ReLU6``, ``LeakyReLU``...) becomes the same spiking neuron, whose clipping/leak is
the neuron's own.

Activations that would stay analog are refused by default (``on_analog="error"``; ``"warn"`` or
``"ignore"`` accept a partly analog network): a hidden-activation module of a type not in
``activations`` (``nn.GELU``, ``nn.SiLU``...; see :data:`ANALOG_MODULES`) is found when ``spikify``
builds the SNN, and an activation applied as a function (``F.relu(x)``, ``torch.relu``, ``x.relu()``,
``F.gelu``...; see :data:`ANALOG_FUNCTIONS`) outside the spiking sites is found on the SNN's first eager
forward, which runs under a ``TorchFunctionMode`` that records such calls (forward code cannot be
inspected without running it; torch.fx tracing fails on data-dependent control flow). Not detected:
rectifiers spelled as other ops (``x.clamp(min=0)``, ``torch.maximum(x, 0)``) and a first forward that is
already compiled (``torch.compile`` skips the check).
"""

from __future__ import annotations

import contextlib
import copy as _copy
import itertools
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lasnn.nn.encoders import DirectEncoder, PoissonEncoder, check_T
from lasnn.nn.lowmem import mark_spikes, spike_bits
from lasnn.nn.neurons import LIF, count_spikes
from lasnn.nn.pool import fast_pool

__all__ = [
    "ANALOG_FUNCTIONS", "ANALOG_MODULES", "DEFAULT_ACTIVATIONS", "SNN", "AnalogActivationWarning", "FoldedNeuron",
    "SpikeCounter", "default_neuron", "spikify",
]

#: Activation modules replaced by spiking neurons unless ``activations=`` says otherwise. Functional
#: activations (``F.relu`` inside a forward) cannot be replaced; they are detected (see ``on_analog``).
DEFAULT_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)

#: Hidden-layer activation modules that stay analog when their type is not in ``activations``.
#: Gates and output squashers (``Sigmoid``, ``Hardsigmoid``, ``Softmax``...) are not listed: analog
#: gating (squeeze-excitation) is a deliberate design, not a forgotten ReLU.
ANALOG_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Threshold, nn.Tanh,
)

#: ``__name__`` of the functions (``torch.*``, ``torch.nn.functional.*``, ``Tensor`` methods, in-place
#: variants) that the first-forward check reports when called outside a spiking site.
ANALOG_FUNCTIONS: frozenset[str] = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "rrelu", "rrelu_", "elu", "elu_", "celu",
    "celu_", "selu", "selu_", "gelu", "silu", "mish", "hardswish", "hardtanh", "hardtanh_", "softplus",
    "threshold", "threshold_", "tanh", "tanh_",
})

_ON_ANALOG = ("error", "warn", "ignore")
_LOW_MEMORY = (False, True, "bits", "recompute", "recompute_all")


class AnalogActivationWarning(UserWarning):
    """An activation of the ANN stays analog in the SNN (``spikify(..., on_analog="warn")``)."""


_CONV_DIMS = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}


def default_neuron() -> LIF:
    """The LaSNN neuron: ``V <- 0.5 V + X``, threshold 1, hard reset to 0, triangle surrogate α=1."""
    return LIF(tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=False, surrogate="triangle", alpha=1.0)


class FoldedNeuron(nn.Module):
    """Runs a multi-step neuron ``[T, *] -> [T, *]`` on time-folded input ``[T*B, ...] -> [T*B, ...]``.

    ``T`` is set by the owning :class:`SNN` before every call (it is part of the call, not of the
    weights). In streaming mode the membrane after the last step is kept (detached: truncated BPTT)
    and used as the initial membrane of the next call; a module called several times per forward
    (torchvision's BasicBlock reuses one ReLU) keeps one state per call site, in call order.

    Streaming needs a neuron that owns its state: one defining
    ``forward_stateful(x_seq, v_init) -> (spikes, v_last)``, as ``lasnn.nn.LIF``/``IF`` do.
    """

    def __init__(self, neuron: nn.Module, T: int = 1) -> None:
        super().__init__()
        if not isinstance(neuron, nn.Module):
            raise TypeError(f"neuron must be an nn.Module, got {type(neuron).__name__}")
        self.neuron = neuron
        self.T = check_T(T)
        self._streaming = False
        self._states: list[torch.Tensor] = []
        self._call = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[T*B, ...]`` (time-major fold of ``[T, B, ...]``) -> spikes of the same shape."""
        T = self.T
        if x.dim() < 1 or x.shape[0] % T != 0:
            raise ValueError(
                f"FoldedNeuron expects time-folded input [T*B, ...] with T={T}, got shape {tuple(x.shape)}; "
                "call it through the SNN returned by lasnn.spikify, or set .T"
            )
        x_seq = x.reshape(T, x.shape[0] // T, *x.shape[1:])
        if self._streaming:
            spikes = self._forward_streaming(x_seq)
        else:
            spikes = self.neuron(x_seq)
        out = spikes.reshape(x.shape)
        # exactly 0/1 (lasnn.lif's spikes, not a subclass's own dynamics): may be saved as bits (lasnn.nn.lowmem)
        n = self.neuron
        if not torch.compiler.is_compiling() and isinstance(n, LIF) and type(n).forward is LIF.forward \
                and type(n).forward_stateful is LIF.forward_stateful:
            mark_spikes(out)
        return out

    def _forward_streaming(self, x_seq: torch.Tensor) -> torch.Tensor:
        idx = self._call
        self._call += 1
        v = self._states[idx] if idx < len(self._states) else None
        if v is not None and v.shape != x_seq.shape[1:]:
            raise ValueError(
                f"streaming: chunk has per-step shape {tuple(x_seq.shape[1:])} but the carried membrane has "
                f"{tuple(v.shape)}; keep the batch size and input size fixed within one streaming() block"
            )
        n = self.neuron
        if hasattr(n, "forward_stateful"):  # the neuron owns its state: lasnn.nn.LIF/IF, IFNeuron, custom ones
            spikes, v_last = n.forward_stateful(x_seq, v)
        else:
            raise TypeError(
                f"streaming needs a lasnn.nn.LIF/IF neuron or one with forward_stateful(x_seq, v_init), "
                f"got {type(n).__name__}"
            )
        v_last = v_last.detach()
        if idx < len(self._states):
            self._states[idx] = v_last
        else:
            self._states.append(v_last)
        return spikes

    def extra_repr(self) -> str:
        return f"T={self.T}" + (", streaming" if self._streaming else "")


class SpikeCounter:
    """Context manager counting the outputs of every spiking site (:class:`FoldedNeuron`) of ``model``.

    Inside the block every forward adds its spikes (``count_spikes``: exact, kept as a tensor, so no host
    sync per site and batch) and its neuron-steps; :meth:`rate` reads them once. Raises ValueError if
    ``model`` has no spiking site.
    """

    def __init__(self, model: nn.Module) -> None:
        self.sites = [m for m in model.modules() if isinstance(m, FoldedNeuron)]
        if not self.sites:
            raise ValueError(f"{type(model).__name__} has no spiking sites (FoldedNeuron): is it a spikify'd SNN?")
        self.spikes: torch.Tensor | float = 0.0
        self.neuron_steps = 0
        self._handles: list = []

    def _hook(self, module: nn.Module, args: object, out: torch.Tensor) -> None:
        self.spikes = self.spikes + count_spikes(out)
        self.neuron_steps += out.numel()

    def __enter__(self) -> SpikeCounter:
        self._handles = [m.register_forward_hook(self._hook) for m in self.sites]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def rate(self) -> float:
        """Spikes per neuron-step so far (NaN before any forward)."""
        return float(self.spikes) / self.neuron_steps if self.neuron_steps else float("nan")


def _listing(items: list[str], limit: int = 6) -> str:
    """Comma-separated, at most ``limit`` items then a count (a MobileNet has dozens of sites)."""
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more} more" if more > 0 else "")


def _report_analog(what: str, on_analog: str, stacklevel: int) -> None:
    """Raise (``on_analog="error"``) or warn about activations that stay analog.

    ``stacklevel`` counts from the caller of this function to the user's code (for the warning's location).
    """
    fix = ("spikify replaces activation modules only: give every call site its own nn.ReLU module (or pass "
           "activations= with your module types)")
    if on_analog == "error":
        raise ValueError(f"{what}; the SNN would be partly analog. {fix}, or pass on_analog='warn' / 'ignore' "
                         "to accept a partly analog network")
    if on_analog == "warn":
        warnings.warn(f"{what}; they stay analog in the SNN. {fix}", AnalogActivationWarning, stacklevel=stacklevel + 1)


class _AnalogCallRecorder(TorchFunctionMode):
    """Counts calls of :data:`ANALOG_FUNCTIONS` made outside the spiking sites, by calling module.

    The module stack comes from forward pre-/post-hooks on every module of the body; inside a
    :class:`FoldedNeuron` (the neuron may use any op) or an analog module already reported by
    ``spikify`` nothing is counted.
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.stack: list[str] = []
        self.muted = 0
        self.calls: dict[tuple[str, str], int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _AnalogCallRecorder:
        for path, m in self.body.named_modules():
            mute = isinstance(m, (FoldedNeuron, *ANALOG_MODULES))
            where = f"{path or '<top>'} ({type(m).__name__})"
            self._handles.append(m.register_forward_pre_hook(self._enter_hook(where, mute)))
            self._handles.append(m.register_forward_hook(self._exit_hook(mute), always_call=True))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _enter_hook(self, where: str, mute: bool) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple) -> None:
            self.stack.append(where)
            self.muted += mute

        return hook

    def _exit_hook(self, mute: bool) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple, out: object) -> None:
            self.stack.pop()
            self.muted -= mute

        return hook

    def __torch_function__(
        self, func: Callable[..., object], types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> object:
        name = getattr(func, "__name__", "")
        if name in ANALOG_FUNCTIONS and not self.muted:
            key = (name, self.stack[-1] if self.stack else "<top>")
            self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> str:
        return _listing([f"{name} x{n} in {where}" for (name, where), n in self.calls.items()])


def _make_neuron_factory(neuron: object) -> Callable[[], nn.Module]:
    if neuron is None:
        return default_neuron
    if isinstance(neuron, nn.Module):
        if isinstance(neuron, FoldedNeuron):
            raise TypeError("neuron must be a multi-step neuron such as lasnn.nn.LIF, not a FoldedNeuron")
        return lambda: _copy.deepcopy(neuron)
    if callable(neuron):
        def factory() -> nn.Module:
            m = neuron()
            if not isinstance(m, nn.Module):
                raise TypeError(f"neuron factory must return an nn.Module, got {type(m).__name__}")
            return m

        return factory
    raise TypeError(
        "neuron must be None (the LaSNN LIF), an nn.Module (copied per layer) or a zero-argument factory, "
        f"got {type(neuron).__name__}"
    )


def _infer_input_dims(ann: nn.Module) -> int | None:
    """Rank of one un-encoded input ``[B, ...]``; None if ambiguous.

    Module registration order need not be execution order (a classifier may be registered before the
    convs), so any conv decides first (``Conv2d`` -> 4); a net without convs takes ``[B, features]`` (2)
    unless a flatten is registered before its first linear layer.
    """
    for m in ann.modules():
        for cls, dims in _CONV_DIMS.items():
            if isinstance(m, cls):
                return dims
    flatten_seen = False
    for m in ann.modules():
        if isinstance(m, nn.Flatten):
            flatten_seen = True
        elif isinstance(m, nn.Linear):
            # a flatten registered before the first linear: the input rank cannot be told from the layers
            return None if flatten_seen else 2
    return None


class SNN(nn.Module):
    """A multi-step SNN built by :func:`spikify` (see the module docstring for how it runs).

    Attributes:
        body: the converted copy of the ANN, run on time-folded tensors ``[T*B, ...]``.
        encoder: turns ``[B, ...]`` into ``[T, B, ...]`` (``DirectEncoder``, ``PoissonEncoder`` or yours).
        T: time steps used for un-encoded input (settable; also updates the encoder's ``T``).
        input_dims: rank of one un-encoded input, e.g. 4 for ``[B, C, H, W]``.
        on_analog: what the first eager forward does about activation functions called outside the
            spiking sites (``"error"``, ``"warn"`` or ``"ignore"``; see :func:`spikify`).
        low_memory: what a forward that builds an autograd graph saves for the backward
            (``lasnn.nn.lowmem``; gradients are bit-identical at every level). ``True`` (default, the same as
            ``"bits"``): the spikes of LIF/IF sites that autograd saves (the input of the next conv/linear)
            are kept as bits, not floats, at no measurable cost in step time. ``"recompute"``: also the
            outputs of training-mode batch norms that autograd saves (the neuron's input) are recomputed in
            the backward from the batch norm's input: about a quarter less activation memory on a VGG-style
            student, for one more batch-norm forward per layer (+5% to +22% step time on a CPU, by model and
            memory layout, measured).
            ``"recompute_all"``: also the outputs of the convolutions, linear layers and average pools whose
            input is spikes (kept as bits), another recomputable tensor, or a tensor they keep anyway (the analog
            first layer's input) are recomputed: autograd keeps little more than the bits of the spikes and the
            input, for one more forward of those layers in the backward. Recomputations run under the autocast
            state of the forward, so every level works under ``torch.autocast`` too.
            ``False``: the plain path. Off under ``torch.compile`` and wherever other saved-tensor hooks
            (checkpointing, offloading) are active.

    Shapes: ``snn(x)`` maps ``[B, ...]`` (or encoded ``[T', B, ...]``) to ``[B, classes]``;
    ``snn(x, return_steps=True)`` / ``snn.forward_steps(x)`` to per-step logits ``[T, B, classes]``.
    """

    def __init__(self, body: nn.Module, T: int, encoder: nn.Module, input_dims: int, on_analog: str = "error") -> None:
        super().__init__()
        if on_analog not in _ON_ANALOG:
            raise ValueError(f"on_analog must be one of {_ON_ANALOG}, got {on_analog!r}")
        self.body = body
        self.encoder = encoder
        self.input_dims = int(input_dims)
        self.on_analog = on_analog
        # the functional-activation check runs once, on the first eager forward (it needs real calls)
        self._analog_check_pending = on_analog != "ignore"
        self.low_memory = True
        self._T = 1
        self.T = T

    @property
    def low_memory(self) -> bool | str:
        return self._low_memory

    @low_memory.setter
    def low_memory(self, value: bool | str) -> None:
        if value not in _LOW_MEMORY or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ValueError(f"low_memory must be one of {_LOW_MEMORY}, got {value!r}")
        self._low_memory = value

    @property
    def T(self) -> int:
        return self._T

    @T.setter
    def T(self, value: int) -> None:
        self._T = check_T(value)
        if hasattr(self.encoder, "T"):
            self.encoder.T = self._T

    @property
    def feature_layers(self) -> dict[str, str]:
        """Stage name -> module path inside ``body`` (copied from the ANN's ``feature_layers``; {} if none)."""
        return dict(getattr(self.body, "feature_layers", {}) or {})

    def neurons(self) -> list[FoldedNeuron]:
        """All spiking sites, in module order."""
        return [m for m in self.body.modules() if isinstance(m, FoldedNeuron)]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` -> ``[T, B, ...]`` through the encoder; ``[T, B, ...]`` is returned as is.

        Raises ValueError for any other rank.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        d = self.input_dims
        if x.dim() == d:
            x_seq = self.encoder(x)
            if not isinstance(x_seq, torch.Tensor) or x_seq.dim() != d + 1:
                raise ValueError(f"the encoder must return [T, B, ...] with {d + 1} dims, got "
                                 f"{tuple(x_seq.shape) if isinstance(x_seq, torch.Tensor) else type(x_seq).__name__}")
            return x_seq
        if x.dim() == d + 1:
            if x.shape[0] < 1:
                raise ValueError(f"encoded input [T, B, ...] needs T >= 1, got shape {tuple(x.shape)}")
            return x
        raise ValueError(
            f"x must be un-encoded input with {d} dims ([B, ...]) or already encoded input with {d + 1} dims "
            f"([T, B, ...]), got shape {tuple(x.shape)}"
        )

    def _prepare(self, T: int) -> None:
        for n in self.neurons():
            if n.T != T:  # write only on change: fewer side effects under torch.compile
                n.T = T
            if n._streaming:
                n._call = 0

    def forward(self, x: torch.Tensor, *, return_steps: bool = False) -> torch.Tensor:
        """Run the SNN from zero membranes (or, inside :meth:`streaming`, from the carried ones).

        Args:
            x: ``[B, ...]`` (encoded to ``self.T`` steps by the encoder) or ``[T', B, ...]`` (already
                encoded: ``T'`` steps, ``self.T`` is not used).
            return_steps: return the per-step outputs instead of their mean. Step ``t`` is the output
                of the body at step ``t`` (the logits of a classifier), computed from the spikes of
                steps ``0..t`` only, so ``out[:t+1].mean(0)`` is the prediction after ``t+1`` steps.
        Returns:
            logits averaged over time ``[B, classes]``, or per-step logits ``[T, B, classes]`` with
            ``return_steps`` (``classes`` stands for whatever trailing shape the ANN's output has).
        Raises:
            ValueError for input of the wrong rank, and on the first eager call with
            ``on_analog="error"`` when the body applies an activation function outside the spiking sites.
        """
        if self._low_memory and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            with spike_bits("bits" if self._low_memory is True else self._low_memory):
                return self._forward(x, return_steps)
        return self._forward(x, return_steps)

    def _forward(self, x: torch.Tensor, return_steps: bool) -> torch.Tensor:
        x_seq = self.encode(x)
        T, B = x_seq.shape[0], x_seq.shape[1]
        self._prepare(T)
        folded = x_seq.reshape(T * B, *x_seq.shape[2:])
        # is_compiling() first: Dynamo then never reads the flag, so no guard on it and no recompile
        # when an eager call clears it
        if not torch.compiler.is_compiling() and self._analog_check_pending:
            with _AnalogCallRecorder(self.body) as rec:
                out = self.body(folded)
            if rec.calls:  # on "error" the check stays pending: every call refuses, not just the first
                _report_analog(f"the ANN's forward applies activation functions outside any replaced module "
                               f"({rec.summary()})", self.on_analog, stacklevel=5)
            self._analog_check_pending = False
        else:
            out = self.body(folded)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the ANN's forward must return one tensor [B, ...], got {type(out).__name__}")
        out = out.reshape(T, B, *out.shape[1:])
        return out if return_steps else out.mean(0)

    def forward_steps(self, x: torch.Tensor) -> torch.Tensor:
        """Per-step logits, ``[B, ...]`` or ``[T, B, ...]`` -> ``[T, B, classes]``: forward(x, return_steps=True)."""
        return self.forward(x, return_steps=True)

    @contextlib.contextmanager
    def streaming(self) -> Iterator[SNN]:
        """Carry neuron membranes across calls inside the block (chunked / online inference).

        Each call inside the block continues from the membranes the previous call left (detached, so
        gradients are truncated at chunk boundaries); the state is dropped when the block ends. Feed
        already-encoded chunks ``[T_chunk, B, ...]`` of a long input ``[T, B, ...]`` (chunk lengths may
        differ), or ``[B, ...]`` to keep running on the same stimulus for another ``self.T`` steps. Every
        call returns the outputs of its own steps only: ``[T_chunk, B, classes]`` with
        ``return_steps=True``, else their mean ``[B, classes]``. Concatenating the per-step outputs of
        the chunks gives exactly the per-step outputs of one call on the whole sequence::

            with snn.streaming():
                step_logits = [snn(chunk, return_steps=True) for chunk in x_seq.split(4)]  # x_seq: [T, B, ...]
            torch.cat(step_logits)  # [T, B, classes] == snn(x_seq, return_steps=True)

        The batch size and per-sample shape must stay fixed inside one block (ValueError otherwise);
        :meth:`reset_state` starts over without leaving the block. Needs neurons that can return their
        membrane (``lasnn.nn.LIF``/``IF`` or ``forward_stateful``, see :class:`FoldedNeuron`).
        """
        neurons = self.neurons()
        for n in neurons:
            n._streaming, n._states, n._call = True, [], 0
        try:
            yield self
        finally:
            for n in neurons:
                n._streaming, n._states, n._call = False, [], 0

    def reset_state(self) -> None:
        """Forget carried membranes (only meaningful inside :meth:`streaming`)."""
        for n in self.neurons():
            n._states, n._call = [], 0

    def stream_state(self) -> list[list[torch.Tensor]]:
        """Inside :meth:`streaming`: the carried membranes, to continue this sequence later.

        Returns one list per spiking site (module order) of its membranes ``[B, ...]``, one per call site
        (empty before the first call). The tensors are not copied: the SNN replaces, never overwrites, a
        carried membrane, so the snapshot stays valid while other sequences run. Several sequences (say,
        batches of a test set) can thus be advanced in turns: ``load_stream_state(s)``, run, ``s =
        stream_state()``.

        Raises:
            RuntimeError outside a :meth:`streaming` block.
        """
        return [list(n._states) for n in self._streaming_neurons("stream_state()")]

    def _streaming_neurons(self, caller: str) -> list[FoldedNeuron]:
        neurons = self.neurons()
        if not all(n._streaming for n in neurons):
            raise RuntimeError(f"{caller} needs a streaming() block: outside it no membrane is carried")
        return neurons

    def load_stream_state(self, state: list[list[torch.Tensor]]) -> None:
        """Inside :meth:`streaming`: continue from ``state``, a :meth:`stream_state` snapshot of this SNN.

        Raises:
            RuntimeError outside a :meth:`streaming` block; ValueError when ``state`` does not have one list of
            tensors per spiking site.
        """
        neurons = self._streaming_neurons("load_stream_state()")
        if not isinstance(state, (list, tuple)) or len(state) != len(neurons) or not all(
                isinstance(s, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in s) for s in state):
            raise ValueError(f"state must be a stream_state() snapshot of this SNN: {len(neurons)} lists of "
                             f"membrane tensors, one per spiking site; got {type(state).__name__} of "
                             f"{len(state) if isinstance(state, (list, tuple)) else '?'} entries")
        for n, s in zip(neurons, state, strict=True):
            n._states, n._call = list(s), 0

    def extra_repr(self) -> str:
        return f"T={self.T}, input_dims={self.input_dims}"


def spikify(
    ann: nn.Module,
    *,
    T: int,
    neuron: nn.Module | Callable[[], nn.Module] | None = None,
    encoding: str | nn.Module = "direct",
    seed: int | None = None,
    copy: bool = True,
    activations: tuple[type[nn.Module], ...] = DEFAULT_ACTIVATIONS,
    input_dims: int | None = None,
    on_analog: str = "error",
) -> SNN:
    """Build a multi-step SNN from an ANN's own modules; the ANN is left untouched.

    Args:
        ann: any ``nn.Module`` whose activations are modules (``nn.ReLU``...), e.g. torchvision ResNet/VGG
            or a ``lasnn.models`` network. Its forward must map ``[N, ...]`` to one tensor ``[N, ...]``.
        T: time steps (>= 1) for un-encoded input.
        neuron: spiking neuron for every replaced activation: None (LaSNN LIF, see :func:`default_neuron`),
            a multi-step module such as ``lasnn.nn.LIF(...)``/``lasnn.nn.IF(...)`` (deep-copied per layer), or a
            zero-argument factory returning one.
        encoding: how un-encoded input ``[B, ...]`` becomes ``[T, B, ...]``: ``"direct"`` (the analog input
            repeated T times; the first layer generates the spikes), ``"poisson"`` (rate coding: spikes in
            {0, 1} drawn at every step with probability = the input min-max scaled to [0, 1] per sample,
            see ``lasnn.nn.PoissonEncoder``), or an encoder module mapping ``[B, ...]`` to ``[T, B, ...]``.
        seed: seed of the Poisson encoder's own generator: a fresh stream per SNN, continuing from call to
            call (every batch gets new spikes, the run is reproducible). None: the global torch RNG.
        copy: deep-copy the weights (default). ``False`` shares parameters *and* buffers (batch-norm
            running statistics) with ``ann``, so training one trains the other.
        activations: module types replaced by neurons (default ``nn.ReLU``, ``nn.ReLU6``, ``nn.LeakyReLU``).
        input_dims: rank of one un-encoded input (4 for ``[B, C, H, W]``); inferred from the first conv or
            linear layer when None.
        on_analog: what to do about activations that would stay analog (see the module docstring):
            ``"error"`` (default; ValueError), ``"warn"`` (:class:`AnalogActivationWarning`) or ``"ignore"``.
            Modules of an :data:`ANALOG_MODULES` type not in ``activations`` are found here; activation
            functions (``F.relu``...) called outside the spiking sites on the SNN's first eager forward.
    Returns:
        an :class:`SNN`: ``snn(x [B, ...]) -> [B, classes]`` (logits averaged over T),
        ``snn(x, return_steps=True)`` -> per-step logits ``[T, B, classes]``; already-encoded input
        ``[T, B, ...]`` is accepted as is; ``with snn.streaming():`` carries membranes across calls.
    Raises:
        TypeError/ValueError for a bad argument; ValueError when ``ann`` has no activation module to replace
        or (``on_analog="error"``) has an activation module that would stay analog.
    """
    if not isinstance(ann, nn.Module):
        raise TypeError(f"ann must be an nn.Module, got {type(ann).__name__}")
    T = check_T(T)
    if isinstance(encoding, str):
        if encoding == "direct":
            encoder: nn.Module = DirectEncoder(T)
        elif encoding == "poisson":
            encoder = PoissonEncoder(T, seed=seed)
        else:
            raise ValueError(f"encoding must be 'direct', 'poisson' or an encoder module, got {encoding!r}")
    elif isinstance(encoding, nn.Module):
        encoder = encoding
    else:
        raise TypeError(f"encoding must be a str or an nn.Module, got {type(encoding).__name__}")
    if not isinstance(activations, tuple) or not activations or not all(
        isinstance(a, type) and issubclass(a, nn.Module) for a in activations
    ):
        raise TypeError(f"activations must be a non-empty tuple of nn.Module subclasses, got {activations!r}")
    factory = _make_neuron_factory(neuron)
    if input_dims is None:
        input_dims = _infer_input_dims(ann)
        if input_dims is None:
            raise ValueError(
                "cannot infer the input rank of ann (its first layer is not a conv, or a flatten precedes the "
                "first linear); pass input_dims=, e.g. 4 for [B, C, H, W]"
            )
    elif isinstance(input_dims, bool) or not isinstance(input_dims, int) or input_dims < 1:
        raise ValueError(f"input_dims must be an int >= 1, got {input_dims!r}")
    if on_analog not in _ON_ANALOG:
        raise ValueError(f"on_analog must be one of {_ON_ANALOG}, got {on_analog!r}")
    if isinstance(ann, activations):
        raise ValueError("ann is itself an activation; wrap the layers in an nn.Module")

    if copy:
        body = _copy.deepcopy(ann)
    else:
        # Pre-seeding the memo makes deepcopy reuse the tensors: a new module tree over the same storage.
        memo = {id(t): t for t in itertools.chain(ann.parameters(), ann.buffers())}
        body = _copy.deepcopy(ann, memo)

    replaced = 0
    for parent in list(body.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, activations):
                setattr(parent, name, FoldedNeuron(factory(), T))
                replaced += 1
            elif (pool := fast_pool(child)) is not None:
                setattr(parent, name, pool)  # same result, fused CPU kernel (lasnn.nn.pool)
    if replaced == 0:
        names = ", ".join(a.__name__ for a in activations)
        raise ValueError(
            f"ann has no activation module to replace (looked for {names}). Activations applied functionally "
            "(F.relu / torch.relu inside forward) cannot be replaced: use nn.ReLU modules, or pass activations="
        )
    analog = [f"{path} ({type(m).__name__})" for path, m in body.named_modules()
              if isinstance(m, ANALOG_MODULES) and not isinstance(m, FoldedNeuron)]
    if analog:
        _report_analog(f"ann has activation modules of types not in activations=: {_listing(analog)}", on_analog,
                       stacklevel=2)
    return SNN(body, T, encoder, input_dims, on_analog)
