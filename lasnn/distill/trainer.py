"""The public training API: ``train_teacher``, ``train_snn`` and ``distill`` (see ``lasnn.distill``).

Each is one objective (``lasnn.distill.objectives``) run by the one engine (``lasnn.distill.engine``) in a
run folder (``lasnn.distill.run``).
"""

from __future__ import annotations

import os
from typing import Any

from lasnn.distill.config import DistillConfig, SNNConfig, TeacherConfig
from lasnn.distill.engine import StepCallback, run_training
from lasnn.distill.objectives import Stage, build_student_model, build_teacher_model, plan_stages
from lasnn.distill.run import Run, RunError, load_run

__all__ = ["Run", "RunError", "Stage", "build_student_model", "build_teacher_model", "distill", "load_run",
           "plan_stages", "train_snn", "train_teacher"]


def train_teacher(
    config: TeacherConfig | None = None, *, out: str | os.PathLike, resume: bool = False, quiet: bool = False,
    on_step: StepCallback | None = None, **overrides: Any,
) -> dict[str, Any]:
    """Train an ANN teacher from the zoo; writes ``out/config.json``, ``metrics.jsonl``, ``last.pt``,
    ``best.pt``, ``curves.png``.

    Args:
        config: a ``TeacherConfig`` (default: its defaults); ``overrides`` replace fields, e.g.
            ``train_teacher(out="runs/t", dataset="digits", epochs=5)``.
        out: run folder (must not hold a run unless ``resume``).
        resume: continue the run in ``out`` from ``last.pt`` (settings come from its config.json; any
            given that differ raise RunError).
        quiet: no progress bars or per-epoch lines.
        on_step: called after every optimizer step as ``on_step(epoch, step, steps_this_process)`` (0-based
            epoch, 1-based step inside it, steps since this call started); e.g. progress reporting, or
            killing the process to test resuming.
    Returns:
        final metrics: ``{"test_acc", "best_test_acc", "train_acc", "epochs", "model", "dataset", "seconds", ...}``.
    """
    return run_training(TeacherConfig, config, overrides, out, resume, quiet, on_step)


def distill(
    config: DistillConfig | None = None, *, out: str | os.PathLike, resume: bool = False, quiet: bool = False,
    on_step: StepCallback | None = None, **overrides: Any,
) -> dict[str, Any]:
    """Distil a spiking student from a trained teacher (LaSNN); same files and arguments as ``train_teacher``.

    Example: ``distill(out="runs/s", dataset="digits", teacher="runs/t", T=4, schedule="layerwise", epochs=6)``.
    Returns the final metrics plus ``T``, ``schedule``, ``stages``, ``pairs``, ``firing_rate`` and ``teacher``.
    """
    return run_training(DistillConfig, config, overrides, out, resume, quiet, on_step)


def train_snn(
    config: SNNConfig | None = None, *, out: str | os.PathLike, resume: bool = False, quiet: bool = False,
    on_step: StepCallback | None = None, **overrides: Any,
) -> dict[str, Any]:
    """Train a spiking student directly (no teacher): the baseline distillation has to beat.

    Surrogate-gradient BPTT, cross-entropy on the T-averaged logits; same run folder, files, resume and
    DDP as ``train_teacher``. Example: ``train_snn(out="runs/d", dataset="mnist1d", T=4, epochs=30)``.
    Returns the final metrics plus ``T``, ``schedule`` (``"direct"``) and ``firing_rate``.
    """
    return run_training(SNNConfig, config, overrides, out, resume, quiet, on_step)
