"""The training engine: one loop for every objective (``lasnn.distill.objectives``) in a run folder
(``lasnn.distill.run``).

A plan of stages (one for a teacher, a directly trained SNN or a joint distillation; one per layer pair
plus a final stage for the layer-wise schedule), SGD with momentum or AdamW and a per-step cosine learning
rate inside each stage (``LambdaLR``), checkpoints that hold everything an exact resume needs, DDP under
torchrun, progress and a per-step callback.

Exact resume: the data order and augmentation of every batch are functions of (seed, epoch, step)
(``lasnn.data.TensorLoader``); the learning rate is a function of the step; the checkpoint holds the
model, the optimizer (momentum or moment buffers), every RNG state of every rank (torch, CUDA, numpy, python and
the private generators of seeded encoders), the epoch, the step inside it and the running sums of the
epoch's metrics. Resuming from a checkpoint therefore replays exactly the computation an uninterrupted
run performs (on the same machine and thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lasnn.data import load_dataset
from lasnn.distill.checkpoint import (
    load_checkpoint,
    module_generator_states,
    save_checkpoint,
    set_module_generator_states,
)
from lasnn.distill.config import TeacherConfig
from lasnn.distill.dist import DistEnv, setup_distributed
from lasnn.distill.objectives import OBJECTIVES, Stage, default_channels_last, resolve_names
from lasnn.distill.run import MACHINE_FIELDS, RunError, RunFolder, load_state
from lasnn.nn.spikify import SpikeCounter
from lasnn.runtime import preserved_rng, rng_state, set_rng_state

__all__ = ["Engine", "StepCallback", "run_training"]

#: ``on_step(epoch, step, steps_this_process)``, called after every optimizer step
StepCallback = Callable[[int, int, int], None]


def _locate(stages: list[Stage], epoch: int) -> tuple[int, int]:
    """(stage index, epoch index inside that stage) of a global epoch index."""
    for i, s in enumerate(stages):
        if epoch < s.epochs:
            return i, epoch
        epoch -= s.epochs
    raise IndexError(epoch)


class Engine:
    """One run: config and resume checks, data, the objective, the loop, evaluation, checkpoints, metrics."""

    def __init__(self, cls: type, config: TeacherConfig | None, overrides: dict[str, Any], out: Path, *,
                 resume: bool, quiet: bool, on_step: StepCallback | None = None) -> None:
        if on_step is not None and not callable(on_step):
            raise TypeError(f"on_step must be a callable (epoch, step, steps_this_process), "
                            f"got {type(on_step).__name__}")
        self.on_step = on_step
        self.quiet = quiet
        self.out = out
        self.folder = RunFolder(out)
        if resume:
            # Settings come from the run's config.json; what the caller gave explicitly must agree with it.
            cfg = self.folder.read_config()
            explicit = dict(config.to_dict() if config is not None else {})
            explicit.pop("kind", None)
            explicit.update(overrides)
            RunFolder.check_resume_compatible(cfg, cls, explicit)
            cfg = dataclasses.replace(cfg, **{k: explicit[k] for k in MACHINE_FIELDS if k in explicit})
        else:
            cfg = _make_config(cls, config, overrides)
            if self.folder.holds_run():
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
        self.resume_ckpt: dict[str, Any] | None = None
        if resume and self.folder.last.is_file():
            self.resume_ckpt = load_checkpoint(self.folder.last)
        self.ds = load_dataset(cfg.dataset, cfg.data_dir)
        cfg = resolve_names(cfg, self.ds)
        self.cfg = cfg
        dev = self.env.device

        torch.manual_seed(cfg.seed)  # the run's RNGs; the caller's are restored around the run (run_training)
        self.objective = OBJECTIVES[type(cfg)](cfg, self.ds, dev)
        self.model = self.objective.model
        self.pairs = self.objective.pairs
        if cfg.channels_last is None:  # resolved here, so config.json records the layout that ran
            cfg.channels_last = default_channels_last(self.objective.models(), dev)
        # the models' memory order: their 4-d weights; the activations follow the convolutions' outputs
        for m in self.objective.models():
            m.to(dev, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
        self.stages = self.objective.stages
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
        self.history: list[dict[str, Any]] = []
        self.best_acc = -1.0
        self.start_epoch, self.start_step = 0, 0
        self.accum = _zero_accum()
        self.opt_state: dict[str, Any] | None = None
        self.opt_stage = -1
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
        elif self.env.is_main:
            self.folder.create(cfg)
        self.env.barrier()

    def _restore(self, ck: dict[str, Any]) -> None:
        if ck.get("world_size", 1) != self.env.world_size:
            raise RunError(f"last.pt was written by {ck.get('world_size', 1)} process(es); resume with the same "
                           f"number (this job has {self.env.world_size}) to reproduce the run")
        if ck.get("steps_per_epoch") != self.steps_per_epoch:
            raise RunError("last.pt was written with a different number of steps per epoch (data set or batch "
                           "size changed); cannot resume it")
        load_state(self.model, ck["model_state"], self.folder.last)
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
            self.folder.write_metrics(self.history)

    # -- one stage's trainable parameters, optimizer and (under torchrun) DDP wrapper
    def _enter_stage(self, idx: int) -> None:
        cfg, stage = self.cfg, self.stages[idx]
        named = dict(self.model.named_parameters())
        groups = self.objective.trainable(stage)
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
        net = self.objective.network()
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

    # -- evaluation over this rank's shard of the test set, totals all-reduced
    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        counter = SpikeCounter(self.model) if self.objective.is_snn else contextlib.nullcontext()
        loss_sum, correct, n = 0.0, 0.0, 0.0
        with counter:
            for x, y in self.test_loader:
                with self.objective.amp():
                    logits = self.model(x).float()
                loss_sum = loss_sum + F.cross_entropy(logits, y, reduction="sum").double()
                correct = correct + (logits.argmax(1) == y).sum().double()
                n += y.numel()
        spikes = [float(counter.spikes), float(counter.neuron_steps)] if self.objective.is_snn else [0.0, 0.0]
        loss_sum, correct = float(loss_sum), float(correct)  # one read per evaluation
        loss_sum, correct, n, s0, s1 = self.env.all_reduce_sum([loss_sum, correct, n, *spikes])
        out = {"test_loss": loss_sum / max(n, 1), "test_acc": correct / max(n, 1), "test_samples": int(n)}
        if self.objective.is_snn:
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
        save_checkpoint(self.folder.last, state)

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
            for step, (x, y, index) in enumerate(self.train_loader.iter_from(first, with_index=True), start=first):
                lr = cfg.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)  # recorded in the metrics
                loss, parts, correct = self.objective.losses(self.net, x, y, stage, index=index)
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
            self.folder.plot_curves(self.history, cfg)
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
            save_checkpoint(self.folder.best, best)
        self._save(epoch + 1, 0)
        if self.env.is_main:
            self.folder.append_metrics(rec)
            if not self.quiet:
                extra = f" fr {rec['firing_rate']:.3f}" if "firing_rate" in rec else ""
                print(f"epoch {epoch + 1:3d}/{self.total_epochs} [{stage.name}] loss {rec['train_loss']:.4f} "
                      f"train {rec['train_acc']:.4f} test {rec['test_acc']:.4f}{extra} ({seconds:.1f}s)", flush=True)

    def _result(self, seconds: float) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        res: dict[str, Any] = {
            "kind": self.cfg.kind, "dataset": self.ds.name, "out": str(self.out),
            "model": self.cfg.student if self.objective.is_snn else self.cfg.model,
            "epochs": len(self.history), "test_acc": last.get("test_acc"), "best_test_acc": self.best_acc,
            "train_acc": last.get("train_acc"), "seconds": seconds, "world_size": self.env.world_size,
        }
        if self.objective.is_snn:
            res["firing_rate"] = last.get("firing_rate")
        res.update(self.objective.result_info())
        return res


def _zero_accum() -> dict[str, Any]:  # floats, or float64 tensors once a step has added to them
    return {"n": 0.0, "correct": 0.0, "loss": 0.0}



def _make_config(cls: type, config: TeacherConfig | None, overrides: dict[str, Any]) -> TeacherConfig:
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    base = config if config is not None else cls()
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s) {unknown}; expected some of {sorted(names)}")
    return dataclasses.replace(base, **overrides)


def run_training(cls: type, config: TeacherConfig | None, overrides: dict[str, Any], out: str | os.PathLike,
                 resume: bool, quiet: bool, on_step: StepCallback | None) -> dict[str, Any]:
    """Run (or resume) the training a ``cls`` config describes in ``out``; returns the final metrics."""
    # The run seeds and (on resume) restores the global RNGs it draws from; the caller's streams are
    # saved around it so that a library call leaves them as it found them.
    with preserved_rng():
        return Engine(cls, config, overrides, Path(out), resume=resume, quiet=quiet, on_step=on_step).run()


