"""Small CNNs for the small data sets: 8x8 digit images (scikit-learn), MNIST-1D signals, 28x28 Fashion-MNIST.

Both are built by :class:`StageCNN`: stages of (conv, BN, ReLU) x ``convs_per_stage``, a 2x pooling
between stages, an adaptive average pool to a small fixed size (MNIST-1D keeps positional information
that a global pool would throw away) and one linear classifier. Stage outputs ``stage1``... are the
ReLU outputs of each stage (before each downsampling; the last is the last feature map).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lasnn.models._common import check_num_classes, check_width, init_weights, scaled

__all__ = [
    "StageCNN",
    "digits_cnn",
    "digits_cnn_small",
    "fashion_cnn",
    "fashion_cnn_small",
    "mnist1d_cnn",
    "mnist1d_cnn_small",
]

_LAYERS = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d),
}


class StageCNN(nn.Module):
    """A plain staged CNN for 1-D (``[B, C, L]``) or 2-D (``[B, C, H, W]``) input.

    Args:
        dims: 1 or 2 spatial dimensions.
        channels: channels of each stage, before the width multiplier.
        convs_per_stage: conv-BN-ReLU layers per stage.
        kernel_size: conv kernel (odd; "same" padding).
        head_size: output size of the adaptive average pool before the classifier (per spatial dim).
        num_classes, width, in_channels: as usual.
    Stage ``stage{k}`` output: ``[B, channels[k-1]·width, L / 2^(k-1)]`` (or ``H, W`` likewise).
    """

    def __init__(
        self,
        dims: int,
        channels: Sequence[int],
        convs_per_stage: int = 1,
        kernel_size: int = 3,
        head_size: int = 1,
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if dims not in _LAYERS:
            raise ValueError(f"dims must be 1 or 2, got {dims!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        num_classes = check_num_classes(num_classes)
        width = check_width(width)
        conv, bn, pool, adaptive = _LAYERS[dims]
        self.dims = dims
        self.num_stages = len(channels)
        self.feature_layers: dict[str, str] = {}
        cin = in_channels
        for i, c0 in enumerate(channels):
            c = scaled(c0, width)
            layers: list[nn.Module] = []
            for _ in range(convs_per_stage):
                layers += [conv(cin, c, kernel_size, 1, kernel_size // 2, bias=False), bn(c), nn.ReLU(inplace=True)]
                cin = c
            setattr(self, f"stage{i + 1}", nn.Sequential(*layers))
            self.feature_layers[f"stage{i + 1}"] = f"stage{i + 1}"
            if i + 1 < len(channels):
                setattr(self, f"pool{i + 1}", pool(2))
        self.head_pool = adaptive(head_size)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin * head_size**dims, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, C, L]`` or ``[B, C, H, W]`` -> logits ``[B, num_classes]``."""
        for i in range(self.num_stages):
            x = getattr(self, f"stage{i + 1}")(x)
            if i + 1 < self.num_stages:
                x = getattr(self, f"pool{i + 1}")(x)
        return self.fc(self.flatten(self.head_pool(x)))


def digits_cnn(num_classes: int = 10, width: float = 1.0, in_channels: int = 1) -> StageCNN:
    """Teacher for 8x8 digits ``[B, 1, 8, 8]``: stages 32, 64 (two 3x3 convs each), 2x2 head."""
    return StageCNN(2, [32, 64], 2, 3, 2, num_classes, width, in_channels)


def digits_cnn_small(num_classes: int = 10, width: float = 1.0, in_channels: int = 1) -> StageCNN:
    """Student for 8x8 digits: stages 16, 32 (one 3x3 conv each), 2x2 head."""
    return StageCNN(2, [16, 32], 1, 3, 2, num_classes, width, in_channels)


def mnist1d_cnn(num_classes: int = 10, width: float = 1.0, in_channels: int = 1) -> StageCNN:
    """Teacher for MNIST-1D ``[B, 1, 40]``: stages 32, 64, 128 (two k=5 convs each) at lengths 40/20/10, head 5."""
    return StageCNN(1, [32, 64, 128], 2, 5, 5, num_classes, width, in_channels)


def mnist1d_cnn_small(num_classes: int = 10, width: float = 1.0, in_channels: int = 1) -> StageCNN:
    """Student for MNIST-1D: the teacher's layout at half the width (stages 16, 32, 64)."""
    return StageCNN(1, [16, 32, 64], 2, 5, 5, num_classes, width, in_channels)


def fashion_cnn(num_classes: int = 10, width: float = 1.0, in_channels: int = 1) -> StageCNN:
    """Teacher for 28x28 images (Fashion-MNIST ``[B, 1, 28, 28]``): stages 32, 64, 128 (two 3x3 convs each) at
    28/14/7 pixels, 2x2 head."""
    return StageCNN(2, [32, 64, 128], 2, 3, 2, num_classes, width, in_channels)


def fashion_cnn_small(num_classes: int = 10, width: float = 1.0, in_channels: int = 1) -> StageCNN:
    """Student for 28x28 images: stages 16, 32, 64 (one 3x3 conv each) at 28/14/7 pixels, 2x2 head."""
    return StageCNN(2, [16, 32, 64], 1, 3, 2, num_classes, width, in_channels)
