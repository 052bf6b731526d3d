"""Test accuracy of a network on a data set, and the check that the two belong together."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from netslim.data.batches import ImageData
from netslim.errors import NetslimError
from netslim.models import num_outputs
from netslim.runtime.device import autocast


def check_classes(model: nn.Module, data: ImageData) -> None:
    """Raise NetslimError unless ``model`` has one output per class of ``data``: a network
    measured or trained on data with other classes gives numbers that mean nothing."""
    if num_outputs(model) != data.num_classes:
        raise NetslimError(
            f"the model has {num_outputs(model)} outputs but dataset "
            f"{data.name} has {data.num_classes} classes; use a matching --dataset"
        )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: ImageData,
    batch_size: int = 1000,
    dtype: torch.dtype | None = None,
    split: str = "test",
) -> tuple[float, float]:
    """Mean loss and accuracy (%) of ``model`` on a split of ``data``, in eval mode."""
    device = data.device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    total = 0
    for x, y in data.eval_batches(batch_size, split=split):
        with autocast(device, dtype):
            out = model(x.contiguous(memory_format=torch.channels_last))
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        total += len(y)
    model.train(was_training)
    return loss_sum.item() / total, 100.0 * correct.item() / total
