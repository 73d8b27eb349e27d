"""The training engine behind ``train_teacher``, ``train_snn`` and ``distill`` (see ``lasnn.distill`` for the API).

One loop serves all three: a plan of stages (one for a teacher, a directly trained SNN or a joint
distillation; one per layer pair plus a final stage for the layer-wise schedule), SGD with momentum or AdamW
and a per-step cosine learning rate inside each stage, checkpoints that hold everything an exact
resume needs, DDP under torchrun.

Exact resume: the data order and augmentation of every batch are functions of (seed, epoch, step)
(``lasnn.data.TensorLoader``); the learning rate is a function of the step; the checkpoint holds the
model, the optimizer (momentum or moment buffers), every RNG state of every rank (torch, CUDA, numpy, python and
the private generators of seeded encoders), the epoch, the step inside it and the running sums of the
epoch's metrics. Resuming from a checkpoint therefore replays exactly the computation an uninterrupted
run performs (on the same machine and thread count).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lasnn.data import Dataset, load_dataset
from lasnn.distill.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    module_generator_states,
    save_checkpoint,
    set_module_generator_states,
)
from lasnn.distill.config import DistillConfig, SNNConfig, TeacherConfig, config_from_dict, default_beta
from lasnn.distill.dist import DistEnv, setup_distributed
from lasnn.distill.taps import TappedModel, match_pairs, parameters_reaching
from lasnn.runtime import preserved_rng, rng_state, set_rng_state

__all__ = ["Run", "RunError", "distill", "load_run", "train_snn", "train_teacher"]

# Fields that may differ between a run and its resume (they describe the machine, not the run).
_MACHINE_FIELDS = ("device", "data_dir")


class RunError(ValueError):
    """A run cannot start: bad run folder, incompatible teacher, mismatched resume (message says why)."""


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
    return spikify(ann, **kwargs)


def _resolve_names(cfg: TeacherConfig, ds: Dataset) -> TeacherConfig:
    """Fill ``model``/``student`` defaults so config.json records the models that actually ran."""
    cfg = dataclasses.replace(cfg)
    if isinstance(cfg, SNNConfig):
        if cfg.student is None:
            cfg.student = _default_models(ds.name)[1]
        if isinstance(cfg, DistillConfig) and cfg.beta is None:
            cfg.beta = default_beta(ds.name)
    elif cfg.model is None:
        cfg.model = _default_models(ds.name)[0]
    return cfg


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


def _locate(stages: list[Stage], epoch: int) -> tuple[int, int]:
    """(stage index, epoch index inside that stage) of a global epoch index."""
    for i, s in enumerate(stages):
        if epoch < s.epochs:
            return i, epoch
        epoch -= s.epochs
    raise IndexError(epoch)


# ------------------------------------------------------------------------------------------ run dir


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


def _checkpoint_path(path: str | os.PathLike, which: str = "best") -> Path:
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
    path = _checkpoint_path(run_dir, which)
    ckpt = load_checkpoint(path, map_location=map_location)
    try:
        cfg = config_from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} holds an invalid run config: {e}") from e
    ds_info = ckpt.get("dataset_info", {})
    fake = _ShapeOnly(cfg.dataset, int(ds_info.get("num_classes", 0)), tuple(ds_info.get("input_shape", ())))
    model = build_student_model(cfg, fake) if isinstance(cfg, SNNConfig) else build_teacher_model(cfg, fake)
    _load_state(model, ckpt["model_state"], path)
    model.eval()
    return Run(model, cfg, cfg.dataset, ckpt["kind"], list(ckpt.get("history", [])), path)


class _ShapeOnly:
    """What model builders need of a data set (name, classes, input shape) without loading it."""

    def __init__(self, name: str, num_classes: int, input_shape: tuple[int, ...]) -> None:
        if num_classes < 1 or not input_shape:
            raise CheckpointError("checkpoint lacks the data set's num_classes/input_shape")
        self.name, self.num_classes, self.input_shape = name, num_classes, input_shape


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the model its config describes: {str(e).splitlines()[0]}"
        ) from e


def _load_teacher(cfg: DistillConfig, ds: Dataset) -> tuple[nn.Module, dict[str, Any]]:
    path = _checkpoint_path(cfg.teacher, "best")
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
    _load_state(teacher, ckpt["model_state"], path)
    return teacher, {"path": str(path), "model": tcfg.model, "test_acc": ckpt.get("best_acc")}


# ------------------------------------------------------------------------------------------ engine


#: ``on_step(epoch, step, steps_this_process)``, called after every optimizer step
StepCallback = Callable[[int, int, int], None]


class _Trainer:
    def __init__(self, cls: type, config: TeacherConfig | None, overrides: dict[str, Any], out: Path, *,
                 resume: bool, quiet: bool, on_step: StepCallback | None = None) -> None:
        if on_step is not None and not callable(on_step):
            raise TypeError(f"on_step must be a callable (epoch, step, steps_this_process), "
                            f"got {type(on_step).__name__}")
        self.on_step = on_step
        self.quiet = quiet
        self.out = out
        if resume:
            # Settings come from the run's config.json; what the caller gave explicitly must agree with it.
            cfg = _read_config(out)
            explicit = dict(config.to_dict() if config is not None else {})
            explicit.pop("kind", None)
            explicit.update(overrides)
            _check_resume_compatible(cfg, cls, explicit)
            cfg = dataclasses.replace(cfg, **{k: explicit[k] for k in _MACHINE_FIELDS if k in explicit})
        else:
            cfg = _make_config(cls, config, overrides)
            if (out / "config.json").exists() or (out / "last.pt").exists():
                raise RunError(f"{str(out)!r} already holds a run (config.json/last.pt); use --resume to continue "
                               "it or choose another --out")
        cfg.validate()
        self.env: DistEnv = setup_distributed(cfg.device)
        try:
            self._setup(cfg, resume)
        except BaseException:
            self.env.close()
            raise

    # -- setup: everything that can fail runs before the first file is written
    def _setup(self, cfg: TeacherConfig, resume: bool) -> None:
        out = self.out
        self.resume_ckpt: dict[str, Any] | None = None
        if resume and (out / "last.pt").is_file():
            self.resume_ckpt = load_checkpoint(out / "last.pt")
        self.ds = load_dataset(cfg.dataset, cfg.data_dir)
        cfg = _resolve_names(cfg, self.ds)
        self.cfg = cfg
        self.is_student = isinstance(cfg, SNNConfig)  # an SNN (direct or distilled): firing rates, T
        self.has_teacher = isinstance(cfg, DistillConfig)
        dev = self.env.device

        torch.manual_seed(cfg.seed)
        if self.has_teacher:
            self.teacher, self.teacher_info = _load_teacher(cfg, self.ds)
            self.teacher.to(dev).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self.model = build_student_model(cfg, self.ds)
            sample = self.ds.normalize(self.ds.x_train[:2])
            self.pairs = match_pairs(self.model, self.teacher.cpu(), sample, cfg.pairs)
            self.teacher.to(dev)
            # Which parameters each pair's stage depends on ("the student up to block k").
            self.reach = [parameters_reaching(self.model, s, sample) for s, _ in self.pairs]
            self.student_tap = TappedModel(self.model, [s for s, _ in self.pairs])
            self.teacher_tap = TappedModel(self.teacher, [t for _, t in self.pairs])
        elif self.is_student:
            self.model = build_student_model(cfg, self.ds)
            self.pairs, self.reach = [], []
        else:
            self.model = build_teacher_model(cfg, self.ds)
            self.pairs, self.reach = [], []
        self.model.to(dev)
        self.stages = plan_stages(cfg, len(self.pairs))
        self.total_epochs = sum(s.epochs for s in self.stages)
        if dev.type == "cuda":
            # The whole data set moves to the GPU once (uint8 CIFAR is 150 MB): batches are then gathered,
            # augmented and normalised there, with no host-to-device copy per step.
            self.ds = dataclasses.replace(self.ds, x_train=self.ds.x_train.to(dev), y_train=self.ds.y_train.to(dev),
                                          x_test=self.ds.x_test.to(dev), y_test=self.ds.y_test.to(dev))
        self.train_loader = self.ds.loader("train", cfg.batch_size, augment=cfg.augment, seed=cfg.seed,
                                           rank=self.env.rank, world_size=self.env.world_size)
        self.test_loader = self.ds.loader("test", max(cfg.batch_size, 256), rank=self.env.rank,
                                          world_size=self.env.world_size)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise RunError(f"batch_size {cfg.batch_size} x {self.env.world_size} process(es) exceeds the "
                           f"{self.ds.x_train.shape[0]} training samples")
        self.autocast = dev.type == "cuda" and cfg.amp
        self.history: list[dict[str, Any]] = []
        self.best_acc = -1.0
        self.start_epoch, self.start_step = 0, 0
        self.accum = _zero_accum()
        self.opt_state: dict[str, Any] | None = None
        self.opt_stage = -1
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
        elif self.env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            (out / "metrics.jsonl").write_text("")
        self.env.barrier()

    def _restore(self, ck: dict[str, Any]) -> None:
        if ck.get("world_size", 1) != self.env.world_size:
            raise RunError(f"last.pt was written by {ck.get('world_size', 1)} process(es); resume with the same "
                           f"number (this job has {self.env.world_size}) to reproduce the run")
        if ck.get("steps_per_epoch") != self.steps_per_epoch:
            raise RunError("last.pt was written with a different number of steps per epoch (data set or batch "
                           "size changed); cannot resume it")
        _load_state(self.model, ck["model_state"], self.out / "last.pt")
        self.history = list(ck["history"])
        self.best_acc = float(ck["best_acc"])
        self.start_epoch, self.start_step = int(ck["epoch"]), int(ck["step"])
        mine = ck["ranks"][self.env.rank]
        self.accum = dict(mine["accum"])
        set_rng_state(mine["rng"])
        set_module_generator_states(self.model, mine["generators"])
        self.opt_state, self.opt_stage = ck.get("optimizer_state"), int(ck.get("opt_stage", -1))
        if self.env.is_main:
            # metrics.jsonl may have a line the checkpoint does not know yet (killed between the two);
            # the checkpoint's history is authoritative.
            _write_metrics(self.out, self.history)

    # -- one stage's trainable parameters, optimizer and (under torchrun) DDP wrapper
    def _enter_stage(self, idx: int) -> None:
        cfg, stage = self.cfg, self.stages[idx]
        named = dict(self.model.named_parameters())
        groups: list[tuple[list[str], float]]
        if stage.pair is None:
            groups = [(list(named), 1.0)]
        else:
            mine = self.reach[stage.pair]
            earlier = self.reach[stage.pair - 1] if stage.pair > 0 else set()
            new = [n for n in named if n in mine and n not in earlier]
            old = [n for n in named if n in mine and n in earlier]
            groups = [(new, 1.0)]
            if cfg.earlier == "lr" and old:
                groups.append((old, cfg.earlier_lr_scale))
        trainable = {n for names, _ in groups for n in names}
        for n, p in named.items():
            p.requires_grad_(n in trainable)
        self.param_groups = [
            {"params": [named[n] for n in names], "lr": cfg.lr * s, "scale": s} for names, s in groups if names
        ]
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(self.param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.param_groups, lr=cfg.lr, momentum=cfg.momentum,
                                             weight_decay=cfg.weight_decay, nesterov=False)
        if self.opt_state is not None and self.opt_stage == idx:
            self.optimizer.load_state_dict(self.opt_state)
        self.opt_state, self.opt_stage = None, idx
        self.cur_stage = idx
        net: nn.Module = self.student_tap if self.has_teacher else self.model
        if self.env.distributed:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None
            )
        self.net = net

    def _train_mode(self) -> None:
        # Frozen means frozen: a module none of whose own parameters train in this stage (an earlier block
        # under earlier="freeze", a later block during a pair stage) runs in eval mode, so batch norm's
        # running statistics stay as they are too.
        self.model.train()
        for m in self.model.modules():
            own = list(m.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own):
                m.eval()

    def _schedule(self, stage_steps: int, start: int) -> torch.optim.lr_scheduler.LambdaLR:
        # Per-step cosine from lr to 0 within the stage (each group at its own scale of lr), positioned at
        # the stage step the loop starts from: the factor is a pure function of the step, so a resumed run
        # needs no scheduler state in its checkpoint.
        for g in self.optimizer.param_groups:
            g["initial_lr"] = self.cfg.lr * g["scale"]
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / stage_steps)), last_epoch=start - 1)

    # -- losses of one batch
    # Per-batch metrics stay tensors (detached): the loop sums them on the device and reads them once per
    # epoch, so a step costs no host sync beyond what the optimizer itself needs.
    def _losses(
        self, x: torch.Tensor, y: torch.Tensor, stage: Stage
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        cfg = self.cfg
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if not self.has_teacher:
                # teacher CE, or direct SNN training: CE on the T-averaged logits, BPTT through the steps
                logits = self.net(x)
                loss = F.cross_entropy(logits.float(), y)
                return loss, {"ce": loss.detach()}, (logits.argmax(1) == y).sum()
            from lasnn import attention_loss, kd_loss

            with torch.no_grad():
                t_logits, t_feats = self.teacher_tap(x)
            logits, s_feats = self.net(x)
        logits, t_logits = logits.float(), t_logits.float()
        parts: dict[str, torch.Tensor] = {}

        def att(k: int) -> torch.Tensor:
            # No casts here: the fused op computes in fp32 from bf16 features without a full-size copy.
            return attention_loss(s_feats[k], t_feats[k], p=cfg.p, time_reduce=cfg.time_reduce)

        # Only the attention terms the loss uses are computed (a pair stage: its own; beta=0: none).
        if stage.pair is not None:
            loss = cfg.beta * att(stage.pair)
            parts["attn"] = loss.detach()
        else:
            ce = F.cross_entropy(logits, y)
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
        return loss, parts, (logits.argmax(1) == y).sum()

    # -- evaluation over this rank's shard of the test set, totals all-reduced
    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        spikes = [0.0, 0.0]
        hooks = []
        if self.is_student:
            from lasnn.nn.neurons import count_spikes
            from lasnn.nn.spikify import FoldedNeuron

            def count(_m, _i, out):
                spikes[0] = spikes[0] + count_spikes(out)  # a tensor: no host sync per site and batch
                spikes[1] += out.numel()

            hooks = [m.register_forward_hook(count) for m in self.model.modules() if isinstance(m, FoldedNeuron)]
        loss_sum, correct, n = 0.0, 0.0, 0.0
        try:
            for x, y in self.test_loader:
                with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    logits = self.model(x).float()
                loss_sum = loss_sum + F.cross_entropy(logits, y, reduction="sum").double()
                correct = correct + (logits.argmax(1) == y).sum().double()
                n += y.numel()
        finally:
            for h in hooks:
                h.remove()
        spikes[0], loss_sum, correct = float(spikes[0]), float(loss_sum), float(correct)  # one read per evaluation
        loss_sum, correct, n, s0, s1 = self.env.all_reduce_sum([loss_sum, correct, n, *spikes])
        out = {"test_loss": loss_sum / max(n, 1), "test_acc": correct / max(n, 1), "test_samples": int(n)}
        if self.is_student:
            out["firing_rate"] = s0 / max(s1, 1)
        return out

    # -- checkpoints
    def _save(self, epoch: int, step: int) -> None:
        mine = {"accum": {k: float(v) for k, v in self.accum.items()}, "rng": rng_state(),
                "generators": module_generator_states(self.model)}
        ranks = self.env.gather_objects(mine)
        if not self.env.is_main:
            return
        state = self._base_state()
        state.update({
            "epoch": epoch, "step": step, "history": self.history, "best_acc": self.best_acc,
            "optimizer_state": self.optimizer.state_dict(), "opt_stage": self.cur_stage,
            "ranks": ranks, "world_size": self.env.world_size, "steps_per_epoch": self.steps_per_epoch,
        })
        save_checkpoint(self.out / "last.pt", state)

    def _base_state(self) -> dict[str, Any]:
        return {
            "kind": self.cfg.kind, "config": self.cfg.to_dict(), "model_state": self.model.state_dict(),
            "dataset_info": {"num_classes": self.ds.num_classes, "input_shape": list(self.ds.input_shape)},
            "pairs": [list(p) for p in self.pairs],
        }

    # -- the loop
    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg, env = self.cfg, self.env
        steps_this_process = 0
        show_bar = env.is_main and not self.quiet and sys.stderr.isatty()
        t_run = time.perf_counter()
        for epoch in range(self.start_epoch, self.total_epochs):
            stage_idx, epoch_in_stage = _locate(self.stages, epoch)
            stage = self.stages[stage_idx]
            if getattr(self, "cur_stage", None) != stage_idx:
                self._enter_stage(stage_idx)
            first = self.start_step if epoch == self.start_epoch else 0
            if first == 0:
                self.accum = _zero_accum()
            t0 = time.perf_counter()
            self._train_mode()
            self.train_loader.set_epoch(epoch)
            bar = tqdm(total=self.steps_per_epoch, initial=first, disable=not show_bar, leave=False,
                       desc=f"epoch {epoch + 1}/{self.total_epochs} {stage.name}", dynamic_ncols=True)
            if epoch == self.start_epoch or epoch_in_stage == 0:
                self.scheduler = self._schedule(stage.epochs * self.steps_per_epoch,
                                                epoch_in_stage * self.steps_per_epoch + first)
            lr = cfg.lr
            for step, (x, y) in enumerate(self.train_loader.iter_from(first), start=first):
                lr = cfg.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)  # recorded in the metrics
                loss, parts, correct = self._losses(x, y, stage)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    params = [p for g in self.optimizer.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                b = y.numel()
                a = self.accum
                a["n"] += b
                # float64 sums of the float32 values times the batch size: the same arithmetic as Python
                # floats, so a resumed epoch (whose sums come back as floats) adds up identically
                a["correct"] = a["correct"] + correct.double()
                a["loss"] = a["loss"] + loss.detach().double() * b
                for k, v in parts.items():
                    a[k] = a.get(k, 0.0) + v.double() * b
                bar.update(1)
                if show_bar:  # an interactive progress bar reads the sums (a host sync) each step
                    bar.set_postfix(loss=f"{float(a['loss']) / a['n']:.4f}", acc=f"{float(a['correct']) / a['n']:.3f}")
                steps_this_process += 1
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < self.steps_per_epoch:
                    self._save(epoch, step + 1)
                if self.on_step is not None:
                    self.on_step(epoch, step + 1, steps_this_process)
            bar.close()
            self._end_epoch(epoch, stage, lr, time.perf_counter() - t0)
        result = self._result(time.perf_counter() - t_run)
        if env.is_main:
            _plot_curves(self.out, self.history, cfg)
        env.barrier()
        env.close()
        return result

    def _end_epoch(self, epoch: int, stage: Stage, lr: float, seconds: float) -> None:
        keys = sorted(self.accum)
        totals = dict(zip(keys, self.env.all_reduce_sum([float(self.accum[k]) for k in keys]), strict=True))
        n = max(totals.pop("n"), 1)
        rec: dict[str, Any] = {"epoch": epoch + 1, "stage": stage.name, "lr": lr,
                               "train_loss": totals.pop("loss") / n, "train_acc": totals.pop("correct") / n,
                               "train_samples": int(n)}
        for k in sorted(totals):
            rec[f"train_{k}"] = totals[k] / n
        rec.update(self._evaluate())
        rec["seconds"] = seconds
        self.history.append(rec)
        improved = rec["test_acc"] > self.best_acc
        if improved:
            self.best_acc = rec["test_acc"]
        self.accum = _zero_accum()
        # best.pt before last.pt: a kill between the two makes the resume redo this epoch and rewrite
        # best.pt identically, whereas the other order could leave best.pt missing this epoch for good.
        if self.env.is_main and improved:
            best = self._base_state()
            best.update({"epoch": epoch + 1, "best_acc": self.best_acc, "history": self.history})
            save_checkpoint(self.out / "best.pt", best)
        self._save(epoch + 1, 0)
        if self.env.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if not self.quiet:
                extra = f" fr {rec['firing_rate']:.3f}" if "firing_rate" in rec else ""
                print(f"epoch {epoch + 1:3d}/{self.total_epochs} [{stage.name}] loss {rec['train_loss']:.4f} "
                      f"train {rec['train_acc']:.4f} test {rec['test_acc']:.4f}{extra} ({seconds:.1f}s)", flush=True)

    def _result(self, seconds: float) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        res: dict[str, Any] = {
            "kind": self.cfg.kind, "dataset": self.ds.name, "out": str(self.out),
            "model": self.cfg.student if self.is_student else self.cfg.model,
            "epochs": len(self.history), "test_acc": last.get("test_acc"), "best_test_acc": self.best_acc,
            "train_acc": last.get("train_acc"), "seconds": seconds, "world_size": self.env.world_size,
        }
        if self.is_student:
            res.update({"T": self.cfg.T, "schedule": self.cfg.method, "stages": [s.name for s in self.stages],
                        "pairs": [list(p) for p in self.pairs], "firing_rate": last.get("firing_rate"),
                        "teacher": self.teacher_info if self.has_teacher else None})
        return res


def _zero_accum() -> dict[str, Any]:  # floats, or float64 tensors once a step has added to them
    return {"n": 0.0, "correct": 0.0, "loss": 0.0}


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def _read_config(out: Path) -> TeacherConfig:
    path = out / "config.json"
    if not path.is_file():
        raise RunError(f"--resume: {str(out)!r} holds no config.json (no run to resume there)")
    try:
        return config_from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise RunError(f"--resume: {str(path)!r} is not a valid lasnn run config: {e}") from e


def _check_resume_compatible(saved: TeacherConfig, cls: type, explicit: dict[str, Any]) -> None:
    if type(saved) is not cls:
        wanted = {DistillConfig: "student", SNNConfig: "snn", TeacherConfig: "teacher"}[cls]
        raise RunError(f"--resume: the run folder holds a {saved.kind} run, not a {wanted} run")
    a = saved.to_dict()
    unknown = sorted(set(explicit) - set(a))
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s) {unknown}")
    diff = [k for k, v in explicit.items() if k not in _MACHINE_FIELDS and a[k] != v
            and not (k in ("model", "student", "beta") and v is None)]
    if diff:
        raise RunError("--resume: these settings differ from the run's config.json: "
                       + ", ".join(f"{k}={explicit[k]!r} (run: {a[k]!r})" for k in diff))


def _plot_curves(out: Path, history: list[dict[str, Any]], cfg: TeacherConfig) -> None:
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
    tmp = out / ".curves.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out / "curves.png")


# ------------------------------------------------------------------------------------------ public


def _make_config(cls: type, config: TeacherConfig | None, overrides: dict[str, Any]) -> TeacherConfig:
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    base = config if config is not None else cls()
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s) {unknown}; expected some of {sorted(names)}")
    return dataclasses.replace(base, **overrides)


def _train(cls: type, config: TeacherConfig | None, overrides: dict[str, Any], out: str | os.PathLike,
           resume: bool, quiet: bool, on_step: StepCallback | None) -> dict[str, Any]:
    # The run seeds and (on resume) restores the global RNGs it draws from; the caller's streams are
    # saved around it so that a library call leaves them as it found them.
    with preserved_rng():
        return _Trainer(cls, config, overrides, Path(out), resume=resume, quiet=quiet, on_step=on_step).run()


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
    return _train(TeacherConfig, config, overrides, out, resume, quiet, on_step)


def distill(
    config: DistillConfig | None = None, *, out: str | os.PathLike, resume: bool = False, quiet: bool = False,
    on_step: StepCallback | None = None, **overrides: Any,
) -> dict[str, Any]:
    """Distil a spiking student from a trained teacher (LaSNN); same files and arguments as ``train_teacher``.

    Example: ``distill(out="runs/s", dataset="digits", teacher="runs/t", T=4, schedule="layerwise", epochs=6)``.
    Returns the final metrics plus ``T``, ``schedule``, ``stages``, ``pairs``, ``firing_rate`` and ``teacher``.
    """
    return _train(DistillConfig, config, overrides, out, resume, quiet, on_step)


def train_snn(
    config: SNNConfig | None = None, *, out: str | os.PathLike, resume: bool = False, quiet: bool = False,
    on_step: StepCallback | None = None, **overrides: Any,
) -> dict[str, Any]:
    """Train a spiking student directly (no teacher): the baseline distillation has to beat.

    Surrogate-gradient BPTT, cross-entropy on the T-averaged logits; same run folder, files, resume and
    DDP as ``train_teacher``. Example: ``train_snn(out="runs/d", dataset="mnist1d", T=4, epochs=30)``.
    Returns the final metrics plus ``T``, ``schedule`` (``"direct"``) and ``firing_rate``.
    """
    return _train(SNNConfig, config, overrides, out, resume, quiet, on_step)
