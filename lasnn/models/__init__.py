"""Model zoo: CIFAR-style VGG/ResNet, small CNNs for 8x8 digits and MNIST-1D, with named stage outputs.

    >>> import lasnn
    >>> lasnn.models.list_models()
    ['digits_cnn', 'digits_cnn_small', 'mnist1d_cnn', 'mnist1d_cnn_small', 'resnet18', 'resnet19', ...]
    >>> teacher_name, student_name = lasnn.models.default_pair("cifar10")   # ('resnet19', 'resnet20')
    >>> student = lasnn.models.create(student_name, num_classes=10, width=1.0)
    >>> snn = lasnn.spikify(student, T=4)
    >>> lasnn.features(snn, x)     # {'layer1': [T, B, 16, 32, 32], 'layer2': ..., 'layer3': ...}

Every model is a plain ANN (``nn.ReLU`` modules, BN) mapping ``[B, C, H, W]`` (or ``[B, C, L]``) to
logits ``[B, num_classes]`` and has ``feature_layers`` (stage name -> module path). A teacher and its
default student share stage names, so attention-transfer pairs can be matched by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lasnn.models.features import FeatureTap, features, stage_layers
from lasnn.models.resnet import BasicBlock, CifarResNet, resnet18, resnet19, resnet20
from lasnn.models.small import (
    StageCNN,
    digits_cnn,
    digits_cnn_small,
    fashion_cnn,
    fashion_cnn_small,
    mnist1d_cnn,
    mnist1d_cnn_small,
)
from lasnn.models.vgg import CifarVGG, vgg11, vgg16

__all__ = [
    "DEFAULT_PAIRS",
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "FeatureTap",
    "ModelInfo",
    "StageCNN",
    "create",
    "default_pair",
    "features",
    "list_models",
    "model_info",
    "stage_layers",
]


@dataclass(frozen=True)
class ModelInfo:
    """A zoo entry: builder ``(num_classes, width, in_channels) -> nn.Module`` and what it expects."""

    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # one sample, e.g. (3, 32, 32); spatial sizes are the design size
    num_classes: int
    description: str


_REGISTRY: dict[str, ModelInfo] = {
    i.name: i
    for i in (
        ModelInfo("vgg11", vgg11, (3, 32, 32), 10, "VGG-11-BN, CIFAR style (avg pooling)"),
        ModelInfo("vgg16", vgg16, (3, 32, 32), 10, "VGG-16-BN, CIFAR style (avg pooling)"),
        ModelInfo("resnet18", resnet18, (3, 32, 32), 10, "ResNet-18, 3x3 stem, 64-512 channels"),
        ModelInfo("resnet19", resnet19, (3, 32, 32), 10, "ResNet-19 (tdBN/TET), 128-512 channels, FC-256"),
        ModelInfo("resnet20", resnet20, (3, 32, 32), 10, "ResNet-20 (He et al.), 16-64 channels"),
        ModelInfo("digits_cnn", digits_cnn, (1, 8, 8), 10, "8x8 digits teacher CNN, stages 32/64"),
        ModelInfo("digits_cnn_small", digits_cnn_small, (1, 8, 8), 10, "8x8 digits student CNN, stages 16/32"),
        ModelInfo("fashion_cnn", fashion_cnn, (1, 28, 28), 10, "28x28 (Fashion-MNIST) teacher CNN, stages 32/64/128"),
        ModelInfo("fashion_cnn_small", fashion_cnn_small, (1, 28, 28), 10,
                  "28x28 (Fashion-MNIST) student CNN, stages 16/32/64"),
        ModelInfo("mnist1d_cnn", mnist1d_cnn, (1, 40), 10, "MNIST-1D teacher 1-D CNN, stages 32/64/128"),
        ModelInfo("mnist1d_cnn_small", mnist1d_cnn_small, (1, 40), 10, "MNIST-1D student 1-D CNN, stages 16/32/64"),
    )
}

#: data set -> (teacher, student, num_classes, input shape of one sample)
DEFAULT_PAIRS: dict[str, tuple[str, str, int, tuple[int, ...]]] = {
    "mnist1d": ("mnist1d_cnn", "mnist1d_cnn_small", 10, (1, 40)),
    "digits": ("digits_cnn", "digits_cnn_small", 10, (1, 8, 8)),
    "fashionmnist": ("fashion_cnn", "fashion_cnn_small", 10, (1, 28, 28)),
    "cifar10": ("resnet19", "resnet20", 10, (3, 32, 32)),
    "cifar100": ("resnet19", "resnet20", 100, (3, 32, 32)),
    "tinyimagenet": ("resnet19", "resnet20", 200, (3, 64, 64)),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name`` (ValueError listing the names if unknown)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {list_models()}")
    return _REGISTRY[name]


def create(name: str, *, num_classes: int | None = None, width: float = 1.0, in_channels: int | None = None,
           **kwargs: object) -> nn.Module:
    """Build zoo model ``name`` (an ANN; ``lasnn.spikify`` turns it into an SNN).

    Args:
        name: one of :func:`list_models`.
        num_classes: classifier outputs (default: the entry's, 10).
        width: channel multiplier (< 1 for a narrower student).
        in_channels: input channels (default: the entry's).
        **kwargs: builder-specific options (e.g. ``pool="max"`` for VGG).
    Returns:
        ``nn.Module`` mapping ``[B, *input_shape]`` to ``[B, num_classes]``, with ``feature_layers``.
    """
    info = model_info(name)
    return info.builder(
        num_classes=info.num_classes if num_classes is None else num_classes,
        width=width,
        in_channels=info.input_shape[0] if in_channels is None else in_channels,
        **kwargs,
    )


def default_pair(dataset: str) -> tuple[str, str]:
    """``(teacher, student)`` zoo names for a data set: mnist1d, digits, fashionmnist, cifar10, cifar100, tinyimagenet.

    The two share stage names (``layer1..3`` for the ResNets, ``stage1..`` otherwise) for layer-wise
    distillation; ``DEFAULT_PAIRS[dataset]`` also gives the class count and sample shape.
    """
    if dataset not in DEFAULT_PAIRS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DEFAULT_PAIRS)}")
    t, s, _, _ = DEFAULT_PAIRS[dataset]
    return t, s
