"""Which channels to remove: one global threshold on BatchNorm scaling factors.

The steps, each usable on its own:

1. :func:`global_threshold` -- the paper's rule: sort all ``|gamma|`` of all BatchNorm
   layers, take the value at index ``int(total * ratio)``; a channel is kept when its
   ``|gamma|`` is strictly greater. Ties at the threshold are all removed, so slightly
   more than ``ratio`` may go. ``ratio == 0`` keeps everything (the official code would
   remove the channel(s) holding the very smallest gamma, which nobody means by 0).
2. :func:`plan_pruning` -- the keep masks of every channel group that
   :func:`netslim.channels.trace_channels` finds. A group's channel is scored by the
   **largest** ``|gamma|`` among the BatchNorms that scale it (in a VGG there is one; on
   a residual stream, one per block; in a DenseNet, one per later layer), and removed
   when that score is at or below the threshold: a channel goes only when *every*
   gamma that scales it is unimportant, so no gamma above the threshold is ever cut.
   A floor keeps each group from collapsing: at least ``max(1, ceil(min_keep * size))``
   of its best channels stay (a warning names every group that hit it). In a VGG the
   masks equal those of the paper's vggprune.py wherever the floor does not bind.
   :func:`plan_for_macs` instead finds the threshold that leaves a given share of MACs.
   With ``round_to=N`` every prunable group then keeps a multiple of N channels
   (:func:`round_kept`), the widths fast kernels like.
3. :func:`netslim.surgery.apply_plan` -- build the physically smaller network.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from netslim.channels import ChannelGraph, Space, trace_channels
from netslim.errors import NetslimError
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
    """Which channels of each group survive.

    Attributes:
        ratio: the requested share of BatchNorm channels to remove.
        threshold: the global ``|gamma|`` threshold (scores strictly above it are kept).
        graph: the traced channel groups of the network.
        keep: group id -> bool tensor, True where the channel is kept (all True when fixed).
        floored: labels of the groups whose channels the floor kept alive.
        round_to: every prunable group keeps a multiple of this many channels (1: any).
    """

    ratio: float
    threshold: float
    graph: ChannelGraph
    keep: dict[int, torch.Tensor]
    floored: list[str] = field(default_factory=list)
    round_to: int = 1

    def kept_of(self, space: Space) -> torch.Tensor:
        """Bool mask over the entries of a channel space (e.g. a BN's channels)."""
        return torch.cat([self.keep[g].repeat_interleave(r) for g, r in space])

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """BatchNorm name -> bool mask of its kept channels."""
        return {name: self.kept_of(space) for name, space in self.graph.norms.items()}

    @property
    def kept(self) -> dict[str, tuple[int, int]]:
        """Prunable group label -> (kept, total) channels."""
        return {g.label: (int(self.keep[i].sum()), g.size) for i, g in self.graph.prunable.items()}

    @property
    def pruned_share(self) -> float:
        """The share of all BatchNorm channels actually removed."""
        masks = list(self.masks.values())
        total = sum(m.numel() for m in masks)
        return 1.0 - sum(int(m.sum()) for m in masks) / total if total else 0.0

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the pruned network on one input (as :func:`count_macs`)."""
        total = 0
        for layer in self.graph.layers.values():
            n_in, n_out = (
                int(self.kept_of(layer.inputs).sum()),
                int(self.kept_of(layer.outputs).sum()),
            )
            # a depthwise conv's output channel reads one input channel, a grouped one n_in/groups
            per_out = 1 if layer.kind == "depthwise" else n_in // layer.groups
            total += layer.pixels * layer.kernel * n_out * per_out
        return total


def _scores(model: nn.Module, graph: ChannelGraph) -> dict[int, torch.Tensor]:
    """Each prunable group's channel scores: the largest |gamma| among its BatchNorms."""
    bns = dict(batchnorms(model))
    scores = {}
    for gid, group in graph.prunable.items():
        gammas = [bns[name].weight.detach()[off : off + group.size].abs().float().cpu()
                  for name, off in group.members]  # fmt: skip
        scores[gid] = torch.stack(gammas).amax(dim=0)
    return scores


def round_kept(keep: torch.Tensor, scores: torch.Tensor, multiple: int) -> torch.Tensor:
    """``keep`` grown to a multiple of ``multiple`` channels by the next-best ``scores``.

    The kept channels stay kept; the count is rounded up, but never beyond the group's
    size, and a group of fewer than ``multiple`` channels is kept whole (no smaller
    multiple exists). ``multiple == 1`` returns ``keep`` unchanged.
    """
    size, kept = keep.numel(), int(keep.sum())
    want = size if size < multiple else min(size, math.ceil(kept / multiple) * multiple)
    if want == kept:
        return keep
    priority = torch.where(keep, torch.inf, scores)  # kept channels first, then by score
    rounded = torch.zeros_like(keep)
    rounded[torch.topk(priority, want).indices] = True
    return rounded


def check_round_to(round_to: int) -> int:
    """Return ``round_to``, or raise NetslimError unless it is an integer >= 1."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise NetslimError(f"--round-to must be a whole number of channels >= 1, got {round_to!r}")
    return round_to


def _plan_at(graph: ChannelGraph, scores: dict[int, torch.Tensor], threshold: float,
             ratio: float, min_keep: float, round_to: int = 1) -> PrunePlan:  # fmt: skip
    keep, floored = {}, []
    for gid, group in graph.groups.items():
        if gid not in scores:
            keep[gid] = torch.ones(group.size, dtype=torch.bool)
            continue
        mask = scores[gid] > threshold
        floor = max(1, math.ceil(min_keep * group.size))
        if int(mask.sum()) < floor:
            mask = torch.zeros_like(mask)
            mask[torch.topk(scores[gid], floor).indices] = True
            floored.append(group.label)
        keep[gid] = round_kept(mask, scores[gid], round_to)
    return PrunePlan(float(ratio), threshold, graph, keep, floored, round_to)


def _check_min_keep(min_keep: float) -> None:
    if not 0.0 <= min_keep <= 1.0:
        raise NetslimError(f"min_keep must be a share in [0, 1], got {min_keep}")


def _warn_floored(plan: PrunePlan, min_keep: float) -> None:
    if plan.floored:
        warnings.warn(
            f"pruning at ratio {plan.ratio:.4g} would leave too few channels in "
            f"{', '.join(plan.floored)}; kept the largest-|gamma| {min_keep:.0%} (at least 1) "
            "of each instead",
            stacklevel=3,
        )


def plan_pruning(
    model: nn.Module,
    ratio: float,
    min_keep: float = 0.01,
    *,
    graph: ChannelGraph | None = None,
    threshold: float | None = None,
    round_to: int = 1,
) -> PrunePlan:
    """Decide the kept channels of every group of ``model`` (see the module docs).

    Args:
        model: any network whose channels are scaled by BatchNorm.
        ratio: share of all BatchNorm channels (gammas) to remove, in [0, 1).
        min_keep: per-group floor as a share of the group's channels; at least one
            channel is always kept. ``1 - min_keep`` is the most one pass may cut from a
            layer (the per-layer cap of the paper's multi-pass scheme).
        graph: the model's traced channel groups, when already at hand.
        threshold: the ``|gamma|`` threshold to use instead of the one ``ratio`` gives
            (to prune another way at exactly the threshold of an earlier plan).
        round_to: every prunable group keeps a multiple of this many channels, rounded up
            with its next-best channels (see :func:`round_kept`).
    """
    _check_min_keep(min_keep)
    check_round_to(round_to)
    graph = graph or trace_channels(model)
    if threshold is None:
        threshold = global_threshold(bn_gammas(model), ratio)
    plan = _plan_at(graph, _scores(model, graph), threshold, ratio, min_keep, round_to)
    _warn_floored(plan, min_keep)
    return plan


def plan_for_macs(
    model: nn.Module,
    fraction: float,
    min_keep: float = 0.01,
    *,
    graph: ChannelGraph | None = None,
    round_to: int = 1,
) -> PrunePlan:
    """The plan with the lowest threshold whose network keeps at most ``fraction`` of the MACs.

    The threshold is searched among the gammas themselves (by bisection: fewer MACs for
    every higher threshold), so the result lands just under the target; the plan's
    ``ratio`` is the equivalent global ratio. With ``round_to`` the search runs over
    rounded plans (rounding up keeps the MACs monotone in the threshold).
    """
    if not 0.0 < fraction <= 1.0:
        raise NetslimError(f"--target-macs must be a share in (0, 1], e.g. 0.5, got {fraction}")
    _check_min_keep(min_keep)
    check_round_to(round_to)
    graph = graph or trace_channels(model)
    scores = _scores(model, graph)
    ordered = torch.sort(bn_gammas(model).abs()).values
    unpruned = _plan_at(graph, scores, float("-inf"), 0.0, min_keep)
    if fraction >= 1.0:
        return unpruned
    total = unpruned.macs

    def plan(k: int) -> PrunePlan:
        return _plan_at(graph, scores, ordered[k].item(), k / len(ordered), min_keep, round_to)

    lo, hi = 0, len(ordered) - 1
    least = plan(hi).macs
    if least > fraction * total:
        raise NetslimError(
            f"cannot reach {fraction:.1%} of the MACs: pruning every prunable channel down to "
            f"the floor (min_keep={min_keep}) leaves {least / total:.1%}; lower "
            "--min-keep or aim higher"
        )
    while lo < hi:  # smallest k whose plan is within the target
        mid = (lo + hi) // 2
        if plan(mid).macs <= fraction * total:
            hi = mid
        else:
            lo = mid + 1
    result = plan(lo)
    _warn_floored(result, min_keep)
    return result


@torch.no_grad()
def masked_copy(
    model: nn.Module, masks: dict[str, torch.Tensor], zero_beta: bool = True
) -> nn.Module:
    """A copy of ``model`` with the pruned channels' gamma set to 0 (and beta, if ``zero_beta``).

    With ``zero_beta`` this is the official code's masked network, which the pruned
    network without compensation reproduces exactly; without it, the network that
    bias compensation reproduces (away from zero-padded borders).
    """
    masked = copy.deepcopy(model)
    for name, bn in batchnorms(masked):
        drop = ~masks[name].to(bn.weight.device)
        bn.weight[drop] = 0.0
        if zero_beta:
            bn.bias[drop] = 0.0
    return masked
