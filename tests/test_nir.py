"""NIR export/import (lasnn.to_nir / lasnn.from_nir / lasnn export-nir), checked by other simulators."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import lasnn
from lasnn.models import create
from lasnn.nir_io import NIRExportError

nir = pytest.importorskip("nir", reason="NIR export tests need `pip install nir`")


def _student(name: str, shape: tuple[int, ...], T: int = 4, seed: int = 0, **kw) -> lasnn.nn.SNN:
    """A random zoo student whose every layer fires: batch-norm statistics measured on random input (so
    folding is exercised with real statistics), affine parameters that put a good share above threshold."""
    torch.manual_seed(seed)
    ann = create(name, **kw)
    bns = [m for m in ann.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    for m in bns:
        m.weight.data.uniform_(1.0, 2.0)
        m.bias.data.uniform_(0.0, 0.5)
        m.momentum = None  # cumulative average over the calibration batches
    snn = lasnn.spikify(ann, T=T).train()
    with torch.no_grad():
        for _ in range(2):
            snn(torch.randn(16, *shape))
    return snn.eval()


def _arrays(node) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in vars(node).items() if isinstance(v, np.ndarray)}


def _same_graph(a, b) -> None:
    assert set(a.nodes) == set(b.nodes) and sorted(a.edges) == sorted(b.edges)
    for k in a.nodes:
        assert type(a.nodes[k]) is type(b.nodes[k]), k
        xa, xb = _arrays(a.nodes[k]), _arrays(b.nodes[k])
        assert xa.keys() == xb.keys(), k
        for name in xa:
            assert np.array_equal(xa[name], xb[name]), (k, name)


CASES = [("fashion_cnn_small", {}, (1, 28, 28)), ("mnist1d_cnn_small", {}, (1, 40)),
         ("digits_cnn_small", {}, (1, 8, 8)), ("resnet20", {"width": 0.25}, (3, 32, 32))]


@pytest.mark.parametrize("name,kw,shape", CASES, ids=[c[0] for c in CASES])
def test_round_trip_through_a_file_gives_the_same_spikes_and_logits(name, kw, shape, tmp_path):
    snn = _student(name, shape, **kw)
    graph = lasnn.to_nir(snn, shape)
    assert graph.metadata["dt"] == 1.0 and graph.metadata["T"] == 4
    assert not any(isinstance(n, nir.NIRNode) and type(n).__name__.startswith("Batch") for n in graph.nodes.values())
    path = tmp_path / "m.nir"
    nir.write(path, graph)
    back = lasnn.from_nir(nir.read(path))
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = snn(x, return_steps=True), back(x, return_steps=True)
    # batch norm is folded in the export, not bit for bit the unfolded arithmetic: a membrane within
    # rounding of the threshold may flip a spike (it does in the residual net), so: same predictions, and
    # outputs equal but for such rare flips (exactness is checked below, and on dyadic graphs)
    assert min(_rates(snn, x)) > 0.01
    assert (got - want).abs().mean() < 1e-3 and (~torch.isclose(got, want, rtol=1e-5, atol=1e-5)).float().mean() < 0.1
    assert torch.equal(got.mean(0).argmax(1), want.mean(0).argmax(1))
    # lasnn -> NIR -> lasnn -> NIR is exact: the same graph, array for array
    _same_graph(graph, lasnn.to_nir(back))
    # and the imported SNN runs every step exactly like the exported one folded (nothing lost)
    with torch.no_grad():
        torch.testing.assert_close(lasnn.from_nir(lasnn.to_nir(back))(x, return_steps=True), got, rtol=0, atol=0)


def test_neuron_parameters_follow_the_dt_1_euler_convention():
    for decay_input, r in ((True, 1.0), (False, 3.0)):
        snn = lasnn.nn.SNN(nn.Sequential(nn.Linear(6, 5), lasnn.nn.FoldedNeuron(
            lasnn.nn.LIF(tau=3.0, v_threshold=0.75, v_reset=-0.25, decay_input=decay_input), 2)),
            2, lasnn.nn.DirectEncoder(2), input_dims=2)
        g = lasnn.to_nir(snn, (6,))
        lif = next(n for n in g.nodes.values() if isinstance(n, nir.LIF))
        assert np.all(lif.tau == 3.0) and np.all(lif.r == r) and np.all(lif.v_leak == -0.25)
        assert np.all(lif.v_reset == -0.25) and np.all(lif.v_threshold == 0.75) and lif.tau.shape == (5,)
        back = lasnn.from_nir(g).body.layers["1"].neuron
        assert (back.tau, back.decay_input, back.v_reset, back.v_threshold) == (3.0, decay_input, -0.25, 0.75)
    snn = lasnn.spikify(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), T=2, neuron=lasnn.nn.IF())
    g = lasnn.to_nir(snn, (6,))
    assert any(isinstance(n, nir.IF) and np.all(n.r == 1.0) for n in g.nodes.values())


def test_what_nir_cannot_express_is_refused_with_the_reason():
    ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x_shape = (1, 8, 8)
    soft = lasnn.spikify(ann, T=2, neuron=lasnn.nn.LIF(v_reset=None))
    with pytest.raises(NIRExportError, match="resets by subtraction"):
        lasnn.to_nir(soft, x_shape)
    poisson = lasnn.spikify(ann, T=2, encoding="poisson")
    with pytest.raises(NIRExportError, match="only direct encoding"):
        lasnn.to_nir(poisson, x_shape)
    converted = lasnn.convert(ann, [torch.rand(4, *x_shape)], method="max")
    with pytest.raises(NIRExportError, match="reset by subtraction"):
        lasnn.to_nir(converted, x_shape)
    maxpool = lasnn.spikify(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                          nn.Linear(36, 3)), T=2)
    with pytest.raises(NIRExportError, match="MaxPool2d"):
        lasnn.to_nir(maxpool, x_shape)
    lone_bn = lasnn.spikify(nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(144, 3)), T=2).eval()
    with pytest.raises(NIRExportError, match="batch norm that does not directly follow"):
        lasnn.to_nir(lone_bn, x_shape)
    odd = lasnn.spikify(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.ReLU()), T=2)
    with pytest.raises(NIRExportError, match="not a plain average pool"):
        lasnn.to_nir(odd, (1, 9, 9))
    with pytest.raises(TypeError, match="lasnn SNN"):
        lasnn.to_nir(ann, x_shape)
    with pytest.raises(ValueError, match="input_shape"):
        lasnn.to_nir(lasnn.spikify(ann, T=2), (8, 8))
    with pytest.raises(TypeError, match=r"nir\.NIRGraph"):
        lasnn.from_nir({"nodes": {}})


def test_from_nir_refuses_recurrence_and_non_uniform_neurons():
    w = np.eye(3, dtype=np.float32)

    def graph(tau, edges):
        lif = nir.LIF(tau=np.asarray(tau, dtype=np.float32), r=np.ones(3), v_leak=np.zeros(3), v_threshold=np.ones(3))
        nodes = {"input": nir.Input(input_type={"input": np.array([3])}), "fc": nir.Linear(weight=w), "lif": lif,
                 "rec": nir.Linear(weight=w), "output": nir.Output(output_type={"output": np.array([3])})}
        if not any("rec" in e for e in edges):
            del nodes["rec"]
        return nir.NIRGraph(nodes=nodes, edges=edges)

    chain = [("input", "fc"), ("fc", "lif"), ("lif", "output")]
    with pytest.raises(NIRExportError, match="recurrent"):
        lasnn.from_nir(graph([2.0] * 3, [*chain, ("lif", "rec"), ("rec", "lif")]), T=2)
    with pytest.raises(NIRExportError, match="tau differs between neurons"):
        lasnn.from_nir(graph([2.0, 3.0, 2.0], chain), T=2)
    with pytest.raises(ValueError, match="no T"):
        lasnn.from_nir(graph([2.0] * 3, chain))
    assert lasnn.from_nir(graph([2.0] * 3, chain), T=3).T == 3


def _spikingjelly(graph):
    sj = pytest.importorskip("spikingjelly.activation_based.nir_exchange", reason="SpikingJelly 2.0 not installed")
    # dt=1.0: our graph's time unit (SpikingJelly's importer defaults to 1e-4 s)
    net = sj.import_from_nir(graph, dt=1.0, step_mode="m")

    def run(x: torch.Tensor, T: int) -> torch.Tensor:
        from spikingjelly.activation_based import functional

        functional.reset_net(net)
        with torch.no_grad():
            return net(x.unsqueeze(0).expand(T, *x.shape).contiguous())[0]

    return run


def _snntorch(graph):
    snntorch = pytest.importorskip("snntorch", reason="snnTorch not installed")
    nirtorch = pytest.importorskip("nirtorch", reason="nirtorch not installed")
    from snntorch import utils as sutils

    # snnTorch 1.0.0's importer assumes dt = 1e-4 s, reads NIR's Flatten dims as torch's (batch included)
    # and maps nir.IF to a leaky neuron; so this node map says what our graph means. Its Leaky neuron is
    # mem <- beta * mem + I with the input unscaled; the graph's LIF (dt = 1, zero leak and reset) is
    # V <- V + (r I - V) / tau, the same with mem = (tau / r) V: beta = 1 - 1/tau, threshold (tau / r) v_th,
    # zero reset (r = 1 for decay_input, r = tau without; exact when tau / r is a power of two).
    def lif(node):
        tau, r = float(node.tau.flat[0]), float(node.r.flat[0])
        return snntorch.Leaky(beta=1 - 1 / tau, threshold=tau / r * float(node.v_threshold.flat[0]),
                              reset_mechanism="zero", init_hidden=True, reset_delay=False)

    def flatten(node):
        return nn.Flatten(node.start_dim + 1, node.end_dim + 1 if node.end_dim >= 0 else node.end_dim)

    def conv(node):
        m = nn.Conv2d(node.weight.shape[1], node.weight.shape[0], node.weight.shape[2:], stride=tuple(node.stride),
                      padding=tuple(node.padding), dilation=tuple(node.dilation), groups=node.groups)
        m.weight.data, m.bias.data = torch.from_numpy(node.weight), torch.from_numpy(node.bias)
        return m

    def affine(node):
        m = nn.Linear(node.weight.shape[1], node.weight.shape[0])
        m.weight.data, m.bias.data = torch.from_numpy(node.weight), torch.from_numpy(node.bias)
        return m

    def pool(node):
        return nn.AvgPool2d(tuple(node.kernel_size), tuple(node.stride), tuple(node.padding))

    node_map = {nir.LIF: lif, nir.Flatten: flatten, nir.Conv2d: conv, nir.Affine: affine, nir.AvgPool2d: pool}
    net = nirtorch.nir_to_torch(graph, node_map)

    def run(x: torch.Tensor, T: int) -> torch.Tensor:
        sutils.reset(net)
        steps, state = [], None
        with torch.no_grad():
            for _ in range(T):  # nirtorch's module returns (output, state); the neurons also keep their own
                out, state = net(x, state)
                steps.append(out)
        return torch.stack(steps)

    return run


def test_spikingjelly_runs_the_exported_student_like_lasnn():
    for name, shape in (("fashion_cnn_small", (1, 28, 28)), ("resnet20", (3, 32, 32))):
        kw = {"width": 0.25} if name == "resnet20" else {}
        snn = _student(name, shape, **kw)
        run = _spikingjelly(lasnn.to_nir(snn, shape))
        x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want = snn(x, return_steps=True)
        got = run(x, 4)
        assert min(_rates(snn, x)) > 0.01, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.mean(0).argmax(1), want.mean(0).argmax(1))


def test_snntorch_runs_the_exported_student_like_lasnn():
    snn = _student("fashion_cnn_small", (1, 28, 28))
    run = _snntorch(lasnn.to_nir(snn, (1, 28, 28)))
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = snn(x, return_steps=True)
    assert min(_rates(snn, x)) > 0.01
    # snnTorch fires on mem > threshold, lasnn on >=: the same wherever no membrane lands on the threshold
    torch.testing.assert_close(run(x, 4), want, rtol=1e-5, atol=1e-5)


def _rates(snn: lasnn.nn.SNN, x: torch.Tensor) -> list[float]:
    """Firing rate of each spiking site of ``snn`` on ``x`` (a comparison means nothing if a layer is silent)."""
    rates: list[float] = []
    hooks = [m.register_forward_hook(lambda m, a, out: rates.append(out.float().mean().item()))
             for m in snn.modules() if isinstance(m, lasnn.nn.FoldedNeuron)]
    with torch.no_grad():
        snn(x)
    for h in hooks:
        h.remove()
    return rates


def _dyadic(graph, bits: int = 6):
    """``graph`` with every weight and bias rounded to a multiple of 2^-bits, and thresholds off that grid.

    Then every sum, product and membrane update in any of the simulators is exact in fp32 whatever its
    summation order, so they must agree bit for bit; the threshold 1 + 2^-16 lies between the membranes'
    grid points, so ``>=`` (lasnn, SpikingJelly) and ``>`` (snnTorch, NIR's text) fire alike.
    """
    q = float(2**bits)
    for node in graph.nodes.values():
        for field in ("weight", "bias"):
            a = getattr(node, field, None)
            if isinstance(a, np.ndarray) and not isinstance(node, nir.AvgPool2d):
                setattr(node, field, (np.round(a * q) / q).astype(a.dtype))
        if isinstance(node, nir.LIF):
            node.v_threshold = np.full_like(node.v_threshold, 1 + 2.0**-16)
    return graph


def test_simulators_agree_bit_for_bit_on_dyadic_weights_and_inputs():
    snn = _student("fashion_cnn_small", (1, 28, 28))
    graph = _dyadic(lasnn.to_nir(snn, (1, 28, 28)))
    ours = lasnn.from_nir(graph).eval()
    # inputs on a 1/4 grid; scaled up so that every layer fires (the rounded weights are small)
    x = torch.randint(-12, 13, (16, 1, 28, 28), generator=torch.Generator().manual_seed(4)).float() / 4
    with torch.no_grad():
        want = ours(x, return_steps=True)
    assert min(_rates(ours, x)) > 0.01
    assert torch.equal(_spikingjelly(graph)(x, 4), want)
    assert torch.equal(_snntorch(graph)(x, 4), want)


def test_a_trained_student_predicts_the_same_everywhere_on_the_digits_test_set(tmp_path):
    from lasnn.data import load_dataset
    from lasnn.distill import load_run, train_snn

    run = tmp_path / "digits"
    train_snn(out=run, dataset="digits", epochs=3, T=4, batch_size=64, quiet=True)
    model = load_run(run).model.eval()
    ds = load_dataset("digits")
    x = ds.normalize(ds.x_test)  # all 360 test images
    graph = lasnn.to_nir(model, tuple(x.shape[1:]))
    with torch.no_grad():
        steps = model(x, return_steps=True)
        pred = steps.mean(0).argmax(1)
        assert (pred == ds.y_test).float().mean() > 0.5  # a trained student, not chance
    assert min(_rates(model, x)) > 0.01
    with torch.no_grad():
        folded = lasnn.from_nir(graph)(x, return_steps=True)
        assert torch.equal(folded.mean(0).argmax(1), pred)
    for name, run_graph in (("SpikingJelly", _spikingjelly), ("snnTorch", _snntorch)):
        got = run_graph(graph)(x, 4)
        assert torch.equal(got.mean(0).argmax(1), pred), name
        # the same folded graph as lasnn's import: equal up to summation order
        torch.testing.assert_close(got, folded, rtol=1e-5, atol=1e-5, msg=name)


def test_export_nir_command_writes_a_students_run(tmp_path):
    from lasnn.distill import train_snn

    run = tmp_path / "snn"
    train_snn(out=run, dataset="synthetic", epochs=1, T=2, width=0.5, batch_size=64, quiet=True)
    out = tmp_path / "s.nir"
    r = subprocess.run([sys.executable, "-m", "lasnn", "export-nir", "--run", str(run), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "nodes" in r.stdout and out.is_file()
    g = nir.read(out)
    assert g.metadata["dt"] == 1.0 and g.metadata["dataset"] == "synthetic" and g.metadata["T"] == 2
    from lasnn.data import load_dataset
    from lasnn.distill import load_run

    ds = load_dataset("synthetic")
    x = ds.normalize(ds.x_test[:32])
    with torch.no_grad():
        assert torch.equal(lasnn.from_nir(g)(x).argmax(1), load_run(run).model(x).argmax(1))
    r = subprocess.run([sys.executable, "-m", "lasnn", "export-nir", "--run", str(tmp_path / "nope"), "--out",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "export-nir: error" in r.stderr


def test_flatten_written_as_a_view_exports_too():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(2 * 6 * 6, 3)

        def forward(self, x):
            x = self.act(self.conv(x))
            return self.fc(x.view(x.size(0), -1))

    snn = lasnn.spikify(Net(), T=2).eval()
    g = lasnn.to_nir(snn, (1, 8, 8))
    assert any(isinstance(n, nir.Flatten) for n in g.nodes.values())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(lasnn.from_nir(g)(x), snn(x))
