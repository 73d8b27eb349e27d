"""The conversion side of the command line: convert a teacher run, evaluate a run over T.

``convert_run`` (``lasnn convert``), ``evaluate_run`` (``lasnn evaluate``) and ``lasnn.demo.run_demo``
(``lasnn demo``) all measure the same way: top-1 accuracy on the data set's full test split, the latency curve from one
``T_max``-step simulation (``lasnn.accuracy_vs_timesteps``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lasnn.convert.convert import METHODS, calibrate_thresholds, convert
from lasnn.convert.latency import accuracy_vs_timesteps
from lasnn.convert.report import curve_to_json, format_table, plot_latency, t_to_match, write_json
from lasnn.nn.qcfs import QCFS

__all__ = ["ann_accuracy", "convert_run", "evaluate_run", "finetune_qcfs", "snn_firing_rate"]

CALIB_BATCHES = 8  # x 256 training samples: enough for a stable 99.9th percentile, seconds on a CPU
EVAL_BATCH = 500


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _say(quiet: bool, *msg: Any) -> None:
    if not quiet:
        print(*msg, flush=True)


@torch.no_grad()
def ann_accuracy(model: nn.Module, loader, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of an ANN (eval mode) over ``loader``'s ``(x [B, *], y [B])`` batches."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x.to(device)).argmax(-1) == y.to(device)).sum())
        total += y.shape[0]
    if total == 0:
        raise ValueError("loader yielded no samples")
    return correct / total


@torch.no_grad()
def snn_firing_rate(snn: nn.Module, loader, device: torch.device | str = "cpu", max_batches: int = 4) -> float:
    """Mean firing rate (spikes per neuron per step) of a spikify'd SNN's neurons at its own ``T``.

    Counts the binary outputs of every spiking site (``FoldedNeuron``) over up to ``max_batches`` batches.
    """
    from lasnn.nn.spikify import SpikeCounter

    counter = SpikeCounter(snn)
    snn.eval()
    with counter:
        for i, (x, _) in enumerate(loader):
            if i >= max_batches:
                break
            snn(x.to(device))
    return counter.rate()


def to_qcfs(ann: nn.Module, clips: dict[str, list[float]], levels: int) -> nn.Module:
    """Replace every ``nn.ReLU`` module of ``ann`` (in place) by ``QCFS(levels)`` with λ initialised from ``clips``
    (``{module name: [θ per call site]}``, e.g. robust thresholds; several call sites share the largest)."""
    for name, m in list(ann.named_modules()):
        if isinstance(m, nn.ReLU):
            parent_name, _, attr = name.rpartition(".")
            parent = ann.get_submodule(parent_name) if parent_name else ann
            setattr(parent, attr, QCFS(levels=levels, init_clip=max(clips.get(name, [1.0]))))
    return ann


def finetune_qcfs(
    ann: nn.Module, train_loader, *, calib_loader, levels: int = 4, epochs: int = 5, lr: float = 0.01,
    device: torch.device | str = "cpu", quiet: bool = True,
) -> nn.Module:
    """QCFS recipe for an already trained ReLU ANN: swap ReLUs for ``QCFS(levels)`` (λ from the robust
    thresholds), then fine-tune all weights and clips with SGD (momentum 0.9, cosine) on cross-entropy.

    Returns a new ANN in eval mode (``ann`` is left untouched), ready for ``convert(..., method="qcfs")``.
    """
    import copy

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    model = copy.deepcopy(ann).to(device)
    clips = calibrate_thresholds(model, calib_loader, method="robust", max_batches=CALIB_BATCHES)
    to_qcfs(model, clips, levels)
    steps = epochs * len(train_loader)
    if steps:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        for epoch in range(epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            for x, y in train_loader:
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
                opt.step()
                sched.step()
            _say(quiet, f"  qcfs fine-tune epoch {epoch + 1}/{epochs}")
    return model.eval()


def _loaders(ds, batch_size: int):
    calib = ds.loader("train", 256, train=False)  # training data, fixed order, no augmentation
    test = ds.loader("test", batch_size)
    return calib, test


def _convert_curve(ann, calib, test, *, method, percentile, initial_membrane, T_max, device, stop_at=None,
                   on_horizon=None):
    snn = convert(ann, calib, method=method, percentile=percentile, initial_membrane=initial_membrane,
                  max_batches=CALIB_BATCHES).to(device)
    snn.reset_counts()
    curve = accuracy_vs_timesteps(snn, test, T_max=T_max, stop_at=stop_at,
                                  on_horizon=None if on_horizon is None else lambda h: on_horizon(snn, h))
    rate = snn.firing_rate()
    return snn, curve, rate


def convert_run(
    teacher: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "robust",
    T_max: int = 256,
    percentile: float = 99.9,
    initial_membrane: float = 0.5,
    levels: int = 4,
    qcfs_epochs: int = 5,
    data_dir: str | None = None,
    device: str = "auto",
    which: str = "best",
    quiet: bool = False,
) -> dict[str, Any]:
    """Convert a teacher run's ANN and sweep T = 1..T_max; writes ``out/accuracy_vs_T.json`` and ``.png``.

    ``method="qcfs"`` fine-tunes the teacher with QCFS activations (``levels``, ``qcfs_epochs``) first
    unless it already has them. ``which``: the run's ``"best"`` or ``"last"`` checkpoint. Returns the JSON
    written.
    """
    from lasnn.data import load_dataset
    from lasnn.distill import load_run

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(T_max, bool) or not isinstance(T_max, int) or T_max < 1:
        raise ValueError(f"T_max must be an int >= 1, got {T_max!r}")
    t0 = time.perf_counter()
    run = load_run(teacher, which=which)
    if run.kind != "teacher":
        raise ValueError(f"--teacher {str(teacher)!r} is a {run.kind} run; conversion needs a train-teacher run")
    dev = _device(device)
    ds = load_dataset(run.dataset, data_dir if data_dir is not None else run.config.data_dir)
    calib, test = _loaders(ds, EVAL_BATCH)
    ann = run.model.to(dev).eval()
    teacher_acc = ann_accuracy(ann, test, dev)
    finetuned = None
    if method == "qcfs" and not any(isinstance(m, QCFS) for m in ann.modules()):
        _say(quiet, f"fine-tuning the teacher with QCFS (L={levels}) for {qcfs_epochs} epoch(s)")
        train = ds.loader("train", run.config.batch_size, seed=run.config.seed)
        ann = finetune_qcfs(ann, train, calib_loader=calib, levels=levels, epochs=qcfs_epochs, device=dev,
                            quiet=quiet)
        finetuned = ann_accuracy(ann, test, dev)
    snn, curve, rate = _convert_curve(ann, calib, test, method=method, percentile=percentile,
                                      initial_membrane=initial_membrane, T_max=T_max, device=dev)
    result: dict[str, Any] = {
        "dataset": run.dataset, "teacher": {"run": str(teacher), "model": run.config.model, "accuracy": teacher_acc},
        "method": method, "percentile": percentile if method == "robust" else None,
        "initial_membrane": initial_membrane, "thresholds": snn.thresholds(), "firing_rate": rate,
        "T_to_match_teacher": t_to_match(curve, teacher_acc), "accuracy_by_T": curve_to_json(curve),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if finetuned is not None:
        result["qcfs"] = {"levels": levels, "epochs": qcfs_epochs, "ann_accuracy": finetuned}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "accuracy_vs_T.json", result)
    plot_latency(out / "accuracy_vs_T.png", {f"{method} conversion": curve}, teacher_acc=teacher_acc,
                 title=f"{run.dataset}: {run.config.model} converted ({method})")
    _say(quiet, format_table({f"{method}": curve}, reference={"teacher": teacher_acc}))
    _say(quiet, f"-> {out / 'accuracy_vs_T.json'}, {out / 'accuracy_vs_T.png'} ({result['seconds']:.1f} s)")
    return result


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    T_max: int | None = None,
    out: str | os.PathLike | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    which: str = "best",
    quiet: bool = False,
) -> dict[str, Any]:
    """Accuracy of a run on its test set: for a student SNN the curve over T = 1..T_max (default 4x its T),
    for a teacher ANN its accuracy. ``which``: the run's ``"best"`` or ``"last"`` checkpoint. Writes
    ``accuracy_vs_T.json`` (and ``.png`` for an SNN) to ``out`` (default: the run folder)."""
    from lasnn.data import load_dataset
    from lasnn.distill import load_run

    if T_max is not None and (isinstance(T_max, bool) or not isinstance(T_max, int) or T_max < 1):
        raise ValueError(f"T_max must be an int >= 1, got {T_max!r}")
    t0 = time.perf_counter()
    run = load_run(run_dir, which=which)
    dev = _device(device)
    ds = load_dataset(run.dataset, data_dir if data_dir is not None else run.config.data_dir)
    _, test = _loaders(ds, EVAL_BATCH)
    model = run.model.to(dev).eval()
    out = Path(out) if out is not None else (Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent)
    out.mkdir(parents=True, exist_ok=True)
    if run.kind == "teacher":
        acc = ann_accuracy(model, test, dev)
        result = {"dataset": run.dataset, "kind": "teacher", "model": run.config.model, "accuracy": acc,
                  "seconds": round(time.perf_counter() - t0, 2)}
        write_json(out / "accuracy_vs_T.json", result)
        _say(quiet, f"teacher {run.config.model} on {run.dataset}: test accuracy {100 * acc:.2f}% (an ANN has no T)")
        return result
    T = int(run.config.T)
    T_max = T_max if T_max is not None else 4 * T
    rate = snn_firing_rate(model, test, dev)
    curve = accuracy_vs_timesteps(model, test, T_max=T_max)
    result = {
        "dataset": run.dataset, "kind": run.kind, "model": run.config.student, "T": T,
        "schedule": run.config.method, "accuracy": curve.get(T), "firing_rate": rate,
        "accuracy_by_T": curve_to_json(curve), "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(out / "accuracy_vs_T.json", result)
    plot_latency(out / "accuracy_vs_T.png", {f"student {run.config.student}": curve},
                 points={f"trained at T={T}": (T, curve[T])} if T in curve else None,
                 title=f"{run.dataset}: student {run.config.student} ({run.config.method}, T={T})")
    _say(quiet, format_table({"student": curve}))
    _say(quiet, f"-> {out / 'accuracy_vs_T.json'}, {out / 'accuracy_vs_T.png'}")
    return result
