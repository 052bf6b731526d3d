"""The architectures netslim trains and slims, by name.

Every network is defined here (no downloaded weights) and scales its channels with
BatchNorm, which is what sparsity training and the pruning engine need:

=============== ==============================================================
``vgg11..19``   CIFAR VGG with the paper's layout (``vgg11-small``, ``vgg5-small``: small ones)
``resnet56``    He et al.'s CIFAR ResNet, post-activation basic blocks (also 20, 32)
``resnet164``   the paper's pre-activation bottleneck ResNet
``densenet40``  the paper's DenseNet-40, growth rate 12
``resnet18``    ImageNet's ResNet-18 with a 32x32 stem
``mobilenetv2`` MobileNetV2 with a 32x32 stem
=============== ==============================================================

and any network named by a spec (:mod:`netslim.models.external`): ``torchvision:NAME``,
``timm:NAME`` or ``package.module:callable``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from netslim.config import ARCH_CHOICES, ARCHS, check_arch_name, is_spec
from netslim.errors import NetslimError
from netslim.models.densenet import DenseNet, densenet40
from netslim.models.external import build_external, resolve
from netslim.models.gather import ChannelGather
from netslim.models.mobilenet import MobileNetV2, mobilenetv2
from netslim.models.resnet import (
    PreActResNet,
    ResNet,
    resnet18,
    resnet20,
    resnet32,
    resnet56,
    resnet164,
)
from netslim.models.vgg import VGG, VGG_CFGS, CfgItem, validate_cfg

_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    **{name: (lambda n, cfg=cfg: VGG(list(cfg), num_classes=n)) for name, cfg in VGG_CFGS.items()},
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet164": resnet164,
    "densenet40": densenet40,
    "resnet18": resnet18,
    "mobilenetv2": mobilenetv2,
}


def build_model(arch: str, num_classes: int = 10) -> nn.Module:
    """Build the unpruned network ``arch`` with fresh weights: one of :data:`ARCHS`, or
    ``torchvision:NAME``, ``timm:NAME``, ``package.module:callable``."""
    if is_spec(arch):
        return build_external(arch, num_classes)
    if arch not in _BUILDERS:
        raise NetslimError(f"unknown architecture {arch!r}; {ARCH_CHOICES}")
    return _BUILDERS[arch](num_classes)


def check_arch(arch: str, load: bool = False) -> None:
    """Raise NetslimError unless ``arch`` is a known name or a well-formed spec; with
    ``load``, also import what a spec names and check that it is there."""
    check_arch_name(arch)
    if load and is_spec(arch):
        resolve(arch)


def model_inputs(model: nn.Module, images: torch.Tensor) -> tuple:
    """The arguments to call ``model`` with on a batch of ``images`` (N, C, H, W): the batch
    itself, or for a torchvision detector (which takes a list of C x H x W images) the list.

    For code below the engine; the engine asks its rules instead
    (:func:`netslim.engine.model_inputs`, the torchvision adapter), which say the same."""
    if type(model).__module__.startswith("torchvision.models.detection"):
        return (list(images),)
    return (images,)


# Where detectors and segmenters keep their number of classes (torchvision's, Ultralytics').
_CLASSES_AT = ("nc", "yaml.nc", "roi_heads.box_predictor.cls_score.out_features",
               "head.classification_head.num_classes", "head.classification_head.num_columns",
               "classifier.4.out_channels",
               "classifier.low_classifier.out_channels")  # fmt: skip


def num_outputs(model: nn.Module) -> int:
    """The classes of the network: its ``num_classes`` attribute (timm's models have one),
    where a torchvision detector or segmenter or an Ultralytics model keeps it, else the
    outputs of its last Linear layer."""
    for path in ("num_classes", *_CLASSES_AT):
        value: object = model
        for part in path.split("."):
            value = _part(value, part)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise NetslimError(f"{type(model).__name__} has no Linear layer to read its classes from")
    return linears[-1].out_features


def _child(module: object, index: str) -> object:
    try:
        return module[int(index)]  # type: ignore[index]
    except (TypeError, IndexError, KeyError):
        return None


def _part(value: object, part: str) -> object:
    if isinstance(value, dict):
        return value.get(part)
    return _child(value, part) if part.isdigit() else getattr(value, part, None)


__all__ = [
    "ARCHS",
    "VGG",
    "VGG_CFGS",
    "CfgItem",
    "ChannelGather",
    "DenseNet",
    "MobileNetV2",
    "PreActResNet",
    "ResNet",
    "build_model",
    "check_arch",
    "is_spec",
    "model_inputs",
    "num_outputs",
    "validate_cfg",
]
