"""Objectives: what a run trains and how one batch is scored; the engine (``lasnn.distill.engine``) does the rest.

``TeacherObjective`` (an ANN, cross-entropy), ``DirectSNNObjective`` (the spikify'd student trained directly:
CE on the T-averaged logits, surrogate-gradient BPTT) and ``DistillObjective`` (LaSNN: CE + KD + attention
terms from a frozen teacher, layer-wise or joint). Each builds its model(s), plans its stages, says which
parameters train in a stage and returns ``(loss, parts, correct)`` for a batch; a new recipe is a new
objective, not another branch in the loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lasnn.data import Dataset
from lasnn.distill.checkpoint import load_checkpoint
from lasnn.distill.config import (
    DistillConfig,
    SNNConfig,
    TeacherConfig,
    config_from_dict,
    default_beta,
    default_kd_weight,
)
from lasnn.distill.run import RunError, checkpoint_path, load_state
from lasnn.distill.taps import TappedModel, match_pairs, parameters_reaching

__all__ = ["OBJECTIVES", "DirectSNNObjective", "DistillObjective", "Mix", "Objective", "Stage", "TeacherObjective",
           "build_student_model", "build_teacher_model", "default_channels_last", "draw_mix", "mixed_cross_entropy",
           "plan_stages", "resolve_names"]

# ------------------------------------------------------------------------------------------ models


def _create(name: str, num_classes: int, width: float | None, in_channels: int) -> nn.Module:
    from lasnn import models

    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_channels": in_channels}
    if width is not None:
        kwargs["width"] = width
    return models.create(name, **kwargs)


def _default_models(dataset: str) -> tuple[str, str]:
    from lasnn import models

    # synthetic data has the digits' shape (1 x 8 x 8), so the digits pair serves it.
    return models.default_pair("digits" if dataset == "synthetic" else dataset)


def build_teacher_model(cfg: TeacherConfig, ds: Dataset) -> nn.Module:
    """The ANN a teacher config describes (fresh weights)."""
    name = cfg.model or _default_models(ds.name)[0]
    return _create(name, ds.num_classes, cfg.width, ds.input_shape[0])


def build_student_model(cfg: SNNConfig, ds: Dataset) -> nn.Module:
    """The spikify'd student SNN a direct-training or distillation config describes (fresh weights)."""
    from lasnn.nn.spikify import spikify

    name = cfg.student or _default_models(ds.name)[1]
    ann = _create(name, ds.num_classes, cfg.width, ds.input_shape[0])
    kwargs: dict[str, Any] = {"T": cfg.T, "encoding": cfg.encoding}
    if cfg.encoding == "poisson":
        kwargs["seed"] = cfg.seed
    snn = spikify(ann, **kwargs)
    snn.low_memory = False if cfg.low_memory == "off" else cfg.low_memory
    return snn


def resolve_names(cfg: TeacherConfig, ds: Dataset) -> TeacherConfig:
    """Fill ``model``/``student`` defaults so config.json records the models that actually ran."""
    cfg = dataclasses.replace(cfg)
    if isinstance(cfg, SNNConfig):
        if cfg.student is None:
            cfg.student = _default_models(ds.name)[1]
        if isinstance(cfg, DistillConfig) and cfg.beta is None:
            cfg.beta = default_beta(ds.name)
        if isinstance(cfg, DistillConfig) and cfg.kd_weight is None:
            cfg.kd_weight = default_kd_weight(ds.name)
    elif cfg.model is None:
        cfg.model = _default_models(ds.name)[0]
    return cfg


def default_channels_last(models: list[nn.Module], device: torch.device) -> bool:
    """What ``channels_last=None`` means for a run of ``models`` on ``device``: True on a CPU when they have 2-d
    convolutions (oneDNN's channels-last convolutions and ATen's channels-last batch norm are faster there:
    a Fashion-MNIST student step at T=4 takes 0.75x the time), unless one of them is a strided 1x1 convolution
    of 2-7 input channels, which crashes the process in channels-last on torch 2.14's CPU (oneDNN: segfault,
    bus error or floating-point exception; e.g. resnet20 at width 0.25). False elsewhere (unmeasured on GPUs)."""
    if device.type != "cpu":
        return False
    convs = [m for model in models for m in model.modules() if isinstance(m, nn.Conv2d)]
    hazard = any(m.kernel_size == (1, 1) and m.stride != (1, 1) and 2 <= m.in_channels <= 7 for m in convs)
    return bool(convs) and not hazard


# ------------------------------------------------------------------------------------------ stages


@dataclass(frozen=True)
class Stage:
    """One part of the schedule: ``pair`` index trained on its attention loss only, or None (all terms)."""

    name: str
    epochs: int
    pair: int | None


def plan_stages(cfg: TeacherConfig, n_pairs: int) -> list[Stage]:
    """The schedule: ``[Stage]`` whose epochs sum to ``cfg.epochs``."""
    if not isinstance(cfg, DistillConfig):
        return [Stage("direct" if isinstance(cfg, SNNConfig) else "teacher", cfg.epochs, None)]
    if cfg.schedule == "joint":
        return [Stage("joint", cfg.epochs, None)]
    per = cfg.stage_epochs if cfg.stage_epochs is not None else max(1, cfg.epochs // (2 * n_pairs))
    final = cfg.epochs - per * n_pairs
    if final < 1:
        raise RunError(
            f"layerwise schedule: {n_pairs} pair stage(s) x {per} epoch(s) leave no epoch for the final stage "
            f"(epochs={cfg.epochs}); raise --epochs or lower --stage-epochs"
        )
    return [Stage(f"pair{k + 1}", per, k) for k in range(n_pairs)] + [Stage("final", final, None)]


# ------------------------------------------------------------------------------------------ objectives


def _load_teacher(cfg: DistillConfig, ds: Dataset) -> tuple[nn.Module, dict[str, Any]]:
    path = checkpoint_path(cfg.teacher, "best")
    ckpt = load_checkpoint(path)
    if ckpt["kind"] != "teacher":
        raise RunError(f"--teacher {str(path)!r} is a {ckpt['kind']} checkpoint; pass a train-teacher run")
    tcfg = config_from_dict(ckpt["config"])
    info = ckpt.get("dataset_info", {})
    if tcfg.dataset != ds.name or info.get("num_classes") != ds.num_classes or tuple(
        info.get("input_shape", ())
    ) != tuple(ds.input_shape):
        raise RunError(
            f"teacher {str(path)!r} was trained on {tcfg.dataset!r} ({info.get('num_classes')} classes, input "
            f"{tuple(info.get('input_shape', ()))}); this run distils on {ds.name!r} ({ds.num_classes} classes, "
            f"input {tuple(ds.input_shape)})"
        )
    teacher = build_teacher_model(tcfg, ds)
    load_state(teacher, ckpt["model_state"], path)
    return teacher, {"path": str(path), "model": tcfg.model, "test_acc": ckpt.get("best_acc")}


#: batch outputs an objective returns: (loss, {part name: detached value}, number of correct predictions)
BatchResult = tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Mix:
    """One mixup draw: the batch became ``lam * x + (1 - lam) * x[perm]`` (``perm`` ``[B]``, ``lam >= 0.5``)."""

    lam: float
    perm: torch.Tensor


def draw_mix(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, Mix | None]:
    """Mix batch ``x`` ``[B, ...]`` with a permutation of itself, weight from Beta(alpha, alpha); alpha 0: as is.

    Draws from the global torch CPU generator, whose state every checkpoint holds, so a resumed run
    replays the same draws.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0 or alpha == float("inf"):
        raise ValueError(f"alpha must be a finite number >= 0 (0: no mixing), got {alpha!r}")
    if alpha == 0:
        return x, None
    lam = float(torch.distributions.Beta(float(alpha), float(alpha)).sample())
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(x.shape[0]).to(x.device)
    return lam * x + (1.0 - lam) * x[perm], Mix(lam, perm)


def _flat_steps(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # per-step outputs [T, B, K] -> [T*B, K] and labels [T*B]: a loss averaged over the rows is the mean
    # over t of the per-step batch-mean losses
    if out.dim() == 3:
        return out.flatten(0, 1), y.repeat(out.shape[0])
    return out, y


def mixed_cross_entropy(out: torch.Tensor, y: torch.Tensor, mix: Mix | None) -> torch.Tensor:
    """Cross-entropy of logits ``out`` (``[B, K]``, or per-step ``[T, B, K]``: the mean of the per-step
    losses) against labels ``y`` ``[B]``, mixed as the batch was when ``mix`` is given."""
    flat, yy = _flat_steps(out, y)
    if mix is None:
        return F.cross_entropy(flat, yy)
    _, yp = _flat_steps(out, y[mix.perm])
    return mix.lam * F.cross_entropy(flat, yy) + (1.0 - mix.lam) * F.cross_entropy(flat, yp)


def _correct(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    pred = out.mean(0) if out.dim() == 3 else out
    return (pred.argmax(1) == y).sum()


class Objective:
    """What a run trains and how a batch is scored. Subclasses set ``model`` (the network trained and
    saved), ``pairs`` (student/teacher stage pairs, empty without a teacher) and ``stages`` in
    ``__init__``; the engine calls ``trainable``, ``network``, ``losses`` and ``result_info``.

    Args (of every subclass): ``cfg`` the run's config (names resolved), ``ds`` the data set, ``device``
    where the run trains. Built after the engine seeded the run's RNGs, so weights are reproducible.
    """

    is_snn = False  # report firing rates, T and the schedule
    model: nn.Module
    pairs: list[tuple[str, str]]
    stages: list[Stage]

    def __init__(self, cfg: TeacherConfig, ds: Dataset, device: torch.device) -> None:
        self.cfg = cfg
        self.ds = ds
        self.device = device
        # bf16 autocast of the forwards: on a GPU with amp, on a CPU with cpu_amp
        self.use_amp = (device.type == "cuda" and cfg.amp) or (device.type == "cpu" and cfg.cpu_amp)

    def amp(self) -> torch.autocast:
        """The autocast context of the forwards (bf16 on a GPU with ``amp``, on a CPU with ``cpu_amp``, else
        disabled)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp)

    def trainable(self, stage: Stage) -> list[tuple[list[str], float]]:
        """Parameter groups trained in ``stage``: ``[(parameter names, lr scale)]`` (default: all, scale 1)."""
        return [([n for n, _ in self.model.named_parameters()], 1.0)]

    def network(self) -> nn.Module:
        """The module the engine calls on a batch (and wraps in DistributedDataParallel under torchrun)."""
        return self.model

    def models(self) -> list[nn.Module]:
        """Every model the objective runs (the trained one first), for the engine to place and lay out."""
        return [self.model]

    def losses(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, stage: Stage, *, index: torch.Tensor | None = None
    ) -> BatchResult:
        """Loss of one batch ``x`` ``[B, ...]``, ``y`` ``[B]`` (default: cross-entropy of ``net(x)``, the logits
        ``[B, classes]``; for an SNN those are the T-averaged logits, so this is BPTT through the steps; with
        ``per_step_loss`` the mean of the per-step cross-entropies; with ``mixup`` on the mixed batch).
        ``index``: ``[B]`` the batch's rows of the training set, or None when unknown."""
        x, mix = draw_mix(x, self.cfg.mixup)
        per_step = self.is_snn and self.cfg.per_step_loss
        with self.amp():
            out = net(x, return_steps=True) if per_step else net(x)
        out = out.float()
        loss = mixed_cross_entropy(out, y, mix)
        return loss, {"ce": loss.detach()}, _correct(out, y)

    def result_info(self) -> dict[str, Any]:
        """Fields the run's final result adds for this objective."""
        return {}


class TeacherObjective(Objective):
    """An ANN teacher from the zoo, trained on cross-entropy."""

    def __init__(self, cfg: TeacherConfig, ds: Dataset, device: torch.device) -> None:
        super().__init__(cfg, ds, device)
        self.model = build_teacher_model(cfg, ds)
        self.pairs = []
        self.stages = plan_stages(cfg, 0)


class DirectSNNObjective(Objective):
    """The spikify'd student trained directly (no teacher): the baseline distillation has to beat."""

    is_snn = True

    def __init__(self, cfg: SNNConfig, ds: Dataset, device: torch.device) -> None:
        super().__init__(cfg, ds, device)
        self.model = build_student_model(cfg, ds)
        self.pairs = []
        self.stages = plan_stages(cfg, 0)

    def result_info(self) -> dict[str, Any]:
        return {"T": self.cfg.T, "schedule": self.cfg.method, "stages": [s.name for s in self.stages],
                "pairs": [], "teacher": None}


class DistillObjective(Objective):
    """LaSNN: ``CE + kd_weight * KD + beta * sum(attention losses)`` from a frozen teacher.

    Layer-wise: a stage per pair trains the student up to that block on the pair's attention loss only
    (earlier blocks frozen, or at ``earlier_lr_scale`` x lr), then a final stage trains everything on CE + KD
    (+ attention if ``final_attention``); joint: all terms throughout. Only the attention terms a stage
    uses are computed.
    """

    is_snn = True

    def __init__(self, cfg: DistillConfig, ds: Dataset, device: torch.device) -> None:
        super().__init__(cfg, ds, device)
        self.teacher, self.teacher_info = _load_teacher(cfg, ds)
        self.teacher.to(device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.model = build_student_model(cfg, ds)
        sample = ds.normalize(ds.x_train[:2])
        self.pairs = match_pairs(self.model, self.teacher.cpu(), sample, cfg.pairs)
        self.teacher.to(device)
        # Which parameters each pair's stage depends on ("the student up to block k").
        self.reach = [parameters_reaching(self.model, s, sample) for s, _ in self.pairs]
        self.student_tap = TappedModel(self.model, [s for s, _ in self.pairs])
        self.teacher_tap = TappedModel(self.teacher, [t for _, t in self.pairs])
        self.stages = plan_stages(cfg, len(self.pairs))
        # When a training sample always reaches the model as the same tensor (no random augmentation, no
        # mixup), the frozen teacher's logits for it never change: they are computed once, on first use, and
        # looked up per batch instead of running the teacher every step (on MNIST-1D that forward costs about
        # as much as the student's, T=4). Attention terms still run the teacher: they need its features.
        augments = cfg.augment and (ds.crop_padding > 0 or ds.hflip)
        self.cache_teacher_logits = cfg.mixup == 0 and not augments
        self._teacher_logits: torch.Tensor | None = None  # [N_train, classes] float32, once computed

    @torch.no_grad()
    def teacher_train_logits(self) -> torch.Tensor:
        """The teacher's logits ``[N_train, classes]`` (float32, on the run's device) for every training
        sample as the loader prepares it without augmentation, in batches of the run's batch size."""
        if self._teacher_logits is None:
            x, b, out = self.ds.x_train, self.cfg.batch_size, []
            with self.amp():
                for i in range(0, x.shape[0], b):
                    out.append(self.teacher(self.ds.prepare(x[i : i + b].to(self.device))).float())
            self._teacher_logits = torch.cat(out)
        return self._teacher_logits

    def models(self) -> list[nn.Module]:
        return [self.model, self.teacher]

    def _uses_attention(self, stage: Stage) -> bool:
        cfg = self.cfg
        return stage.pair is not None or ((cfg.schedule == "joint" or cfg.final_attention) and cfg.beta > 0)

    def trainable(self, stage: Stage) -> list[tuple[list[str], float]]:
        if stage.pair is None:
            return super().trainable(stage)
        names = [n for n, _ in self.model.named_parameters()]
        mine = self.reach[stage.pair]
        earlier = self.reach[stage.pair - 1] if stage.pair > 0 else set()
        groups = [([n for n in names if n in mine and n not in earlier], 1.0)]
        old = [n for n in names if n in mine and n in earlier]
        if self.cfg.earlier == "lr" and old:
            groups.append((old, self.cfg.earlier_lr_scale))
        return groups

    def network(self) -> nn.Module:
        return self.student_tap

    def losses(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, stage: Stage, *, index: torch.Tensor | None = None
    ) -> BatchResult:
        from lasnn import attention_loss, kd_loss

        cfg = self.cfg
        x, mix = draw_mix(x, cfg.mixup)  # the teacher sees the same mixed batch
        with self.amp():
            t_feats: list[torch.Tensor] = []
            if self._uses_attention(stage):
                with torch.no_grad():
                    t_logits, t_feats = self.teacher_tap(x)
            elif self.cache_teacher_logits and index is not None:
                t_logits = self.teacher_train_logits()[index.to(self.device)]
            else:
                with torch.no_grad():
                    t_logits = self.teacher(x)  # no features kept: none is used
            logits, s_feats = net(x, return_steps=True) if cfg.per_step_loss else net(x)
        logits, t_logits = logits.float(), t_logits.float()  # logits: [B, K], or [T, B, K] per step
        parts: dict[str, torch.Tensor] = {}

        def att(k: int) -> torch.Tensor:
            # No casts here: the fused op computes in fp32 from bf16 features without a full-size copy.
            return attention_loss(s_feats[k], t_feats[k], p=cfg.p, time_reduce=cfg.time_reduce)

        # Only the attention terms the loss uses are computed (a pair stage: its own; beta=0: none).
        if stage.pair is not None:
            loss = cfg.beta * att(stage.pair)
            parts["attn"] = loss.detach()
        else:
            ce = mixed_cross_entropy(logits, y, mix)
            if logits.dim() == 3:  # per-step KD: each step's logits against the teacher's
                kd = kd_loss(logits.flatten(0, 1), t_logits.repeat(logits.shape[0], 1), temperature=cfg.kd_temperature)
            else:
                kd = kd_loss(logits, t_logits, temperature=cfg.kd_temperature)
            loss = ce + cfg.kd_weight * kd
            parts["ce"], parts["kd"] = ce.detach(), kd.detach()
            if cfg.schedule == "joint" or cfg.final_attention:
                if cfg.beta > 0:
                    a = cfg.beta * torch.stack([att(k) for k in range(len(self.pairs))]).sum()
                    loss = loss + a
                    parts["attn"] = a.detach()
                else:
                    parts["attn"] = torch.zeros((), device=loss.device)
        return loss, parts, _correct(logits, y)

    def result_info(self) -> dict[str, Any]:
        return {"T": self.cfg.T, "schedule": self.cfg.method, "stages": [s.name for s in self.stages],
                "pairs": [list(p) for p in self.pairs], "teacher": self.teacher_info}


#: the objective of each config class
OBJECTIVES: dict[type, type[Objective]] = {
    TeacherConfig: TeacherObjective, SNNConfig: DirectSNNObjective, DistillConfig: DistillObjective,
}
