"""torchvision's detectors take a list of images, not a batch."""

from __future__ import annotations

import torch
from torch import nn

from netslim.engine.rules import Rules

DETECTION = "torchvision.models.detection"


def detector_inputs(model: nn.Module, images: torch.Tensor) -> tuple | None:
    """A torchvision detector is called with a list of C x H x W images; None for others."""
    if type(model).__module__.startswith(DETECTION):
        return (list(images),)
    return None


def register(rules: Rules) -> None:
    rules.add_input_adapter(detector_inputs)
