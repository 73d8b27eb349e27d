"""ANN-to-SNN conversion (lasnn.convert), QCFS, and the one-pass latency curve (issue 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import lasnn
from lasnn.convert import ConvertedSNN, IFNeuron, calibrate_thresholds, fold_batchnorm
from lasnn.nn import QCFS
from lasnn.nn.spikify import spikify
from lasnn.reference.lif import lif_reference


def _digits_cnn(act=nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), act(), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), act(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )


def _train(model: nn.Module, ds, epochs: int, lr: float = 1e-2) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = ds.loader("train", 64, seed=0)
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def _ann_accuracy(model: nn.Module, loader) -> float:
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


@pytest.fixture(scope="module")
def digits():
    from lasnn.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = _train(_digits_cnn(), digits, epochs=6)
    return model, _ann_accuracy(model, digits.loader("test", 512))


def _calib(ds, n=4):
    return [b for _, b in zip(range(n), ds.loader("train", 128, train=False), strict=False)]


def _bn_net() -> nn.Module:
    torch.manual_seed(1)
    net = _digits_cnn()
    net.train()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for _ in range(3):
            net(torch.randn(32, 1, 8, 8) * 2 + 0.5)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


# --- batch-norm folding -------------------------------------------------------------------------------------------


def test_fold_batchnorm_is_exact_in_eval_mode():
    net = _bn_net().double()
    folded, pairs = fold_batchnorm(net)
    assert pairs == [("0", "1"), ("4", "5")]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules()), "the input model must be left untouched"
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def resnet18():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=10)
    net.train()
    with torch.no_grad():
        net(torch.randn(4, 3, 32, 32))  # running statistics away from (0, 1)
    return net.eval()


def test_fold_batchnorm_torchvision_resnet(resnet18):
    net = resnet18
    folded, pairs = fold_batchnorm(net)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert len(pairs) == n_bn == 20
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)


# --- calibration and neurons --------------------------------------------------------------------------------------


def test_thresholds_are_percentile_and_max_of_positive_activations():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 50), nn.ReLU(), nn.Linear(50, 3)).eval()
    xs = [torch.randn(100, 6) for _ in range(3)]
    with torch.no_grad():
        a = torch.cat([net[1](net[0](x)) for x in xs]).numpy()
    pos = a[a > 0]
    rob = calibrate_thresholds(net, xs, method="robust", percentile=99.0)
    mx = calibrate_thresholds(net, [(x, None) for x in xs], method="max")
    assert rob["1"][0] == pytest.approx(float(np.percentile(pos, 99.0)), rel=1e-6)
    assert mx["1"][0] == pytest.approx(float(pos.max()), rel=1e-6)


def test_if_neuron_matches_reference_soft_reset_if():
    torch.manual_seed(0)
    x = torch.randn(13, 5, 7) * 2
    n = IFNeuron([1.7], initial_membrane=0.5)
    out, v = n.forward_stateful(x, None)
    ref_s, ref_v = lif_reference(x, torch.full((5, 7), 0.85), tau=math.inf, v_threshold=1.7, v_reset=None)
    torch.testing.assert_close(out, ref_s * 1.7)
    torch.testing.assert_close(v, ref_v)


def test_shared_activation_gets_one_threshold_per_call_site(resnet18):
    net = resnet18
    calib = [torch.randn(4, 3, 32, 32)]
    snn = lasnn.convert(net, calib, T=2)
    th = snn.thresholds()
    assert len(th["layer1.0.relu"]) == 2 and len(th["relu"]) == 1  # BasicBlock calls its relu twice
    out = snn(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert 0 <= snn.firing_rate() <= 1


# --- conversion accuracy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,membrane", [("robust", 0.5), ("max", 0.0)], ids=["robust", "classic"])
def test_conversion_reaches_ann_accuracy_as_T_grows(digits, trained, method, membrane):
    ann, ann_acc = trained
    assert ann_acc > 0.9, "the fixture ANN did not train"
    snn = lasnn.convert(ann, _calib(digits), method=method, initial_membrane=membrane)
    assert isinstance(snn, ConvertedSNN)
    curve = lasnn.accuracy_vs_timesteps(snn, digits.loader("test", 512), T_max=128)
    assert sorted(curve) == list(range(1, 129))
    assert curve[128] >= ann_acc - 0.02
    assert curve[128] > curve[1] + 0.1  # latency matters: one step is far from the ANN
    assert max(curve[t] for t in range(96, 129)) - min(curve[t] for t in range(96, 129)) <= 0.02


def test_robust_is_faster_than_classic(digits, trained):
    ann, _ = trained
    rob = lasnn.convert(ann, _calib(digits), method="robust", initial_membrane=0.5)
    cls = lasnn.convert(ann, _calib(digits), method="max", initial_membrane=0.0)
    loader = digits.loader("test", 512)
    c_r = lasnn.accuracy_vs_timesteps(rob, loader, T_max=8)
    c_c = lasnn.accuracy_vs_timesteps(cls, loader, T_max=8)
    assert c_r[4] > c_c[4]


# --- one-pass curve -----------------------------------------------------------------------------------------------


def test_one_pass_curve_equals_separate_runs():
    net = _bn_net().double()
    torch.manual_seed(2)
    x = torch.randn(64, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[::5] = (y[::5] + 1) % 10  # not every label agrees with the ANN
    snn = lasnn.convert(net, [x[:32]], method="robust")
    loader = [(x[:40], y[:40]), (x[40:], y[40:])]
    curve = lasnn.accuracy_vs_timesteps(snn, loader, T_max=40, chunk=7)  # chunks do not divide T
    # the automatic chunk (CPU: chunk x batch <= 1024 samples, here 25 steps of 40, then 32 of 24) and one
    # chunk per step give the same curve
    assert lasnn.accuracy_vs_timesteps(snn, loader, T_max=40) == curve
    assert lasnn.accuracy_vs_timesteps(snn, loader, T_max=40, chunk=1) == curve
    with torch.no_grad():
        for T in (1, 3, 7, 8, 25, 40):
            snn.T = T
            separate = sum(int((snn(xb).argmax(1) == yb).sum()) for xb, yb in loader) / 64
            assert curve[T] == separate, T
        # the streamed per-step outputs are the unchunked ones, step for step
        snn.T = 40
        full = snn(x, return_steps=True)
        with snn.streaming():
            snn.T = 7
            parts = [snn(x, return_steps=True) for _ in range(6)]
        torch.testing.assert_close(torch.cat(parts)[:40], full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 3])
def test_curve_stops_once_it_reaches_stop_at_with_the_full_curves_values(chunk):
    """stop_at: every batch advances through horizons 1, 2, 4, ...; the curve ends at the first horizon with a
    T reaching the target, and its values are exactly the full curve's (batches of unequal size, state kept)."""
    from lasnn.convert.report import t_to_match

    net = _bn_net()
    torch.manual_seed(3)
    x = torch.randn(150, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[::6] = (y[::6] + 1) % 10
    snn = lasnn.convert(net, [x[:64]], method="max", initial_membrane=0.0)
    loader = [(x[:64], y[:64]), (x[64:128], y[64:128]), (x[128:], y[128:])]
    full = lasnn.accuracy_vs_timesteps(snn, loader, T_max=48, chunk=chunk)
    levels = sorted(set(full.values()))
    targets = [0.0, levels[len(levels) // 3], levels[2 * len(levels) // 3], max(full.values()), 1.0]
    lengths = []
    for target in targets:
        part = lasnn.accuracy_vs_timesteps(snn, loader, T_max=48, chunk=chunk, stop_at=target)
        m = t_to_match(full, target)
        # horizons 1, 2, 4, ..., 32, then every 32 steps, T_max last: here 1, 2, 4, 8, 16, 32, 48
        horizon = 48 if m is None else min(48, 1 << (m - 1).bit_length() if m <= 32 else 32 * -(-m // 32))
        assert list(part) == list(range(1, horizon + 1)), target
        assert part == {t: full[t] for t in part}, target
        lengths.append(horizon)
    assert lengths[0] == 1 and lengths[-1] == 48 and len(set(lengths)) >= 3  # the targets spread the horizons
    # a target known only from the 4th horizon on (a function returning None before): the sweep goes on until then
    asked = []

    def late() -> float | None:
        asked.append(len(asked))
        return 0.0 if len(asked) >= 4 else None

    part = lasnn.accuracy_vs_timesteps(snn, loader, T_max=48, chunk=chunk, stop_at=late)
    assert list(part) == list(range(1, 9)) and part == {t: full[t] for t in part} and len(asked) == 4
    with pytest.raises(ValueError, match="stop_at must be None, an accuracy in"):
        lasnn.accuracy_vs_timesteps(snn, loader, T_max=48, stop_at=lambda: 2.0)
    assert not snn.neurons()[0]._streaming  # the streaming block ended


def test_sweep_horizons_double_to_32_then_grow_by_32():
    from lasnn.convert.latency import sweep_horizons

    assert sweep_horizons(1) == [1]
    assert sweep_horizons(5) == [1, 2, 4, 5]
    assert sweep_horizons(32) == [1, 2, 4, 8, 16, 32]
    assert sweep_horizons(100) == [1, 2, 4, 8, 16, 32, 64, 96, 100]
    assert sweep_horizons(256) == [1, 2, 4, 8, 16, 32, *range(64, 257, 32)]
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="T_max must be an int >= 1"):
            sweep_horizons(bad)


def test_stream_state_snapshots_and_restores_membranes():
    torch.manual_seed(0)
    snn = spikify(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), T=3,
                  neuron=lasnn.nn.LIF(tau=2.0, v_threshold=0.5))
    a, b = torch.randn(5, 6), torch.randn(5, 6)
    with torch.no_grad():
        ref = snn(a.expand(6, 5, 6), return_steps=True)[3:]  # steps 3..5 of one 6-step run of a
        with snn.streaming():
            snn(a)
            saved = snn.stream_state()
            snn.reset_state()
            snn(b)  # another sequence in between
            snn(b)
            snn.load_stream_state(saved)
            out = snn(a, return_steps=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="needs a streaming"):
        snn.stream_state()
    with pytest.raises(RuntimeError, match="needs a streaming"):
        snn.load_stream_state(saved)
    with snn.streaming(), pytest.raises(ValueError, match="one per spiking site"):
        snn.load_stream_state([saved[0], saved[0]])
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="stop_at must be None, an accuracy in"):
            lasnn.accuracy_vs_timesteps(snn, [(a, torch.zeros(5, dtype=torch.long))], T_max=4, stop_at=bad)

    class Plain(nn.Module):  # streams (reset/simulate) but cannot save its state
        def reset(self) -> None:
            pass

        def simulate(self, x: torch.Tensor, steps: int) -> torch.Tensor:
            return torch.zeros(steps, x.shape[0], 3)

    loader = [(a, torch.zeros(5, dtype=torch.long))]
    assert lasnn.accuracy_vs_timesteps(Plain(), loader, T_max=4, device="cpu") == {t: 1.0 for t in range(1, 5)}
    with pytest.raises(TypeError, match="stream_state"):
        lasnn.accuracy_vs_timesteps(Plain(), loader, T_max=4, device="cpu", stop_at=0.5)


def test_curve_of_a_spikified_lif_snn():
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12, 4))
    snn = spikify(ann, T=4, neuron=lasnn.nn.LIF(tau=2.0, v_threshold=0.5))
    x = torch.randn(50, 1, 12)
    y = torch.randint(0, 4, (50,))
    curve = lasnn.accuracy_vs_timesteps(snn, [(x, y)], T_max=9, chunk=2)
    for T in (1, 4, 9):
        snn.T = T
        with torch.no_grad():
            assert curve[T] == int((snn(x).argmax(1) == y).sum()) / 50, T
    assert snn.T == 9  # the last assignment above; the curve itself restored T afterwards


# --- QCFS ---------------------------------------------------------------------------------------------------------


def test_qcfs_levels_and_straight_through_gradients():
    q = QCFS(levels=4, init_clip=2.0)
    x = torch.tensor([-1.0, 0.0, 0.24, 0.26, 0.7, 1.9, 3.0], requires_grad=True)
    h = q(x)
    torch.testing.assert_close(h.detach(), torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5, 2.0, 2.0]))
    h.sum().backward()
    # dh/dx = 1 strictly between the bottom and top levels, else 0
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]))
    # dh/dλ: y - x/λ inside (x = 0.26, 0.7 are both on level y = 1/4), 1 for each of the two clipped elements
    torch.testing.assert_close(q.clip.grad, torch.tensor((0.25 - 0.13) + (0.25 - 0.35) + 2.0))


def test_qcfs_single_layer_converts_exactly_at_T_equals_L():
    """One QCFS layer: IF neurons (θ = λ, membrane θ/2) over T = L steps fire exactly floor(x·L/λ + 1/2) times."""
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(5, 30), QCFS(levels=8, init_clip=1.5), nn.Linear(30, 4)).double().eval()
    x = torch.randn(64, 5, dtype=torch.float64)
    snn = lasnn.convert(ann, [x], method="qcfs", T=8)
    assert snn.thresholds() == {"1": [1.5]}
    with torch.no_grad():
        torch.testing.assert_close(snn(x), ann(x), rtol=1e-10, atol=1e-10)


def test_qcfs_trains_and_converts(digits):
    torch.manual_seed(0)
    ann = _train(_digits_cnn(lambda: QCFS(levels=4, init_clip=4.0)), digits, epochs=3)
    clips = [m.clip.item() for m in ann.modules() if isinstance(m, QCFS)]
    assert clips != [4.0, 4.0]  # λ is trained
    ann_acc = _ann_accuracy(ann, digits.loader("test", 512))
    assert ann_acc > 0.85
    snn = lasnn.convert(ann, None, method="qcfs")
    curve = lasnn.accuracy_vs_timesteps(snn, digits.loader("test", 512), T_max=32)
    assert curve[32] >= ann_acc - 0.03
    assert snn.thresholds() == {"2": [clips[0]], "6": [clips[1]]}


# --- bad input ----------------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(trained, digits):
    ann, _ = trained
    calib = _calib(digits, 1)
    with pytest.raises(ValueError, match="no activation module"):
        lasnn.convert(nn.Sequential(nn.Linear(4, 2)), [torch.randn(2, 4)])
    with pytest.raises(ValueError, match=r"no .*batches"):
        lasnn.convert(ann, [])
    with pytest.raises(ValueError, match="calib_loader is required"):
        lasnn.convert(ann, None)
    with pytest.raises(ValueError, match="method must be one of"):
        lasnn.convert(ann, calib, method="nope")
    with pytest.raises(ValueError, match="initial_membrane"):
        lasnn.convert(ann, calib, initial_membrane=1.5)
    with pytest.raises(ValueError, match="QCFS"):
        lasnn.convert(ann, calib, method="qcfs")
    with pytest.raises(ValueError, match="percentile"):
        lasnn.convert(ann, calib, percentile=0)

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.act(self.fc1(x))))

    with pytest.raises(ValueError, match="ReLU as a function"):
        lasnn.convert(Functional(), [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="cannot represent"):
        lasnn.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.GELU(), nn.Linear(4, 2)), [torch.randn(2, 4)])
    snn = lasnn.convert(ann, calib)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="T_max"):
            lasnn.accuracy_vs_timesteps(snn, digits.loader("test", 512), T_max=bad)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="chunk must be None or an int"):
            lasnn.accuracy_vs_timesteps(snn, digits.loader("test", 512), T_max=4, chunk=bad)
    with pytest.raises(ValueError, match=r"no .*batches"):
        lasnn.accuracy_vs_timesteps(snn, [], T_max=4)
    with pytest.raises(TypeError, match="cannot stream"):
        lasnn.accuracy_vs_timesteps(ann, digits.loader("test", 512), T_max=4)
    with pytest.raises(ValueError, match="levels"):
        QCFS(levels=0)


def test_if_neuron_counts_spikes_exactly_and_scales_in_place_only_without_grad():
    torch.manual_seed(0)
    n = IFNeuron([0.3], 0.5)
    x = torch.rand(3, 2, 5) * 0.6
    with torch.no_grad():
        out = n(x)
    s, _ = lasnn.lif(x, torch.full_like(x[0], 0.15), tau=math.inf, v_threshold=0.3, v_reset=None, return_v=True)
    assert torch.equal(out, s * 0.3)
    assert float(n.spikes) == float(s.sum()) and n.neuron_steps == s.numel()
    # with a gradient to carry, the output is a new tensor and the gradient reaches the input
    xg = x.clone().requires_grad_(True)
    n._call = 0
    out = n(xg)
    assert out.requires_grad and torch.equal(out.detach(), s * 0.3)
    out.sum().backward()
    assert xg.grad is not None
