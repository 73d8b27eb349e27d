"""CIFAR-style VGG-11/16 with batch norm.

Convs are 3x3 with BN and a ReLU module each; the five 2x2 poolings are average pools by default
(exact on firing rates, so the same net also suits ANN-to-SNN conversion; ``pool="max"`` for max
pooling). After the last pool, a global average pool and one linear classifier (input 32x32 gives a
1x1 map; 64x64 gives 2x2, averaged). Stage outputs ``stage1``...``stage5`` are the ReLU outputs just
before each pooling (the last one is also the last feature map).
"""

from __future__ import annotations

import torch
from torch import nn

from lasnn.models._common import check_num_classes, check_width, init_weights, scaled

__all__ = ["CFGS", "CifarVGG", "vgg11", "vgg16"]

CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    """VGG with BN for small images: ``[B, in_channels, H, W] -> [B, num_classes]``.

    Args:
        cfg: channels per conv, ``"M"`` for a 2x2 pooling.
        num_classes: classifier outputs.
        width: channel multiplier.
        in_channels: image channels.
        pool: ``"avg"`` (default) or ``"max"``.
    """

    def __init__(
        self, cfg: list[int | str], num_classes: int = 10, width: float = 1.0, in_channels: int = 3, pool: str = "avg"
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        width = check_width(width)
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        layers: list[nn.Module] = []
        self.feature_layers: dict[str, str] = {}
        cin = in_channels
        for v in cfg:
            if v == "M":
                # the ReLU just appended is the stage output (the tensor before this downsampling)
                self.feature_layers[f"stage{len(self.feature_layers) + 1}"] = f"features.{len(layers) - 1}"
                layers.append(nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2))
            else:
                c = scaled(int(v), width)
                layers += [nn.Conv2d(cin, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                cin = c
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, C, H, W]`` (H, W multiples of 32) -> logits ``[B, num_classes]``."""
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def vgg11(num_classes: int = 10, width: float = 1.0, in_channels: int = 3, pool: str = "avg") -> CifarVGG:
    """VGG-11 with BN, CIFAR variant (8 convs + 1 linear; 9.2M params at width 1)."""
    return CifarVGG(CFGS["vgg11"], num_classes, width, in_channels, pool)


def vgg16(num_classes: int = 10, width: float = 1.0, in_channels: int = 3, pool: str = "avg") -> CifarVGG:
    """VGG-16 with BN, CIFAR variant (13 convs + 1 linear; 14.7M params at width 1)."""
    return CifarVGG(CFGS["vgg16"], num_classes, width, in_channels, pool)
