"""CIFAR-style ResNets (3x3 stem, no stem pooling): ResNet-18, ResNet-19 (tdBN/TET), ResNet-20 (He et al.).

Every activation is its own ``nn.ReLU`` module so that ``lasnn.spikify`` gives every spiking site its
own neuron. Stage outputs (``feature_layers``) are the outputs of ``layer1``...``layerN``: the tensors
before each stride-2 stage and the last feature map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lasnn.models._common import check_num_classes, check_width, init_weights, scaled

__all__ = ["BasicBlock", "CifarResNet", "resnet18", "resnet19", "resnet20"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual addition; ``[B, Cin, H, W] -> [B, Cout, H/stride, W/stride]``.

    The shortcut is the identity, or a 1x1 conv + BN when the shape changes (option B of He et al.).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stem (stride 1), stages of BasicBlocks, global average pool, classifier.

    Args:
        blocks: BasicBlocks per stage; the first stage has stride 1, the others stride 2.
        channels: channels per stage (the stem has ``channels[0]``), before the width multiplier.
        num_classes: classifier outputs.
        width: channel multiplier (e.g. 0.5 for a narrower student).
        in_channels: image channels.
        hidden_fc: width of an extra FC + ReLU before the classifier (ResNet-19 uses 256), or None.
    Shapes: ``[B, in_channels, H, W] -> [B, num_classes]``; stage ``layer{k}`` gives
    ``[B, channels[k-1]·width, H / 2^(k-1), W / 2^(k-1)]``.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        channels: Sequence[int],
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
        hidden_fc: int | None = None,
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        width = check_width(width)
        if len(blocks) != len(channels) or not blocks:
            raise ValueError(f"blocks and channels must be non-empty and of equal length, got {blocks}, {channels}")
        chans = [scaled(c, width) for c in channels]
        self.conv1 = nn.Conv2d(in_channels, chans[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        self.relu = nn.ReLU(inplace=True)
        cin = chans[0]
        self.feature_layers: dict[str, str] = {}
        for i, (n, c) in enumerate(zip(blocks, chans, strict=True)):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(*[BasicBlock(cin if j == 0 else c, c, stride if j == 0 else 1) for j in range(n)])
            setattr(self, f"layer{i + 1}", layer)
            self.feature_layers[f"layer{i + 1}"] = f"layer{i + 1}"
            cin = c
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        if hidden_fc:
            hidden = scaled(hidden_fc, width)
            self.fc_hidden: nn.Module = nn.Linear(cin, hidden)
            self.relu_fc: nn.Module = nn.ReLU(inplace=True)
            cin = hidden
        else:
            self.fc_hidden = nn.Identity()
            self.relu_fc = nn.Identity()
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, C, H, W]`` -> logits ``[B, num_classes]``."""
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.flatten(self.avgpool(x))
        return self.fc(self.relu_fc(self.fc_hidden(x)))


def resnet18(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarResNet:
    """ResNet-18, CIFAR variant: stages [2, 2, 2, 2] at 64/128/256/512 channels (11.2M params at width 1)."""
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, width, in_channels)


def resnet19(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarResNet:
    """ResNet-19 of the SNN literature (tdBN, Zheng et al. 2021; TET): stages [3, 3, 2] at 128/256/512, FC-256."""
    return CifarResNet([3, 3, 2], [128, 256, 512], num_classes, width, in_channels, hidden_fc=256)


def resnet20(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (He et al. 2016, CIFAR): stages [3, 3, 3] at 16/32/64 channels (0.27M params at width 1)."""
    return CifarResNet([3, 3, 3], [16, 32, 64], num_classes, width, in_channels)
