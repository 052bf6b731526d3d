"""DenseNet-40 (growth rate 12) for CIFAR, the paper's DenseNet.

Each layer is ``bn -> relu -> conv3x3`` producing ``growth`` new channels that are
concatenated to its input; transitions are ``bn -> relu -> conv1x1 -> avg-pool 2``
(no compression). Every channel of the concatenated map is read through the BN of each
later layer, so each BN's gammas score the channels that layer reads. Each BN reads
through ``select``: an identity, or the channel selection
(:class:`~netslim.models.gather.ChannelGather`) of the paper's pruned DenseNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from netslim.models.init import reset_parameters


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        self.select = nn.Identity()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(self.select(x))))], dim=1)


class Transition(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.select = nn.Identity()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(self.select(x)))), 2)


class DenseNet(nn.Module):
    """DenseNet of three dense blocks of ``(depth - 4) / 3`` layers each."""

    def __init__(self, depth: int = 40, growth: int = 12, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 3:
            raise ValueError(f"a DenseNet without bottlenecks has depth 3n + 4, got {depth}")
        n = (depth - 4) // 3
        self.num_classes = num_classes
        channels = 2 * growth
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for block in range(3):
            for _ in range(n):
                stages.append(DenseLayer(channels, growth))
                channels += growth
            if block < 2:
                stages.append(Transition(channels, channels))
        self.features = nn.Sequential(*stages)
        self.select = nn.Identity()
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        reset_parameters(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.select(self.features(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def densenet40(num_classes: int = 10) -> DenseNet:
    """The paper's DenseNet-40 with growth rate 12."""
    return DenseNet(40, 12, num_classes)
