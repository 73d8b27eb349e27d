"""lasnn.profile on networks small enough to count by hand.

Network: conv 3x3 (1 -> 2 channels, padding 1, no bias) on a 4x4 image, LaSNN LIF, flatten, linear
32 -> 3. Conv channel 0 is the identity (centre tap 1), channel 1 is zero, so the neuron input is the
image itself. With V <- 0.5 V + X, threshold 1, hard reset, over T = 2 steps:
  pixel 1.5 fires at t=0 (H=1.5) and t=1 (H=1.5 after reset): 2 spikes;
  pixel 0.8 stays below at t=0 (H=0.8) and fires at t=1 (H=0.4+0.8=1.2): 1 spike;
  pixel 0 never fires. Channel 1 never fires.
Four 1.5-pixels and four 0.8-pixels: 4*2 + 4*1 = 12 spikes over 2 steps x 32 neurons -> rate 12/64.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lasnn
from lasnn.profile import E_AC_PJ, E_MAC_PJ


@pytest.fixture(autouse=True, scope="module")
def _one_intraop_thread():
    # tiny nets: a second intra-op thread only spin-waits on a loaded 2-core box (see test_spikify.py)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

T = 2
CONV_MACS = 32 * 1 * 9  # 2x4x4 outputs, 1 input channel, 3x3 kernel (padding taps counted, as usual)
RATE = 12 / 64


def _image() -> torch.Tensor:
    x = torch.zeros(1, 1, 4, 4)
    for r, c in ((0, 0), (0, 2), (2, 0), (2, 2)):  # one 1.5 and one 0.8 in every 2x2 block
        x[0, 0, r, c] = 1.5
        x[0, 0, r + 1, c + 1] = 0.8
    return x


def _net(pool: bool) -> nn.Sequential:
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
    layers = [conv, nn.ReLU()] + ([nn.AvgPool2d(2)] if pool else []) + [nn.Flatten(), nn.Linear(8 if pool else 32, 3,
                                                                                                  bias=False)]
    return nn.Sequential(*layers)


def _rows(p):
    return {r.name: r for r in p.layers}


def test_hand_counted_direct_encoding():
    snn = lasnn.spikify(_net(pool=False), T=T)
    p = lasnn.profile(snn, _image().repeat(2, 1, 1, 1))  # two identical samples: numbers are per sample
    rows = _rows(p)
    assert list(rows) == ["0", "1", "3"]  # conv, neuron, linear in execution order
    conv, neuron, fc = rows["0"], rows["1"], rows["3"]
    # first layer: analog input, the same at every step (direct encoding) -> its MACs once, at 4.6 pJ
    assert (conv.input, conv.macs, conv.steps, conv.mac_ops, conv.sops) == ("analog", CONV_MACS, 1, CONV_MACS, 0)
    assert conv.energy_pj == pytest.approx(CONV_MACS * E_MAC_PJ)
    assert neuron.kind == "neuron" and neuron.firing_rate == pytest.approx(RATE)
    # linear: spike input, SOPs = rate x T x MACs = 12/64 * 2 * 96 = 36 accumulates at 0.9 pJ
    assert (fc.input, fc.macs) == ("spikes", 96)
    assert fc.firing_rate == pytest.approx(RATE)
    assert fc.sops == pytest.approx(36.0)
    assert fc.energy_pj == pytest.approx(36.0 * E_AC_PJ)
    assert p.energy_pj == pytest.approx(CONV_MACS * 4.6 + 36 * 0.9)  # 1357.2 pJ
    assert p.ann_energy_pj == pytest.approx((CONV_MACS + 96) * 4.6)  # 1766.4 pJ
    assert p.totals["firing_rate"] == pytest.approx(RATE)
    assert p.firing_rates == {"1": pytest.approx(RATE)}
    assert p.totals["sops"] == pytest.approx(36.0) and p.totals["mac_ops"] == CONV_MACS
    custom = lasnn.profile(snn, _image(), e_mac_pj=1.0, e_ac_pj=0.0)  # energies are parameters, not constants
    assert custom.energy_pj == pytest.approx(CONV_MACS) and custom.ann_energy_pj == pytest.approx(CONV_MACS + 96)
    text = str(p)
    assert "total" in text and "1.36nJ" in text and "1.77nJ" in text
    json.dumps(p.to_dict())


def test_hand_counted_average_pooled_spikes():
    # after a 2x2 average pool the linear layer reads spike *rates*: per block 1 spike of 4 at t=0 (0.25)
    # and 2 of 4 at t=1 (0.5); channel 1 is 0. Mean over 2 steps x 8 inputs = (4*.25 + 4*.5) / 16 = 12/64.
    p = lasnn.profile(lasnn.spikify(_net(pool=True), T=T), _image())
    fc = _rows(p)["4"]
    assert fc.input == "rates" and fc.macs == 24
    assert fc.firing_rate == pytest.approx(RATE)
    assert fc.sops == pytest.approx(RATE * T * 24)  # 9


def test_hand_counted_encoded_inputs():
    snn = lasnn.spikify(_net(pool=False), T=T)
    # already-encoded binary input: the first layer is spike driven too. 4 ones at t=0, 8 at t=1 of 16
    spikes = torch.zeros(T, 1, 1, 4, 4)
    spikes[0].view(-1)[:4] = 1
    spikes[1].view(-1)[:8] = 1
    conv = _rows(lasnn.profile(snn, spikes))["0"]
    assert conv.input == "spikes" and conv.firing_rate == pytest.approx(12 / 32)
    assert conv.sops == pytest.approx(12 / 32 * T * CONV_MACS) and conv.mac_ops == 0  # 216
    # analog input that changes over time: real MACs at every step
    varying = torch.stack([_image(), 2 * _image()])
    conv = _rows(lasnn.profile(snn, varying))["0"]
    assert (conv.input, conv.steps, conv.mac_ops) == ("analog", T, T * CONV_MACS)
    # Poisson encoding: the encoder's spikes drive the first layer
    psnn = lasnn.spikify(_net(pool=False), T=8, encoding="poisson", seed=0)
    enc = lasnn.spikify(_net(pool=False), T=8, encoding="poisson", seed=0).encode(_image())
    conv = _rows(lasnn.profile(psnn, _image()))["0"]
    assert conv.input == "spikes" and conv.firing_rate == pytest.approx(enc.mean().item())


def test_transformed_input_before_the_first_neuron_is_analog():
    # forward code that scales the image first: the conv reads a new tensor whose values lie in [0, 1],
    # but nothing has spiked yet, so it is analog input (MACs once: constant over time), not spike rates.
    class Scaled(nn.Sequential):
        def forward(self, x):
            return super().forward(0.5 * x)

    p = lasnn.profile(lasnn.spikify(Scaled(*_net(pool=False)), T=T), _image())
    conv = _rows(p)["0"]
    assert (conv.input, conv.firing_rate, conv.steps, conv.sops, conv.mac_ops) == ("analog", None, 1, 0, CONV_MACS)


def test_ann_profile_counts_all_macs():
    p = lasnn.profile(_net(pool=False), _image())
    assert [r.input for r in p.layers] == ["analog", "analog"]
    assert p.energy_pj == pytest.approx((CONV_MACS + 96) * E_MAC_PJ) == pytest.approx(p.ann_energy_pj)
    assert "ANN" in str(p)


def test_reused_module_mode_restored_and_stats_untouched():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
            self.act = nn.ReLU()
            self.fc = nn.Linear(64, 2)

        def forward(self, x):
            return self.fc(self.act(self.conv2(self.act(self.bn(self.conv1(x))))).flatten(1))

    snn = lasnn.spikify(Reuse(), T=3).train()
    stats = snn.body.bn.running_mean.clone()
    p = lasnn.profile(snn, torch.randn(2, 1, 4, 4))
    assert [r.name for r in p.layers] == ["conv1", "act", "conv2", "act#2", "fc"]
    assert snn.training and torch.equal(snn.body.bn.running_mean, stats)


def test_bad_input():
    snn = lasnn.spikify(_net(pool=False), T=T)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        lasnn.profile("net", _image())
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        lasnn.profile(snn, [[1.0]])
    with pytest.raises(ValueError, match="dims"):
        lasnn.profile(snn, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="at least one sample"):
        lasnn.profile(snn, torch.zeros(0, 1, 4, 4))
    with pytest.raises(ValueError, match="e_mac_pj must be >= 0"):
        lasnn.profile(snn, _image(), e_mac_pj=-1.0)
    with pytest.raises(TypeError, match="e_ac_pj must be a float"):
        lasnn.profile(snn, _image(), e_ac_pj="0.9")


def _neurobench_synops(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """NeuroBench's own SynapticOperations on ``model(x)``: its layer hooks on every conv/linear."""
    import types

    from neurobench.blocks.layer import STATELESS_LAYERS
    from neurobench.hooks.layer import LayerHook
    from neurobench.metrics.workload import SynapticOperations

    # what SynapticOperations reads of a NeuroBenchModel
    wrapped = types.SimpleNamespace(
        connection_hooks=[LayerHook(m) for m in model.modules() if isinstance(m, STATELESS_LAYERS)])
    with torch.no_grad():
        model(x)
        out = SynapticOperations()(wrapped, None, (x, None))
    for h in wrapped.connection_hooks:
        h.close()
    return out


@pytest.mark.parametrize("name,kw", [("fashion_cnn_small", {}), ("mnist1d_cnn_small", {}), ("digits_cnn", {}),
                                     ("resnet20", {"width": 0.25})])
def test_neurobench_convention_equals_neurobench(name, kw):
    pytest.importorskip("neurobench", reason="NeuroBench not installed (pip install neurobench)")
    from lasnn.models import create, model_info

    torch.manual_seed(0)
    ann = create(name, **kw).eval()
    x = 10 * torch.randn(4, *model_info(name).input_shape)  # strong input: the spiking layers do fire
    snn = lasnn.spikify(ann, T=4).eval()
    for model in (snn, ann):
        p = lasnn.profile(model, x, convention="neurobench")
        assert p.neurobench() == _neurobench_synops(model, x), (name, type(model).__name__)
    if name in ("mnist1d_cnn_small", "resnet20"):  # a conv reads spikes directly (elsewhere pooled spikes: MACs)
        assert lasnn.profile(snn, x, convention="neurobench").neurobench()["Effective_ACs"] > 0


def test_neurobench_convention_closed_form():
    # one linear layer, weights with zeros, binary input: ops = nonzero (input, weight) pairs
    lin = nn.Linear(4, 3, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    spikes = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    nb = lasnn.profile(lin, spikes, convention="neurobench").neurobench()
    # sample 1: columns 0, 2 -> 2 + 1 + 2 = 5; sample 2: all -> 2 + 2 + 4 = 8; per sample 6.5
    assert nb == {"Effective_MACs": 0.0, "Effective_ACs": 6.5, "Dense": 12.0}
    analog = lasnn.profile(lin, spikes * 0.5, convention="neurobench").neurobench()
    assert analog == {"Effective_MACs": 6.5, "Effective_ACs": 0.0, "Dense": 12.0}
    with pytest.raises(ValueError, match="convention must be one of"):
        lasnn.profile(lin, spikes, convention="nb")
    with pytest.raises(ValueError, match="take the profile with"):
        lasnn.profile(lin, spikes).neurobench()
