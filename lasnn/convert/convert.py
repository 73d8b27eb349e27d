"""ANN-to-SNN conversion: BN folding, per-layer thresholds, IF neurons with soft reset (``lasnn.convert``).

One documented form is used throughout: **threshold balancing**. Weights stay as trained (after BN
folding); each activation module is replaced by IF neurons with threshold ``θ`` (the layer's calibrated
activation scale) that emit ``θ·S`` for a binary spike ``S``. The next layer therefore receives the same
scale as in the ANN, and the firing rate ``r`` approximates ``clip(a, 0, θ)/θ`` for an ANN activation
``a``. (The equivalent weight-scaling form, binary spikes with unit threshold and ``W_l·θ_{l-1}/θ_l``,
gives identical spikes; we keep thresholds because they are what QCFS learns and what users inspect.)

The neurons run on the LIF operator's inference path: ``lasnn.lif(x, v_init, tau=inf, v_threshold=θ,
v_reset=None)`` (IF neuron, reset by subtraction), with the membrane starting at
``initial_membrane·θ`` (0.5 halves the expected quantisation error, Bu et al. 2022; 0 is the classic
recipe). The SNN itself is built by ``lasnn.spikify`` (time folded into the batch, so unmodified
forward code: Sequential CNNs, torchvision ResNet/VGG, the zoo), with an :class:`IFNeuron` holding the
calibrated thresholds at every activation site.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lasnn.checks import check_float
from lasnn.convert.fold import fold_batchnorm
from lasnn.nn.neurons import count_spikes
from lasnn.nn.qcfs import QCFS
from lasnn.nn.spikify import SNN, FoldedNeuron, spikify
from lasnn.ops.lif import lif

__all__ = ["METHODS", "ConvertedSNN", "IFNeuron", "calibrate_thresholds", "convert"]

METHODS = ("robust", "max", "qcfs")
# Activation modules that conversion replaces by IF neurons (both are 0 for x <= 0 and monotone).
ACTIVATIONS = (nn.ReLU, QCFS)
# Activations an IF neuron cannot represent (negative outputs, saturation, smooth curves): refused.
_UNSUPPORTED = (nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Tanh)
# Positive activations kept per call site for the percentile; beyond this they are subsampled.
_MAX_SAMPLES = 1 << 23


def _batch_input(batch: Any, name: str) -> torch.Tensor:
    """The input tensor of a loader batch: a tensor, or the first element of a (x, y, ...) tuple/list."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must yield tensors or (x, y) tuples of tensors, got a batch of {type(x).__name__}")
    return x


class _Replay:
    """Iterates a calibration loader, remembering the rank of its inputs (spikify needs the input rank)."""

    def __init__(self, loader: Iterable | None) -> None:
        self.loader = loader
        self.input_dims: int | None = None

    def __iter__(self):
        if self.loader is None:
            return
        for batch in self.loader:
            x = _batch_input(batch, "calib_loader")
            if self.input_dims is None:
                self.input_dims = x.dim()
            yield batch


def _check_no_functional_relu(model: nn.Module) -> None:
    """A ReLU applied as a function cannot become a spiking neuron: refuse rather than convert silently wrong."""
    import torch.fx

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # untraceable forward code: nothing to check
        return
    bad = [
        str(n.target)
        for n in gm.graph.nodes
        if (n.op == "call_function" and n.target in (torch.relu, torch.nn.functional.relu, torch.relu_))
        or (n.op == "call_method" and n.target in ("relu", "relu_"))
    ]
    if bad:
        raise ValueError(
            f"ann applies ReLU as a function ({len(bad)} call(s) to {sorted(set(bad))}); conversion replaces "
            "activation modules only: use nn.ReLU modules in the forward code"
        )


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class _Samples:
    """Positive activations of one call site: exact max, and a (sub)sample for the percentile."""

    def __init__(self, generator: torch.Generator) -> None:
        self.chunks: list[torch.Tensor] = []
        self.kept = 0
        self.keep_prob = 1.0
        self.max = 0.0
        self.count = 0
        self.gen = generator

    def add(self, a: torch.Tensor) -> None:
        pos = a.detach().reshape(-1)
        pos = pos[pos > 0].float()
        if pos.numel() == 0:
            return
        self.count += pos.numel()
        self.max = max(self.max, float(pos.max()))
        pos = pos.cpu()
        if self.keep_prob < 1.0:
            pos = pos[torch.rand(pos.numel(), generator=self.gen) < self.keep_prob]
        self.chunks.append(pos)
        self.kept += pos.numel()
        while self.kept > _MAX_SAMPLES:  # halve the sample uniformly, and the rate for later batches
            allv = torch.cat(self.chunks)
            allv = allv[torch.rand(allv.numel(), generator=self.gen) < 0.5]
            self.chunks, self.kept, self.keep_prob = [allv], allv.numel(), self.keep_prob / 2

    def percentile(self, q: float) -> float:
        # linear interpolation between ranks, as numpy.percentile; the sample stays below torch.quantile's
        # input limit (2^24 elements) by construction (_MAX_SAMPLES)
        return float(torch.quantile(torch.cat(self.chunks).double(), q / 100.0))


@torch.no_grad()
def calibrate_thresholds(
    ann: nn.Module,
    calib_loader: Iterable,
    *,
    method: str = "robust",
    percentile: float = 99.9,
    max_batches: int | None = None,
) -> dict[str, list[float]]:
    """Per-layer thresholds from the ANN's activations on calibration data.

    For every activation module (``nn.ReLU``, ``lasnn.nn.QCFS``) and every place the forward code calls
    it (torchvision's ResNet blocks call one ``relu`` twice), the threshold is the ``percentile``-th
    percentile (``robust``; Rueckauer et al. 2017) or the maximum (``max``) of its *positive* outputs
    over the calibration inputs (zeros carry no information about the scale; as in SNN-Toolbox).
    ``qcfs``: the learned clip ``λ`` of each QCFS module, no data needed.

    Args:
        ann: the ANN (run in eval mode on its own device; not modified).
        calib_loader: iterable of ``x [B, *]`` or ``(x, y)`` batches.
        max_batches: stop after this many batches (None: all).
    Returns:
        ``{module_name: [θ per call site]}`` in call order.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    acts = {name: m for name, m in ann.named_modules() if isinstance(m, ACTIVATIONS)}
    if not acts:
        raise ValueError(
            f"ann ({type(ann).__name__}) has no activation module to replace: conversion needs nn.ReLU or "
            "lasnn.nn.QCFS modules"
        )
    if method == "qcfs":
        missing = [n for n, m in acts.items() if not isinstance(m, QCFS)]
        if missing:
            raise ValueError(f"method='qcfs' needs every activation to be lasnn.nn.QCFS; these are not: {missing}")
        return {n: [float(m.clip.detach().abs())] for n, m in acts.items()}
    percentile = check_float("percentile", percentile)
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if calib_loader is None:
        raise ValueError(f"calib_loader is required for method={method!r}")

    was_training = ann.training
    ann.eval()
    gen = torch.Generator().manual_seed(0)
    samples: dict[str, list[_Samples]] = {n: [] for n in acts}
    calls = dict.fromkeys(acts, 0)

    def make_hook(name: str):
        def hook(module, args, output):
            i = calls[name]
            calls[name] += 1
            while len(samples[name]) <= i:
                samples[name].append(_Samples(gen))
            samples[name][i].add(output)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in acts.items()]
    device = _device_of(ann)
    n_batches = 0
    try:
        for batch in calib_loader:
            if max_batches is not None and n_batches >= max_batches:
                break
            x = _batch_input(batch, "calib_loader")
            if x.shape[0] == 0:
                continue
            for k in calls:
                calls[k] = 0
            ann(x.to(device))
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        ann.train(was_training)
    if n_batches == 0:
        raise ValueError("calib_loader yielded no (non-empty) batches: calibration needs at least one input")

    thresholds: dict[str, list[float]] = {}
    for name, sites in samples.items():
        if not sites:
            raise ValueError(f"activation module {name!r} was never called by ann's forward; cannot calibrate it")
        thetas = []
        for i, s in enumerate(sites):
            if s.count == 0:
                warnings.warn(
                    f"activation {name!r} (call {i}) never produced a positive value on the calibration data; "
                    "using threshold 1.0",
                    stacklevel=2,
                )
                thetas.append(1.0)
            else:
                thetas.append(s.max if method == "max" or percentile == 100 else max(s.percentile(percentile), 1e-12))
        thresholds[name] = thetas
    return thresholds


class IFNeuron(nn.Module):
    """Converted IF neuron, multi-step ``[T, *] -> [T, *]``: outputs ``θ·S`` (threshold balancing).

    Reset by subtraction, membrane starting at ``initial_membrane·θ``; one threshold per call site of
    the activation it replaced (a module called twice in one forward, like torchvision's BasicBlock
    ``relu``, gets two thresholds; its ``ConvertedSNN`` rewinds the call counter at every forward).
    Runs on ``lasnn.lif(x, v_init, tau=inf, v_threshold=θ, v_reset=None)``; ``forward_stateful`` is the
    streaming hook that spikify's ``FoldedNeuron`` calls to carry the membrane across chunks.
    """

    def __init__(self, thresholds: list[float], initial_membrane: float) -> None:
        super().__init__()
        if not thresholds or any(not (t > 0 and math.isfinite(t)) for t in thresholds):
            raise ValueError(f"thresholds must be a non-empty list of finite positive floats, got {thresholds}")
        self.thresholds = [float(t) for t in thresholds]
        self.initial_membrane = check_float("initial_membrane", initial_membrane)
        self._call = 0
        # spike and neuron-step counts since reset_counts(), for firing rates (a tensor: no device sync per call)
        self.spikes: torch.Tensor | float = 0.0
        self.neuron_steps = 0

    def reset_counts(self) -> None:
        """Zero the spike counters."""
        self.spikes = 0.0
        self.neuron_steps = 0

    def forward_stateful(
        self, x_seq: torch.Tensor, v_init: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_seq: ``[T, *]`` current, v_init: ``[*]`` or None (start at ``initial_membrane·θ``) ->
        (``θ·S [T, *]``, membrane after the last step ``[*]``)."""
        i = self._call
        if i >= len(self.thresholds):
            raise RuntimeError(
                f"IFNeuron was called {i + 1} times in one forward but was calibrated for {len(self.thresholds)} "
                "call site(s): the forward code calls it differently than during calibration"
            )
        self._call += 1
        theta = self.thresholds[i]
        if v_init is None:
            v_init = torch.full_like(x_seq[0], self.initial_membrane * theta)
        s, v = lif(x_seq, v_init, tau=math.inf, v_threshold=theta, v_reset=None, return_v=True)
        self.spikes = self.spikes + count_spikes(s)
        self.neuron_steps += s.numel()
        # Inference (nothing to differentiate): scale the fresh spike tensor in place, no second tensor.
        return (s * theta if s.requires_grad else s.mul_(theta)), v

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """x_seq: ``[T, *]`` input current -> ``[T, *]`` outputs ``θ·S``, from the initial membrane."""
        return self.forward_stateful(x_seq, None)[0]

    def get_extra_state(self) -> dict:
        return {"thresholds": self.thresholds, "initial_membrane": self.initial_membrane}

    def set_extra_state(self, state: dict) -> None:
        self.thresholds = [float(t) for t in state["thresholds"]]
        self.initial_membrane = float(state["initial_membrane"])

    def extra_repr(self) -> str:
        th = ", ".join(f"{t:.4g}" for t in self.thresholds)
        return f"theta=[{th}], initial_membrane={self.initial_membrane:g}, reset=soft"


class ConvertedSNN(SNN):
    """An ANN converted to IF neurons: a ``lasnn.spikify`` SNN (same calling convention) whose neurons are
    :class:`IFNeuron` s.

    ``snn(x [B, *]) -> [B, classes]`` averaged over ``snn.T`` steps (direct encoding: the analog input
    at every step), ``return_steps=True`` for ``[T, B, classes]``; stateless between calls, and
    ``streaming()`` carries the membranes across calls (what ``lasnn.accuracy_vs_timesteps`` uses).
    The body always stays in eval mode (conversion is inference only; batch norms keep their statistics).
    """

    def __init__(self, snn: SNN, *, method: str, initial_membrane: float) -> None:
        super().__init__(snn.body, snn.T, snn.encoder, snn.input_dims)
        self.method = method
        self.initial_membrane = initial_membrane
        self.body.eval()

    def if_neurons(self) -> list[tuple[str, IFNeuron]]:
        """``(path of the replaced activation in body, neuron)`` for every IF neuron, in module order."""
        return [
            (n, m.neuron) for n, m in self.body.named_modules()
            if isinstance(m, FoldedNeuron) and isinstance(m.neuron, IFNeuron)
        ]

    def train(self, mode: bool = True) -> ConvertedSNN:
        super().train(mode)
        self.body.eval()
        return self

    def forward(self, x: torch.Tensor, *, return_steps: bool = False) -> torch.Tensor:
        """x: ``[B, *]`` (or encoded ``[T, B, *]``) -> logits ``[B, classes]`` (``[T, B, classes]`` if return_steps)."""
        for _, m in self.if_neurons():
            m._call = 0  # every forward replays the call sites in the same order
        return super().forward(x, return_steps=return_steps)

    def reset_counts(self) -> None:
        """Zero every neuron's spike counters."""
        for _, m in self.if_neurons():
            m.reset_counts()

    def firing_rate(self) -> float:
        """Spikes per neuron per step since the last ``reset_counts()`` (nan if nothing ran)."""
        ns = self.if_neurons()
        steps = sum(m.neuron_steps for _, m in ns)
        return float(sum(m.spikes for _, m in ns)) / steps if steps else float("nan")

    def thresholds(self) -> dict[str, list[float]]:
        """``{activation path (as in the ANN): [θ per call site]}``."""
        return {n: list(m.thresholds) for n, m in self.if_neurons()}

    def extra_repr(self) -> str:
        return f"method={self.method}, T={self.T}, initial_membrane={self.initial_membrane:g}"


def convert(
    ann: nn.Module,
    calib_loader: Iterable | None,
    *,
    method: str = "robust",
    percentile: float = 99.9,
    initial_membrane: float = 0.5,
    T: int = 32,
    max_batches: int | None = None,
) -> ConvertedSNN:
    """Convert a trained ANN to an SNN of IF neurons (soft reset) on the LIF operator's inference path.

    Steps: fold batch norms into the preceding conv/linear (exact in eval mode); one threshold per
    activation call site from ``calib_loader`` (``robust``: the ``percentile`` of its positive outputs;
    ``max``: the maximum; ``qcfs``: the learned clip of each ``lasnn.nn.QCFS``); replace each ``nn.ReLU`` /
    ``QCFS`` module with an ``IFNeuron`` emitting ``θ·S`` (threshold balancing, see module docstring) and
    starting at ``initial_membrane·θ``. ``method="max", initial_membrane=0`` is the classic recipe;
    ``robust`` with 0.5 is today's strong one.

    Args:
        ann: the trained ANN (left untouched), e.g. a Sequential CNN, torchvision ResNet/VGG, a zoo model;
            its activations must be ``nn.ReLU``/``QCFS`` modules (functional ``F.relu`` is refused).
        calib_loader: iterable of ``x [B, *]`` or ``(x, y)`` batches (training data; unused for ``qcfs``).
        initial_membrane: initial membrane as a fraction of θ, in [0, 1].
        T: default number of steps of ``ConvertedSNN.forward``.
        max_batches: calibrate on at most this many batches.
    Returns:
        a ``ConvertedSNN`` (on the ANN's device): ``snn(x [B, *]) -> [B, classes]``.
    """
    if not isinstance(ann, nn.Module):
        raise TypeError(f"ann must be a torch.nn.Module, got {type(ann).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    initial_membrane = check_float("initial_membrane", initial_membrane)
    if not 0.0 <= initial_membrane <= 1.0:
        raise ValueError(f"initial_membrane must be in [0, 1] (a fraction of the threshold), got {initial_membrane}")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")
    if calib_loader is None and method != "qcfs":
        raise ValueError(f"calib_loader is required for method={method!r} (thresholds come from its activations)")
    if not any(isinstance(m, ACTIVATIONS) for m in ann.modules()):
        raise ValueError(
            f"ann ({type(ann).__name__}) has no activation module to replace: conversion needs nn.ReLU or "
            "lasnn.nn.QCFS modules"
        )
    unsupported = sorted({type(m).__name__ for m in ann.modules() if isinstance(m, _UNSUPPORTED)})
    if unsupported:
        raise ValueError(f"ann has activations IF neurons cannot represent ({unsupported}); use nn.ReLU or QCFS")
    _check_no_functional_relu(ann)
    folded, _ = fold_batchnorm(ann)
    calib = _Replay(calib_loader)
    thresholds = calibrate_thresholds(folded, calib, method=method, percentile=percentile, max_batches=max_batches)
    if method == "qcfs" and calib_loader is not None:
        for _ in calib:  # no calibration needed; one batch tells the input rank
            break
    input_dims = calib.input_dims
    for p in folded.parameters():
        p.requires_grad_(False)
    # spikify does the model walking and time folding; our neurons are then put in place by name
    # (spikify keeps the module paths), because each needs its own thresholds.
    snn = spikify(folded, T=T, neuron=nn.Identity, activations=ACTIVATIONS, copy=False, input_dims=input_dims)
    for name, thetas in thresholds.items():
        site = snn.body.get_submodule(name)
        if not isinstance(site, FoldedNeuron):
            raise RuntimeError(f"spikify did not replace activation {name!r} (got {type(site).__name__})")
        site.neuron = IFNeuron(thetas, initial_membrane)
    return ConvertedSNN(snn, method=method, initial_membrane=initial_membrane)
