"""MobileNetV2 (Sandler et al., 2018) adapted to 32x32 inputs.

As usual for CIFAR, the stem conv and the second stage use stride 1 instead of 2, so the
feature maps are 32, 32, 16, 8, 8, 4, 4 pixels wide instead of shrinking 32x.
"""

from __future__ import annotations

import torch
from torch import nn

from netslim.models.init import reset_parameters

# (expansion t, output channels c, blocks n, stride s) per stage, as in the paper's Table 2.
STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; a residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, expansion: int, stride: int):
        super().__init__()
        hidden = in_ch * expansion
        layers = conv_bn(in_ch, hidden, 1) if expansion != 1 else []
        layers += conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += conv_bn(hidden, out_ch, 1, act=False)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = conv_bn(3, 32, 3, stride=1)
        in_ch = 32
        for i, (t, c, n, s) in enumerate(STAGES):
            s = 1 if i == 1 else s  # 32x32 input: keep the resolution one stage longer
            for j in range(n):
                layers.append(InvertedResidual(in_ch, c, t, s if j == 0 else 1))
                in_ch = c
        layers += conv_bn(in_ch, 1280, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1280, num_classes)
        reset_parameters(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.fc(self.dropout(x))


def mobilenetv2(num_classes: int = 10) -> MobileNetV2:
    return MobileNetV2(num_classes)
