"""Run configurations: dataclasses that round-trip through ``RUN_DIR/config.json`` and checkpoints."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_BETA", "DEFAULT_KD_WEIGHT", "DistillConfig", "SNNConfig", "TeacherConfig", "config_from_dict",
    "default_beta", "default_kd_weight",
]

SCHEDULES = ("layerwise", "joint")
ENCODINGS = ("direct", "poisson")
LOW_MEMORY = ("off", "bits", "recompute", "recompute_all")  # SNN.low_memory: False, True, ...
EARLIER = ("freeze", "lr")
TIME_REDUCE = ("mean", "per_step")
OPTIMIZERS = ("sgd", "adamw")


def _check_int(name: str, v: object, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def _check_pos(name: str, v: object, *, allow_zero: bool = False) -> None:
    bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
    if bad or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {v!r}")


@dataclass
class TeacherConfig:
    """Everything that defines a teacher (ANN) run; ``RUN_DIR/config.json`` holds exactly these fields.

    ``model=None`` picks the data set's default teacher (``lasnn.models.default_pair``). ``optimizer``:
    ``sgd`` (with ``momentum``, coupled L2 ``weight_decay``) or ``adamw`` (betas 0.9/0.999, decoupled
    ``weight_decay``; ``momentum`` unused). ``lr`` is the learning rate at the start of the cosine
    schedule (per-step cosine to 0 over the run, or over each stage).
    ``save_every``: also checkpoint every that many steps inside an epoch (0: at epoch ends only).
    ``grad_clip``: clip the global gradient norm to this value (0: off).
    ``mixup``: mixup (Zhang et al., ICLR 2018) with mixing weights drawn from Beta(mixup, mixup) per batch
    (0: off): the batch becomes ``lam * x + (1 - lam) * x[perm]`` (after augmentation) and cross-entropy
    ``lam * CE(y) + (1 - lam) * CE(y[perm])``, with ``lam >= 0.5`` so ``y`` stays the dominant label (train
    accuracy is counted against it). A distillation run shows the teacher the same mixed batch, so KD and
    attention match the teacher's function between training samples as well.
    ``channels_last``: keep the 2-d convolutional models (and their activations, spikes included) in
    channels-last memory order; None (default) resolves, when the run starts, to True for 2-d convolutional
    models on a CPU, where oneDNN's convolutions and ATen's batch norm are faster that way (a Fashion-MNIST
    student step, T=4: 0.75x the time), and False elsewhere (not measured on a GPU) or where torch's CPU
    channels-last convolution crashes (``lasnn.distill.objectives.default_channels_last``); config.json
    records the result. The results are the same up to float rounding (another summation order inside the
    convolutions), not bit-identical across the two settings.
    ``amp``: bf16 autocast of the forwards (convolutions and linear layers in bf16, the rest in fp32) on a GPU;
    ``cpu_amp``: the same on a CPU, off by default: fast only where the CPU computes bf16 natively (AVX512-BF16
    or AMX, ``lasnn.runtime.cpu_has_native_bf16``; measured on a Zen 4 core: the Fashion-MNIST teacher's and
    student's training steps 1.8x faster), slower elsewhere. Test accuracy is measured under the same autocast.
    """

    dataset: str = "mnist1d"
    data_dir: str | None = None
    model: str | None = None
    width: float | None = None
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0
    save_every: int = 0
    grad_clip: float = 0.0
    mixup: float = 0.0
    device: str = "auto"
    amp: bool = True
    cpu_amp: bool = False
    channels_last: bool | None = None
    kind: str = field(default="teacher", init=False)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"dataset must be a data set name, got {self.dataset!r}")
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        _check_int("save_every", self.save_every, 0)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check_pos("lr", self.lr)
        _check_pos("momentum", self.momentum, allow_zero=True)
        _check_pos("weight_decay", self.weight_decay, allow_zero=True)
        _check_pos("grad_clip", self.grad_clip, allow_zero=True)
        _check_pos("mixup", self.mixup, allow_zero=True)
        if self.width is not None:
            _check_pos("width", self.width)
        for name in ("augment", "amp", "cpu_amp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be True, False or None (auto), got {self.channels_last!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SNNConfig(TeacherConfig):
    """Direct training of a spiking student, no teacher: the baseline SpikingJelly and snnTorch users train.

    Surrogate-gradient BPTT through the ``T`` steps, cross-entropy on the T-averaged logits, the same
    optimizer, schedule, data, augmentation, checkpoints and DDP as every other run. ``student=None``: the
    data set's default student (``lasnn.models.default_pair``); ``width``: its width multiplier;
    ``encoding``: ``direct`` (the input repeated at every step) or ``poisson``.
    ``per_step_loss``: the classification loss (and, when distilling, KD) is the mean over the ``T``
    per-step outputs of the loss of each step's logits (temporal efficient training, Deng et al., ICLR
    2022) instead of the loss of their mean; predictions still use the mean.
    ``low_memory``: what the student's training forward saves for the backward (``lasnn.nn.SNN.low_memory``):
    ``bits`` (spikes as bits), ``recompute`` (batch-norm outputs recomputed too), ``recompute_all`` (conv, linear
    and pool outputs too: least memory, one more conv forward in the backward) or ``off``; the same gradients
    bit for bit at every level.
    """

    student: str | None = None
    T: int = 4
    encoding: str = "direct"
    per_step_loss: bool = False
    low_memory: str = "bits"
    kind: str = field(default="snn", init=False)

    @property
    def method(self) -> str:
        """How the SNN is trained: ``"direct"`` here, the schedule for a ``DistillConfig``."""
        return "direct"

    def validate(self) -> None:
        super().validate()
        if isinstance(self.T, bool) or not isinstance(self.T, int) or self.T < 1:
            raise ValueError(f"T must be an int >= 1, got {self.T!r}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if not isinstance(self.per_step_loss, bool):
            raise ValueError(f"per_step_loss must be a bool, got {self.per_step_loss!r}")
        if self.low_memory not in LOW_MEMORY:
            raise ValueError(f"low_memory must be one of {LOW_MEMORY}, got {self.low_memory!r}")


@dataclass
class DistillConfig(SNNConfig):
    """A LaSNN distillation run (student SNN from a trained teacher); extends ``SNNConfig``.

    ``teacher``: a teacher run folder or checkpoint file. ``student=None``: the data set's default
    student; ``width`` is the student's width multiplier (the teacher's comes from its own run).
    ``pairs``: ``"auto"`` or a list of ``"student_stage:teacher_stage"`` names (one name means the
    same on both sides). Loss: ``ce + kd_weight * KD(T=kd_temperature) + beta * sum(attention losses)``.
    ``layerwise``: one stage of ``stage_epochs`` epochs per pair (attention loss of that pair only,
    student up to that block; earlier blocks ``freeze`` (no gradient, and eval mode, so batch norm's running
    statistics stay fixed too) or train at ``earlier_lr_scale`` x lr), then the
    remaining epochs train everything on CE + KD (+ attention if ``final_attention``). ``joint``: all
    terms for all ``epochs``. ``stage_epochs=None``: ``max(1, epochs // (2 * pairs))``.

    ``beta=None`` resolves per data set (and config.json records the value used): 1000 (the attention-
    transfer and LaSNN value) for cifar10/cifar100/tinyimagenet, 100 for the small built-in sets. The loss
    is a mean over map positions, so its size grows as maps shrink; with 8x8/4x4 digit maps and length
    40/20/10 MNIST-1D maps, beta=1000 swamps CE and inflates the weights of the batch-normalised convs
    (which then barely learn). Measured, student T=4, 30 epochs on digits: layerwise beta=1000 90.3%,
    beta=100 98.6%, CE+KD only 98.9% (teacher 99.4%).

    ``kd_weight``: the KD term's gradient on the student's logits is ``kd_temperature * (p_s - p_t)`` at the
    softened probabilities, and it does not vanish until the student's logits spread as widely as the
    teacher's (a range of about 21 for the MNIST-1D teacher), which a spiking student's rate-coded logits
    reach only with large weights. At weight 1 and temperature 4 it swamps cross-entropy there: measured on
    MNIST-1D (30 epochs), a half-width student fell from 95.0% (direct training, 3 seeds) to 37.9-84.9%, a
    quarter-width one from 82.2% to chance (seed 0), and the default student lost 1.85 points (2 seeds). Weight 0.25 (or
    ``grad_clip=1``) removes the collapse. ``kd_weight=None`` resolves per data set (config.json records the
    value used): 0.25 for mnist1d, 1 elsewhere (on Fashion-MNIST weight 1 beats direct training by 1.5 points).
    """

    teacher: str = ""
    schedule: str = "layerwise"
    pairs: str | list[str] = "auto"
    beta: float | None = None
    p: float = 2.0
    time_reduce: str = "mean"
    kd_temperature: float = 4.0
    kd_weight: float | None = None
    stage_epochs: int | None = None
    earlier: str = "freeze"
    earlier_lr_scale: float = 0.1
    final_attention: bool = True
    kind: str = field(default="student", init=False)

    @property
    def method(self) -> str:
        """The schedule (``"layerwise"`` or ``"joint"``)."""
        return self.schedule

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ValueError("teacher must name a teacher run folder or checkpoint file")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.earlier not in EARLIER:
            raise ValueError(f"earlier must be one of {EARLIER}, got {self.earlier!r}")
        if self.time_reduce not in TIME_REDUCE:
            raise ValueError(f"time_reduce must be one of {TIME_REDUCE}, got {self.time_reduce!r}")
        if self.pairs != "auto" and (
            not isinstance(self.pairs, list) or not self.pairs or not all(isinstance(s, str) and s for s in self.pairs)
        ):
            raise ValueError(f"pairs must be 'auto' or a non-empty list of 'student:teacher' names, got {self.pairs!r}")
        if self.beta is not None:
            _check_pos("beta", self.beta, allow_zero=True)
        _check_pos("p", self.p)
        _check_pos("kd_temperature", self.kd_temperature)
        if self.kd_weight is not None:
            _check_pos("kd_weight", self.kd_weight, allow_zero=True)
        _check_pos("earlier_lr_scale", self.earlier_lr_scale)
        if self.stage_epochs is not None:
            _check_int("stage_epochs", self.stage_epochs, 1)


#: attention-loss weight when ``beta`` is None, per data set (see ``DistillConfig``)
DEFAULT_BETA: dict[str, float] = {"cifar10": 1000.0, "cifar100": 1000.0, "tinyimagenet": 1000.0}
_SMALL_DATA_BETA = 100.0


#: KD weight when ``kd_weight`` is None, per data set (see ``DistillConfig``)
DEFAULT_KD_WEIGHT: dict[str, float] = {"mnist1d": 0.25}
_KD_WEIGHT = 1.0


def default_kd_weight(dataset: str) -> float:
    """The KD weight a run on ``dataset`` uses when none is given."""
    return DEFAULT_KD_WEIGHT.get(dataset, _KD_WEIGHT)


def default_beta(dataset: str) -> float:
    """The attention weight a run on ``dataset`` uses when none is given."""
    return DEFAULT_BETA.get(dataset, _SMALL_DATA_BETA)


def config_from_dict(d: dict[str, Any]) -> TeacherConfig:
    """Rebuild a config from ``to_dict`` output (config.json or a checkpoint); unknown keys raise."""
    if not isinstance(d, dict):
        raise ValueError(f"a run config must be a JSON object, got {type(d).__name__}")
    kind = d.get("kind")
    cls = {"teacher": TeacherConfig, "snn": SNNConfig, "student": DistillConfig}.get(kind)
    if cls is None:
        raise ValueError(f"run config has kind={kind!r}; expected 'teacher', 'snn' or 'student'")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names - {"kind"})
    if unknown:
        raise ValueError(f"run config has unknown fields {unknown} (written by another lasnn version?)")
    cfg = cls(**{k: v for k, v in d.items() if k in names})
    cfg.validate()
    return cfg
