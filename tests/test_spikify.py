"""spikify, encoders and feature taps: shapes, spikes, gradients, equality with hand-written SNNs.

The hand-written SNNs run one time step at a time with explicit membranes, through the LIF oracle
(lasnn/reference/lif.py) and the ANN's own conv/BN/linear modules: they share nothing with spikify's
time folding, so agreement checks folding, neuron placement, weight copying and state handling.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lasnn
from lasnn.models import create, model_info
from lasnn.nn import IF, LIF, SNN, DirectEncoder, FoldedNeuron, PoissonEncoder, default_neuron, spikify
from lasnn.nn.spikify import AnalogActivationWarning
from lasnn.reference.lif import lif_reference


@pytest.fixture(autouse=True, scope="module")
def _one_intraop_thread():
    # These nets are tiny: with 2 intra-op threads on a loaded 2-core box the OpenMP workers mostly
    # spin-wait (measured: 25 s -> 10 s CPU for the three issue-4 test files). Same work, one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ----------------------------------------------------------------------------------------------- helpers


def _lif_step(x: torch.Tensor, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the LaSNN neuron (tau 2, decay_input False, hard reset 0, triangle α=1) via the oracle."""
    s, v = lif_reference(
        x.unsqueeze(0), v, tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=False, surrogate="triangle", alpha=1.0
    )
    return s[0], v


def _calibrated(
    name: str, width: float, dtype: torch.dtype = torch.float64, seed: int = 0, shape: tuple[int, ...] | None = None
) -> nn.Module:
    """A zoo ANN whose BN statistics come from one batch (of ``shape``, default the design input) and whose BN
    shift is 0.5, so that every layer of the SNN fires at a moderate rate (with fresh BN stats deep layers of
    an untrained SNN fall silent and an equality test would compare zeros)."""
    torch.manual_seed(seed)
    m = create(name, width=width).to(dtype)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = None
            nn.init.constant_(mod.bias, 0.5)
    with torch.no_grad():
        m.train()(torch.randn(8, *(shape or model_info(name).input_shape), dtype=dtype))
    return m.eval()


def _handwritten_stagecnn(ann, x: torch.Tensor, T: int):
    """Per-step SNN over a StageCNN's own modules: returns (logits [T, B, K], {stage: [T, B, C, ...]})."""
    state: dict = {}
    outs, stages = [], {k: [] for k in ann.feature_layers}
    for _ in range(T):
        h = x
        for i in range(ann.num_stages):
            for j, m in enumerate(getattr(ann, f"stage{i + 1}")):
                if isinstance(m, nn.ReLU):
                    h, state[(i, j)] = _lif_step(h, state.get((i, j)))
                else:
                    h = m(h)
            stages[f"stage{i + 1}"].append(h)
            if i + 1 < ann.num_stages:
                h = getattr(ann, f"pool{i + 1}")(h)
        outs.append(ann.fc(ann.flatten(ann.head_pool(h))))
    return torch.stack(outs), {k: torch.stack(v) for k, v in stages.items()}


def _handwritten_resnet(ann, x: torch.Tensor, T: int):
    """Per-step SNN over a CifarResNet's own modules (residual additions, optional hidden FC)."""
    state: dict = {}

    def neuron(key, h):
        s, state[key] = _lif_step(h, state.get(key))
        return s

    outs, stages = [], {k: [] for k in ann.feature_layers}
    for _ in range(T):
        h = neuron("stem", ann.bn1(ann.conv1(x)))
        for i in range(ann.num_stages):
            for j, blk in enumerate(getattr(ann, f"layer{i + 1}")):
                o = neuron((i, j, 1), blk.bn1(blk.conv1(h)))
                h = neuron((i, j, 2), blk.bn2(blk.conv2(o)) + blk.shortcut(h))
            stages[f"layer{i + 1}"].append(h)
        h = ann.flatten(ann.avgpool(h))
        if isinstance(ann.fc_hidden, nn.Linear):
            h = neuron("fc", ann.fc_hidden(h))
        outs.append(ann.fc(h))
    return torch.stack(outs), {k: torch.stack(v) for k, v in stages.items()}


def _neuron_outputs(snn: SNN, x: torch.Tensor) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    hs = [n.register_forward_hook(lambda m, a, o: outs.append(o.detach())) for n in snn.neurons()]
    try:
        snn(x)
    finally:
        for h in hs:
            h.remove()
    return outs


def _assert_binary(t: torch.Tensor) -> None:
    assert bool(((t == 0) | (t == 1)).all()), "non-binary spikes"


# ------------------------------------------------------------------------ equality with hand-written SNNs


# The CIFAR ResNets run on 8x8 images: every stage (down to 2x2), residual addition and shortcut is
# still exercised, at 1/16 of the 32x32 cost.
@pytest.mark.parametrize(
    ("name", "width", "shape", "handwritten"),
    [
        ("digits_cnn_small", 1.0, (1, 8, 8), _handwritten_stagecnn),
        ("mnist1d_cnn_small", 0.5, (1, 40), _handwritten_stagecnn),
        ("resnet20", 0.5, (3, 8, 8), _handwritten_resnet),
        ("resnet19", 0.0625, (3, 8, 8), _handwritten_resnet),
    ],
    ids=["digits-2d", "mnist1d-1d", "resnet20-residual", "resnet19-hiddenfc"],
)
def test_matches_handwritten_snn(name, width, shape, handwritten):
    ann = _calibrated(name, width, shape=shape)
    T, B = 3, 3
    x = 2 * torch.randn(B, *shape, dtype=torch.float64)
    snn = spikify(ann, T=T)
    with torch.no_grad():
        want_steps, want_stages = handwritten(ann, x, T)
        steps, stages = lasnn.features(snn, x, return_output=True, return_steps=True)
        mean = snn(x)
    assert steps.shape == (T, B, 10)
    torch.testing.assert_close(steps, want_steps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, want_steps.mean(0), rtol=1e-12, atol=1e-12)
    assert list(stages) == list(ann.feature_layers)
    for k, v in stages.items():
        assert torch.equal(v, want_stages[k]), k
        rate = v.mean().item()
        assert 0.02 < rate < 0.98, f"{k}: firing rate {rate} makes the comparison weak"


def test_T1_is_a_threshold_network():
    # At T=1 the membrane starts at 0, so H = X and S = [X >= 1]: the SNN is the ANN with ReLU -> step.
    class Step(nn.Module):
        def forward(self, x):
            return (x >= 1).to(x.dtype)

    ann = _calibrated("digits_cnn", 1.0)
    x = 2 * torch.randn(4, 1, 8, 8, dtype=torch.float64)
    snn = spikify(ann, T=1)
    stepped = spikify(ann, T=1, neuron=Step)  # any multi-step module works as a neuron
    ref = _handwritten_stagecnn(ann, x, 1)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(snn(x), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stepped(x), ref, rtol=1e-12, atol=1e-12)
        assert snn(x, return_steps=True).shape == (1, 4, 10)


# --------------------------------------------------------------------------------- torchvision models


@pytest.fixture(scope="module")
def tv_models():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return {
        "resnet18": torchvision.models.resnet18(num_classes=10),
        "vgg11_bn": torchvision.models.vgg11_bn(num_classes=10),
    }


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_torchvision_shapes_spikes_gradients(tv_models, arch):
    ann = tv_models[arch]
    before = {k: v.clone() for k, v in ann.state_dict().items()}
    n_relu = sum(isinstance(m, nn.ReLU) for m in ann.modules())
    # copy=False keeps the 100M-parameter VGG classifier shared instead of copied (fast); ANN untouched below
    snn = spikify(ann, T=2, copy=False)
    assert sum(isinstance(m, nn.ReLU) for m in snn.body.modules()) == 0
    assert len(snn.neurons()) == n_relu
    # resnet18 downsamples 32x: 16x16 is its smallest input that keeps every stage; VGG needs 32x32
    x = torch.randn(2, 3, 16, 16) if arch == "resnet18" else torch.randn(2, 3, 32, 32)
    snn.train()
    outs: list[torch.Tensor] = []  # one forward + backward only: these nets are the slow part of the file
    hooks = [n.register_forward_hook(lambda m, a, o: outs.append(o.detach())) for n in snn.neurons()]
    steps = snn(x, return_steps=True)
    for h in hooks:
        h.remove()
    assert steps.shape == (2, 2, 10)
    steps.mean(0).square().sum().backward()
    first = snn.body.conv1 if arch == "resnet18" else snn.body.features[0]
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    # torchvision's BasicBlock calls one ReLU twice: every call is a separate multi-step run
    assert len(outs) >= len(snn.neurons())
    for o in outs:
        _assert_binary(o)
    assert any(o.sum() > 0 for o in outs)
    # the ANN still has its ReLUs; only BN running stats moved (shared buffers, copy=False)
    assert sum(isinstance(m, nn.ReLU) for m in ann.modules()) == n_relu
    for k, v in ann.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), k
    ann.load_state_dict(before)
    ann.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("arch", "sites", "channels"), [("resnet34", 17, [64, 128, 256, 512]),
                                                    ("vgg16_bn", 15, [64, 128, 256, 512, 512])])
def test_torchvision_deeper_models_on_meta(arch, sites, channels):
    # shapes only, on the meta device (no memory, no compute): the deeper torchvision nets run unmodified
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        snn = spikify(getattr(torchvision.models, arch)(num_classes=10), T=2)
        x = torch.empty(2, 3, 32, 32)
        out, feats = lasnn.features(snn, x, return_output=True, return_steps=True)
    assert len(snn.neurons()) == sites  # one ReLU module per BasicBlock (called twice) + stem / 13 convs + 2 FC
    assert out.shape == (2, 2, 10)
    assert [tuple(f.shape[:3]) for f in feats.values()] == [(2, 2, c) for c in channels]


def test_torchvision_features(tv_models):
    x = torch.randn(2, 3, 32, 32)
    r = tv_models["resnet18"].eval()
    x16 = x[:, :, :16, :16]
    with torch.no_grad():
        fa = lasnn.features(r, x16)
        fs = lasnn.features(spikify(r, T=2, copy=False).eval(), x16)
    assert {k: tuple(v.shape) for k, v in fa.items()} == {
        "layer1": (2, 64, 4, 4), "layer2": (2, 128, 2, 2), "layer3": (2, 256, 1, 1), "layer4": (2, 512, 1, 1)
    }
    assert {k: tuple(v.shape) for k, v in fs.items()} == {k: (2, *v.shape) for k, v in fa.items()}
    with torch.no_grad():
        fv = lasnn.features(tv_models["vgg11_bn"].eval(), x)
    assert [tuple(v.shape[1:]) for v in fv.values()] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4),
                                                         (512, 2, 2)]


# ------------------------------------------------------------------------------------- zoo and modes


@pytest.mark.parametrize("name", ["vgg11", "resnet20", "mnist1d_cnn"])
def test_zoo_shapes_spikes_and_gradients(name):
    torch.manual_seed(0)
    ann = create(name, width=0.125 if name == "vgg11" else 0.5)
    snn = spikify(ann, T=2).train()
    x = 2 * torch.randn(2, *model_info(name).input_shape)
    y = snn(x)
    assert y.shape == (2, 10)
    y.square().sum().backward()
    first = next(m for m in snn.body.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    for o in _neuron_outputs(snn, x):
        _assert_binary(o)
    # the ANN's own parameters got no gradient: weights were copied
    assert all(p.grad is None for p in ann.parameters())


def test_train_eval_and_no_state_between_calls():
    ann = _calibrated("digits_cnn_small", 1.0, torch.float32)
    snn = spikify(ann, T=4)
    x = 2 * torch.randn(5, 1, 8, 8)
    snn.eval()
    with torch.no_grad():
        a, b = snn(x), snn(x)
        first = snn(x[:2])
    assert torch.equal(a, b)  # nothing carried from call to call
    torch.testing.assert_close(first, a[:2])  # nor across batch sizes
    bn = snn.body.stage1[1]
    bn.momentum = 0.1  # _calibrated left it at None (cumulative average)
    ann_mean = ann.stage1[1].running_mean.clone()
    before = bn.running_mean.clone()
    snn.train()
    with torch.no_grad():
        t = snn(x)
    assert not torch.equal(t, a)  # train mode normalises with batch statistics
    # BN statistics are shared over time: one update from all T*B folded samples
    folded_in = ann.stage1[0](x.repeat(4, 1, 1, 1))
    want = 0.9 * before + 0.1 * folded_in.mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(ann.stage1[1].running_mean, ann_mean)  # the ANN is untouched (copy=True)


def test_copy_and_share():
    ann = create("digits_cnn_small")
    copied = spikify(ann, T=2)
    shared = spikify(ann, T=2, copy=False)
    assert copied.body.stage1[0].weight is not ann.stage1[0].weight
    assert torch.equal(copied.body.stage1[0].weight, ann.stage1[0].weight)
    assert shared.body.stage1[0].weight is ann.stage1[0].weight
    assert shared.body.stage1[1].running_var is ann.stage1[1].running_var
    assert isinstance(ann.stage1[2], nn.ReLU) and isinstance(shared.body.stage1[2], FoldedNeuron)


def test_neuron_choices():
    ann = create("digits_cnn_small")
    snn = spikify(ann, T=2)
    n = snn.neurons()[0].neuron
    d = default_neuron()
    assert isinstance(n, LIF) and (n.tau, n.decay_input, n.v_reset, n.surrogate, n.alpha) == (
        2.0, False, 0.0, "triangle", 1.0
    ) == (d.tau, d.decay_input, d.v_reset, d.surrogate, d.alpha)
    proto = IF(v_threshold=0.5)
    s2 = spikify(ann, T=2, neuron=proto)
    ns = [f.neuron for f in s2.neurons()]
    assert all(isinstance(m, IF) and m.v_threshold == 0.5 for m in ns)
    assert len({id(m) for m in ns}) == len(ns) and all(m is not proto for m in ns)  # one copy per site
    s3 = spikify(ann, T=2, neuron=lambda: LIF(tau=4.0))
    assert all(f.neuron.tau == 4.0 for f in s3.neurons())


def test_reference_backend_neuron():
    # lasnn.nn.LIF(backend="reference") inside spikify: same per-step logits as the hand-written oracle SNN,
    # streaming through lasnn.lif(..., backend="reference", return_v=True), and the same gradients as the
    # default backend (the C++ kernel here).
    ann = _calibrated("digits_cnn_small", 1.0)
    ref = spikify(ann, T=3, neuron=LIF(tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=False,
                                      surrogate="triangle", alpha=1.0, backend="reference"))
    dflt = spikify(ann, T=3)
    assert all(f.neuron.backend == "reference" for f in ref.neurons())
    x = 2 * torch.randn(3, 1, 8, 8, dtype=torch.float64)
    x_seq = x + torch.randn(5, 3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = _handwritten_stagecnn(ann, x, 3)[0]
        torch.testing.assert_close(ref(x, return_steps=True), want, rtol=1e-12, atol=1e-12)
        full = ref(x_seq, return_steps=True)
        with ref.streaming():
            parts = [ref(c, return_steps=True) for c in x_seq.split([2, 3])]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-12, atol=1e-12)
    grads = []
    for snn in (ref, dflt):
        snn.train()(x_seq).square().sum().backward()
        grads.append(snn.body.stage1[0].weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_encoded_input_and_streaming():
    ann = _calibrated("digits_cnn_small", 1.0)
    snn = spikify(ann, T=3)
    x = 2 * torch.randn(2, 1, 8, 8, dtype=torch.float64)
    x_seq = torch.randn(6, 2, 1, 8, 8, dtype=torch.float64) + x  # a time-varying encoded input
    with torch.no_grad():
        full = snn(x_seq, return_steps=True)  # encoded input: T taken from it (6, not snn.T)
        assert full.shape == (6, 2, 10)
        with snn.streaming():
            parts = [snn(c, return_steps=True) for c in x_seq.split([2, 1, 3])]
            snn.reset_state()
            again = snn(x_seq[:2], return_steps=True)
        after = snn(x_seq[:2], return_steps=True)
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again, full[:2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after, full[:2], rtol=1e-12, atol=1e-12)  # state dropped after the block
    # streaming on un-encoded input continues the same stimulus for another T steps
    with torch.no_grad():
        long = spikify(ann, T=6)(x, return_steps=True)
        with snn.streaming():
            two = torch.cat([snn(x, return_steps=True), snn(x, return_steps=True)])
    torch.testing.assert_close(two, long, rtol=1e-12, atol=1e-12)


def test_streaming_with_if_neurons():
    # IF is an LIF with tau = inf: streaming carries its membrane through lasnn.lif(..., return_v=True) too
    ann = _calibrated("digits_cnn_small", 1.0)
    snn = spikify(ann, T=4, neuron=IF(v_threshold=1.0, surrogate="triangle", alpha=1.0))
    x_seq = 2 * torch.randn(4, 2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        full = snn(x_seq, return_steps=True)
        with snn.streaming():
            parts = torch.cat([snn(c, return_steps=True) for c in x_seq.split(2)])
    torch.testing.assert_close(parts, full, rtol=1e-12, atol=1e-12)

    class OwnDynamics(LIF):  # a subclass's forward_stateful is used, not the plain LIF op
        def forward_stateful(self, x_seq, v_init):
            s, v = lasnn.lif(x_seq, v_init, tau=self.tau, return_v=True)
            return 2 * s, v

    s2 = spikify(ann, T=2, neuron=OwnDynamics())
    with torch.no_grad(), s2.streaming():
        outs = _neuron_outputs(s2, x_seq[0])
    assert outs and all(bool(((o == 0) | (o == 2)).all()) for o in outs) and any(o.max() == 2 for o in outs)

    # the neuron owns its state: streaming runs the LIF's own forward_stateful (no field list copied elsewhere)
    calls = []
    real = LIF.forward_stateful

    def spy(self, x_seq, v_init):
        calls.append(v_init is None)
        return real(self, x_seq, v_init)

    s3 = spikify(ann, T=2, neuron=LIF(tau=3.0, v_threshold=0.7, v_reset=None, decay_input=False, surrogate="atan"))
    try:
        LIF.forward_stateful = spy
        with torch.no_grad(), s3.streaming():
            s3(x_seq[:2], return_steps=True)
            s3(x_seq[2:], return_steps=True)
    finally:
        LIF.forward_stateful = real
    n_sites = len(s3.neurons())
    assert calls == [True] * n_sites + [False] * n_sites


def test_streaming_rejects_changed_batch_and_stateless_neuron():
    snn = spikify(create("digits_cnn_small"), T=2)
    with snn.streaming(), torch.no_grad():
        snn(torch.randn(2, 1, 8, 8))
        with pytest.raises(ValueError, match="batch size"):
            snn(torch.randn(3, 1, 8, 8))

    class Plain(nn.Module):
        def forward(self, x):
            return (x > 0).float()

    s2 = spikify(create("digits_cnn_small"), T=2, neuron=Plain)
    with s2.streaming(), pytest.raises(TypeError, match="forward_stateful"):
        s2(torch.randn(2, 1, 8, 8))


# ------------------------------------------------------------------------------------------- encoders


def test_direct_encoder():
    x = torch.randn(3, 4)
    y = DirectEncoder(5)(x)
    assert y.shape == (5, 3, 4) and all(torch.equal(y[t], x) for t in range(5))


def test_poisson_encoder_seeding_and_rates():
    x = torch.rand(4, 1, 8, 8) * 3 - 1
    a, b = PoissonEncoder(8, seed=3), PoissonEncoder(8, seed=3)
    sa, sb = a(x), b(x)
    assert sa.shape == (8, 4, 1, 8, 8)
    _assert_binary(sa)
    assert torch.equal(sa, sb)  # same seed, same spikes
    assert not torch.equal(sa, PoissonEncoder(8, seed=4)(x))
    nxt = a(x)
    assert not torch.equal(nxt, sa)  # the stream continues: a new batch gets new spikes
    a.reseed()
    assert torch.equal(a(x), sa)  # ... and restarts on reseed
    # global RNG when unseeded
    torch.manual_seed(1)
    u1 = PoissonEncoder(8)(x)
    torch.manual_seed(1)
    assert torch.equal(PoissonEncoder(8)(x), u1)
    # rate = the per-sample min-max scaled intensity (deterministic: seeded; bound is ~6 sigma)
    p = PoissonEncoder(4000, seed=0)
    prob = p.probabilities(x)
    assert prob.amin(dim=(1, 2, 3)).eq(0).all() and prob.amax(dim=(1, 2, 3)).eq(1).all()
    rate = p(x).mean(0)
    assert (rate - prob).abs().max() < 6 * math.sqrt(0.25 / 4000)
    clamp = PoissonEncoder(2, scale="clamp").probabilities(x)
    assert torch.equal(clamp, x.clamp(0, 1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PoissonEncoder(2, scale="none")(x)


def test_poisson_spikify_is_seeded():
    ann = create("digits_cnn_small")
    x = torch.randn(2, 1, 8, 8)
    s1 = spikify(ann, T=4, encoding="poisson", seed=7).eval()
    s2 = spikify(ann, T=4, encoding="poisson", seed=7).eval()
    with torch.no_grad():
        assert torch.equal(s1(x), s2(x))
        enc = s1.encode(x)
    _assert_binary(enc)
    assert isinstance(s1.encoder, PoissonEncoder) and s1.encoder.T == 4
    s1.T = 6
    assert s1.encoder.T == 6 and s1.encode(x).shape[0] == 6


# ---------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_torch_compile_matches_eager(backend):
    # fullgraph=True: encoding, time folding, the LIF op (backend chosen at trace time) and the first-forward
    # analog check (skipped while compiling) must all trace without a graph break.
    # aot_eager: dynamo + AOTAutograd through the ops' fake kernels and autograd.Function, without the
    # inductor C++ compilation (checked by hand for this net with fullgraph=True: results equal to eager;
    # first forward+backward 39-108 s wall depending on load, ~20 s CPU, on the shared 2-core box).
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    snn = spikify(ann, T=2, neuron=LIF(decay_input=False, surrogate="triangle", alpha=1.0, backend=backend))
    x = 2 * torch.randn(4, 1, 8, 8)
    compiled = torch.compile(snn, backend="aot_eager", fullgraph=True)
    y_c = compiled(x)
    y_c.square().sum().backward()
    g_c = snn.body[0].weight.grad.clone()
    snn.zero_grad()
    y_e = snn(x)
    y_e.square().sum().backward()
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(g_c, snn.body[0].weight.grad)
    assert g_c.abs().sum() > 0
    # the eager call ran (and cleared) the first-forward analog check; the compiled graph must not
    # depend on that flag, or every eager call would cost a recompile
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(x), snn(x))


# ------------------------------------------------------------------------------------------ bad input


def test_bad_arguments():
    ann = create("digits_cnn_small")
    for T in (0, -1):
        with pytest.raises(ValueError, match="T must be >= 1"):
            spikify(ann, T=T)
    for T in (2.0, True, "2"):
        with pytest.raises(TypeError, match="T must be an int"):
            spikify(ann, T=T)
    with pytest.raises(ValueError, match="encoding must be"):
        spikify(ann, T=2, encoding="rate")
    with pytest.raises(TypeError, match=r"ann must be an nn\.Module"):
        spikify(lambda x: x, T=2)
    with pytest.raises(TypeError, match="neuron"):
        spikify(ann, T=2, neuron=3)
    with pytest.raises(TypeError, match="activations"):
        spikify(ann, T=2, activations=nn.ReLU)
    snn = spikify(ann, T=2)
    with pytest.raises(ValueError, match="T must be >= 1"):
        snn.T = 0
    with pytest.raises(ValueError, match=r"4 dims \(\[B, \.\.\.\]\).*5 dims"):
        snn(torch.randn(8, 8))
    with pytest.raises(ValueError, match="got shape"):
        snn(torch.randn(1, 2, 1, 1, 8, 8))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        snn([1.0])


def test_no_activation_to_replace():
    with pytest.raises(ValueError, match="no activation module to replace"):
        spikify(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(3)), T=2)

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return F.relu(self.conv(x))

    with pytest.raises(ValueError, match=r"F\.relu"):
        spikify(Functional(), T=2)


class _Apply(nn.Module):
    """Calls ``fn`` in its forward: how an activation applied as a function looks from outside."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _Mixed(nn.Module):
    """ReLU modules plus an activation applied by ``fn`` (as torchvision's DenseNet does with F.relu before
    its classifier), then an optional ``extra`` module."""

    def __init__(self, fn=None, extra=None):
        super().__init__()
        self.conv1, self.act1, self.conv2 = nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)
        self.inner = _Apply(fn or (lambda h: h))
        self.extra = extra or nn.Identity()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(self.extra(self.inner(self.conv2(self.act1(self.conv1(x))))).flatten(1))


@pytest.mark.parametrize(
    ("fn", "name"),
    [(F.relu, "relu"), (torch.relu, "relu"), (lambda h: h.relu_(), "relu_"), (F.leaky_relu, "leaky_relu"),
     (F.gelu, "gelu")],
    ids=["F.relu", "torch.relu", "Tensor.relu_", "F.leaky_relu", "F.gelu"],
)
def test_functional_activation_is_refused_on_first_forward(fn, name):
    x = torch.randn(2, 1, 8, 8)
    snn = spikify(_Mixed(fn), T=2)  # the module ReLU is replaced, so spikify itself cannot tell
    for _ in range(2):  # refused on every call, not only the first
        with pytest.raises(ValueError, match=rf"{name} x1 in inner \(_Apply\).*on_analog="):
            snn(x)


def test_on_analog_warn_and_ignore():
    torch.manual_seed(0)
    ann, x = _Mixed(F.relu), torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warned = spikify(ann, T=2, on_analog="warn")
        a, b = warned(x), warned(x)
        ignored = spikify(ann, T=2, on_analog="ignore")
        c = ignored(x)
    assert [w.category for w in caught] == [AnalogActivationWarning]  # once per SNN, and none when ignored
    assert "relu x1 in inner (_Apply)" in str(caught[0].message) and caught[0].filename == __file__
    assert torch.equal(a, b) and torch.equal(a, c)  # the check does not change the computation


def test_unreplaced_activation_modules():
    # a hidden activation module of a type not in activations= is found when the SNN is built
    with pytest.raises(ValueError, match=r"extra \(GELU\).*on_analog="):
        spikify(_Mixed(extra=nn.GELU()), T=2)
    with pytest.raises(ValueError, match=r"act1 \(ReLU\)"):
        spikify(_Mixed(extra=nn.SiLU()), T=2, activations=(nn.SiLU,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        snn = spikify(_Mixed(extra=nn.GELU()), T=2, on_analog="warn")
        snn(torch.randn(2, 1, 8, 8))  # F.gelu inside the reported module is not reported again
    assert [w.category for w in caught] == [AnalogActivationWarning]
    assert "extra (GELU)" in str(caught[0].message) and caught[0].filename == __file__

    # not flagged: gates (Sigmoid), and any op a neuron uses internally
    class ReluThreshold(nn.Module):
        def forward(self, x):
            return (torch.relu(x) >= 1).to(x.dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gated = spikify(_Mixed(extra=nn.Sigmoid()), T=2, neuron=ReluThreshold)
        assert gated(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="on_analog must be one of"):
        spikify(_Mixed(), T=2, on_analog="raise")


def test_input_rank_inference():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    snn = spikify(mlp, T=3)
    assert snn.input_dims == 2 and snn(torch.randn(5, 4)).shape == (5, 3)
    flat_first = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="input_dims"):
        spikify(flat_first, T=2)
    assert spikify(flat_first, T=2, input_dims=3)(torch.randn(5, 4, 4)).shape == (5, 3)

    class HeadFirst(nn.Module):  # classifier registered before the conv: a conv still decides the rank
        def __init__(self):
            super().__init__()
            self.fc, self.conv, self.act = nn.Linear(18, 3), nn.Conv2d(1, 2, 3), nn.ReLU()

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).flatten(1))

    snn = spikify(HeadFirst(), T=2)
    assert snn.input_dims == 4 and snn(torch.randn(5, 1, 5, 5)).shape == (5, 3)


def test_features_errors_and_tap():
    ann = create("resnet20", width=0.25)
    with pytest.raises(ValueError, match="unknown stage"):
        lasnn.features(ann, torch.randn(1, 3, 32, 32), ["layer9"])
    with pytest.raises(ValueError, match="cannot tell the stages"):
        lasnn.features(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2))
    snn = spikify(ann, T=2)
    x = torch.randn(2, 3, 32, 32)
    with lasnn.FeatureTap(snn, ["layer2"]) as tap:
        y = snn(x)
    assert y.shape == (2, 10) and list(tap.features) == ["layer2"]
    assert tap.features["layer2"].shape == (2, 2, 8, 16, 16)
    assert not snn.body.layer2._forward_hooks  # hooks removed on exit
    feats = tap.pop()
    assert feats["layer2"].shape == (2, 2, 8, 16, 16) and tap.features == {}  # popped: nothing kept alive
    # the distillation trainer's tap is this one, returning (logits, [features]) in the asked order
    from lasnn.distill.taps import TappedModel

    tapped = TappedModel(snn, ["layer3", "layer1"])
    logits, (f3, f1) = tapped(x)
    assert torch.equal(logits, snn(x)) and f3.shape == (2, 2, 16, 8, 8) and f1.shape == (2, 2, 4, 32, 32)
    assert not snn.body.layer1._forward_hooks and tapped._tap.features == {}
    with pytest.raises(ValueError, match="unknown stage"):
        TappedModel(snn, ["layer9"])


def test_count_spikes_is_exact_beyond_float32_integers():
    from lasnn.nn import count_spikes

    # 2^24 + 3 ones: a float32 sum of the whole tensor would stop counting at 2^24
    big = torch.ones(4, (1 << 22) + 1)
    big[0, :1] = 0.0
    got = count_spikes(big)
    assert got.dtype == torch.float64 and got.dim() == 0 and int(got) == 4 * ((1 << 22) + 1) - 1
    small = (torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.6).to(torch.bfloat16)
    assert int(count_spikes(small)) == int((small != 0).sum())
    assert int(count_spikes(torch.ones(1 << 24 | 1))) == (1 << 24) + 1  # one row only: float64 path
    with pytest.raises(TypeError, match="spikes must be a floating-point tensor"):
        count_spikes(torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="spikes must be a floating-point tensor"):
        count_spikes([1.0, 0.0])


def test_spike_bits_round_trip_every_dtype_and_odd_sizes():
    from lasnn.ops import spike_bits
    from lasnn.ops.spike_bits import pack_bits, unpack_bits

    g = torch.Generator().manual_seed(0)
    for use_c in ((True, False) if lasnn._ext.c_has_op("spike_pack") else (False,)):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for shape in ((3, 5, 7), (16,), (1,), (2, 0, 3), (1000, 9)):
                s = (torch.rand(shape, generator=g) < 0.3).to(dtype)
                orig = spike_bits._use_c
                spike_bits._use_c = lambda t, u=use_c: u  # the C++ kernels and the torch fallback alike
                try:
                    p = pack_bits(s)
                    assert p.dtype == torch.uint8 and p.numel() == -(-s.numel() // 8)
                    back = unpack_bits(p, s.shape, dtype)
                    if s.numel():  # the same bytes from both paths: one format
                        spike_bits._use_c = lambda t: False
                        assert torch.equal(pack_bits(s), p)
                finally:
                    spike_bits._use_c = orig
                assert back.dtype == dtype and torch.equal(back, s), (use_c, dtype, shape)
    if lasnn._ext.c_has_op("spike_pack"):
        s = (torch.rand(4, 9, generator=g) < 0.5).float()
        torch.library.opcheck(torch.ops.lasnn.spike_pack.default, (s,))
        torch.library.opcheck(torch.ops.lasnn.spike_unpack.default, (pack_bits(s), 36, torch.float32))
    with pytest.raises(TypeError, match="spikes must be a floating-point tensor"):
        pack_bits(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="does not fit"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), (30,), torch.float32)


def test_spike_bits_keep_a_dense_tensors_strides():
    """Saved spikes come back with the strides they were saved with (a channels-last tensor stays
    channels-last, so the backward reading them runs as without packing); other layouts come back contiguous
    with the same values."""
    from lasnn.nn.lowmem import _Packed

    g = torch.Generator().manual_seed(5)
    s = (torch.rand(6, 5, 4, 3, generator=g) < 0.4).float()
    for t in (s, s.contiguous(memory_format=torch.channels_last), s.permute(3, 1, 0, 2), s[:, :, ::2]):
        back = _Packed(t).tensor()
        assert torch.equal(back, t)
        dense = t.is_contiguous() or t.permute(sorted(range(4), key=lambda d: -t.stride(d))).is_contiguous()
        assert back.stride() == (t.stride() if dense else back.contiguous().stride())


def _grads(snn, x, y, low: bool) -> list[torch.Tensor]:
    snn.zero_grad(set_to_none=True)
    snn.low_memory = low
    F.cross_entropy(snn(x), y).backward()
    return [p.grad.clone() for p in snn.parameters()]


@pytest.mark.parametrize("name,kw,layout", [("mnist1d_cnn_small", {}, "contiguous"),
                                            ("fashion_cnn_small", {}, "contiguous"),
                                            ("resnet20", {"width": 0.25}, "contiguous"),
                                            ("fashion_cnn_small", {}, "channels_last"),
                                            # width 0.5: torch 2.14 crashes on a channels-last strided 1x1
                                            # conv of 2-7 input channels (lasnn.distill's default_channels_last)
                                            ("resnet20", {"width": 0.5}, "channels_last")])
def test_low_memory_bptt_gives_bit_identical_gradients_and_saves_memory(name, kw, layout):
    torch.manual_seed(0)
    info = model_info(name)
    snn = spikify(create(name, **kw), T=4).train()
    x = torch.randn(32, *info.input_shape)
    if layout == "channels_last":
        snn.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,))
    plain, low = _grads(snn, x, y, False), _grads(snn, x, y, True)
    assert all(torch.equal(a, b) for a, b in zip(plain, low, strict=True))
    assert snn.low_memory  # the default

    # memory, from the profiler's allocator events: what autograd keeps after the forward (peak of a forward
    # whose graph stays alive) and the peak of forward + backward
    from lasnn.testing import peak_allocated_bytes

    def peaks(low: bool) -> tuple[int, int]:
        snn.low_memory = low
        keep = []
        kept = peak_allocated_bytes(lambda: keep.append(F.cross_entropy(snn(x), y)), "cpu")
        keep.clear()
        return kept, peak_allocated_bytes(lambda: F.cross_entropy(snn(x), y).backward(), "cpu")

    (kept_plain, step_plain), (kept_bits, step_bits) = peaks(False), peaks(True)
    kept_low, step_low = peaks("recompute")
    assert kept_bits <= kept_plain and step_bits <= step_plain
    if name != "fashion_cnn_small":  # there no spike tensor is saved: pools save nothing, the head is tiny
        assert kept_bits < 0.95 * kept_plain
    assert kept_low < 0.85 * kept_plain  # measured: 0.54 (mnist1d), 0.78 (fashion), 0.55 (resnet20)
    # fashion_cnn_small's step peak is the backward's working set at its first layer (recomputed batch-norm
    # output, incoming and outgoing gradients: as in the plain path), not what was saved: 0.96 measured. Never
    # above the plain path: a registry that outlived the forward once kept every batch-norm input alive (1.12).
    assert step_low < (1.0 if name == "fashion_cnn_small" else 0.85) * step_plain
    assert all(torch.equal(a, b) for a, b in zip(plain, _grads(snn, x, y, "recompute"), strict=True))
    # recompute_all: convolution, linear and pool outputs too, from the spike bits and the input; measured (kept /
    # step peak vs "recompute"): mnist1d 0.42 / 0.48, fashion 0.70 / 1.0 (its peak is the backward's working set at
    # the first layer), resnet20 0.55 / 0.70
    kept_all, step_all = peaks("recompute_all")
    assert kept_all < 0.8 * kept_low and step_all <= step_low
    if name != "fashion_cnn_small":
        assert step_all < 0.8 * step_low
    assert all(torch.equal(a, b) for a, b in zip(plain, _grads(snn, x, y, "recompute_all"), strict=True))


@contextlib.contextmanager
def _saved_kinds():
    """Yields a list that collects, for each tensor autograd saves inside a low-memory block, the type of what is
    kept for it (``Tensor``, ``_Packed`` bits, ``_Recompute``)."""
    from lasnn.nn import lowmem

    kinds: list[str] = []
    pack = lowmem._SpikeBits.pack

    def counting(self, t):
        out = pack(self, t)
        kinds.append(type(out).__name__)
        return out

    lowmem._SpikeBits.pack = counting
    try:
        yield kinds
    finally:
        lowmem._SpikeBits.pack = pack


def test_low_memory_recomputes_batch_norm_outputs_only_when_it_may():
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                        nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    snn = spikify(ann, T=3).train()
    snn.body[4].eval()  # running statistics: its input is not saved, so its output is saved as usual
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    with _saved_kinds() as kinds:
        bits = _grads(snn, x, y, True)
        assert "_Recompute" not in kinds  # the default level keeps batch-norm outputs
        low = _grads(snn, x, y, "recompute")
    assert kinds.count("_Recompute") == 1, kinds
    plain = _grads(snn, x, y, False)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(plain, low, bits, strict=True))
    for bad in ("max", 1, 0.5, None):
        with pytest.raises(ValueError, match="low_memory must be one of"):
            snn.low_memory = bad

    # a batch-norm weight changed in place between forward and backward: a clear error, not a wrong gradient
    snn.low_memory = "recompute"
    loss = F.cross_entropy(snn(x), y)
    with torch.no_grad():
        snn.body[1].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="batch norm's weight was modified in place"):
        loss.backward()


def test_recompute_all_computes_each_tensor_once_per_backward_and_refuses_changed_weights():
    """A convolution's output is needed twice in the backward (the batch norm's backward, and to recompute the
    batch norm's output for the neuron): computed once, cached until its last use; a second backward through a
    retained graph recomputes and gives the same gradients; a weight changed in place in between is an error."""
    from lasnn.nn import lowmem

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(96, 3))
    snn = spikify(ann, T=3).train()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    plain = _grads(snn, x, y, False)
    computed: list[str] = []
    get = lowmem._Node.get

    def counting(self):
        if self.cache is None:
            computed.append(self.name)
        return get(self)

    lowmem._Node.get = counting
    try:
        assert all(torch.equal(a, b) for a, b in zip(plain, _grads(snn, x, y, "recompute_all"), strict=True))
        # each once: both convolutions (the first from the kept input, the second from the pooled spike bits),
        # both batch norms, the pool (read by the second convolution's backward)
        assert sorted(computed) == sorted(["Conv2d", "Conv2d", "batch norm", "batch norm", "AvgPool2d"]), computed
        computed.clear()
        snn.zero_grad(set_to_none=True)
        loss = F.cross_entropy(snn(x), y)
        loss.backward(retain_graph=True)
        first = [p.grad.clone() for p in snn.parameters()]
        snn.zero_grad(set_to_none=True)
        loss.backward()
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in
                   zip(plain, first, [p.grad for p in snn.parameters()], strict=True))
    finally:
        lowmem._Node.get = get
    loss = F.cross_entropy(snn(x), y)
    with torch.no_grad():
        snn.body[4].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="Conv2d's weight was modified in place"):
        loss.backward()


@pytest.mark.parametrize("name,layout", [("fashion_cnn_small", "channels_last"), ("mnist1d_cnn_small", "contiguous"),
                                         ("resnet20", "channels_last")])
def test_low_memory_under_autocast_recomputes_in_the_forwards_precision(name, layout):
    """Under bf16 autocast (``--cpu-amp``; ``--amp`` on a GPU) every level still recomputes, each op under the
    autocast state it ran under in the forward, whatever state the backward runs in: gradients bit-identical to
    the plain path's, and the recomputed tensors are really not kept."""
    torch.manual_seed(0)
    snn = spikify(create(name, **({"width": 0.5} if name == "resnet20" else {})), T=4).train()
    x = torch.randn(16, *model_info(name).input_shape)
    if layout == "channels_last":
        snn.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))

    def grads(level, amp_in_backward: bool) -> list[torch.Tensor]:
        snn.zero_grad(set_to_none=True)
        snn.low_memory = level
        with torch.autocast("cpu", torch.bfloat16):
            out = snn(x)
        assert out.dtype == torch.bfloat16
        # the backward inside another autocast state (fp16 here) must not change what is recomputed
        with torch.autocast("cpu", torch.float16, enabled=amp_in_backward):
            F.cross_entropy(out.float(), y).backward()
        return [p.grad.clone() for p in snn.parameters()]

    # autocast applies to the ops the backward calls too (a linear layer's backward matmuls), so each case is
    # compared with the plain path under the same backward state
    plain = {amp_in_backward: grads(False, amp_in_backward) for amp_in_backward in (False, True)}
    for level in ("recompute", "recompute_all"):
        for amp_in_backward in (False, True):
            with _saved_kinds() as kinds:
                got = grads(level, amp_in_backward)
            assert all(torch.equal(a, b) for a, b in zip(plain[amp_in_backward], got, strict=True)), \
                (level, amp_in_backward)
            assert "_Recompute" in kinds, kinds


def test_recomputation_ignores_the_autocast_state_of_the_backward():
    """A forward without autocast, a backward inside an autocast block: the recomputed convolution and batch norm
    run in fp32 as in the forward (under bf16 they would differ, and so would the gradients)."""
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))
    snn = spikify(ann, T=3).train()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))

    def grads(level) -> list[torch.Tensor]:
        snn.zero_grad(set_to_none=True)
        snn.low_memory = level
        loss = F.cross_entropy(snn(x), y)
        with torch.autocast("cpu", torch.bfloat16):  # the backward's own ops run under it, in every case
            loss.backward()
        return [p.grad.clone() for p in snn.parameters()]

    plain = grads(False)
    for level in ("recompute", "recompute_all"):
        assert all(torch.equal(a, b) for a, b in zip(plain, grads(level), strict=True)), level
    from lasnn.nn.lowmem import spike_bits

    with pytest.raises(ValueError, match="level must be one of"):
        with spike_bits("everything"):
            pass


def test_low_memory_steps_aside_for_checkpointing_and_leaves_no_hooks():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    snn = spikify(create("digits_cnn_small"), T=2).train()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    want = _grads(snn, x, y, False)
    snn.zero_grad(set_to_none=True)
    snn.low_memory = True
    F.cross_entropy(checkpoint(snn, x, use_reentrant=False), y).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(want, snn.parameters(), strict=True))
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    from torch.nn.modules import module as torch_module

    hooks_before = dict(torch_module._global_forward_hooks)
    _grads(snn, x, y, "recompute")
    _grads(snn, x, y, "recompute_all")
    assert dict(torch_module._global_forward_hooks) == hooks_before  # the module hook went with the block
    with torch.no_grad():  # no graph, nothing saved: the plain path
        snn(x)


def test_low_memory_saves_a_spike_tensor_changed_in_place_as_is():
    class Halve(nn.Module):  # changes the spikes in place before the next conv saves them
        def forward(self, x):
            return x.mul_(0.5)

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), Halve(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 3))
    snn = spikify(ann, T=2, neuron=LIF(v_threshold=0.1)).train()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    assert all(torch.equal(a, b) for a, b in zip(_grads(snn, x, y, False), _grads(snn, x, y, True), strict=True))


def test_torch_compile_dynamic_batch_sizes_without_recompiling():
    # a spikify'd model, fullgraph and dynamic shapes: a second batch size reuses the graph
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    snn = spikify(ann, T=2).eval()
    torch._dynamo.reset()
    compiled = torch.compile(snn, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for i, b in enumerate((4, 7)):
            x = 2 * torch.randn(b, 1, 8, 8)
            with torch._dynamo.config.patch(error_on_recompile=bool(i)):
                y = compiled(x)
            torch.testing.assert_close(y, snn(x))
