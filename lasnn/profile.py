"""``lasnn.profile``: per-layer activity, synaptic operations and estimated energy of an SNN (or ANN).

Accounting (Horowitz, ISSCC 2014, 45 nm; METHODS.md), per sample (one inference), for every conv /
linear layer (``nn.Conv1d/2d/3d``, ``nn.Linear``; batch norm is foldable into them and pooling,
additions and neuron updates are not counted):

- ``MACs``: multiply-accumulates of one time step (``output elements x input channels/groups x kernel
  size``; ``output features x input features``), bias not counted;
- a layer whose input is spikes (binary, or one spike value such as ``θ·S``) is spike-driven:
  ``SOPs = input firing rate x T x MACs``, each an accumulate at ``0.9 pJ``;
- a layer reading the (analog, non-spike) network input does real MACs at ``4.6 pJ``; with direct
  encoding that input is the same at every step, so it is counted once (``T_eff = 1``), otherwise
  ``T`` times;
- a layer that runs after a spiking neuron (in execution order) and whose input is not spikes but lies
  in [0, 1] reads averaged spikes (average pooling of spike maps, e.g. the classifier after a global
  average pool): its firing rate is the mean of its input (average pooling preserves it) and it is
  counted as spike-driven. Every other non-spike input is analog and counts as MACs; this includes
  layers before the first neuron that read a transformed network input (``x * 0.5``, a normalisation
  inside ``forward``), however small its values.

The ANN reference is ``4.6 pJ x`` all MACs of one pass. Neuron rows report the firing rate of their
output spikes (fraction of neuron-steps that fire).

``convention="neurobench"`` counts as NeuroBench's ``SynapticOperations`` does (its ``Effective_MACs``,
``Effective_ACs`` and ``Dense``, from ``Profile.neurobench()``): every call of a conv/linear, at every step,
does one operation per (nonzero input, nonzero weight) pair it connects (bias not counted); the call is
accumulates (ACs) when all its inputs are 0 or +-1 and multiply-accumulates otherwise; ``Dense`` counts every
pair, zeros included. Where that differs from the default: the direct-encoded input layer is counted at
every step (``T`` times, not once); a zero input or a zero weight costs nothing (the default counts a
spike-driven layer by its input firing rate x all weights, and an analog layer densely); average-pooled
spikes and ``θ·S`` spikes (values other than 0/1) are MACs (the default counts them as spike-driven).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lasnn.checks import check_float
from lasnn.nn.neurons import count_spikes
from lasnn.nn.spikify import SNN, FoldedNeuron

__all__ = ["E_AC_PJ", "E_MAC_PJ", "LayerProfile", "Profile", "profile"]

E_MAC_PJ = 4.6  #: energy of one 32-bit float multiply-accumulate, pJ (Horowitz 2014, 45 nm)
E_AC_PJ = 0.9  #: energy of one 32-bit float accumulate, pJ

_SYNAPTIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class LayerProfile:
    """One row of a :class:`Profile` (numbers per sample).

    Attributes:
        name: module path (inside ``body`` for an SNN); ``name#k`` for the k-th call of a reused module.
        kind: module type (``Conv2d``, ``Linear``, ``neuron``...).
        input: ``spikes``, ``rates`` (averaged spikes), ``analog`` or ``-`` (neuron rows).
        macs: MACs of one time step (0 for neurons).
        firing_rate: synaptic rows: input firing rate (None for analog input); neuron rows: output rate.
        steps: time steps the op count covers (``T``, or 1 for a constant analog input).
        sops: synaptic (accumulate) operations over all steps.
        mac_ops: multiply-accumulates executed over all steps.
        energy_pj: ``0.9·sops + 4.6·mac_ops``.
        neurons: neuron rows: neurons per sample at one step (weights the mean rate of the total row).
        dense_ops: every connection of every step, zeros included (``macs x T``; NeuroBench's ``Dense``).
    """

    name: str
    kind: str
    input: str
    macs: int
    firing_rate: float | None
    steps: int
    sops: float
    mac_ops: float
    energy_pj: float
    neurons: int = 0
    dense_ops: float = 0.0


@dataclass
class Profile:
    """Result of :func:`profile`: ``layers`` in execution order and totals; ``str()`` gives a table."""

    layers: list[LayerProfile]
    T: int
    batch: int
    is_snn: bool
    e_mac_pj: float = E_MAC_PJ
    e_ac_pj: float = E_AC_PJ
    convention: str = "lasnn"
    totals: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        syn = [r for r in self.layers if r.kind != "neuron"]
        neu = [r for r in self.layers if r.kind == "neuron"]
        self.totals = {
            "macs": float(sum(r.macs for r in syn)),
            "sops": float(sum(r.sops for r in syn)),
            "mac_ops": float(sum(r.mac_ops for r in syn)),
            "energy_pj": float(sum(r.energy_pj for r in syn)),
            "ann_energy_pj": self.e_mac_pj * float(sum(r.macs for r in syn)),
            "dense_ops": float(sum(r.dense_ops for r in syn)),
            # spike-count weighted mean over all neurons
            "firing_rate": _weighted_rate(neu),
        }

    @property
    def energy_pj(self) -> float:
        """Estimated energy of one inference, pJ."""
        return self.totals["energy_pj"]

    @property
    def ann_energy_pj(self) -> float:
        """Energy of the same network run as an ANN (all MACs, one pass), pJ."""
        return self.totals["ann_energy_pj"]

    def neurobench(self) -> dict[str, float]:
        """``{"Effective_MACs", "Effective_ACs", "Dense"}`` per sample, as NeuroBench's ``SynapticOperations``
        reports them; only for a profile taken with ``convention="neurobench"``."""
        if self.convention != "neurobench":
            raise ValueError("neurobench(): take the profile with lasnn.profile(..., convention='neurobench')")
        t = self.totals
        return {"Effective_MACs": t["mac_ops"], "Effective_ACs": t["sops"], "Dense": t["dense_ops"]}

    @property
    def firing_rates(self) -> dict[str, float]:
        """Neuron site -> output firing rate (fraction of neuron-steps that spike), in execution order."""
        return {r.name: float(r.firing_rate) for r in self.layers if r.kind == "neuron" and r.firing_rate is not None}

    def to_dict(self) -> dict[str, Any]:
        """Plain-python form (JSON-serialisable)."""
        return {"T": self.T, "batch": self.batch, "is_snn": self.is_snn, "totals": dict(self.totals),
                "layers": [asdict(r) for r in self.layers]}

    def table(self) -> str:
        """The per-layer table with a total row and the ANN comparison."""
        head = ("layer", "type", "input", "MACs/step", "rate", "steps", "SOPs", "MACs", "energy")
        rows = [head]
        for r in self.layers:
            rate = "-" if r.firing_rate is None else f"{r.firing_rate:.4f}"
            if r.kind == "neuron":
                rows.append((r.name, r.kind, "-", "-", rate, str(r.steps), "-", "-", "-"))
            else:
                rows.append((r.name, r.kind, r.input, _si(r.macs), rate, str(r.steps), _si(r.sops),
                             _si(r.mac_ops), _si(r.energy_pj * 1e-12, "J")))
        t = self.totals
        rate = "-" if math.isnan(t["firing_rate"]) else f"{t['firing_rate']:.4f}"
        rows.append(("total", "", "", _si(t["macs"]), rate, str(self.T), _si(t["sops"]), _si(t["mac_ops"]),
                     _si(t["energy_pj"] * 1e-12, "J")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        kind = f"SNN, T={self.T}" if self.is_snn else "ANN"
        lines.append(f"per sample ({kind}, batch {self.batch}); AC {self.e_ac_pj:g} pJ, MAC {self.e_mac_pj:g} pJ")
        if self.is_snn and t["energy_pj"] > 0:
            lines.append(f"ANN with the same layers: {_si(t['ann_energy_pj'] * 1e-12, 'J')} "
                         f"({t['ann_energy_pj'] / t['energy_pj']:.2f}x the SNN estimate)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _weighted_rate(rows: list[LayerProfile]) -> float:
    num = sum(r.firing_rate * r.neurons for r in rows if r.firing_rate is not None)
    den = sum(r.neurons for r in rows)
    return num / den if den else float("nan")


def _si(v: float, unit: str = "") -> str:
    for scale, p in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{p}{unit}"
    for scale, p in ((1e-3, "m"), (1e-6, "µ"), (1e-9, "n"), (1e-12, "p")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{p}{unit}"
    return f"0{unit}"


def _macs_per_item(m: nn.Module, out: torch.Tensor) -> int:
    """MACs per leading-dimension item (one sample at one step)."""
    per_out = out[0].numel() if out.dim() > 0 and out.shape[0] else 0
    if isinstance(m, nn.Linear):
        return per_out * m.in_features
    k = math.prod(m.kernel_size)
    return per_out * (m.in_channels // m.groups) * k


def _active_rate(x: torch.Tensor) -> float:
    """Fraction of nonzero elements of ``x`` (counted like every other spike count: ``count_spikes``)."""
    return float(count_spikes((x != 0).to(torch.float32))) / x.numel() if x.numel() else 0.0


def _spike_rate(x: torch.Tensor) -> float | None:
    """Fraction of nonzero elements if ``x`` holds spikes (all nonzero values equal), else None."""
    nz = x[x != 0]
    if nz.numel() and not bool((nz == nz[0]).all()):
        return None
    return _active_rate(x)


@torch.no_grad()
def _neurobench_ops(m: nn.Module, inp: torch.Tensor) -> tuple[float, float, bool]:
    """Over the whole call: (operations between nonzero inputs and nonzero weights, all operations (padding
    excluded, as a conv of ones with ones), whether every input is 0 or +-1), counted in float64."""
    spiking = bool(((inp == 0) | (inp == 1) | (inp == -1)).all())

    def apply(x: torch.Tensor, w: torch.Tensor) -> float:
        if isinstance(m, nn.Linear):
            return float(torch.nn.functional.linear(x, w).sum())
        if m.padding_mode != "zeros":
            raise ValueError(f"convention='neurobench': {type(m).__name__} with padding_mode={m.padding_mode!r}")
        conv = {nn.Conv1d: torch.nn.functional.conv1d, nn.Conv2d: torch.nn.functional.conv2d,
                nn.Conv3d: torch.nn.functional.conv3d}[type(m)]
        return float(conv(x, w, None, m.stride, m.padding, m.dilation, m.groups).sum())

    eff = apply((inp != 0).to(torch.float64), (m.weight != 0).to(torch.float64))
    dense = apply(torch.ones_like(inp, dtype=torch.float64), torch.ones_like(m.weight, dtype=torch.float64))
    return eff, dense, spiking


CONVENTIONS = ("lasnn", "neurobench")


def profile(model: nn.Module, x: torch.Tensor, *, e_mac_pj: float = E_MAC_PJ, e_ac_pj: float = E_AC_PJ,
            convention: str = "lasnn") -> Profile:
    """Measure per-layer firing rates, SOPs/MACs and energy of one forward pass (see the module docstring).

    Runs ``model`` once on ``x`` under ``torch.no_grad()`` in eval mode (the training flag is restored), so
    batch-norm statistics are not touched; a Poisson encoder draws once.

    Args:
        model: an :class:`SNN` from ``lasnn.spikify`` (or ``lasnn.convert``), or any ANN.
        x: its input, ``[B, ...]`` (an SNN also takes encoded ``[T, B, ...]``); every number is per sample,
            averaged over the ``B`` samples.
        e_mac_pj, e_ac_pj: energy per MAC / per accumulate, pJ (finite, >= 0).
        convention: ``"lasnn"`` (the module docstring's accounting) or ``"neurobench"`` (NeuroBench's
            ``SynapticOperations``; ``Profile.neurobench()`` gives its three numbers).
    Returns:
        :class:`Profile` (``print(p)`` for the table; ``p.layers``, ``p.totals``, ``p.to_dict()``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    for name, e in (("e_mac_pj", e_mac_pj), ("e_ac_pj", e_ac_pj)):
        if check_float(name, e) < 0:
            raise ValueError(f"{name} must be >= 0, got {e}")
    e_mac_pj, e_ac_pj = float(e_mac_pj), float(e_ac_pj)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    is_snn = isinstance(model, SNN)
    net = model.body if is_snn else model
    if is_snn:
        x = model.encode(x)
        T, B = x.shape[0], x.shape[1]
    else:
        T, B = 1, x.shape[0] if x.dim() else 1
    if B == 0:
        raise ValueError(f"x must hold at least one sample, got shape {tuple(x.shape)}")

    rows: list[LayerProfile] = []
    calls: dict[str, int] = {}
    neuron_ran = [False]  # set once any spiking site has run: only then can an input be averaged spikes

    def name_of(path: str) -> str:
        calls[path] = calls.get(path, 0) + 1
        return path if calls[path] == 1 else f"{path}#{calls[path]}"

    def syn_hook(path: str):
        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            inp = args[0]
            macs = _macs_per_item(m, out)
            dense = float(macs * T)
            if convention == "neurobench":
                ops, dense, spiking = _neurobench_ops(m, inp)
                ops, dense = ops / B, dense / B  # the call covers all T steps of the B samples
                sops, mac_ops = (ops, 0.0) if spiking else (0.0, ops)
                rate = _spike_rate(inp) if spiking and is_snn else None
                rows.append(LayerProfile(name_of(path), type(m).__name__, "spikes" if spiking else "analog", macs,
                                         rate, T, sops, mac_ops, e_ac_pj * sops + e_mac_pj * mac_ops,
                                         dense_ops=dense))
                return
            rate = _spike_rate(inp) if is_snn else None
            if is_snn and rate is not None:
                kind, steps, sops, mac_ops = "spikes", T, rate * T * macs, 0.0
            elif is_snn and neuron_ran[0] and inp.numel() and bool(((inp >= 0) & (inp <= 1)).all()):
                rate = float(inp.float().mean())
                kind, steps, sops, mac_ops = "rates", T, rate * T * macs, 0.0
            else:
                steps = T
                if T > 1:
                    seq = inp.reshape(T, -1)
                    steps = 1 if bool((seq == seq[0]).all()) else T
                kind, sops, mac_ops, rate = "analog", 0.0, float(steps * macs), None
            energy = e_ac_pj * sops + e_mac_pj * mac_ops
            rows.append(LayerProfile(name_of(path), type(m).__name__, kind, macs, rate, steps, sops, mac_ops, energy,
                                     dense_ops=dense))

        return hook

    def neuron_hook(path: str):
        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            rate = _spike_rate(out)
            if rate is None:  # graded output: report the fraction of active neuron-steps
                rate = _active_rate(out)
            per_sample = out.numel() // (T * B)
            neuron_ran[0] = True
            rows.append(LayerProfile(name_of(path), "neuron", "-", 0, rate, T, 0.0, 0.0, 0.0, per_sample))

        return hook

    handles = []
    for path, m in net.named_modules():
        if isinstance(m, _SYNAPTIC):
            handles.append(m.register_forward_hook(syn_hook(path)))
        elif isinstance(m, FoldedNeuron):
            handles.append(m.register_forward_hook(neuron_hook(path)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # a measurement: no graph (and no warning from reading a value off one)
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    # every count is per sample already: rates are means over T and B, MACs are per item
    return Profile(rows, T, B, is_snn, e_mac_pj, e_ac_pj, convention)
