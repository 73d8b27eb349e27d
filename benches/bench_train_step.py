"""Benchmark of one training step (forward + backward + SGD update) of a spiking network, against the same
network as an ANN and against SpikingJelly 2.0.

Run: ``pytest benches/ -k train_step --benchmark-json=out.json`` (``--keep-cpu-memory`` for the allocator
setting the ``lasnn`` commands use on a CPU; ``LASNN_BENCH_ROUNDS`` rounds per row, default 5).

Network: a VGG-style student of six conv(3x3, no bias)-BN-activation layers (32-32-64-64-128-128
channels, 2x2 average pooling after every second one) and a linear classifier, on 32x32x3 input, T=4
(direct encoding), fp32. Rows, each at two batch sizes so the per-sample slope is visible:

- ``ann``: the network with ReLU;
- ``lasnn``: ``lasnn.spikify`` of it (LIF tau=2, hard reset), low-memory BPTT on (spikes saved as bits);
- ``lasnn_recompute``: the same with ``snn.low_memory = "recompute"`` (batch-norm outputs recomputed too);
- ``lasnn_recompute_all``: the same with ``snn.low_memory = "recompute_all"`` (conv and pool outputs too);
- ``lasnn_plain``: the same with ``snn.low_memory = False``;
- ``ann_channels_last``, ``lasnn_channels_last``, ``lasnn_recompute_channels_last``,
  ``lasnn_recompute_all_channels_last``: those rows with the model and the input in channels-last memory order
  (what ``lasnn train-snn``/``distill`` do on a CPU for image data; there oneDNN's convolutions need no
  layout-conversion buffers, so the backward's working set is smaller too);
- ``spikingjelly``: SpikingJelly 2.0 multi-step layers, ``LIFNode(tau=2)`` (its default backend);
- ``spikingjelly_memopt``: that, after ``memopt.optimize_memory(level=1)`` (skipped where it cannot run,
  with the reason).

``extra_info``: ``peak_bytes`` (peak of live bytes allocated above the start during one step: the
profiler's allocator events on a CPU, ``max_memory_allocated`` on a GPU), ``batch``, and once both batch
sizes of a row ran, ``bytes_per_sample`` (the slope between them: activation memory per sample) and
``over_ann`` (that slope over the ANN's in the same memory layout).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lasnn

T = 4
BATCHES = (16, 48)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = int(os.environ.get("LASNN_BENCH_ROUNDS", "5"))
ROWS = ("ann", "lasnn", "lasnn_recompute", "lasnn_recompute_all", "lasnn_plain", "ann_channels_last",
        "lasnn_channels_last", "lasnn_recompute_channels_last", "lasnn_recompute_all_channels_last", "spikingjelly",
        "spikingjelly_memopt")
_peaks: dict[tuple[str, int], int] = {}


def _vgg(act) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for i, co in enumerate((32, 32, 64, 64, 128, 128)):
        layers += [nn.Conv2d(c, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), act()]
        if i % 2 == 1:
            layers.append(nn.AvgPool2d(2))
        c = co
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 10))


def _spikingjelly(memopt: bool, x: torch.Tensor):
    sj = pytest.importorskip("spikingjelly.activation_based", reason="SpikingJelly 2.0 not installed")
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    mods: list[nn.Module] = []
    c = 3
    for i, co in enumerate((32, 32, 64, 64, 128, 128)):
        mods += [layer.Conv2d(c, co, 3, padding=1, bias=False), layer.BatchNorm2d(co),
                 neuron.LIFNode(tau=2.0, surrogate_function=surrogate.Sigmoid())]
        if i % 2 == 1:
            mods.append(layer.AvgPool2d(2))
        c = co
    net = nn.Sequential(*mods, layer.Flatten(), layer.Linear(128 * 4 * 4, 10))
    functional.set_step_mode(net, "m")
    net = net.to(DEVICE)
    x_seq = x.unsqueeze(0).repeat(T, *([1] * x.dim()))
    if memopt:
        from spikingjelly.activation_based import memopt as mo

        try:
            net = mo.optimize_memory(net, (neuron.LIFNode,), lambda m: m(x_seq), level=1)
        except Exception as e:  # e.g. needs CUDA here
            pytest.skip(f"spikingjelly memopt cannot run here: {type(e).__name__}: {e}")

    def forward(inp):
        functional.reset_net(net)
        return net(x_seq).mean(0)

    del sj
    return net, forward


def _model(row: str, x: torch.Tensor):
    torch.manual_seed(0)
    if row.startswith("spikingjelly"):
        return _spikingjelly(row.endswith("memopt"), x)
    ann = _vgg(nn.ReLU).to(DEVICE)
    layout = torch.channels_last if row.endswith("_channels_last") else torch.preserve_format
    row = row.removesuffix("_channels_last")
    if row == "ann":
        return ann.to(memory_format=layout), ann
    snn = lasnn.spikify(ann, T=T).to(DEVICE, memory_format=layout)
    snn.low_memory = {"lasnn": True, "lasnn_recompute": "recompute", "lasnn_recompute_all": "recompute_all",
                      "lasnn_plain": False}[row]
    return snn, snn


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("row", ROWS)
def test_train_step(benchmark, bench_info, peak_bytes, row, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(DEVICE)
    if row.endswith("_channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g).to(DEVICE)
    module, forward = _model(row, x)
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        opt.step()
        _sync()

    step()  # momentum buffers exist before the peak is taken: every later step looks like this one
    peak = peak_bytes(step, DEVICE)
    benchmark.group = f"train step T={T} batch {batch}"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _peaks[(row, batch)] = peak
    benchmark.extra_info.update(bench_info)
    benchmark.extra_info.update(row=row, batch=batch, T=T, device=DEVICE, peak_bytes=peak)
    lo, hi = BATCHES
    if (row, lo) in _peaks and (row, hi) in _peaks:
        slope = (_peaks[(row, hi)] - _peaks[(row, lo)]) / (hi - lo)
        benchmark.extra_info["bytes_per_sample"] = round(slope)
        ann = "ann_channels_last" if row.endswith("_channels_last") else "ann"  # the ANN in the same layout
        if (ann, lo) in _peaks and (ann, hi) in _peaks and row != ann:
            ann_slope = (_peaks[(ann, hi)] - _peaks[(ann, lo)]) / (hi - lo)
            benchmark.extra_info["over_ann"] = round(slope / ann_slope, 3)
