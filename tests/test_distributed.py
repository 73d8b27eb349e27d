"""The distillation command under torchrun: 2 CPU processes, gloo, DistributedDataParallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from lasnn.distill import load_checkpoint, train_teacher


def test_torchrun_two_processes_gloo(tmp_path):
    teacher = tmp_path / "teacher"
    train_teacher(out=teacher, dataset="synthetic", width=0.5, batch_size=32, epochs=2, quiet=True)
    out = tmp_path / "student"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lasnn", "distill", "--dataset", "synthetic", "--teacher", str(teacher), "--width", "0.5",
           "--batch-size", "32", "--epochs", "5", "--stage-epochs", "1", "--T", "2",
           "--device", "cpu", "--out", str(out)]
    # one thread per process: two processes share the two cores of the build machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # only rank 0 prints and writes: one line per epoch, one final summary
    assert r.stdout.count("epoch   1/5") == 1 and r.stdout.count("test accuracy") == 1, r.stdout
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in recs] == ["pair1", "pair2", "final", "final", "final"]
    # metrics are summed over both ranks: each rank trains on half of the 256 samples per epoch (4 batches
    # of 32) and tests on half of the 128 test samples
    assert all(x["train_samples"] == 256 and x["test_samples"] == 128 for x in recs)
    assert recs[-1]["train_ce"] < recs[2]["train_ce"]
    assert recs[-1]["test_acc"] > 0.5  # chance is 0.25
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "curves.png", "last.pt", "metrics.jsonl"]
    ck = load_checkpoint(out / "last.pt")
    assert ck["world_size"] == 2 and len(ck["ranks"]) == 2
    # the saved model is the plain module's state dict (no DDP "module." prefix), loadable without torchrun
    assert not any(k.startswith("module.") for k in ck["model_state"])
    assert all(torch.isfinite(v).all() for v in ck["model_state"].values() if v.is_floating_point())
