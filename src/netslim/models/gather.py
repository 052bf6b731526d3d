"""A channel selection kept as a layer: output channel ``j`` is input channel ``index[j]``.

The paper's pruned ResNet and DenseNet read a subset of a wider feature map in some
layers (its ``channel_selection``): a bottleneck's pre-activation reads the whole
residual stream but its first conv only some channels of it. Where those channels cannot
simply be taken out of the layers around the selection, netslim keeps the selection as
this small module, with the kept channels as an index buffer saved in the state_dict.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelGather(nn.Module):
    """Select channels ``index`` (in that order) of a ``(N, C, ...)`` input.

    Args:
        index: the input channels to keep, one per output channel.
    """

    def __init__(self, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{len(self.index)} channels"
