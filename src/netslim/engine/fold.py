"""Fold each BatchNorm into the conv or linear layer before it, for inference.

In eval mode a BatchNorm is the per-channel affine map
``y = (x - mean) / sqrt(var + eps) * gamma + beta``. When it alone reads a conv's (or a
linear layer's) output, the map folds into that layer's weights and bias, and the
BatchNorm becomes an identity: one layer less to run, the same outputs up to rounding.
BatchNorms with no such layer before them (the pre-activation ones of ResNet-164 and
DenseNet-40, which read a sum or a concatenation) stay as they are, and so do subclasses of
BatchNorm from other libraries, whose forward may do more than normalise.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from netslim.engine.trace import trace_channels


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def _folded(layer: nn.Module, bn: nn.Module) -> nn.Module:
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    folded = copy.deepcopy(layer)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)  # one scale per output channel
    weight = layer.weight.double() * scale.view(shape)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    folded.weight = nn.Parameter(weight.to(layer.weight.dtype))
    folded.bias = nn.Parameter((bias * scale + shift).to(layer.weight.dtype))
    return folded


def fold_bn(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> nn.Module:
    """A copy of ``model`` in eval mode with every foldable BatchNorm folded into its layer.

    A BatchNorm folds when it is the only reader of a conv's or linear layer's output
    (found by :func:`netslim.engine.trace.trace_channels` on an input of ``input_size``) and
    keeps running statistics; it is then replaced by ``nn.Identity``. The copy gives the
    same outputs as ``model.eval()`` up to float rounding (the folding is computed in
    float64). ``model`` itself is left unchanged.

    Example::

        >>> fast = netslim.fold_bn(netslim.load("pruned.pth"))
    """
    graph = trace_channels(model, input_size)
    folded = copy.deepcopy(model).eval()
    for name, layer in graph.layers.items():
        if layer.norm is None:
            continue
        bn = folded.get_submodule(layer.norm)
        if bn.running_var is None:  # statistics of the batch at hand: nothing fixed to fold
            continue
        if not type(bn).__module__.startswith("torch."):  # a subclass may add to its forward
            continue  # (timm's BatchNormAct2d applies an activation): an identity would drop it
        _replace(folded, name, _folded(folded.get_submodule(name), bn))
        _replace(folded, layer.norm, nn.Identity())
    return folded
