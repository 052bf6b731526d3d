"""VGG for CIFAR, built from a cfg list, with the paper's module and state_dict names.

The layout follows the official network-slimming code so that checkpoints move
both ways: ``feature.<i>`` is a Sequential of ``Conv2d(3x3, no bias) -> BatchNorm2d
-> ReLU`` triples with a ``MaxPool2d(2)`` at each ``'M'``; then ``AvgPool2d(2)``,
flatten and ``classifier`` (one Linear). A cfg such as ``[64, 'M', 128, ...]``
therefore fully describes a (pruned or unpruned) network.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.models.init import reset_parameters

CfgItem = Union[int, str]

VGG_CFGS: dict[str, list[CfgItem]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
    ],
    # A narrow VGG-11 for the tests: trains in seconds on a CPU.
    "vgg11-small": [32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256],
    # The demo's network: five convolutions, narrow where the maps are large and wide where
    # they are small (most channels to slim, few MACs); 3.4x cheaper per image on a CPU.
    "vgg5-small": [16, "M", 32, "M", 64, "M", 256, "M", 256],
}


def validate_cfg(cfg: list[CfgItem]) -> list[CfgItem]:
    """Return ``cfg`` as a clean list, or raise NetslimError saying what is wrong with it."""
    if not isinstance(cfg, (list, tuple)) or not cfg:
        raise NetslimError(
            f"a VGG cfg must be a non-empty list such as [64, 'M', 128], got {cfg!r}"
        )
    clean: list[CfgItem] = []
    for item in cfg:
        if item == "M":
            clean.append("M")
        elif isinstance(item, int) and not isinstance(item, bool) and item > 0:
            clean.append(int(item))
        else:
            raise NetslimError(
                f"bad entry {item!r} in VGG cfg {list(cfg)!r}: each entry must be a positive "
                "channel count or 'M' (max-pool)"
            )
    if clean[-1] == "M":
        raise NetslimError(f"VGG cfg {clean!r} must end with a conv layer, not 'M'")
    if clean.count("M") > 4:
        raise NetslimError(f"VGG cfg {clean!r} has more than 4 max-pools; 32x32 inputs allow 4")
    return clean


class VGG(nn.Module):
    """CIFAR VGG: ``feature`` (conv-BN-ReLU and max-pools), 2x2 average pool, ``classifier``.

    Args:
        cfg: channel counts of the conv layers in order, with ``'M'`` for each 2x2 max-pool.
        num_classes: outputs of the classifier (10 for CIFAR-10, 100 for CIFAR-100).
        init_weights: initialise as :func:`netslim.models.init.reset_parameters` does.
            Set False when weights will be loaded anyway.
    """

    def __init__(self, cfg: list[CfgItem], num_classes: int = 10, init_weights: bool = True):
        super().__init__()
        cfg = validate_cfg(cfg)
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        in_channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [
                    nn.Conv2d(in_channels, v, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                in_channels = v
        self.feature = nn.Sequential(*layers)
        # Four max-pools bring 32x32 to 2x2, which AvgPool2d(2) turns into one vector.
        # With fewer pools the map is larger; pool it to 1x1 so the classifier always
        # sees exactly the last layer's channels (what the paper's cfg-only rebuild assumes).
        self.pool = nn.AvgPool2d(2) if cfg.count("M") == 4 else nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        if init_weights:
            reset_parameters(self)

    @property
    def cfg(self) -> list[CfgItem]:
        """The network's cfg, read from its layers (so it stays true after pruning)."""
        return [
            m.out_channels if isinstance(m, nn.Conv2d) else "M"
            for m in self.feature
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d))
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.feature(x))
        return self.classifier(torch.flatten(x, 1))
