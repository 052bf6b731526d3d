"""Residual networks: CIFAR ResNet-20/32/56, pre-activation ResNet-164, and ResNet-18 for 32x32.

All shortcuts that change shape are projections (1x1 conv, plus BN in the post-activation
nets), never zero-padding: a projection is an ordinary layer the pruning engine can shrink,
where zero-padding would hard-code the channel count in ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from netslim.models.init import reset_parameters


def _stages(
    block: type[nn.Module], in_planes: int, stages: list[tuple[int, int, int]]
) -> tuple[nn.Sequential, int]:
    """Stages of ``block`` from ``(planes, blocks, stride)`` each (the stride on the first
    block of a stage); returns them and the channels they output."""
    layers = []
    for planes, blocks, stride in stages:
        stage = []
        for s in [stride] + [1] * (blocks - 1):
            stage.append(block(in_planes, planes, s))
            in_planes = planes * getattr(block, "expansion", 1)
        layers.append(nn.Sequential(*stage))
    return nn.Sequential(*layers), in_planes


class BasicBlock(nn.Module):
    """Post-activation block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()  # identity
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A post-activation ResNet of :class:`BasicBlock` stages on 32x32 inputs.

    Args:
        stages: ``(planes, blocks, stride)`` per stage.
        stem: channels of the first 3x3 conv (stride 1: no downsampling at the input).
        num_classes: outputs of ``fc``.
    """

    def __init__(self, stages: list[tuple[int, int, int]], stem: int, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layers, in_planes = _stages(BasicBlock, stem, stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        reset_parameters(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al., Identity Mappings, 2016), 4x expansion.

    ``bn1 -> relu -> conv1 (1x1) -> bn2 -> relu -> conv2 (3x3) -> bn3 -> relu -> conv3 (1x1)``,
    added to the input. A projection shortcut reads the pre-activated input, as in that
    paper, so every layer reading the residual stream does so through a BatchNorm: each
    stream channel is then scaled by gammas the L1 term can drive to 0. With
    ``raw_shortcut`` it reads the raw input instead, as the network-slimming code's
    model does (:mod:`netslim.official`). ``select`` is an identity, or the channel
    selection (:class:`~netslim.models.gather.ChannelGather`) of a paper's pruned file.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, raw_shortcut: bool = False):
        super().__init__()
        out_planes = planes * self.expansion
        self.raw_shortcut = raw_shortcut
        self.select = nn.Identity()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.select(x)))
        if self.shortcut is None:
            residual = x
        else:
            residual = self.shortcut(x if self.raw_shortcut else out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + residual


class PreActResNet(nn.Module):
    """CIFAR pre-activation bottleneck ResNet of ``depth = 9n + 2`` layers (164: n = 18)."""

    def __init__(self, depth: int = 164, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"a bottleneck ResNet has depth 9n + 2, got {depth}")
        n = (depth - 2) // 9
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        stages = [(16, n, 1), (32, n, 2), (64, n, 2)]
        self.layers, in_planes = _stages(PreActBottleneck, 16, stages)
        self.select = nn.Identity()  # or a ChannelGather (see PreActBottleneck)
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        reset_parameters(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.select(self.layers(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(depth: int, num_classes: int = 10) -> ResNet:
    """He et al.'s CIFAR ResNet of ``depth`` = 6n + 2 layers: 3 stages of n basic blocks,
    16/32/64 channels (20, 32, 56: the family the Pareto test compares, bench/pareto.py)."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"a CIFAR ResNet has 6n + 2 layers (20, 32, 56, ...), not {depth}")
    n = (depth - 2) // 6
    return ResNet([(16, n, 1), (32, n, 2), (64, n, 2)], stem=16, num_classes=num_classes)


def resnet20(num_classes: int = 10) -> ResNet:
    """He et al.'s CIFAR ResNet-20: 3 stages of 3 basic blocks."""
    return cifar_resnet(20, num_classes)


def resnet32(num_classes: int = 10) -> ResNet:
    """He et al.'s CIFAR ResNet-32: 3 stages of 5 basic blocks."""
    return cifar_resnet(32, num_classes)


def resnet56(num_classes: int = 10) -> ResNet:
    """He et al.'s CIFAR ResNet-56: 3 stages of 9 basic blocks, 16/32/64 channels."""
    return cifar_resnet(56, num_classes)


def resnet18(num_classes: int = 10) -> ResNet:
    """ImageNet's ResNet-18 for 32x32 inputs: a 3x3 stride-1 stem and no max-pool."""
    return ResNet(
        [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)], stem=64, num_classes=num_classes
    )


def resnet164(num_classes: int = 10) -> PreActResNet:
    """The paper's pre-activation bottleneck ResNet-164 for CIFAR."""
    return PreActResNet(164, num_classes)
