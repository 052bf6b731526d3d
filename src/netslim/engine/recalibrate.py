"""Re-estimating BatchNorm running statistics after pruning.

Pruning changes what every layer after the first sees, so the running means and
variances learned on the unpruned network are stale. Forwarding a few batches of
unlabeled training images in train mode, with ``momentum=None`` (a cumulative
average over the batches instead of an exponential one), re-estimates them. No
labels, no gradients, no weight changes: only the BN buffers move.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from netslim.engine.sparsity import BN_TYPES


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm's running statistics by their average over ``batches``.

    Args:
        model: the network; its mode (train/eval) is restored afterwards.
        batches: input tensors, already normalised and on the model's device.

    Returns:
        The number of batches used. With none, the statistics are left as they were.
    """
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    batches = iter(batches)
    first = next(batches, None)
    if first is None or not bns:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    used = 0
    try:
        for x in itertools.chain([first], batches):
            model(x)
            used += 1
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
    return used
