"""Parameter and multiply-accumulate (MAC) counts of a network.

MACs are counted by running one input through the model with forward hooks on conv and
linear layers (:func:`netslim.engine.graph.layer_macs`): a conv costs
``out_elements * in_channels/groups * kh * kw``, a linear ``out_elements * in_features``.
BatchNorm, ReLU and pooling are not counted, as in the paper, whose "FLOPs" are about
twice these MACs (VGG-19: 3.98e8 MACs, 7.97e8 FLOPs in the paper's Table 1).
"""

from __future__ import annotations

import torch
from torch import nn

from netslim.engine.graph import layer_macs
from netslim.engine.rules import Rules, default_rules


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable tensors, not BN running statistics)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(
    model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32), rules: Rules | None = None
) -> int:
    """Multiply-accumulates of one forward pass on an input of ``input_size`` (batch 1);
    ``rules`` say how to call the model (a torchvision detector takes a list of images)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += layer_macs(module, output)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        x = torch.zeros(input_size, device=param.device, dtype=param.dtype)
        model(*(rules or default_rules()).model_inputs(model, x))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and floating-point buffers of ``model`` that hold NaN or Inf."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [
        name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
