"""``lasnn demo``: what distillation adds, in one command.

It trains a teacher ANN, then for each seed the LaSNN student and the same student trained directly (no
teacher; same model, T, epochs, batch, seed, each with its own tuned learning rate), converts the teacher
with the classic and robust recipes and sweeps them over T = 1..T_max. It sits above both pipelines
(``lasnn.distill`` and ``lasnn.convert``), which do not import each other.

Writes ``OUT/report.json`` and ``OUT/latency.png``; the runs go to ``OUT/teacher``, ``OUT/student`` and
``OUT/direct`` (one seed) or ``OUT/seed<S>/student`` and ``OUT/seed<S>/direct`` (several).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEMO_RECIPES", "DemoRecipe", "register", "run_demo"]


@dataclass(frozen=True)
class DemoRecipe:
    """A data set's demo budget and the recipes of its two students.

    ``student_epochs``, ``batch_size``, ``optimizer``: shared by the LaSNN student and the direct baseline
    (``sgd``: momentum 0.9, weight decay 5e-4; ``adamw``: weight decay 5e-4). ``lr``: the LaSNN student's
    learning rate; ``direct_lr``: the baseline's, tuned by the same search (the best
    rate of one is not the best of the other). ``schedule``, ``stage_epochs``, ``kd_weight``,
    ``kd_temperature``, ``beta`` (None: the data set's default), ``final_attention``, ``per_step_loss`` (CE and
    KD on each step's logits, averaged over the steps): the distillation.
    ``cpu_amp``: on a CPU that computes bf16 natively (``lasnn.runtime.cpu_has_native_bf16``), train the teacher
    and both students under bf16 autocast, as every run on a GPU does (elsewhere: fp32).
    ``sweep_samples``: the conversion sweeps (and the student accuracy they are matched against) use the
    first that many test samples (None: all). ``sweep_until_match``: a sweep stops at the first horizon ``H``
    (1, 2, 4, ..., 32, 64, 96, ...) at which the conversion has reached the students' accuracy (its curve then ends
    at ``H``, less than 32 steps or 2x past ``T_match``; its values and ``T_match`` are those of the full sweep)
    instead of running to ``T_max``; it keeps every test sample's membranes at once, so it is off for the large
    data sets.
    """

    teacher_epochs: int
    student_epochs: int
    batch_size: int
    optimizer: str = "sgd"
    lr: float = 0.1
    direct_lr: float = 0.1
    schedule: str = "layerwise"
    stage_epochs: int | None = 1
    kd_weight: float = 1.0
    kd_temperature: float = 4.0
    beta: float | None = None
    final_attention: bool = True
    per_step_loss: bool = False
    cpu_amp: bool = False
    sweep_samples: int | None = None
    sweep_until_match: bool = True

    @property
    def label(self) -> str:
        """What the distilled student is called in the table, plot and headline."""
        if self.schedule == "joint" and self.beta == 0:
            return "KD student (logits only)"
        return "LaSNN student"


# Measured on this project's 2-core CPU; the README's ablation section shows the search behind each
# choice and how to rerun it.
DEMO_RECIPES: dict[str, DemoRecipe] = {
    # MNIST-1D: the teacher (98.3%) is no better than the student trained directly (98.1%), so no recipe
    # measured beats direct training beyond the seed noise; logit KD at a quarter of the weight with the per-step
    # loss is the only one ahead (+0.23 +- 0.19 over 3 seeds vs direct with the same loss, +0.17 +- 0.49 vs plain
    # direct, which the per-step loss does not help); on the mean logits KD at weight 0.25 ties or trails
    # (+0.00 +- 0.15, -0.27 +- 0.03 on a rerun), KD at weight 1 loses 1.85 (2 seeds) and the layer-wise schedule 0.67
    # (the KD gradient, tau * (p_s - p_t) at tau=4, swamps cross-entropy for a spiking student that cannot reach the
    # teacher's logit scale).
    "mnist1d": DemoRecipe(20, 30, 64, schedule="joint", stage_epochs=None, kd_weight=0.25, beta=0.0,
                          per_step_loss=True),
    "digits": DemoRecipe(10, 10, 64),
    # Logit KD (joint, beta=0) is the recipe measured to beat direct training here: +1.18 +- 0.09 points over
    # 3 seeds against direct training at its own best rate (0.2; KD's is 0.1); adding the attention term
    # (beta=100) costs 0.26 +- 0.02 of that; the layer-wise schedule is 1.04 +- 0.18 behind KD alone. bf16
    # autocast where the CPU has it natively: 1.5-1.8x faster steps, one seed of the demo in 21 minutes (fp32: ~26).
    "fashionmnist": DemoRecipe(8, 8, 128, direct_lr=0.2, schedule="joint", stage_epochs=None, beta=0.0,
                               sweep_samples=2000, cpu_amp=True),
    "synthetic": DemoRecipe(2, 4, 64),
}
# cifar-scale data sets (meant for a GPU): whole sweeps (keeping 10,000 test images' membranes at once would not fit)
_DEFAULT_RECIPE = DemoRecipe(30, 30, 128, stage_epochs=None, sweep_until_match=False)

EVAL_BATCH = 500
DEMO_STATE = "demo.json"  # a demo's settings, written when it starts: what --resume continues
TARGET_FILE = "sweep_target.json"  # the distilled students' accuracy the sweeps stop at, once measured
# settings added after demos were first written, with the value an older demo.json implies
_SETTINGS_BEFORE = {"full_sweeps": True}


def _saved_settings(path: Path) -> dict[str, Any]:
    """The settings of the demo whose ``demo.json`` is ``path`` (older files: the values they implied)."""
    return {**_SETTINGS_BEFORE, **json.loads(path.read_text())}


def _say(quiet: bool, *msg: Any) -> None:
    if not quiet:
        print(*msg, flush=True)


def _check_int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _summary(values: list[float], curves: list[dict[int, float]], rates: list[float]) -> dict[str, Any]:
    from lasnn.convert.report import curve_to_json

    m, sd = _mean_std(values)
    mean_curve = {t: sum(c[t] for c in curves) / len(curves) for t in curves[0]}
    return {"accuracy": m, "accuracy_std": sd, "accuracy_by_seed": values, "firing_rate": sum(rates) / len(rates),
            "accuracy_by_T": curve_to_json(mean_curve)}


def run_demo(
    out: str | os.PathLike,
    *,
    dataset: str = "mnist1d",
    data_dir: str | None = None,
    teacher_epochs: int | None = None,
    student_epochs: int | None = None,
    stage_epochs: int | None = None,
    T: int = 4,
    T_max: int = 256,
    seed: int = 0,
    seeds: int = 1,
    device: str = "auto",
    jobs: int | None = None,
    quiet: bool = False,
    resume: bool = False,
    full_sweeps: bool | None = None,
) -> dict[str, Any]:
    """The comparison in one call: teacher ANN; per seed, the LaSNN student and the directly trained student
    at ``T``; classic and robust conversions of the teacher swept over T = 1..T_max.

    Args:
        out: output folder (must not hold a demo yet, unless ``resume``).
        dataset, data_dir: the data set (``lasnn.data.load_dataset``).
        teacher_epochs, student_epochs, stage_epochs: override the data set's ``DEMO_RECIPES`` budget.
        T: the students' time steps; ``T_max`` (>= T): the longest conversion latency.
        seed, seeds: the students train with seeds ``seed .. seed + seeds - 1`` (the teacher with ``seed``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        jobs: how many of the phases after the teacher (the students, the two sweeps; they depend only on the
            teacher) run at once, each in its own worker process with ``torch.get_num_threads() // jobs``
            threads. None: 2 on a CPU with at least 2 cores (small models use two cores far better as two
            processes than as two threads), else 1 (in this process, one phase after another).
        resume: continue an interrupted demo in ``out`` (its settings, in ``out/demo.json``, must equal the ones
            given): runs already finished are kept, interrupted ones resume from their last checkpoint (exactly,
            as ``--resume`` of a run does), finished conversion sweeps (``out/sweep_<recipe>.json``) are read
            back; the report's timings then cover this invocation only (``resumed``: true).
        full_sweeps: sweep every conversion over all of T = 1..T_max; False: stop each once it has matched the
            students (at the first horizon ``H >= T_match`` of ``lasnn.convert.latency.sweep_horizons``: 1, 2, 4, ...,
            32, 64, 96, ...; the values up to ``H``, the match and the ratio are the full sweep's); None: the data
            set's ``DemoRecipe.sweep_until_match`` (on for the small built-in data sets). A stopping sweep may start
            beside the students; it goes on until they are measured.
    Returns:
        the report written to ``out/report.json``: ``teacher``, ``student`` and ``direct`` (mean accuracy at
        ``T``, its standard deviation and per-seed values, firing rate, mean curve over T), ``gain_over_direct``
        (points, mean of the per-seed paired differences) and ``gain`` (std, standard error, whether the mean
        exceeds twice the standard error), ``conversion`` (per recipe: curve, ``T_to_match_student``,
        ``ratio``), ``recipe`` (everything needed to rerun it), timings.
    Raises:
        ValueError for bad arguments, an existing demo in ``out`` (without ``resume``), or with ``resume`` a
        complete demo, no demo, or other settings; DatasetError for missing data.
    """
    from lasnn.convert.pipeline import _device, ann_accuracy
    from lasnn.convert.report import curve_to_json, format_table, plot_latency, t_to_match, write_json
    from lasnn.data import load_dataset
    from lasnn.distill import load_run, train_teacher
    from lasnn.runtime import cpu_has_native_bf16

    T = _check_int("T", T, 1)
    T_max = _check_int("T_max", T_max, 1)
    if T_max < T:
        raise ValueError(f"T_max ({T_max}) must be >= T ({T}): the conversions are matched against the student at T")
    seeds = _check_int("seeds", seeds, 1)
    seed = _check_int("seed", seed, 0)
    if jobs is not None:
        jobs = _check_int("jobs", jobs, 1)
    for name, v in (("teacher_epochs", teacher_epochs), ("student_epochs", student_epochs),
                    ("stage_epochs", stage_epochs)):
        if v is not None:
            _check_int(name, v, 1)
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be a bool, got {type(resume).__name__}")
    if full_sweeps is not None and not isinstance(full_sweeps, bool):
        raise TypeError(f"full_sweeps must be None or a bool, got {type(full_sweeps).__name__}")
    out = Path(out)
    rec = DEMO_RECIPES.get(dataset, _DEFAULT_RECIPE)
    rec = dataclasses.replace(
        rec, teacher_epochs=teacher_epochs or rec.teacher_epochs, student_epochs=student_epochs or rec.student_epochs,
        stage_epochs=stage_epochs if stage_epochs is not None else rec.stage_epochs,
    )
    if full_sweeps is None:
        full_sweeps = not rec.sweep_until_match
    settings = {"dataset": dataset, "data_dir": None if data_dir is None else str(data_dir),
                "teacher_epochs": rec.teacher_epochs, "student_epochs": rec.student_epochs,
                "stage_epochs": rec.stage_epochs, "T": T, "T_max": T_max, "seed": seed, "seeds": seeds,
                "full_sweeps": full_sweeps}
    state = out / DEMO_STATE
    if resume:
        if (out / "report.json").exists():
            raise ValueError(f"--out {str(out)!r} holds a complete demo (report.json); nothing to resume")
        if not state.is_file():
            raise ValueError(f"--out {str(out)!r} holds no demo to resume ({DEMO_STATE} is missing)")
        saved = _saved_settings(state)
        diff = [f"{k}: the demo has {saved.get(k)!r}, got {v!r}" for k, v in settings.items() if saved.get(k) != v]
        if diff:
            raise ValueError(f"--resume continues the same demo; its settings differ: {'; '.join(diff)}")
    else:
        for name in ("teacher", "student", "direct", "report.json", DEMO_STATE):
            if (out / name).exists():
                raise ValueError(f"--out {str(out)!r} already holds a demo ({name}); choose an empty or new folder, "
                                 "or --resume it")
    t0, c0 = time.perf_counter(), time.process_time()
    ds = load_dataset(dataset, data_dir)  # fail early, before any training, on a missing data set
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json(state, settings)
    dev = _device(device)
    if jobs is None:
        jobs = 2 if dev.type == "cpu" and (os.cpu_count() or 1) >= 2 else 1
    timings: dict[str, float] = {}  # wall seconds per phase
    cpu: dict[str, float] = {}  # CPU seconds (all threads) per phase
    n_phases = 1 + 2 * seeds + 2

    @contextlib.contextmanager
    def phase(key: str) -> Iterator[None]:
        t, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
            cpu[key] = cpu.get(key, 0.0) + time.process_time() - c

    def again(run: Path) -> bool:  # resume this run (it was started by the interrupted demo)
        return resume and (run / "config.json").is_file()

    # bf16 autocast on a CPU only where it is native (and so faster); on a GPU every run has it (amp)
    cpu_amp = rec.cpu_amp and dev.type == "cpu" and cpu_has_native_bf16()
    _say(quiet, f"[1/{n_phases}] teacher ANN on {dataset}: {rec.teacher_epochs} epochs"
                + (" (bf16 autocast, as the students)" if cpu_amp else ""))
    with phase("teacher"):
        train_teacher(out=out / "teacher", dataset=dataset, data_dir=data_dir, epochs=rec.teacher_epochs, seed=seed,
                      device=device, quiet=True, resume=again(out / "teacher"), cpu_amp=cpu_amp)
    kd = {"schedule": rec.schedule, "kd_weight": rec.kd_weight, "kd_temperature": rec.kd_temperature,
          "final_attention": rec.final_attention, "per_step_loss": rec.per_step_loss}
    if rec.schedule == "layerwise":
        kd["stage_epochs"] = rec.stage_epochs
    if rec.beta is not None:
        kd["beta"] = rec.beta
    common = {"dataset": dataset, "data_dir": data_dir, "T": T, "epochs": rec.student_epochs,
              "batch_size": rec.batch_size, "optimizer": rec.optimizer, "device": device, "quiet": True,
              "cpu_amp": cpu_amp}
    run_seeds = list(range(seed, seed + seeds))
    folders = [out if seeds == 1 else out / f"seed{s}" for s in run_seeds]
    sub_n = rec.sweep_samples if rec.sweep_samples is not None and rec.sweep_samples < ds.x_test.shape[0] else None
    recipes = {"classic": ("max", 0.0), "robust": ("robust", 0.5)}

    # Every phase after the teacher depends only on it: the students, then both sweeps, run as jobs, `jobs` at a
    # time, each in a worker process with its share of the threads (jobs=1: one after another, here). Each student
    # job also measures its student (last epoch); a sweep that stops at the students' accuracy may start before
    # they finish: it reads the target from TARGET_FILE, written once every distilled student has been measured.
    t_curve = min(T_max, 4 * T)
    target_file = out / TARGET_FILE
    target_file.unlink(missing_ok=True)  # a resumed demo measures its students again
    measure = {"dataset": dataset, "data_dir": data_dir, "T": T, "t_curve": t_curve, "samples": sub_n,
               "device": device}
    tasks: list[tuple[str, str, str, dict[str, Any]]] = []  # (phase key, progress line, job, kwargs)
    for i, (s, base) in enumerate(zip(run_seeds, folders, strict=True)):
        tasks.append(("student", f"[{2 + 2 * i}/{n_phases}] {rec.label} SNN at T={T} ({rec.schedule}), seed {s}: "
                                 f"{rec.student_epochs} epochs", "distill",
                      {"out": base / "student", "teacher": str(out / "teacher"), "seed": s, "lr": rec.lr, **kd,
                       **common, "resume": again(base / "student"), "measure": measure}))
        tasks.append(("direct", f"[{3 + 2 * i}/{n_phases}] the same student trained directly (no teacher), seed {s}: "
                                f"{rec.student_epochs} epochs", "train_snn",
                      {"out": base / "direct", "seed": s, "lr": rec.direct_lr, **common,
                       "resume": again(base / "direct"), "measure": measure}))
    sweeps: dict[str, tuple[dict[int, float], dict[int, float]]] = {}  # curve, firing rate by horizon
    for i, (name, (method, membrane)) in enumerate(recipes.items()):
        saved_sweep = out / f"sweep_{name}.json"
        if resume and saved_sweep.is_file():
            sweeps[name] = _read_sweep(saved_sweep)
            _say(quiet, f"[{2 + 2 * seeds + i}/{n_phases}] {name} conversion: finished before, read from "
                        f"{saved_sweep.name}")
            continue
        tasks.append((f"conversion_{name}",
                      f"[{2 + 2 * seeds + i}/{n_phases}] {name} conversion ({method} thresholds, membrane starting "
                      f"at {membrane:g}·θ), T = 1..{T_max}"
                      + ("" if full_sweeps else " or until it matches the student")
                      + (f" on the first {sub_n} test samples" if sub_n else ""),
                      "sweep", {"teacher": out / "teacher", "dataset": dataset, "data_dir": data_dir,
                                "samples": sub_n, "method": method, "initial_membrane": membrane, "T_max": T_max,
                                "device": device, "save": saved_sweep,
                                "target_file": None if full_sweeps else target_file}))
    n_students = sum(key == "student" for key, _, _, _ in tasks)
    measured: dict[int, float] = {}

    def on_done(i: int, result: Any) -> None:  # once every distilled student is measured: the sweeps' target
        if tasks[i][0] == "student":
            measured[i] = result["sweep_acc"]
            if len(measured) == n_students:
                write_json(target_file, {"student_accuracy_on_conversion_samples": sum(measured.values()) / seeds})

    results, child_cpu = _run_jobs(tasks, jobs, quiet, timings, cpu, on_done)
    evals: dict[str, dict[str, list]] = {k: {"acc": [], "curve": [], "rate": [], "sweep_acc": []}
                                         for k in ("student", "direct")}
    names = {}
    for (key, _, _, _), result in zip(tasks, results, strict=True):
        if key.startswith("conversion_"):
            sweeps[key.removeprefix("conversion_")] = result
        else:  # the student runs, in task order: seed by seed
            names[key] = result["model"]
            if key == "student":
                beta = result["beta"]  # the value the run resolved (None in the recipe: the data set's default)
            e = evals[key]
            e["acc"].append(result["curve"][T])
            e["curve"].append(result["curve"])
            e["rate"].append(result["rate"])
            e["sweep_acc"].append(result["sweep_acc"])

    test = ds.loader("test", EVAL_BATCH)
    n_conversion = ds.x_test.shape[0] if sub_n is None else sub_n
    # Last epochs throughout: no model is selected on the test set it is then measured on.
    trun = load_run(out / "teacher", which="last")
    teacher = trun.model.to(dev).eval()
    teacher_acc = ann_accuracy(teacher, test, dev)
    student = _summary(evals["student"]["acc"], evals["student"]["curve"], evals["student"]["rate"])
    direct = _summary(evals["direct"]["acc"], evals["direct"]["curve"], evals["direct"]["rate"])
    gains = [100 * (a - b) for a, b in zip(evals["student"]["acc"], evals["direct"]["acc"], strict=True)]
    g_mean, g_std = _mean_std(gains)
    g_se = g_std / math.sqrt(len(gains)) if g_std is not None else None
    student_target = sum(evals["student"]["sweep_acc"]) / seeds
    if not full_sweeps:  # a sweep may have run past its stopping horizon (before the target was known): cut there
        for name, (curve, rates) in sweeps.items():
            sweeps[name] = (_until_match(curve, student_target, T_max), rates)

    conversions: dict[str, Any] = {}
    curves = {f"{rec.label} ({names['student']})": {int(t): a for t, a in student["accuracy_by_T"].items()},
              f"direct training ({names['direct']})": {int(t): a for t, a in direct["accuracy_by_T"].items()}}
    for name, (method, membrane) in recipes.items():
        curve, rates = sweeps[name]
        rate = rates[max(curve)]  # over the curve's steps (on_horizon recorded every horizon, the last included)
        match = t_to_match(curve, student_target)
        conversions[name] = {
            "method": method, "percentile": 99.9 if method == "robust" else None, "initial_membrane": membrane,
            "accuracy_by_T": curve_to_json(curve), "T_to_match_student": match,
            "ratio": (match / T) if match is not None else None, "firing_rate": rate,
        }
        curves[f"{name} conversion"] = curve

    seconds = time.perf_counter() - t0
    # CPU time of this process and its job workers (all threads): on a shared machine wall time mostly
    # measures the neighbours
    cpu_seconds = time.process_time() - c0 + child_cpu
    epochs_info = {"epochs": rec.student_epochs, "batch_size": rec.batch_size}
    opt: dict[str, Any] = {"optimizer": rec.optimizer, "weight_decay": 5e-4}
    if rec.optimizer == "sgd":
        opt["momentum"] = 0.9
    report = {
        "dataset": dataset,
        "seeds": run_seeds,
        "teacher": {"model": trun.config.model, "accuracy": teacher_acc, "epochs": rec.teacher_epochs},
        "student": {"model": names["student"], "label": rec.label, "T": T, "schedule": rec.schedule, **student,
                    **epochs_info},
        "direct": {"model": names["direct"], "T": T, **direct, **epochs_info},
        "gain_over_direct": g_mean,
        "gain": {"mean": g_mean, "std": g_std, "stderr": g_se, "by_seed": gains,
                 "exceeds_2_stderr": (g_mean > 2 * g_se) if g_se is not None else None},
        "recipe": {
            "student": {**opt, "lr": rec.lr, **kd, "beta": beta, **epochs_info},
            "direct": {**opt, "lr": rec.direct_lr, **epochs_info},
            "cpu_amp": cpu_amp,  # teacher and students trained under bf16 autocast on this CPU
            "schedule_lr": "cosine to 0 per stage",
        },
        "conversion": conversions,
        "conversion_test_samples": int(n_conversion),
        # "until_match": each sweep stopped at the first horizon at or after its match (its curve ends there)
        "sweeps": "full" if full_sweeps else "until_match",
        "student_accuracy_on_conversion_samples": student_target,
        "T_max": T_max,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "jobs": jobs,  # with jobs > 1 each job ran in a worker process with threads // jobs threads
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "cpu_timings": {k: round(v, 2) for k, v in cpu.items()},
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "resumed": resume,  # true: timings and seconds cover the resuming invocation only
    }
    write_json(out / "report.json", report)
    plot_latency(out / "latency.png", curves, teacher_acc=teacher_acc,
                 points={f"student at T={T}": (T, student["accuracy"]), f"direct at T={T}": (T, direct["accuracy"])},
                 title=f"{dataset}: {rec.label} vs direct training vs conversion ({trun.config.model} teacher)")
    if not quiet:
        print()
        print(format_table({"student": curves[f"{rec.label} ({names['student']})"],
                            "direct": curves[f"direct training ({names['direct']})"],
                            "classic": curves["classic conversion"], "robust": curves["robust conversion"]},
                           reference={"teacher": teacher_acc}))
        print()
        print(_headline(report))
        for name, c in conversions.items():
            m = c["T_to_match_student"]
            print(f"{name:>8} conversion reaches the student's accuracy at T={m} "
                  f"({c['ratio']:g}x the student's T)" if m is not None else
                  f"{name:>8} conversion does not reach the student's accuracy by T={T_max} (ratio > "
                  f"{T_max / T:g}x)")
        if not full_sweeps:
            print("(each sweep stopped at the first horizon (1, 2, 4, ..., 32, 64, 96, ...) at which it had matched "
                  "the student; --full-sweeps runs both to T-max)")
        if sub_n is not None:
            print(f"(conversion sweeps and the student accuracy they match: the first {sub_n} test "
                  f"samples, student {100 * student_target:.2f}% there)")
        print(f"{seconds:.1f} s on {dev} ({torch.get_num_threads()} threads, {cpu_seconds:.1f} s CPU time) -> "
              f"{out / 'report.json'}, {out / 'latency.png'}")
    return report


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this worker once the demo process ``parent`` that started it is gone (killed,
    even by SIGKILL, which runs no clean-up), so no orphaned job keeps training into the demo's folder."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="lasnn-demo-parent-watch", daemon=True).start()


def _job(job: str, kwargs: dict[str, Any], threads: int | None) -> tuple[Any, float, float]:
    """Run one demo phase (``distill``, ``train_snn`` or ``sweep``): ``(result, wall s, CPU s)``.

    ``threads``: set this process's torch threads first (a worker process); None leaves them (the caller's).
    """
    from lasnn.distill import distill, train_snn

    if threads is not None:
        torch.set_num_threads(threads)
    t, c = time.perf_counter(), time.process_time()
    result: Any = None
    if job in ("distill", "train_snn"):
        measure = kwargs.pop("measure", None)
        (distill if job == "distill" else train_snn)(**kwargs)
        if measure is not None:
            result = _measure_student(kwargs["out"], **measure)
    elif job == "sweep":
        result = _sweep(**kwargs)
    else:
        raise ValueError(f"unknown demo job {job!r}")
    return result, time.perf_counter() - t, time.process_time() - c


def _measure_student(run: Path, dataset: str, data_dir: str | None, T: int, t_curve: int, samples: int | None,
                     device: str) -> dict[str, Any]:
    """A student run's last-epoch model on the test set: ``curve`` (T = 1..t_curve), firing ``rate`` at ``T``,
    ``sweep_acc`` (accuracy at ``T`` on the first ``samples`` test samples, the ones the sweeps use; None: all),
    ``model`` (its zoo name) and ``beta`` (as the run resolved it)."""
    from lasnn.convert.latency import accuracy_vs_timesteps
    from lasnn.convert.pipeline import _device, snn_firing_rate
    from lasnn.data import load_dataset
    from lasnn.distill import load_run

    ds = load_dataset(dataset, data_dir)
    dev = _device(device)
    r = load_run(run, which="last")
    model = r.model.to(dev).eval()
    test = ds.loader("test", EVAL_BATCH)
    curve = accuracy_vs_timesteps(model, test, T_max=t_curve)
    if samples is None:
        sweep_acc = curve[T]
    else:
        sweep_acc = accuracy_vs_timesteps(model, _first_test(ds, samples).loader("test", EVAL_BATCH), T_max=T)[T]
    return {"curve": curve, "rate": snn_firing_rate(model, test, dev), "sweep_acc": sweep_acc,
            "model": r.config.student, "beta": getattr(r.config, "beta", None)}


def _first_test(ds: Any, samples: int | None) -> Any:
    """``ds`` with only its first ``samples`` test samples (None: all of them)."""
    return ds if samples is None else dataclasses.replace(ds, x_test=ds.x_test[:samples], y_test=ds.y_test[:samples])


def _until_match(curve: dict[int, float], target: float, T_max: int) -> dict[int, float]:
    """``curve`` up to the first sweep horizon (``lasnn.convert.latency.sweep_horizons``) at or after its match with
    ``target`` (all of it without a match): where a sweep that knew the target from the start stops."""
    from lasnn.convert.latency import sweep_horizons
    from lasnn.convert.report import t_to_match

    m = t_to_match(curve, target)
    if m is None:
        return curve
    horizon = next(h for h in sweep_horizons(T_max) if h >= m)
    return {t: a for t, a in curve.items() if t <= horizon}


def _sweep(teacher: Path, dataset: str, data_dir: str | None, samples: int | None, method: str,
           initial_membrane: float, T_max: int, device: str,
           save: Path | None = None, target_file: Path | None = None) -> tuple[dict[int, float], dict[int, float]]:
    """Convert the teacher run's ANN and sweep T = 1..T_max over the first ``samples`` test samples (None: all);
    ``target_file``: stop once the curve reaches the accuracy in that JSON file (asked at every horizon of
    ``accuracy_vs_timesteps``; the sweep goes on while the file does not exist yet); ``save``: also write
    ``(curve, firing rate)`` there (atomically), for a resumed demo. Returns the curve and the firing rate over the
    first H steps at each horizon H the sweep passed (the whole curve's at its end)."""
    from lasnn.convert.pipeline import _convert_curve, _device, _loaders
    from lasnn.data import load_dataset
    from lasnn.distill import load_run

    ds = load_dataset(dataset, data_dir)
    calib, _ = _loaders(ds, EVAL_BATCH)
    ds = _first_test(ds, samples)
    dev = _device(device)
    ann = load_run(teacher, which="last").model.to(dev).eval()
    stop_at = None
    if target_file is not None:
        def stop_at() -> float | None:
            try:
                return float(json.loads(target_file.read_text())["student_accuracy_on_conversion_samples"])
            except FileNotFoundError:
                return None
    rates: dict[int, float] = {}  # firing rate over the first H steps, at every horizon H the sweep passed

    _, curve, rate = _convert_curve(ann, calib, ds.loader("test", EVAL_BATCH), method=method, percentile=99.9,
                                    initial_membrane=initial_membrane, T_max=T_max, device=dev, stop_at=stop_at,
                                    on_horizon=lambda snn, h: rates.__setitem__(h, snn.firing_rate()))
    if save is not None:
        from lasnn.convert.report import write_json

        write_json(save, {"accuracy_by_T": {str(t): a for t, a in curve.items()}, "firing_rate": rate,
                          "firing_rate_by_horizon": {str(h): r for h, r in sorted(rates.items())}})
    return curve, rates


def _read_sweep(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """A sweep written by ``_sweep(save=path)``: ``(curve {T: accuracy}, {H: firing rate over the first H steps})``
    (a file from before the horizons: its one rate, over the whole curve)."""
    d = json.loads(path.read_text())
    curve = {int(t): float(a) for t, a in d["accuracy_by_T"].items()}
    rates = {int(h): float(r) for h, r in d.get("firing_rate_by_horizon", {}).items()}
    return curve, rates or {max(curve): float(d["firing_rate"])}


def _run_jobs(tasks: list[tuple[str, str, str, dict[str, Any]]], jobs: int, quiet: bool,
              timings: dict[str, float], cpu: dict[str, float],
              on_done: Callable[[int, Any], None] | None = None) -> tuple[list[Any], float]:
    """Run ``(phase key, progress line, job, kwargs)`` tasks, ``jobs`` at a time (started in task order); add each
    one's wall and CPU seconds to ``timings``/``cpu`` under its key; ``on_done(index, result)`` (in this process)
    as each finishes. Returns the results in task order and the CPU seconds spent in worker processes (0 for
    jobs=1: everything ran here)."""
    results: list[Any] = [None] * len(tasks)

    def book(key: str, wall: float, c: float) -> None:
        timings[key] = timings.get(key, 0.0) + wall
        cpu[key] = cpu.get(key, 0.0) + c

    if jobs == 1:
        for i, (key, line, job, kw) in enumerate(tasks):
            _say(quiet, line)
            results[i], wall, c = _job(job, kw, None)
            book(key, wall, c)
            if on_done is not None:
                on_done(i, results[i])
        return results, 0.0
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, torch.get_num_threads() // jobs)
    _say(quiet, f"the next {len(tasks)} phases depend only on the teacher: {jobs} at a time, each in its own "
                f"process with {threads} thread{'s' if threads > 1 else ''}")
    child_cpu = 0.0
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_die_with_parent, initargs=(os.getpid(),))
    try:
        futures = {pool.submit(_job, job, kw, threads): i for i, (_, _, job, kw) in enumerate(tasks)}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i], wall, c = fut.result()
            key, line = tasks[i][0], tasks[i][1]
            book(key, wall, c)
            child_cpu += c
            _say(quiet, f"{line}: done in {wall:.0f} s")
            if on_done is not None:
                on_done(i, results[i])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results, child_cpu


def _pm(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f}%" + (f" ± {100 * std:.2f} (std)" if std is not None else "")


def _headline(rep: dict[str, Any]) -> str:
    """The printed verdict: teacher, both students, the gain and whether it is above the seed noise."""
    st, di, g = rep["student"], rep["direct"], rep["gain"]
    k = len(rep["seeds"])
    lines = [f"teacher {rep['teacher']['model']}: {100 * rep['teacher']['accuracy']:.2f}%",
             f"{st.get('label', 'LaSNN student')} {st['model']} at T={st['T']}: "
             f"{_pm(st['accuracy'], st['accuracy_std'])} "
             f"(firing rate {st['firing_rate']:.3f})",
             f"direct training, same student: {_pm(di['accuracy'], di['accuracy_std'])} "
             f"(firing rate {di['firing_rate']:.3f})"]
    if g["stderr"] is None:
        lines.append(f"gain over direct training: {g['mean']:+.2f} points (one seed: no spread, an anecdote; "
                     "use --seeds 3 or more)")
    else:
        if g["exceeds_2_stderr"]:
            verdict = "distillation wins: the gain exceeds twice its standard error"
        elif -g["mean"] > 2 * g["stderr"]:
            verdict = "direct training wins: the loss exceeds twice its standard error"
        else:
            verdict = "within the seed noise (less than twice its standard error)"
        lines.append(f"gain over direct training: {g['mean']:+.2f} ± {g['stderr']:.2f} points (mean ± standard error "
                     f"over {k} seeds): {verdict}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command


def _cmd_demo(args: argparse.Namespace) -> int:
    from lasnn.data import DatasetError

    # The demo's settings: the defaults, or with --resume the interrupted demo's own; flags given on the command
    # line override them (a resume then refuses any that differ from the demo's).
    kw: dict[str, Any] = dict(_DEMO_DEFAULTS)
    try:
        if args.resume:
            state = Path(args.out) / DEMO_STATE
            if state.is_file():
                kw.update({k: v for k, v in _saved_settings(state).items() if k in _DEMO_DEFAULTS})
        if args.quick:  # the test suite's reduced mode: tiny data set, a couple of epochs, short sweep
            kw.update(teacher_epochs=6, student_epochs=6, stage_epochs=1)
        for k in _DEMO_DEFAULTS:
            if getattr(args, k, None) is not None:
                kw[k] = getattr(args, k)
        run_demo(args.out, device=args.device, jobs=args.jobs, quiet=args.quiet, resume=args.resume, **kw)
    except (ValueError, TypeError, FileNotFoundError, DatasetError) as e:
        print(f"lasnn demo: error: {e}", file=sys.stderr)
        return 2
    return 0


# settings of a demo (what --resume must keep) and their command-line defaults
_DEMO_DEFAULTS: dict[str, Any] = {"dataset": "mnist1d", "data_dir": None, "teacher_epochs": None,
                                  "student_epochs": None, "stage_epochs": None, "T": 4, "T_max": 256, "seed": 0,
                                  "seeds": 1, "full_sweeps": None}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``lasnn`` command line."""
    from lasnn.convert.cli import positive_int as _positive_int
    from lasnn.data import DATASETS

    p = subparsers.add_parser(
        "demo", help="what distillation adds: LaSNN student vs direct training vs converted SNNs",
        description="Train a teacher ANN; per seed, distil a small SNN student at T=4 (LaSNN) and train the same "
        "student directly (no teacher); convert the teacher with the classic (max, membrane 0) and robust (99.9th "
        "percentile, membrane θ/2) recipes and sweep T = 1..T_max; print a table and the gain over direct "
        "training, write OUT/report.json and OUT/latency.png.",
    )
    p.add_argument("--out", required=True, help="output folder (must not hold a demo yet, unless --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted demo in --out with its own settings: finished runs and sweeps are "
                        "kept, interrupted runs resume from their last checkpoint")
    p.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                   help="mnist1d (default), digits, fashionmnist (apt-get install dataset-fashion-mnist, or "
                        "--data-dir); cifar10/cifar100/tinyimagenet with --data-dir (GPU advised)")
    p.add_argument("--data-dir", dest="data_dir", default=None, help="data folder for the file-based data sets")
    p.add_argument("--T", dest="T", type=_positive_int, default=None,
                   help="time steps of the students (default 4)")
    p.add_argument("--T-max", dest="T_max", type=_positive_int, default=None,
                   help="longest conversion latency, >= --T (default 256)")
    p.add_argument("--teacher-epochs", dest="teacher_epochs", type=_positive_int, default=None,
                   help="override the data set's teacher epochs")
    p.add_argument("--student-epochs", dest="student_epochs", type=_positive_int, default=None,
                   help="override the data set's student epochs (both students)")
    p.add_argument("--seed", type=int, default=None, help="first seed (default 0)")
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help="train both students with this many seeds (one teacher) and report mean, spread and "
                        "whether the gain exceeds twice its standard error (default 1)")
    p.add_argument("--full-sweeps", dest="full_sweeps", action="store_const", const=True, default=None,
                   help="sweep both conversions over all of T = 1..T-max (default on the built-in data sets: stop "
                        "each at the first horizon (1, 2, 4, ..., 32, 64, 96, ...) where it has matched the students; "
                        "the match and the curve up to there are the same)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--jobs", type=_positive_int, default=None,
                   help="phases after the teacher run this many at a time, each in its own process (default: 2 "
                        "on a CPU with 2 or more cores, else 1)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # reduced mode for the test suite
    p.set_defaults(func=_cmd_demo)
