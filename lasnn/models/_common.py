"""Helpers shared by the zoo builders."""

from __future__ import annotations

from torch import nn

from lasnn.checks import check_float


def check_width(width: object) -> float:
    """Require a width multiplier > 0."""
    return check_float("width", width, positive=True)


def check_num_classes(num_classes: object) -> int:
    """Require an int >= 1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return num_classes


def scaled(channels: int, width: float) -> int:
    """Channels after the width multiplier (at least 1)."""
    return max(1, round(channels * width))


def init_weights(model: nn.Module) -> None:
    """He (fan-out) init for convs, as in torchvision's ResNet; BN starts as the identity."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
