"""``lasnn demo`` / ``convert`` / ``evaluate`` end to end in reduced mode."""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from lasnn.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "d"
    assert main(["demo", "--out", str(out), "--dataset", "synthetic", "--quick", "--T-max", "16", "--quiet",
                 "--full-sweeps"]) == 0
    return out


def test_demo_report_fields_and_consistency(demo_dir):
    rep = json.loads((demo_dir / "report.json").read_text())
    assert rep["dataset"] == "synthetic"
    assert set(rep["teacher"]) >= {"model", "accuracy"}
    st = rep["student"]
    assert st["T"] == 4 and st["schedule"] == "layerwise" and 0 <= st["firing_rate"] <= 1
    assert st["label"] == "LaSNN student"
    assert st["accuracy"] == st["accuracy_by_T"]["4"] == st["accuracy_by_seed"][0]
    assert st["accuracy"] > 0.25 + 0.1, "the student did not learn (4 classes)"
    # the last epoch's model, not the best by test accuracy: nothing is selected on the test set
    for kind in ("student", "direct"):
        last = json.loads((demo_dir / kind / "metrics.jsonl").read_text().splitlines()[-1])
        assert rep[kind]["accuracy"] == last["test_acc"], kind
    # the direct-training baseline: same student, T, epochs and batch, no teacher
    di = rep["direct"]
    assert di["model"] == st["model"] and di["T"] == 4 and 0 <= di["firing_rate"] <= 1
    assert (di["epochs"], di["batch_size"]) == (st["epochs"], st["batch_size"])
    assert di["accuracy"] == di["accuracy_by_T"]["4"] and di["accuracy"] > 0.25 + 0.1
    assert rep["gain_over_direct"] == pytest.approx(100 * (st["accuracy"] - di["accuracy"]))
    assert rep["seeds"] == [0] and rep["gain"]["stderr"] is None and st["accuracy_std"] is None
    direct_cfg = json.loads((demo_dir / "direct" / "config.json").read_text())
    assert direct_cfg["kind"] == "snn" and direct_cfg["T"] == 4 and direct_cfg["seed"] == 0
    assert direct_cfg["lr"] == rep["recipe"]["direct"]["lr"]
    student_cfg = json.loads((demo_dir / "student" / "config.json").read_text())
    for key in ("schedule", "kd_weight", "kd_temperature", "beta", "lr", "epochs", "batch_size", "per_step_loss"):
        assert rep["recipe"]["student"][key] == student_cfg[key], key
    for name in ("classic", "robust"):
        c = rep["conversion"][name]
        assert list(c["accuracy_by_T"]) == [str(t) for t in range(1, 17)]
        acc = {int(t): a for t, a in c["accuracy_by_T"].items()}
        m = c["T_to_match_student"]
        if m is None:
            assert c["ratio"] is None and max(acc.values()) < st["accuracy"]
        else:
            assert acc[m] >= st["accuracy"] and all(acc[t] < st["accuracy"] for t in range(1, m))
            assert c["ratio"] == m / 4
    assert rep["sweeps"] == "full"
    assert rep["conversion"]["classic"]["initial_membrane"] == 0.0
    assert rep["conversion"]["robust"]["initial_membrane"] == 0.5
    assert rep["seconds"] > 0
    png = (demo_dir / "latency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_convert_and_evaluate_commands(demo_dir, tmp_path, capsys):
    out = tmp_path / "conv"
    assert main(["convert", "--teacher", str(demo_dir / "teacher"), "--method", "max", "--initial-membrane", "0",
                 "--T-max", "8", "--out", str(out), "--which", "last"]) == 0
    res = json.loads((out / "accuracy_vs_T.json").read_text())
    assert res["method"] == "max" and list(res["accuracy_by_T"]) == [str(t) for t in range(1, 9)]
    assert (out / "accuracy_vs_T.png").is_file()
    # the same recipe as the demo's classic conversion, so the same curve
    demo = json.loads((demo_dir / "report.json").read_text())["conversion"]["classic"]["accuracy_by_T"]
    assert res["accuracy_by_T"] == {t: demo[t] for t in res["accuracy_by_T"]}
    assert "teacher" in capsys.readouterr().out  # the table

    ev = tmp_path / "ev"
    assert main(["evaluate", "--run", str(demo_dir / "student"), "--T-max", "6", "--out", str(ev), "--quiet",
                 "--which", "last"]) == 0
    res = json.loads((ev / "accuracy_vs_T.json").read_text())
    assert res["kind"] == "student" and res["T"] == 4 and list(res["accuracy_by_T"]) == [str(t) for t in range(1, 7)]
    assert res["accuracy"] == json.loads((demo_dir / "report.json").read_text())["student"]["accuracy"]


def test_qcfs_convert_command_finetunes_a_relu_teacher(demo_dir, tmp_path):
    out = tmp_path / "q"
    assert main(["convert", "--teacher", str(demo_dir / "teacher"), "--method", "qcfs", "--qcfs-epochs", "1",
                 "--T-max", "4", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "accuracy_vs_T.json").read_text())
    assert res["qcfs"]["levels"] == 4 and 0 <= res["qcfs"]["ann_accuracy"] <= 1
    assert all(len(v) == 1 and v[0] > 0 for v in res["thresholds"].values())


def test_demo_with_seeds_reports_mean_spread_and_gain(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["demo", "--out", str(out), "--dataset", "synthetic", "--quick", "--student-epochs", "4",
                 "--T-max", "8", "--seeds", "2", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["seeds"] == [5, 6]
    for s in (5, 6):
        assert json.loads((out / f"seed{s}" / "direct" / "config.json").read_text())["seed"] == s
        assert json.loads((out / f"seed{s}" / "student" / "config.json").read_text())["seed"] == s
    g = rep["gain"]
    by = [100 * (a - b) for a, b in zip(rep["student"]["accuracy_by_seed"], rep["direct"]["accuracy_by_seed"],
                                        strict=True)]
    assert g["by_seed"] == pytest.approx(by) and g["mean"] == pytest.approx(sum(by) / 2)
    assert g["std"] == pytest.approx(abs(by[0] - by[1]) / 2**0.5)
    assert g["stderr"] == pytest.approx(g["std"] / 2**0.5)
    assert g["exceeds_2_stderr"] == (g["mean"] > 2 * g["stderr"])
    assert rep["student"]["accuracy"] == pytest.approx(sum(rep["student"]["accuracy_by_seed"]) / 2)
    assert "gain over direct training" in printed and "standard error over 2 seeds" in printed
    verdict = ("distillation wins" if g["exceeds_2_stderr"] else "direct training wins"
               if -g["mean"] > 2 * g["stderr"] else "within the seed noise")
    assert verdict in printed


def test_demo_conversion_subset_is_reported_and_matched_on_the_same_samples(tmp_path, monkeypatch):
    import dataclasses

    from lasnn import demo

    monkeypatch.setitem(demo.DEMO_RECIPES, "synthetic",
                        dataclasses.replace(demo.DEMO_RECIPES["synthetic"], sweep_samples=50))
    rep = demo.run_demo(tmp_path / "d", dataset="synthetic", teacher_epochs=2, student_epochs=4, T_max=8, quiet=True)
    assert rep["conversion_test_samples"] == 50
    for c in rep["conversion"].values():
        acc = {int(t): a for t, a in c["accuracy_by_T"].items()}
        assert all(abs(round(a * 50) - a * 50) < 1e-9 for a in acc.values())  # k / 50: over the 50 samples
        m, target = c["T_to_match_student"], rep["student_accuracy_on_conversion_samples"]
        assert m is None or (acc[m] >= target and all(acc[t] < target for t in range(1, m)))
    # the student's full-test accuracy is over all 128 test samples, the matched one over the 50
    assert abs(round(rep["student"]["accuracy"] * 128) - rep["student"]["accuracy"] * 128) < 1e-9
    assert abs(round(rep["student_accuracy_on_conversion_samples"] * 50)
               - rep["student_accuracy_on_conversion_samples"] * 50) < 1e-9


def test_bad_arguments(demo_dir, tmp_path, capsys):
    assert main(["demo", "--out", str(demo_dir), "--dataset", "synthetic", "--quick"]) == 2
    assert "already holds a demo" in capsys.readouterr().err
    assert main(["convert", "--teacher", str(demo_dir / "student"), "--out", str(tmp_path / "x")]) == 2
    assert "student run" in capsys.readouterr().err
    assert main(["convert", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x" / "accuracy_vs_T.json").exists()
    with pytest.raises(SystemExit):
        main(["convert", "--teacher", str(demo_dir / "teacher"), "--T-max", "0", "--out", str(tmp_path / "x")])
    assert "integer >= 1" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "t"), "--dataset", "synthetic", "--quick", "--T-max", "2"]) == 2
    assert "T_max (2) must be >= T (4)" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # rejected before any training
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "t"), "--dataset", "synthetic", "--seeds", "0"])
    assert "integer >= 1" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "c"), "--dataset", "cifar10", "--quick"]) == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err  # names the files it expected
    assert not (tmp_path / "c").exists()


def test_demo_sweeps_stop_once_matched_with_the_full_sweeps_values(tmp_path, capsys):
    """By default a sweep stops at the first horizon at which it has matched the students: the same match,
    ratio and curve values up to there as the full sweep of the same teacher (``--full-sweeps``)."""
    import shutil

    from lasnn import demo

    kw = {"dataset": "synthetic", "teacher_epochs": 2, "student_epochs": 3, "stage_epochs": 1, "T_max": 16}
    full = demo.run_demo(tmp_path / "full", jobs=1, quiet=True, full_sweeps=True, **kw)
    assert full["sweeps"] == "full"
    # the same teacher for the stopping demo (copied in, then resumed with its own settings)
    (tmp_path / "stop").mkdir()
    settings = json.loads((tmp_path / "full" / demo.DEMO_STATE).read_text())
    assert settings["full_sweeps"] is True
    (tmp_path / "stop" / demo.DEMO_STATE).write_text(json.dumps({**settings, "full_sweeps": False}))
    shutil.copytree(tmp_path / "full" / "teacher", tmp_path / "stop" / "teacher")
    stop = demo.run_demo(tmp_path / "stop", jobs=1, resume=True, **kw)  # None: the recipe's default, stopping
    printed = capsys.readouterr().out
    assert stop["sweeps"] == "until_match" and "or until it matches the student" in printed
    assert stop["student"] == full["student"] and stop["direct"] == full["direct"]
    stopped_early = 0
    for name in ("classic", "robust"):
        f, s = full["conversion"][name], stop["conversion"][name]
        assert s["T_to_match_student"] == f["T_to_match_student"] and s["ratio"] == f["ratio"]
        m = f["T_to_match_student"]
        horizon = 16 if m is None else min(16, 1 << (m - 1).bit_length())  # below 32 the horizons double
        assert list(s["accuracy_by_T"]) == [str(t) for t in range(1, horizon + 1)], name
        assert s["accuracy_by_T"] == {t: f["accuracy_by_T"][t] for t in s["accuracy_by_T"]}, name
        stopped_early += horizon < 16
    assert stopped_early, "neither sweep matched before T_max: the test does not exercise stopping"
    # the target the sweeps read, written once the distilled student was measured: what the report matches against
    target = json.loads((tmp_path / "stop" / demo.TARGET_FILE).read_text())
    assert target == {"student_accuracy_on_conversion_samples": stop["student_accuracy_on_conversion_samples"]}
    # the firing rate reported with a cut curve is over its steps: the rate of a sweep to that T, whenever the
    # sweep learnt the target (here: from the start, and never, i.e. a full sweep read at that horizon)
    for name, (method, membrane) in {"classic": ("max", 0.0), "robust": ("robust", 0.5)}.items():
        s = stop["conversion"][name]
        h = int(list(s["accuracy_by_T"])[-1])
        args = (tmp_path / "stop" / "teacher", "synthetic", None, None, method, membrane)
        _, alone = demo._sweep(*args, h, "cpu")
        curve, late = demo._sweep(*args, 16, "cpu", target_file=tmp_path / "never.json")
        assert s["firing_rate"] == alone[h] == late[h] and set(late) == {1, 2, 4, 8, 16} and len(curve) == 16
    # a demo.json written before the setting existed resumes as what it was: full sweeps
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / demo.DEMO_STATE).write_text(json.dumps({k: v for k, v in settings.items()
                                                                if k != "full_sweeps"}))
    with pytest.raises(ValueError, match="full_sweeps: the demo has True, got False"):
        demo.run_demo(tmp_path / "old", resume=True, full_sweeps=False, **kw)
    with pytest.raises(TypeError, match="full_sweeps must be None or a bool"):
        demo.run_demo(tmp_path / "bad", full_sweeps="yes", **kw)


def test_demo_jobs_in_worker_processes_give_the_same_report(tmp_path, capsys):
    """The phases after the teacher run in worker processes with ``jobs=2``: the same runs, curves and gain as
    one after another in this process (both with one thread per phase). The second demo starts from the first
    one's teacher (copied in, then ``resume``): trained here with two threads, a channels-last teacher (image
    data on a CPU) would differ in the last bits, ATen's channels-last batch norm summing per thread."""
    import shutil

    import torch

    from lasnn import demo

    threads = torch.get_num_threads()
    kw = {"dataset": "synthetic", "teacher_epochs": 2, "student_epochs": 3, "stage_epochs": 1, "T_max": 8,
          "seeds": 2}
    try:
        torch.set_num_threads(1)
        one = demo.run_demo(tmp_path / "one", jobs=1, quiet=True, **kw)
        (tmp_path / "two").mkdir()
        shutil.copy(tmp_path / "one" / demo.DEMO_STATE, tmp_path / "two" / demo.DEMO_STATE)
        shutil.copytree(tmp_path / "one" / "teacher", tmp_path / "two" / "teacher")
        torch.set_num_threads(2)  # two workers with 2 // 2 = 1 thread each
        two = demo.run_demo(tmp_path / "two", jobs=2, resume=True, **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # the workers' thread settings stay in the workers
    printed = capsys.readouterr().out
    assert "2 at a time, each in its own process with 1 thread" in printed and printed.count(": done in ") == 6
    assert (one["jobs"], two["jobs"]) == (1, 2)
    for key in ("student", "direct"):
        assert one[key]["accuracy_by_seed"] == two[key]["accuracy_by_seed"]
        assert one[key]["accuracy_by_T"] == two[key]["accuracy_by_T"]
        assert one[key]["firing_rate"] == two[key]["firing_rate"]
    assert one["gain"] == two["gain"]
    for name in ("classic", "robust"):
        assert one["conversion"][name] == two["conversion"][name]
    assert set(two["timings"]) == {"teacher", "student", "direct", "conversion_classic", "conversion_robust"}
    assert two["cpu_seconds"] >= sum(two["cpu_timings"][k] for k in two["cpu_timings"] if k != "teacher")
    with pytest.raises(ValueError, match="jobs must be an int >= 1"):
        demo.run_demo(tmp_path / "bad", jobs=0, **kw)


def test_demo_workers_end_when_the_demo_process_is_killed(tmp_path):
    """A SIGKILLed demo (no clean-up runs) leaves no worker training on into its folder."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from lasnn.demo import _die_with_parent\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "                               initializer=_die_with_parent, initargs=(os.getpid(),))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 120)\n"
        "    time.sleep(120)\n"
    )
    f = tmp_path / "parent.py"
    f.write_text(script)
    proc = subprocess.Popen([sys.executable, str(f)], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    os.kill(worker, 0)  # alive
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        # a zombie (exited, not yet reaped by its new parent) counts as gone
        with contextlib.suppress(FileNotFoundError):
            if open(f"/proc/{worker}/stat").read().split(")")[-1].split()[0] == "Z":
                break
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the worker outlived the killed demo process")


class _Stop(Exception):
    """Stands for the demo process being killed."""


def test_demo_resume_continues_an_interrupted_demo_to_the_same_report(tmp_path, capsys):
    """Interrupted inside the direct student's second epoch, then inside the second conversion sweep: each
    --resume keeps what was finished (runs, the first sweep's saved curve) and the final report equals an
    uninterrupted demo's."""
    from lasnn import demo

    kw = {"dataset": "synthetic", "teacher_epochs": 2, "student_epochs": 3, "stage_epochs": 1, "T_max": 8}
    full = demo.run_demo(tmp_path / "full", jobs=1, quiet=True, **kw)
    out = tmp_path / "cut"
    real = demo._job
    ran: list[str] = []

    def cut_in_direct(job, kwargs, threads):
        ran.append(job)
        if job == "train_snn":
            def stop(epoch, step, _n):
                if epoch == 1 and step == 2:
                    raise _Stop
            kwargs = {**kwargs, "on_step": stop}
        return real(job, kwargs, threads)

    def cut_in_robust(job, kwargs, threads):
        ran.append(job + ":" + kwargs.get("method", ""))
        if job == "sweep" and kwargs["method"] == "robust":
            raise _Stop
        return real(job, kwargs, threads)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "_job", cut_in_direct)
        with pytest.raises(_Stop):
            demo.run_demo(out, jobs=1, quiet=True, **kw)
        assert ran == ["distill", "train_snn"] and not (out / "report.json").exists()
        assert json.loads((out / "demo.json").read_text())["student_epochs"] == 3
        assert len((out / "direct" / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 2 was cut
        ran.clear()
        mp.setattr(demo, "_job", cut_in_robust)
        with pytest.raises(_Stop):
            demo.run_demo(out, jobs=1, quiet=True, resume=True, **kw)
        assert ran == ["distill:", "train_snn:", "sweep:max", "sweep:robust"]
        assert (out / "sweep_classic.json").is_file() and not (out / "sweep_robust.json").exists()
    # the last resume through the command line, which reads the demo's settings from demo.json
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--resume", "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "classic conversion: finished before, read from sweep_classic.json" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["resumed"] is True and full["resumed"] is False
    for key in ("student", "direct"):
        assert rep[key]["accuracy_by_T"] == full[key]["accuracy_by_T"]
        assert rep[key]["firing_rate"] == full[key]["firing_rate"]
    assert rep["gain"] == full["gain"] and rep["conversion"] == full["conversion"]
    assert rep["recipe"] == full["recipe"]
    # nothing left to resume; other settings; no demo; a new demo into a started one
    with pytest.raises(ValueError, match="complete demo"):
        demo.run_demo(out, resume=True, **kw)
    (tmp_path / "cut2").mkdir()
    (tmp_path / "cut2" / "demo.json").write_text((out / "demo.json").read_text())
    with pytest.raises(ValueError, match=r"student_epochs: the demo has 3, got 4"):
        demo.run_demo(tmp_path / "cut2", resume=True, **{**kw, "student_epochs": 4})
    with pytest.raises(ValueError, match="already holds a demo"):
        demo.run_demo(tmp_path / "cut2", **kw)
    with pytest.raises(ValueError, match="no demo to resume"):
        demo.run_demo(tmp_path / "empty", resume=True, **kw)
