"""Model zoo: registry, shapes, stage taps (ANN and SNN), width multiplier, default pairs, CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lasnn
from lasnn import models
from lasnn.cli import main as cli_main
from lasnn.models._common import scaled


@pytest.fixture(autouse=True, scope="module")
def _one_intraop_thread():
    # tiny nets: a second intra-op thread only spin-waits on a loaded 2-core box (see test_spikify.py)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# Stage channels (before width) and the downsampling factor of each stage, from the architectures' docs.
STAGES = {
    "vgg11": ([64, 128, 256, 512, 512], [1, 2, 4, 8, 16]),
    "vgg16": ([64, 128, 256, 512, 512], [1, 2, 4, 8, 16]),
    "resnet18": ([64, 128, 256, 512], [1, 2, 4, 8]),
    "resnet19": ([128, 256, 512], [1, 2, 4]),
    "resnet20": ([16, 32, 64], [1, 2, 4]),
    "digits_cnn": ([32, 64], [1, 2]),
    "digits_cnn_small": ([16, 32], [1, 2]),
    "mnist1d_cnn": ([32, 64, 128], [1, 2, 4]),
    "mnist1d_cnn_small": ([16, 32, 64], [1, 2, 4]),
    "fashion_cnn": ([32, 64, 128], [1, 2, 4]),
    "fashion_cnn_small": ([16, 32, 64], [1, 2, 4]),
}


def _params(name: str, **kw) -> int:
    with torch.device("meta"):  # counts only: no memory, no init cost
        m = models.create(name, **kw)
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_every_model():
    assert models.list_models() == sorted(STAGES)
    for name in STAGES:
        info = models.model_info(name)
        assert info.name == name and info.num_classes == 10 and info.description


@pytest.mark.parametrize("name", sorted(STAGES))
def test_shapes_and_stage_taps(name):
    torch.manual_seed(0)
    width = 0.125 if name.startswith(("vgg", "resnet1")) else 0.5
    m = models.create(name, num_classes=7, width=width).eval()
    shape = models.model_info(name).input_shape
    if name.startswith("resnet"):  # 16x16 leaves every ResNet stage >= 4x4, at 1/4 of the cost (VGG pools 32x)
        shape = (shape[0], 16, 16)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        out, feats = lasnn.features(m, x, return_output=True)
        plain = m(x)
    assert out.shape == (2, 7)
    torch.testing.assert_close(out, plain)
    chans, down = STAGES[name]
    assert list(feats) == [f"layer{i + 1}" if name.startswith("resnet") else f"stage{i + 1}" for i in range(len(chans))]
    for (k, f), c, d in zip(feats.items(), chans, down, strict=True):
        want = (2, scaled(c, width), *(s // d for s in shape[1:]))
        assert tuple(f.shape) == want, k
        assert (f >= 0).all(), f"{k} is not a ReLU output"
    # the SNN of the same model taps the same stages, with time in front
    snn = lasnn.spikify(m, T=2).eval()
    with torch.no_grad():
        sf = lasnn.features(snn, x)
    assert {k: tuple(v.shape) for k, v in sf.items()} == {k: (2, *v.shape) for k, v in feats.items()}
    for v in sf.values():
        assert bool(((v == 0) | (v == 1)).all())


def test_taps_are_the_stage_outputs():
    # recompute each stage by hand from the modules and compare with the tap
    torch.manual_seed(0)
    r = models.create("resnet20", width=0.5).eval()
    x16 = torch.randn(2, 3, 16, 16)  # small input: values are compared here, shapes in test_shapes_and_stage_taps
    with torch.no_grad():
        f = lasnn.features(r, x16)
        h = r.relu(r.bn1(r.conv1(x16)))
        for k in ("layer1", "layer2", "layer3"):
            h = getattr(r, k)(h)
            torch.testing.assert_close(f[k], h)
    v = models.create("vgg11", width=0.125).eval()
    x = torch.randn(2, 3, 32, 32)  # VGG pools 32x
    with torch.no_grad():
        f = lasnn.features(v, x)
        pools = [i for i, m in enumerate(v.features) if isinstance(m, nn.AvgPool2d)]
        for k, p in zip(f, pools, strict=True):
            torch.testing.assert_close(f[k], v.features[:p](x))  # the ReLU output right before the pool
    s = models.create("mnist1d_cnn")
    s.eval()
    x1 = torch.randn(3, 1, 40)
    with torch.no_grad():
        f = lasnn.features(s, x1, ["stage2"])
        torch.testing.assert_close(f["stage2"], s.stage2(s.pool1(s.stage1(x1))))


def test_known_parameter_counts_and_width():
    # CIFAR ResNet-18 (3x3 stem, 1x1-conv shortcuts, 10 classes): 11,173,962 parameters, the count of the
    # widely used reference implementation; ResNet-20: 0.27M (He et al. 2016).
    assert _params("resnet18") == 11_173_962
    assert 0.26e6 < _params("resnet20") < 0.28e6
    for name in STAGES:
        full, half = _params(name), _params(name, width=0.5)
        assert half < 0.4 * full, name  # conv params scale ~ width^2
    assert _params("resnet20", num_classes=100) - _params("resnet20") == 90 * (64 + 1)


@pytest.mark.parametrize("dataset", ["mnist1d", "digits", "fashionmnist", "cifar10", "cifar100", "tinyimagenet"])
def test_default_pairs(dataset):
    t, s = models.default_pair(dataset)
    assert t in models.list_models() and s in models.list_models()
    _, _, classes, shape = models.DEFAULT_PAIRS[dataset]
    assert _params(s, num_classes=classes) < 0.5 * _params(t, num_classes=classes)  # a *small* student
    with torch.device("meta"):
        tm, sm = models.create(t, num_classes=classes), models.create(s, num_classes=classes)
    assert list(models.stage_layers(tm)) == list(models.stage_layers(sm))  # pairable by name
    assert models.model_info(t).input_shape[0] == shape[0]


def test_mnist1d_student_is_about_half_width():
    t = models.create("mnist1d_cnn")
    s = models.create("mnist1d_cnn_small")
    tc = [m.out_channels for m in t.modules() if isinstance(m, nn.Conv1d)]
    sc = [m.out_channels for m in s.modules() if isinstance(m, nn.Conv1d)]
    assert [2 * c for c in sc] == tc


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        models.create("resnet50")
    with pytest.raises(ValueError, match="width must be > 0"):
        models.create("resnet20", width=0)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        models.create("vgg11", num_classes=0)
    with pytest.raises(ValueError, match="pool must be"):
        models.create("vgg11", pool="min")
    with pytest.raises(ValueError, match="unknown dataset"):
        models.default_pair("imagenet")


def test_cli_lists_models(capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    for name in models.list_models():
        assert name in out
    assert "cifar10" in out and "resnet19 -> resnet20" in out
