"""``spikify``: one-call conversion of an ANN's architecture into a multi-step SNN.

How it works (and why unmodified forward code such as torchvision's ResNet/VGG keeps working):

- the SNN holds a copy of the ANN (``body``; weights copied, or shared with ``copy=False``) in which
  every activation module (``nn.ReLU`` by default) is replaced by a :class:`FoldedNeuron` wrapping a
  multi-step spiking neuron;
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
the neuron's own; activations called functionally (``F.relu``) are invisible and stay analog.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import itertools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lasnn.nn.encoders import DirectEncoder, PoissonEncoder, check_T
from lasnn.nn.neurons import LIF
from lasnn.ops.lif import lif

__all__ = ["DEFAULT_ACTIVATIONS", "SNN", "FoldedNeuron", "default_neuron", "spikify"]

#: Activation modules replaced by spiking neurons unless ``activations=`` says otherwise. Functional
#: activations (``F.relu`` inside a forward) cannot be found and are not replaced.
DEFAULT_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)

_CONV_DIMS = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}


def default_neuron() -> LIF:
    """The LaSNN neuron (METHODS.md): ``V <- 0.5 V + X``, threshold 1, hard reset to 0, triangle surrogate α=1."""
    return LIF(tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=False, surrogate="triangle", alpha=1.0)


class FoldedNeuron(nn.Module):
    """Runs a multi-step neuron ``[T, *] -> [T, *]`` on time-folded input ``[T*B, ...] -> [T*B, ...]``.

    ``T`` is set by the owning :class:`SNN` before every call (it is part of the call, not of the
    weights). In streaming mode the membrane after the last step is kept (detached: truncated BPTT)
    and used as the initial membrane of the next call; a module called several times per forward
    (torchvision's BasicBlock reuses one ReLU) keeps one state per call site, in call order.

    Streaming needs a neuron that can return its membrane: a ``lasnn.nn.LIF``/``IF`` (run through
    ``lasnn.lif(..., return_v=True)``) or any module defining
    ``forward_stateful(x_seq, v_init) -> (spikes, v_last)``.
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
        return spikes.reshape(x.shape)

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
        if isinstance(n, LIF):
            spikes, v_last = lif(
                x_seq, v, tau=n.tau, v_threshold=n.v_threshold, v_reset=n.v_reset, decay_input=n.decay_input,
                detach_reset=n.detach_reset, surrogate=n.surrogate, alpha=n.alpha, return_v=True, backend=n.backend,
            )
        elif hasattr(n, "forward_stateful"):
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
    """Rank of one un-encoded input ``[B, ...]``, from the first conv/linear layer; None if ambiguous."""
    flatten_seen = False
    for m in ann.modules():
        for cls, dims in _CONV_DIMS.items():
            if isinstance(m, cls):
                return dims
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
    """

    def __init__(self, body: nn.Module, T: int, encoder: nn.Module, input_dims: int) -> None:
        super().__init__()
        self.body = body
        self.encoder = encoder
        self.input_dims = int(input_dims)
        self._T = 1
        self.T = T

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
        """Run the SNN.

        Args:
            x: ``[B, ...]`` (encoded to ``T`` steps) or ``[T', B, ...]`` (already encoded; ``T'`` steps).
            return_steps: return the per-step outputs ``[T, B, classes]`` instead of their mean.
        Returns:
            logits averaged over time ``[B, classes]`` (or ``[T, B, classes]`` with ``return_steps``).
        """
        x_seq = self.encode(x)
        T, B = x_seq.shape[0], x_seq.shape[1]
        self._prepare(T)
        out = self.body(x_seq.reshape(T * B, *x_seq.shape[2:]))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the ANN's forward must return one tensor [B, ...], got {type(out).__name__}")
        out = out.reshape(T, B, *out.shape[1:])
        return out if return_steps else out.mean(0)

    def forward_steps(self, x: torch.Tensor) -> torch.Tensor:
        """Per-step outputs ``[T, B, classes]`` (same as ``forward(x, return_steps=True)``)."""
        return self.forward(x, return_steps=True)

    @contextlib.contextmanager
    def streaming(self) -> Iterator[SNN]:
        """Carry neuron membranes across calls inside the block (chunked / online inference).

        Each call inside the block continues from the membranes the previous call left (detached, so
        gradients are truncated at chunk boundaries); the state is dropped when the block ends. Feed
        already-encoded chunks ``[T_chunk, B, ...]`` for a long input, or ``[B, ...]`` to keep running on
        the same stimulus for another ``T`` steps::

            with snn.streaming():
                for chunk in x_seq.split(4):            # x_seq: [T, B, ...]
                    step_logits.append(snn(chunk, return_steps=True))
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
) -> SNN:
    """Build a multi-step SNN from an ANN's own modules; the ANN is left untouched.

    Args:
        ann: any ``nn.Module`` whose activations are modules (``nn.ReLU``...), e.g. torchvision ResNet/VGG
            or a ``lasnn.models`` network. Its forward must map ``[N, ...]`` to one tensor ``[N, ...]``.
        T: time steps (>= 1) for un-encoded input.
        neuron: spiking neuron for every replaced activation: None (LaSNN LIF, see :func:`default_neuron`),
            a multi-step module such as ``lasnn.nn.LIF(...)``/``lasnn.nn.IF(...)`` (deep-copied per layer), or a
            zero-argument factory returning one.
        encoding: ``"direct"`` (input repeated T times), ``"poisson"`` (Bernoulli spikes, see
            ``lasnn.nn.PoissonEncoder``) or an encoder module mapping ``[B, ...]`` to ``[T, B, ...]``.
        seed: seed of the Poisson encoder's generator (None: the global RNG).
        copy: deep-copy the weights (default). ``False`` shares parameters *and* buffers (batch-norm
            running statistics) with ``ann``, so training one trains the other.
        activations: module types replaced by neurons (default ``nn.ReLU``, ``nn.ReLU6``, ``nn.LeakyReLU``).
        input_dims: rank of one un-encoded input (4 for ``[B, C, H, W]``); inferred from the first conv or
            linear layer when None.
    Returns:
        an :class:`SNN`: ``snn(x [B, ...]) -> [B, classes]`` (time-averaged), ``snn(x, return_steps=True)``
        -> ``[T, B, classes]``; already-encoded input ``[T, B, ...]`` is accepted as is.
    Raises:
        TypeError/ValueError for a bad argument, or when ``ann`` has no activation module to replace.
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
    if replaced == 0:
        names = ", ".join(a.__name__ for a in activations)
        raise ValueError(
            f"ann has no activation module to replace (looked for {names}). Activations applied functionally "
            "(F.relu / torch.relu inside forward) cannot be replaced: use nn.ReLU modules, or pass activations="
        )
    return SNN(body, T, encoder, input_dims)
