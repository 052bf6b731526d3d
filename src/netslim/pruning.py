"""Channel pruning by one global threshold on BatchNorm scaling factors.

The steps, each usable on its own:

1. :func:`global_threshold` -- the paper's rule: sort all ``|gamma|`` of all BatchNorm
   layers, take the value at index ``int(total * ratio)``; a channel is kept when its
   ``|gamma|`` is strictly greater. Ties at the threshold are all removed, so slightly
   more than ``ratio`` may go. ``ratio == 0`` keeps everything (the official code would
   remove the channel(s) holding the very smallest gamma, which nobody means by 0).
2. :func:`plan_pruning` -- the per-layer keep masks, with a floor so that no layer
   collapses: each layer keeps at least ``max(1, ceil(min_keep * channels))`` of its
   largest-``|gamma|`` channels (a warning names every layer that hit the floor).
   Where the floor does not bind, the masks equal those of the paper's vggprune.py.
3. :func:`prune_vgg` -- build the physically smaller network and copy the kept weights.

Bias compensation (``compensate=True``). Once gamma is 0, a channel's output after
BN and ReLU is the constant ``relu(beta)``. Dropping the channel drops that constant
from what the next layer sums, so it is folded back in: into the next BatchNorm's
``running_mean`` (which the next conv's output feeds) or into the classifier's bias.
The pruned network then computes exactly what the unpruned network computes with the
pruned gammas set to 0 (betas kept) wherever the next conv sees no zero padding: the
classifier's inputs, and the interior of every feature map. At the one-pixel border
the padded zeros replace part of the constant, so there the fold is an approximation.
Without compensation the result is exactly the official code's (pruned gamma *and*
beta zeroed, so the dropped channels output 0).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.models import VGG, CfgItem
from netslim.sparsity import batchnorms, bn_gammas


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` as a float, or raise NetslimError unless ``0 <= ratio < 1``."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise NetslimError(f"prune ratio must be a number in [0, 1), got {ratio!r}") from None
    if not 0.0 <= value < 1.0:
        raise NetslimError(
            f"prune ratio must be in [0, 1) (the share of channels to remove, e.g. 0.7), got {ratio}"
        )
    return value


def global_threshold(gammas: torch.Tensor, ratio: float) -> float:
    """The official threshold: ``sorted(|gammas|)[int(len * ratio)]`` (-inf for ratio 0).

    Channels with ``|gamma| > threshold`` are kept.
    """
    ratio = check_ratio(ratio)
    if ratio == 0.0 or gammas.numel() == 0:
        return float("-inf")
    ordered = torch.sort(gammas.detach().abs().flatten().float()).values
    return ordered[int(ordered.numel() * ratio)].item()


@dataclass
class PrunePlan:
    """Which channels of each BatchNorm layer survive.

    Attributes:
        ratio: the requested share of channels to remove.
        threshold: the global ``|gamma|`` threshold (channels strictly above it are kept).
        masks: BatchNorm module name -> bool tensor, True where the channel is kept.
        floored: names of the layers whose channels the per-layer floor kept alive.
    """

    ratio: float
    threshold: float
    masks: dict[str, torch.Tensor]
    floored: list[str] = field(default_factory=list)

    @property
    def kept(self) -> dict[str, tuple[int, int]]:
        """Layer name -> (kept, total) channels."""
        return {n: (int(m.sum()), m.numel()) for n, m in self.masks.items()}

    @property
    def pruned_share(self) -> float:
        """The share of all channels actually removed."""
        kept = sum(k for k, _ in self.kept.values())
        total = sum(t for _, t in self.kept.values())
        return 1.0 - kept / total if total else 0.0


def plan_pruning(model: nn.Module, ratio: float, min_keep: float = 0.01) -> PrunePlan:
    """Decide the kept channels of every BatchNorm layer of ``model`` (see module docs).

    Args:
        model: any network whose channels are scaled by BatchNorm.
        ratio: share of all channels to remove, in [0, 1).
        min_keep: per-layer floor as a share of the layer's channels; at least one
            channel is always kept.
    """
    if not 0.0 <= min_keep <= 1.0:
        raise NetslimError(f"min_keep must be a share in [0, 1], got {min_keep}")
    threshold = global_threshold(bn_gammas(model), ratio)
    masks: dict[str, torch.Tensor] = {}
    floored: list[str] = []
    for name, bn in batchnorms(model):
        gamma = bn.weight.detach().abs().float().cpu()
        mask = gamma > threshold
        floor = max(1, math.ceil(min_keep * gamma.numel()))
        if int(mask.sum()) < floor:
            mask = torch.zeros_like(mask)
            mask[torch.topk(gamma, floor).indices] = True
            floored.append(name)
        masks[name] = mask
    if floored:
        warnings.warn(
            f"pruning at ratio {ratio} would leave too few channels in {', '.join(floored)}; "
            f"kept the largest-|gamma| {min_keep:.0%} (at least 1) of each instead",
            stacklevel=2,
        )
    return PrunePlan(float(ratio), threshold, masks, floored)


@torch.no_grad()
def masked_copy(
    model: nn.Module, masks: dict[str, torch.Tensor], zero_beta: bool = True
) -> nn.Module:
    """A copy of ``model`` with the pruned channels' gamma set to 0 (and beta, if ``zero_beta``).

    With ``zero_beta`` this is the official code's masked network, which the pruned
    network without compensation reproduces exactly; without it, the network that
    bias compensation reproduces away from the borders.
    """
    masked = copy.deepcopy(model)
    for name, bn in batchnorms(masked):
        drop = ~masks[name].to(bn.weight.device)
        bn.weight[drop] = 0.0
        if zero_beta:
            bn.bias[drop] = 0.0
    return masked


def _vgg_blocks(model: VGG) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d]]:
    """The (BN name, conv, BN) triples of a VGG's feature stack, in order."""
    mods = list(model.feature.named_children())
    blocks = []
    for i, (_, m) in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            bn_name, bn = mods[i + 1]
            blocks.append((f"feature.{bn_name}", m, bn))
    return blocks


@torch.no_grad()
def prune_vgg(model: VGG, plan: PrunePlan, compensate: bool = True) -> VGG:
    """Build the smaller VGG that keeps ``plan``'s channels and copy their weights into it.

    The input model is not modified. See the module docs for ``compensate``.
    """
    if not isinstance(model, VGG):
        raise NetslimError(f"prune_vgg needs a netslim VGG, got {type(model).__name__}")
    blocks = _vgg_blocks(model)
    missing = [name for name, _, _ in blocks if name not in plan.masks]
    if missing:
        raise NetslimError(f"the prune plan has no mask for layer(s) {', '.join(missing)}")

    new_cfg: list[CfgItem] = []
    i = 0
    for item in model.cfg:
        if item == "M":
            new_cfg.append("M")
        else:
            new_cfg.append(int(plan.masks[blocks[i][0]].sum()))
            i += 1
    device = next(model.parameters()).device
    pruned = VGG(new_cfg, num_classes=model.num_classes, init_weights=False).to(device)
    new_blocks = _vgg_blocks(pruned)

    pruned.classifier.bias.copy_(model.classifier.bias)
    keep_in = torch.arange(3, device=device)
    shift: torch.Tensor | None = None  # folded constant for the current layer's conv output
    for (name, conv, bn), (_, new_conv, new_bn) in zip(blocks, new_blocks):
        mask = plan.masks[name].to(device)
        keep = mask.nonzero().flatten()
        new_conv.weight.copy_(conv.weight[keep][:, keep_in])
        running_mean = bn.running_mean.clone()
        if shift is not None:
            running_mean -= shift  # the dropped constant inputs no longer reach this conv
        new_bn.weight.copy_(bn.weight[keep])
        new_bn.bias.copy_(bn.bias[keep])
        new_bn.running_mean.copy_(running_mean[keep])
        new_bn.running_var.copy_(bn.running_var[keep])
        new_bn.num_batches_tracked.copy_(bn.num_batches_tracked)
        constant = torch.relu(bn.bias) * (~mask)  # what each dropped channel outputs once gamma=0
        shift = None
        if compensate and bool((constant != 0).any()):
            nxt = _next_conv(blocks, name)
            if nxt is not None:  # sum of the next conv's kernel over space, times the constant
                shift = nxt.weight.sum(dim=(2, 3)) @ constant
            else:  # the classifier sees the average-pooled constant, i.e. the constant
                pruned.classifier.bias.add_(model.classifier.weight @ constant)
        keep_in = keep
    pruned.classifier.weight.copy_(model.classifier.weight[:, keep_in])
    return pruned


def _next_conv(blocks: list[tuple[str, nn.Conv2d, nn.BatchNorm2d]], name: str) -> nn.Conv2d | None:
    names = [n for n, _, _ in blocks]
    i = names.index(name)
    return blocks[i + 1][1] if i + 1 < len(blocks) else None


def prune(
    model: VGG, ratio: float, *, compensate: bool = True, min_keep: float = 0.01
) -> tuple[VGG, PrunePlan]:
    """Plan and carry out pruning of ``model`` at ``ratio``: returns (pruned model, plan)."""
    plan = plan_pruning(model, ratio, min_keep=min_keep)
    return prune_vgg(model, plan, compensate=compensate), plan
