"""LaSNN trainer: teacher and distillation runs, run files, exact kill-and-resume, bad inputs.

Runs are seconds long: the synthetic data set (256 train / 128 test 8x8 images, 4 classes) with the
digits models at half width.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lasnn.cli import main
from lasnn.data import load_dataset
from lasnn.distill import (
    CheckpointError,
    DistillConfig,
    RunError,
    SNNConfig,
    TeacherConfig,
    distill,
    load_checkpoint,
    load_run,
    plan_stages,
    train_snn,
    train_teacher,
)
from lasnn.distill.config import config_from_dict
from lasnn.distill.objectives import DistillObjective
from lasnn.distill.taps import match_pairs, parameters_reaching

SMALL = {"dataset": "synthetic", "width": 0.5, "batch_size": 64, "lr": 0.1}
STUDENT = {**SMALL, "stage_epochs": 1}
CHANCE = 0.25


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    res = train_teacher(out=out, epochs=3, quiet=True, **{**SMALL, "batch_size": 32})
    assert res["kind"] == "teacher" and res["test_acc"] > 0.8
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_teacher_run_writes_every_file(teacher):
    assert {p.name for p in teacher.iterdir()} >= {"config.json", "metrics.jsonl", "last.pt", "best.pt", "curves.png"}
    cfg = config_from_dict(json.loads((teacher / "config.json").read_text()))
    assert isinstance(cfg, TeacherConfig) and cfg.model == "digits_cnn" and cfg.epochs == 3
    recs = _records(teacher)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert {"train_loss", "train_acc", "test_acc", "test_loss", "seconds", "lr"} <= set(recs[0])
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    ck = torch.load(teacher / "last.pt", weights_only=True)  # plain tensors and primitives only
    assert ck["epoch"] == 3 and ck["step"] == 0 and ck["kind"] == "teacher"
    assert (teacher / "curves.png").read_bytes()[:4] == b"\x89PNG"
    run = load_run(teacher, which="last")
    assert run.kind == "teacher" and run.dataset == "synthetic" and not run.model.training


@pytest.mark.parametrize("schedule", ["layerwise", "joint"])
def test_distill_schedules_reduce_loss_and_beat_chance(teacher, tmp_path, schedule, monkeypatch):
    from lasnn.distill.engine import Engine

    # Snapshot the student's weights whenever a stage starts (and at the end) to check what each trained.
    snaps: list[dict[str, torch.Tensor]] = []
    enter = Engine._enter_stage

    def spy(self, idx):
        snaps.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        enter(self, idx)

    monkeypatch.setattr(Engine, "_enter_stage", spy)
    out = tmp_path / schedule
    res = distill(out=out, teacher=str(teacher), schedule=schedule, epochs=5, T=2, quiet=True,
                  **{**STUDENT, "batch_size": 32})
    recs = _records(out)
    stages = [r["stage"] for r in recs]
    if schedule == "layerwise":
        assert res["stages"] == ["pair1", "pair2", "final"]
        assert res["pairs"] == [["stage1", "stage1"], ["stage2", "stage2"]]
        assert stages == ["pair1", "pair2", "final", "final", "final"]
        assert "train_ce" not in recs[0] and recs[0]["train_attn"] > 0  # attention-only stage
        assert len(snaps) == 3  # entering pair1, pair2, final

        def changed(a, b, prefix):  # any parameter or buffer (batch-norm running statistics too)
            return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))

        start, pair2, final = snaps
        assert changed(start, pair2, "body.stage1.") and not changed(start, pair2, "body.stage2.")
        assert not changed(pair2, final, "body.stage1.")  # earlier block frozen (default earlier="freeze")
        assert changed(pair2, final, "body.stage2.")
        assert not changed(start, final, "body.fc.")  # the classifier waits for the final stage
    else:
        assert stages == ["joint"] * 5
    full = [r for r in recs if r["stage"] in ("final", "joint")]
    assert full[-1]["train_loss"] < full[0]["train_loss"]
    assert full[-1]["train_ce"] < full[0]["train_ce"]
    assert res["test_acc"] > CHANCE + 0.3, res
    assert 0 < res["firing_rate"] < 1 and res["schedule"] == schedule and res["T"] == 2
    run = load_run(out, which="last")
    assert run.model.T == 2 and run.config.schedule == schedule
    assert run.config.beta == 100.0  # the default resolved for a small data set, recorded in config.json
    assert run.config.kd_weight == 1.0  # likewise the KD weight
    # the reported accuracy is what the saved model gives on the test set
    from lasnn.data import load_dataset

    ds = load_dataset("synthetic")
    with torch.no_grad():
        acc = (run.model(ds.normalize(ds.x_test)).argmax(1) == ds.y_test).float().mean().item()
    assert acc == pytest.approx(recs[-1]["test_acc"], abs=1e-6)


def test_layerwise_stage_k_trains_the_student_up_to_block_k(teacher):
    from lasnn.data import load_dataset
    from lasnn.distill.objectives import build_student_model

    ds = load_dataset("synthetic")
    cfg = DistillConfig(teacher=str(teacher), **{k: v for k, v in STUDENT.items() if k != "stage_epochs"})
    student = build_student_model(cfg, ds)
    sample = ds.normalize(ds.x_train[:2])
    r1, r2 = (parameters_reaching(student, s, sample) for s in ("stage1", "stage2"))
    assert r1 and r1 < r2  # block 2 depends on block 1, not the other way round
    assert not any(n.startswith("body.fc") for n in r2)  # the classifier is trained in the final stage only
    teacher_model = load_run(teacher).model
    assert match_pairs(student, teacher_model, sample) == [("stage1", "stage1"), ("stage2", "stage2")]
    assert match_pairs(student, teacher_model, sample, ["stage2:stage1"]) == [("stage2", "stage1")]
    with pytest.raises(ValueError, match="unknown teacher stage 'nope'"):
        match_pairs(student, teacher_model, sample, ["stage1:nope"])
    st = plan_stages(DistillConfig(teacher="x", epochs=7), 3)
    assert [(s.name, s.epochs) for s in st] == [("pair1", 1), ("pair2", 1), ("pair3", 1), ("final", 4)]
    assert [s.name for s in plan_stages(DistillConfig(teacher="x", schedule="joint", epochs=7), 3)] == ["joint"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lasnn", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


# The lasnn command line in a process that SIGKILLs itself after `after` optimizer steps (through the
# trainers' on_step callback), exactly like an external kill -9.
_KILLED_CLI = """
import os, signal, sys
from lasnn.distill.engine import Engine
after = int(sys.argv[1])
init = Engine.__init__
def patched(self, *a, **k):
    k["on_step"] = lambda epoch, step, n: n >= after and os.kill(os.getpid(), signal.SIGKILL)
    init(self, *a, **k)
Engine.__init__ = patched
from lasnn.cli import main
from lasnn.data import load_dataset
sys.exit(main(sys.argv[2:]))
"""


def _cli_killed_after(steps: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _KILLED_CLI, str(steps), *args], capture_output=True, text=True,
                          timeout=300)


def _assert_same_run(full: Path, resumed: Path, checkpoints: tuple[str, ...] = ("last.pt",)) -> None:
    """The resumed run wrote the same metrics (but for wall time) and the same weights as the full one."""

    def strip(recs):
        return [{k: v for k, v in rec.items() if k != "seconds"} for rec in recs]

    assert strip(_records(resumed)) == strip(_records(full))
    for name in checkpoints:
        a, b = load_checkpoint(full / name), load_checkpoint(resumed / name)
        assert a["model_state"].keys() == b["model_state"].keys(), name
        for k in a["model_state"]:
            assert torch.equal(a["model_state"][k], b["model_state"][k]), (name, k)


def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(teacher, tmp_path):
    # Layer-wise schedule, Poisson encoding (its generator must be restored too), a checkpoint every 2
    # steps; 4 steps per epoch, killed after 7 steps: inside epoch 2 (stage pair2), 1 step after the
    # checkpoint at step 2 of that epoch, so that step is lost and recomputed.
    args = ["distill", "--dataset", "synthetic", "--teacher", str(teacher), "--width", "0.5", "--batch-size", "64",
            "--epochs", "3", "--stage-epochs", "1", "--T", "2", "--encoding", "poisson",
            "--save-every", "2", "--seed", "1", "--quiet"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = _cli(*args, "--out", str(full))
    assert r.returncode == 0, r.stderr
    r = _cli_killed_after(7, *args, "--out", str(killed))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    ck = load_checkpoint(killed / "last.pt")
    assert (ck["epoch"], ck["step"]) == (1, 2)
    assert len(_records(killed)) == 1
    r = _cli("distill", "--out", str(killed), "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    _assert_same_run(full, killed, ("last.pt", "best.pt"))


def test_train_snn_trains_the_student_directly(tmp_path):
    res = train_snn(out=tmp_path / "d", epochs=5, T=2, quiet=True, **{**SMALL, "batch_size": 32})
    assert res["kind"] == "snn" and res["schedule"] == "direct" and res["teacher"] is None
    assert res["stages"] == ["direct"] and res["pairs"] == [] and 0 <= res["firing_rate"] <= 1
    assert res["test_acc"] > CHANCE + 0.2
    recs = _records(tmp_path / "d")
    assert [r["stage"] for r in recs] == ["direct"] * 5
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    assert "train_ce" in recs[0] and "train_kd" not in recs[0] and "train_attn" not in recs[0]
    run = load_run(tmp_path / "d")
    assert run.kind == "snn" and isinstance(run.config, SNNConfig) and run.config.student == "digits_cnn_small"
    assert run.model.T == 2  # a spikify'd SNN at the run's T
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["kind"] == "snn" and "teacher" not in cfg and "beta" not in cfg


def test_train_snn_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    # AdamW here (the distill kill test covers SGD): its moment buffers and step count resume exactly too
    args = ["train-snn", "--dataset", "synthetic", "--width", "0.5", "--batch-size", "64", "--epochs", "2",
            "--T", "2", "--encoding", "poisson", "--save-every", "2", "--seed", "3", "--quiet",
            "--optimizer", "adamw", "--lr", "0.003"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _cli(*args, "--out", str(full)).returncode == 0
    # 4 steps per epoch: killed 1 step after the mid-epoch checkpoint at step 2 of epoch 2
    r = _cli_killed_after(7, *args, "--out", str(killed))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    ck = load_checkpoint(killed / "last.pt")
    assert (ck["epoch"], ck["step"]) == (1, 2)
    assert all("exp_avg_sq" in st for st in ck["optimizer_state"]["state"].values())  # really AdamW
    r = _cli("train-snn", "--out", str(killed), "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    _assert_same_run(full, killed)
    # a direct run is neither a teacher nor a distillation run
    r = _cli("distill", "--out", str(killed), "--resume", "--quiet")
    assert r.returncode == 2 and "holds a snn run, not a student run" in r.stderr


def test_resume_checks_and_refuses_to_overwrite(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(teacher, out)
    assert main(["train-teacher", "--dataset", "synthetic", "--out", str(out), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train-teacher", "--out", str(out), "--resume", "--epochs", "9", "--quiet"]) == 2
    assert "epochs=9 (run: 3)" in capsys.readouterr().err
    assert main(["distill", "--out", str(out), "--resume", "--quiet"]) == 2
    assert "holds a teacher run" in capsys.readouterr().err
    # resuming a finished run is a no-op that reports its final metrics
    assert main(["train-teacher", "--out", str(out), "--resume", "--quiet"]) == 0
    assert len(_records(out)) == 3


def _assert_rejected(capsys, argv, pattern, out):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert pattern in err, err
    assert not out.exists(), "a rejected run must not write anything"


def test_bad_inputs_give_clear_errors_and_write_nothing(teacher, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--out", str(out), "--quiet"]
    _assert_rejected(capsys, ["distill", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"),
                              "--teacher", str(teacher), *base], "cifar-10-batches-py", out)
    _assert_rejected(capsys, ["train-teacher", "--dataset", "synthetic", "--model", "resnet99", *base],
                     "unknown model 'resnet99'", out)
    _assert_rejected(capsys, ["distill", "--dataset", "synthetic", "--teacher", str(teacher), "--T", "0", *base],
                     "T must be an int >= 1", out)
    _assert_rejected(capsys, ["distill", "--dataset", "digits", "--teacher", str(teacher), *base],
                     "was trained on 'synthetic'", out)
    _assert_rejected(capsys, ["distill", "--dataset", "synthetic", "--teacher", str(tmp_path / "nothing"), *base],
                     "neither a run folder nor a checkpoint file", out)
    _assert_rejected(capsys, ["distill", "--dataset", "synthetic", "--teacher", str(teacher), "--epochs", "2",
                              "--width", "0.5", *base], "leave no epoch for the final stage", out)
    _assert_rejected(capsys, ["distill", "--dataset", "synthetic", "--teacher", str(teacher), "--pairs", "stage1:x",
                              "--width", "0.5", *base], "unknown teacher stage 'x'", out)


def test_corrupt_or_foreign_checkpoints_are_rejected(teacher, tmp_path):
    bad = tmp_path / "bad.pt"
    good = (teacher / "best.pt").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated, as a kill during a non-atomic write would leave it
    with pytest.raises(CheckpointError, match="corrupt or not a lasnn checkpoint"):
        load_run(bad)
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match="not a lasnn run checkpoint"):
        load_run(bad)
    ck = load_checkpoint(teacher / "best.pt")
    ck["model_state"] = {k: v for k, v in ck["model_state"].items() if "fc" not in k}
    torch.save(ck, bad)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_run(bad)
    with pytest.raises(RunError, match="is a student checkpoint"):
        ck["kind"] = "student"
        ck["config"] = {**DistillConfig(teacher="t", **SMALL).to_dict()}
        ck["model_state"] = load_run(teacher).model.state_dict()
        torch.save(ck, bad)
        distill(out=tmp_path / "o", teacher=str(bad), quiet=True, **STUDENT)
    assert not (tmp_path / "o").exists()


def test_progress_output_is_quiet_off_a_terminal(teacher, tmp_path, capsys):
    assert main(["train-teacher", "--dataset", "synthetic", "--width", "0.5", "--epochs", "1", "--batch-size", "64",
                 "--out", str(tmp_path / "a")]) == 0
    cap = capsys.readouterr()
    assert "epoch   1/1" in cap.out and "test accuracy" in cap.out
    assert "it/s" not in cap.err and "\r" not in cap.err  # no tqdm bar: stderr is not a TTY here
    assert main(["train-teacher", "--dataset", "synthetic", "--width", "0.5", "--epochs", "1", "--batch-size", "64",
                 "--out", str(tmp_path / "b"), "--quiet"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""


def test_config_validation_and_round_trip():
    cfg = DistillConfig(teacher="t", pairs=["a:b"], T=2)
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, msg in [({"T": 0}, "T must be"), ({"schedule": "x"}, "schedule"), ({"beta": -1.0}, "beta"),
                     ({"epochs": 0}, "epochs"), ({"pairs": []}, "pairs"), ({"encoding": "rate"}, "encoding"),
                     ({"grad_clip": -1.0}, "grad_clip"), ({"earlier": "thaw"}, "earlier")]:
        with pytest.raises(ValueError, match=msg):
            DistillConfig(teacher="t", **bad).validate()
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_dict({**cfg.to_dict(), "bogus": 1})
    direct = SNNConfig(T=3, student="digits_cnn_small")
    assert config_from_dict(json.loads(json.dumps(direct.to_dict()))) == direct and direct.method == "direct"
    for bad, msg in [({"T": 0}, "T must be"), ({"encoding": "rate"}, "encoding"), ({"lr": 0.0}, "lr"),
                     ({"optimizer": "adam"}, "optimizer must be one of")]:
        with pytest.raises(ValueError, match=msg):
            SNNConfig(**bad).validate()
    with pytest.raises(TypeError, match="unknown SNNConfig field"):
        train_snn(out="/nonexistent/never", teacher="t")
    with pytest.raises(TypeError, match="unknown TeacherConfig field"):
        train_teacher(out="/nonexistent/never", bogus=1)


def _draws():
    import random

    import numpy as np

    return random.random(), np.random.random(), float(torch.rand(()))  # noqa: NPY002


def test_runs_leave_the_callers_rng_streams_and_plot_backend_alone(tmp_path):
    import random

    import matplotlib
    import numpy as np

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        def seed_all():
            random.seed(7)
            np.random.seed(7)  # noqa: NPY002
            torch.manual_seed(7)

        seed_all()
        expected = _draws()
        seed_all()
        train_snn(out=tmp_path / "a", epochs=1, T=2, quiet=True, **SMALL)
        assert _draws() == expected, "train_snn changed the caller's RNG streams"
        seed_all()
        # resuming (even a finished run) loads every RNG state of its last.pt
        train_snn(out=tmp_path / "a", resume=True, epochs=1, T=2, quiet=True, **SMALL)
        assert _draws() == expected, "a resumed run changed the caller's RNG streams"
        assert matplotlib.get_backend() == "svg"  # curves.png was drawn without switching the backend
        assert (tmp_path / "a" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use(before)


def test_only_the_attention_terms_a_stage_uses_are_computed(teacher, tmp_path, monkeypatch):
    import lasnn

    calls: list[int] = []
    real = lasnn.attention_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lasnn, "attention_loss", counting)
    # joint with beta=0: no attention term at all (the metrics still report it as 0)
    distill(out=tmp_path / "kd", teacher=str(teacher), schedule="joint", beta=0.0, epochs=1, T=2, quiet=True,
            **STUDENT)
    assert calls == [] and _records(tmp_path / "kd")[0]["train_attn"] == 0.0
    # layer-wise: one term per step in a pair stage (of two pairs), both in the final stage
    distill(out=tmp_path / "lw", teacher=str(teacher), schedule="layerwise", epochs=3, T=2, quiet=True, **STUDENT)
    steps = _records(tmp_path / "lw")[0]["train_samples"] // STUDENT["batch_size"]
    assert len(calls) == steps * (1 + 1 + 2)


def test_on_step_is_called_after_every_optimizer_step(tmp_path):
    calls = []
    train_snn(out=tmp_path / "d", epochs=2, T=2, quiet=True, on_step=lambda *a: calls.append(a), **SMALL)
    per_epoch = len(calls) // 2
    assert per_epoch >= 1 and calls[0] == (0, 1, 1) and calls[-1] == (1, per_epoch, 2 * per_epoch)
    with pytest.raises(TypeError, match="on_step must be a callable"):
        train_snn(out=tmp_path / "e", epochs=1, quiet=True, on_step=3, **SMALL)


def test_kd_weight_default_resolves_per_data_set():
    """``kd_weight=None`` becomes the data set's measured weight (0.25 on MNIST-1D, 1 elsewhere); a given one stays."""
    from types import SimpleNamespace

    from lasnn.distill.config import DistillConfig
    from lasnn.distill.objectives import resolve_names

    for name, want in (("mnist1d", 0.25), ("fashionmnist", 1.0), ("synthetic", 1.0)):
        cfg = resolve_names(DistillConfig(dataset=name, teacher="t"), SimpleNamespace(name=name))
        assert cfg.kd_weight == want, name
    assert resolve_names(DistillConfig(dataset="mnist1d", teacher="t", kd_weight=0.5),
                         SimpleNamespace(name="mnist1d")).kd_weight == 0.5
    with pytest.raises(ValueError, match="kd_weight"):
        DistillConfig(teacher="t", kd_weight=-1.0).validate()


def test_channels_last_default_records_and_obeys_the_flag(tmp_path):
    """``channels_last=None`` is on for 2-d convolutional models on a CPU, off for 1-d ones, on other devices and
    where torch's CPU channels-last strided 1x1 convolution of 2-7 input channels crashes; the run records the
    resolved value, trains its weights in that layout, and ``--no-channels-last`` turns it off."""
    from lasnn.distill.config import SNNConfig
    from lasnn.distill.objectives import default_channels_last
    from lasnn.models import create

    cpu = torch.device("cpu")
    assert default_channels_last([create("digits_cnn_small")], cpu)
    assert not default_channels_last([create("mnist1d_cnn_small")], cpu)
    assert default_channels_last([create("resnet20", width=0.5)], cpu)
    assert not default_channels_last([create("digits_cnn_small"), create("resnet20", width=0.25)], cpu)
    assert not default_channels_last([create("digits_cnn_small")], torch.device("cuda"))
    with pytest.raises(ValueError, match="channels_last must be True, False or None"):
        SNNConfig(channels_last="yes").validate()
    base = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--quiet"]
    for flags, want in (([], True), (["--no-channels-last"], False), (["--channels-last"], True)):
        out = tmp_path / f"run{len(flags)}{want}"
        assert main(["train-snn", "--out", str(out), *base, *flags]) == 0
        assert json.loads((out / "config.json").read_text())["channels_last"] is want
        convs = [v for v in load_checkpoint(out / "last.pt")["model_state"].values() if v.dim() == 4]
        assert convs and all(
            (v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()) is want
            for v in convs if v.shape[1] > 1)


def test_low_memory_level_is_recorded_and_trains_the_same_weights(tmp_path):
    """``--low-memory``: every level computes the same gradients, so runs end with the same weights and metrics;
    config.json records the level and the loaded run's model has it."""
    base = ["--dataset", "synthetic", "--epochs", "2", "--batch-size", "64", "--T", "2", "--quiet"]
    for level in ("off", "recompute_all"):
        assert main(["train-snn", "--out", str(tmp_path / level), *base, "--low-memory", level]) == 0
        assert json.loads((tmp_path / level / "config.json").read_text())["low_memory"] == level
    assert load_run(tmp_path / "recompute_all").model.low_memory == "recompute_all"
    assert load_run(tmp_path / "off").model.low_memory is False
    a, b = (load_checkpoint(tmp_path / lv / "last.pt")["model_state"] for lv in ("off", "recompute_all"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _records(tmp_path / "off")]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in _records(tmp_path / "recompute_all")]
    with pytest.raises(ValueError, match="low_memory must be one of"):
        SNNConfig(low_memory="all").validate()


def test_cpu_amp_trains_under_bf16_autocast_on_a_cpu(tmp_path, monkeypatch):
    """``--cpu-amp``: the forwards run under bf16 autocast on a CPU (convolutions in bf16), recorded in
    config.json; without it, fp32."""
    from lasnn.distill import objectives

    seen: list[bool] = []
    real = objectives.Objective.losses

    def spy(self, net, x, y, stage, **kw):
        with self.amp():
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(self, net, x, y, stage, **kw)

    monkeypatch.setattr(objectives.Objective, "losses", spy)
    base = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--quiet", "--device", "cpu"]
    assert main(["train-teacher", "--out", str(tmp_path / "amp"), *base, "--cpu-amp"]) == 0
    assert json.loads((tmp_path / "amp" / "config.json").read_text())["cpu_amp"] is True
    assert seen and all(seen)
    seen.clear()
    assert main(["train-snn", "--out", str(tmp_path / "fp32"), *base, "--T", "2"]) == 0
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["cpu_amp"] is False
    assert seen and not any(seen)
    res = train_snn(out=tmp_path / "snn", epochs=1, T=2, quiet=True, cpu_amp=True, device="cpu", **SMALL)
    assert res["test_acc"] > 0  # a spiking student trains under it too (as every run on a GPU does)
    with pytest.raises(ValueError, match="cpu_amp must be a bool"):
        TeacherConfig(cpu_amp="yes").validate()


def test_command_help_states_the_config_defaults():
    """Every `lasnn distill` / `train-snn` option that has a config field shows that field's default."""
    import argparse
    import dataclasses

    from lasnn.cli import build_parser
    from lasnn.distill.config import DistillConfig

    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for command in ("distill", "train-snn", "train-teacher"):
        for action in sub.choices[command]._actions:
            v = defaults.get(action.dest)
            if v in (None, "") or isinstance(v, bool) or isinstance(action, argparse._StoreFalseAction):
                continue
            text = f"{v:g}" if isinstance(v, float) else str(v)
            assert f"default {text}" in action.help, (command, action.dest, action.help)
            checked += 1
    assert checked >= 40


def test_mixup_and_per_step_losses_are_the_formulas():
    """``draw_mix``: ``lam * x + (1 - lam) * x[perm]`` with ``lam >= 0.5``, from the global generator (so a
    checkpoint replays it); ``mixed_cross_entropy``: the weighted CE pair, per step the mean of the steps' CEs."""
    import torch.nn.functional as F

    from lasnn.distill.objectives import draw_mix, mixed_cross_entropy

    x = torch.randn(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    same, mix = draw_mix(x, 0.0)
    assert same is x and mix is None
    for bad in (-0.1, float("nan"), float("inf"), "0.2"):
        with pytest.raises(ValueError, match="alpha must be"):
            draw_mix(x, bad)
    torch.manual_seed(5)
    xm, mix = draw_mix(x, 0.4)
    torch.manual_seed(5)
    xm2, mix2 = draw_mix(x, 0.4)
    assert torch.equal(xm, xm2) and torch.equal(mix.perm, mix2.perm) and mix.lam == mix2.lam
    assert 0.5 <= mix.lam <= 1.0 and sorted(mix.perm.tolist()) == list(range(6))
    torch.testing.assert_close(xm, mix.lam * x + (1 - mix.lam) * x[mix.perm])

    logits = torch.randn(3, 6, 4)  # per step [T, B, K]
    want = sum(F.cross_entropy(logits[t], y) for t in range(3)) / 3
    torch.testing.assert_close(mixed_cross_entropy(logits, y, None), want)
    torch.testing.assert_close(mixed_cross_entropy(logits[0], y, None), F.cross_entropy(logits[0], y))
    want = sum(mix.lam * F.cross_entropy(logits[t], y) + (1 - mix.lam) * F.cross_entropy(logits[t], y[mix.perm])
               for t in range(3)) / 3
    torch.testing.assert_close(mixed_cross_entropy(logits, y, mix), want)
    for bad, msg in [({"mixup": -0.1}, "mixup"), ({"per_step_loss": "yes"}, "per_step_loss")]:
        with pytest.raises(ValueError, match=msg):
            SNNConfig(**bad).validate()


def test_mixup_shows_the_teacher_the_students_batch_and_per_step_kd(teacher, tmp_path, monkeypatch):
    """With mixup the teacher and the student see the same mixed batch (not the loader's); with
    ``per_step_loss`` the student's logits reach the losses per step ``[T, B, K]``."""
    import lasnn
    from lasnn.distill.taps import TappedModel

    seen: list[tuple[torch.Tensor, bool]] = []
    real_fwd = TappedModel.forward

    def spy(self, x, **kw):
        seen.append((x, kw.get("return_steps", False)))
        return real_fwd(self, x, **kw)

    kd_shapes: list[tuple[int, ...]] = []
    real_kd = lasnn.kd_loss
    monkeypatch.setattr(TappedModel, "forward", spy)
    monkeypatch.setattr(lasnn, "kd_loss", lambda s, t, **kw: kd_shapes.append(tuple(s.shape)) or real_kd(s, t, **kw))
    res = distill(out=tmp_path / "m", teacher=str(teacher), schedule="joint", epochs=1, T=2, quiet=True,
                  mixup=0.4, per_step_loss=True, **STUDENT)
    assert res["test_acc"] is not None
    steps = _records(tmp_path / "m")[0]["train_samples"] // STUDENT["batch_size"]
    train = seen[-2 * steps:]  # (teacher, student) per training step; earlier calls: stage matching
    for (xt, rt), (xs, rs) in zip(train[::2], train[1::2], strict=True):
        assert xt is xs and not rt and rs
    # the student's per-step logits, flattened to [T*B, K], against the teacher's repeated per step
    assert kd_shapes and all(s == (2 * STUDENT["batch_size"], 4) for s in kd_shapes)


def test_mixup_per_step_run_kill_9_then_resume_matches_an_uninterrupted_run(teacher, tmp_path):
    # the mixup draws come from the global generator, which every checkpoint holds
    args = ["distill", "--dataset", "synthetic", "--teacher", str(teacher), "--width", "0.5", "--batch-size", "64",
            "--epochs", "2", "--schedule", "joint", "--T", "2", "--mixup", "0.4", "--per-step-loss",
            "--save-every", "2", "--seed", "2", "--quiet"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = _cli(*args, "--out", str(full))
    assert r.returncode == 0, r.stderr
    r = _cli_killed_after(7, *args, "--out", str(killed))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert (load_checkpoint(killed / "last.pt")["step"]) == 2
    r = _cli("distill", "--out", str(killed), "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["mixup"] == 0.4 and cfg["per_step_loss"] is True
    _assert_same_run(full, killed)


_DISTILL_INIT = DistillObjective.__init__


def _count_teacher_samples(monkeypatch, cache: bool = True) -> list[int]:
    """Batch sizes of every teacher forward while training the runs that follow (``cache=False``: with the
    teacher-logit cache switched off)."""
    seen: list[int] = []

    def counted(self, *a, **k):
        _DISTILL_INIT(self, *a, **k)
        self.teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
        self.cache_teacher_logits = self.cache_teacher_logits and cache

    monkeypatch.setattr(DistillObjective, "__init__", counted)
    return seen


def test_teacher_logits_are_computed_once_when_every_sample_is_always_the_same_input(teacher, tmp_path, monkeypatch):
    kw = {**STUDENT, "schedule": "joint", "beta": 0.0, "epochs": 3, "T": 2, "quiet": True, "teacher": str(teacher)}
    n_train = load_dataset("synthetic").x_train.shape[0]
    seen = _count_teacher_samples(monkeypatch)
    cached = distill(out=tmp_path / "cached", augment=False, per_step_loss=True, **kw)
    assert sum(seen) == n_train  # one pass over the training set, whatever the epochs and steps
    # the same run with the teacher run on every batch: the same metrics and weights, bit for bit
    seen = _count_teacher_samples(monkeypatch, cache=False)
    live = distill(out=tmp_path / "live", augment=False, per_step_loss=True, **kw)
    assert sum(seen) > 2 * n_train  # every batch of the three epochs
    assert live["test_acc"] == cached["test_acc"]
    _assert_same_run(tmp_path / "live", tmp_path / "cached")
    # random augmentation, mixup or attention terms: the teacher runs on every batch
    for name, extra in [("augment", {"augment": True}), ("mixup", {"augment": False, "mixup": 0.4}),
                        ("attention", {"augment": False, "beta": 10.0})]:
        seen = _count_teacher_samples(monkeypatch)
        distill(out=tmp_path / name, **{**kw, "epochs": 1, **extra})
        assert sum(seen) >= n_train - STUDENT["batch_size"], name  # every full batch of the epoch, live
        assert set(seen) == {STUDENT["batch_size"]}, name
