"""Benchmark of the conversion sweep: ``accuracy_vs_timesteps`` on a converted SNN against the ANN's own
forward over the same samples x T (the floor: a converted SNN runs the ANN's layers once per step).

Run: ``pytest benches/ -k sweep --benchmark-json=out.json`` (add ``--keep-cpu-memory`` for the setting the
``lasnn`` commands use on a CPU).

Case: the ``fashion_cnn`` teacher (32-64-128 channels, two convs per stage) converted with robust
thresholds, ``N`` random 28x28 images in batches of ``B``, ``T`` steps. Rows: ``ann`` (``T`` forwards of each
batch), ``sweep`` (the automatic chunk) and ``sweep_chunk32`` (32 steps per call, the old default).
``extra_info`` holds ``over_ann``: the row's median over the ``ann`` row's median (target: at most 1.3).
"""

from __future__ import annotations

import os

import pytest
import torch

import lasnn
from lasnn.models import create

N, B, T = 500, 500, 32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = int(os.environ.get("LASNN_BENCH_ROUNDS", "3"))
_medians: dict[str, float] = {}


def _case():
    torch.manual_seed(0)
    ann = create("fashion_cnn", num_classes=10, in_channels=1).eval().to(DEVICE)
    x = torch.rand(N, 1, 28, 28, device=DEVICE)
    y = torch.randint(0, 10, (N,), device=DEVICE)
    snn = lasnn.convert(ann, [(x[:200], y[:200])], method="robust")
    return ann, snn, [(x[i:i + B], y[i:i + B]) for i in range(0, N, B)]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("row", ["ann", "sweep", "sweep_chunk32"])
def test_conversion_sweep_vs_ann_forward(benchmark, bench_info, row):
    ann, snn, loader = _case()

    def run():
        if row == "ann":
            with torch.no_grad():
                for xb, _ in loader:
                    for _ in range(T):
                        ann(xb)
        else:
            lasnn.accuracy_vs_timesteps(snn, loader, T_max=T, chunk=32 if row == "sweep_chunk32" else None)
        _sync()

    benchmark.group = f"conversion sweep N={N} T={T}"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to record
        return
    _medians[row] = benchmark.stats.stats.median
    benchmark.extra_info.update(bench_info)
    benchmark.extra_info.update(row=row, N=N, batch=B, T=T, device=DEVICE)
    if "ann" in _medians and row != "ann":
        benchmark.extra_info["over_ann"] = round(_medians[row] / _medians["ann"], 3)
