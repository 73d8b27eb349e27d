"""The run folder: what a training run leaves on disk, and how it is read back.

``RUN_DIR/config.json`` (the run's config dataclass), ``metrics.jsonl`` (one line per epoch), ``last.pt``
(everything an exact resume needs), ``best.pt`` (weights of the best epoch) and ``curves.png``; every file
is replaced atomically (``lasnn.distill.checkpoint``: write, fsync, rename). ``load_run`` reads a folder
back as a model with its config and metrics.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lasnn.distill.checkpoint import CheckpointError, load_checkpoint
from lasnn.distill.config import DistillConfig, SNNConfig, TeacherConfig, config_from_dict
from lasnn.files import atomic_write, atomic_write_text

__all__ = ["MACHINE_FIELDS", "Run", "RunError", "RunFolder", "checkpoint_path", "load_run", "load_state"]

# Fields that may differ between a run and its resume (they describe the machine, not the run).
MACHINE_FIELDS = ("device", "data_dir")


class RunError(ValueError):
    """A run cannot start: bad run folder, incompatible teacher, mismatched resume (message says why)."""


@dataclass
class Run:
    """A finished (or checkpointed) run loaded by ``load_run``.

    Attributes:
        model: the trained network in eval mode on the CPU (an ANN for a teacher, a spikify'd SNN for a
            student; the SNN's ``T`` is the run's).
        config: the run's ``TeacherConfig``/``SNNConfig``/``DistillConfig``.
        dataset: data set name.
        kind: ``"teacher"``, ``"snn"`` (trained directly) or ``"student"`` (distilled).
        metrics: per-epoch records of ``metrics.jsonl`` (from the checkpoint, so they match it).
        checkpoint: path of the file the weights came from.
    """

    model: nn.Module
    config: TeacherConfig
    dataset: str
    kind: str
    metrics: list[dict[str, Any]]
    checkpoint: Path


def checkpoint_path(path: str | os.PathLike, which: str = "best") -> Path:
    """The checkpoint file a run folder (``which``.pt, else last.pt, else best.pt) or a file path names."""
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    p = Path(path).expanduser()
    if p.is_dir():
        for name in (f"{which}.pt", "last.pt", "best.pt"):
            if (p / name).is_file():
                return p / name
        raise RunError(f"run folder {str(p)!r} holds no checkpoint (expected {which}.pt or last.pt)")
    if p.is_file():
        return p
    raise RunError(f"{str(p)!r} is neither a run folder nor a checkpoint file")


def load_run(run_dir: str | os.PathLike, *, which: str = "best", map_location: str = "cpu") -> Run:
    """Load a run folder (or one of its ``.pt`` files): model with trained weights, config, metrics.

    Args:
        run_dir: ``RUN_DIR`` of ``train-teacher``/``distill``, or a checkpoint file inside one.
        which: ``"best"`` (highest test accuracy, the convention of the SNN literature) or ``"last"``.
    Raises:
        RunError / CheckpointError (ValueErrors) for a missing, corrupt or incompatible run.
    """
    path = checkpoint_path(run_dir, which)
    ckpt = load_checkpoint(path, map_location=map_location)
    try:
        cfg = config_from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} holds an invalid run config: {e}") from e
    ds_info = ckpt.get("dataset_info", {})
    fake = _ShapeOnly(cfg.dataset, int(ds_info.get("num_classes", 0)), tuple(ds_info.get("input_shape", ())))
    from lasnn.distill.objectives import build_student_model, build_teacher_model

    model = build_student_model(cfg, fake) if isinstance(cfg, SNNConfig) else build_teacher_model(cfg, fake)
    load_state(model, ckpt["model_state"], path)
    model.eval()
    return Run(model, cfg, cfg.dataset, ckpt["kind"], list(ckpt.get("history", [])), path)


class _ShapeOnly:
    """What model builders need of a data set (name, classes, input shape) without loading it."""

    def __init__(self, name: str, num_classes: int, input_shape: tuple[int, ...]) -> None:
        if num_classes < 1 or not input_shape:
            raise CheckpointError("checkpoint lacks the data set's num_classes/input_shape")
        self.name, self.num_classes, self.input_shape = name, num_classes, input_shape


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``model.load_state_dict(state)``; a mismatch raises CheckpointError naming ``path``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the model its config describes: {str(e).splitlines()[0]}"
        ) from e




class RunFolder:
    """The files of one run folder (``out``): config, metrics, curves; checkpoints are written by the engine
    through ``lasnn.distill.checkpoint`` into ``last`` and ``best``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.last, self.best = out / "last.pt", out / "best.pt"

    def holds_run(self) -> bool:
        """Whether a run was started here (config.json or last.pt)."""
        return (self.out / "config.json").exists() or self.last.exists()

    def create(self, cfg: TeacherConfig) -> None:
        """Start a fresh run: the folder, its config.json and an empty metrics.jsonl."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        atomic_write_text(self.out / "metrics.jsonl", "")

    def append_metrics(self, rec: dict[str, Any]) -> None:
        """One epoch's record, appended to metrics.jsonl."""
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl from ``history`` (atomically)."""
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


    def read_config(self) -> TeacherConfig:
        """The run's config from config.json (RunError when missing or invalid)."""
        out = self.out
        path = out / "config.json"
        if not path.is_file():
            raise RunError(f"--resume: {str(out)!r} holds no config.json (no run to resume there)")
        try:
            return config_from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise RunError(f"--resume: {str(path)!r} is not a valid lasnn run config: {e}") from e


    @staticmethod
    def check_resume_compatible(saved: TeacherConfig, cls: type, explicit: dict[str, Any]) -> None:
        """Raise RunError unless ``explicit`` settings agree with the ``saved`` config of a ``cls`` run."""
        if type(saved) is not cls:
            wanted = {DistillConfig: "student", SNNConfig: "snn", TeacherConfig: "teacher"}[cls]
            raise RunError(f"--resume: the run folder holds a {saved.kind} run, not a {wanted} run")
        a = saved.to_dict()
        unknown = sorted(set(explicit) - set(a))
        if unknown:
            raise TypeError(f"unknown {cls.__name__} field(s) {unknown}")
        diff = [k for k, v in explicit.items() if k not in MACHINE_FIELDS and a[k] != v
                and not (k in ("model", "student", "beta") and v is None)]
        if diff:
            raise RunError("--resume: these settings differ from the run's config.json: "
                           + ", ".join(f"{k}={explicit[k]!r} (run: {a[k]!r})" for k in diff))


    def plot_curves(self, history: list[dict[str, Any]], cfg: TeacherConfig) -> None:
        """Draw curves.png (losses, accuracies, firing rate per epoch)."""
        out = self.out
        # A bare Figure (Agg canvas): pyplot's global state and the caller's backend stay untouched.
        from matplotlib.figure import Figure

        ep = [r["epoch"] for r in history]
        fig = Figure(figsize=(10, 3.8))
        ax1, ax2 = fig.subplots(1, 2)
        for key in ("train_loss", "train_ce", "train_kd", "train_attn", "test_loss"):
            if any(key in r for r in history):
                ax1.plot(ep, [r.get(key, float("nan")) for r in history], marker=".", label=key)
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("loss")
        ax1.set_yscale("log")
        ax1.legend(fontsize=8)
        ax2.plot(ep, [r["train_acc"] for r in history], marker=".", label="train acc")
        ax2.plot(ep, [r["test_acc"] for r in history], marker=".", label="test acc")
        if any("firing_rate" in r for r in history):
            ax2.plot(ep, [r.get("firing_rate", float("nan")) for r in history], ls="--", label="firing rate")
        ax2.set_xlabel("epoch")
        ax2.set_ylim(0, 1)
        ax2.legend(fontsize=8)
        title = f"{cfg.kind} {cfg.dataset}"
        if isinstance(cfg, SNNConfig):
            title += f" student {cfg.student} T={cfg.T} {cfg.method}"
        else:
            title += f" {cfg.model}"
        fig.suptitle(title)
        fig.tight_layout()
        atomic_write(out / "curves.png", lambda f: fig.savefig(f, dpi=100, format="png"))
