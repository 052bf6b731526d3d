"""Prune a network that holds a layer of your own with weights.

The engine knows torch's convs and linear layers. A layer of your own that computes with
weights (here a pointwise conv written with ``einsum``) is, by default, kept whole: the
engine cannot know how to slice it. Registering it says which axis of each of its tensors
holds its output and its input channels; then it is pruned like a conv, and the pruned
network computes exactly what the masked one (removed channels' gamma and beta zeroed)
computes.

Run it: ``python examples/custom_layer.py``
"""

from __future__ import annotations

import torch
from torch import nn

from netslim import engine
from netslim.engine.plan import reference_network


class Pointwise(nn.Module):
    """A 1x1 convolution of one's own: ``out[o] = sum_i weight[o, i] * x[i] + bias[o]``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oi,nihw->nohw", self.weight, x) + self.bias.view(1, -1, 1, 1)


def network() -> nn.Module:
    """A small CNN with the layer in the middle, its BatchNorms as sparsity training leaves
    them: half of the channels with a tiny gamma."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Pointwise(16, 24),
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 10),
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            n = bn.num_features
            bn.weight.copy_(torch.where(torch.rand(n) < 0.5, 1e-3, 1.0) * torch.rand(n))
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def rules_with_pointwise() -> engine.Rules:
    """The default rules (every adapter included) plus the layer: scoped to the calls they
    are passed to, so nothing else in the process sees them."""
    rules = engine.default_rules().copy()
    rules.register_layer(
        Pointwise,
        params={"weight": ("out", "in"), "bias": ("out",)},  # axis 0 of weight: outputs
        attrs={"in_channels": "in", "out_channels": "out"},  # kept in step with the weights
    )
    return rules


def main() -> float:
    """Prune at ratio 0.5 with and without the registration; returns the largest difference
    between the pruned network and its reference."""
    model = network()
    unregistered = engine.trace_channels(model, (1, 3, 32, 32))
    print(
        f"without the registration: {len(unregistered.prunable)} groups to prune "
        f"({unregistered.fixed_reasons[0]})"
    )

    rules = rules_with_pointwise()
    plan = engine.plan_pruning(model, 0.5, rules=rules)
    pruned = engine.apply_plan(model, plan, compensate=False)  # follows plan.graph.rules
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        difference = float((pruned(x) - reference_network(model, plan, False)(x)).abs().max())
    print(
        f"with it: Pointwise {tuple(model[3].weight.shape)} -> {tuple(pruned[3].weight.shape)}, "
        f"largest difference to the masked network {difference:.1e}"
    )
    return difference


if __name__ == "__main__":
    main()
