"""Which channels to remove: one global threshold on BatchNorm scaling factors.

The steps, each usable on its own:

1. :func:`global_threshold` -- the paper's rule: sort all ``|gamma|`` of all BatchNorm
   layers, take the value at index ``int(total * ratio)``; a channel is kept when its
   ``|gamma|`` is strictly greater. ``ratio == 0`` keeps everything (the official code
   would remove the channel(s) holding the very smallest gamma, which nobody means by 0).
2. :func:`plan_pruning` -- which channel units (see :mod:`netslim.engine.ops`) are kept.
   A unit is scored by the **largest** ``|gamma|`` among the BatchNorm channels that scale
   it (in a VGG there is one; on a residual stream, one per block; in a DenseNet, one per
   later layer), and removed when that score is at or below the threshold: a channel
   goes only when *every* gamma that scales it is unimportant, so no gamma above the
   threshold is ever cut. Fixed units are always kept. A floor keeps each group from
   collapsing: at least ``max(1, ceil(min_keep * units))`` of its best units stay (a
   warning names every group that hit it), and every layer keeps an input. In a VGG the
   masks equal those of the paper's vggprune.py wherever the floor does not bind.
   **Ties at the threshold** (a fresh network, whose gammas are all 1) would all go, far
   more than ``ratio``: where several units tie and removing them all would remove more
   gammas than the paper's rule does without ties (``int(total * ratio) + 1``), only that
   many go, taken from the groups in proportion to their tied units (:func:`_break_ties`),
   and the plan says so (``tie_break``). Without ties nothing changes.
   :func:`plan_for_macs` instead finds the threshold that leaves a given share of MACs.
   With ``round_to=N`` every prunable group then keeps a multiple of N channels
   (:func:`round_kept`), the widths fast kernels like.
3. :func:`netslim.engine.surgery.apply_plan` -- build the physically smaller network.

Two knobs for your own networks: ``ignore=`` leaves layers (or whole modules, or every
module of a class) unpruned, and ``importance=`` replaces ``|gamma|`` by your own score
per BatchNorm channel (e.g. gamma times the next layer's weight norms); both are listed
in the prune report. With neither, everything is exactly the paper's rule::

    plan = plan_pruning(model, 0.5, ignore=["head"],
                        importance=lambda name, bn: bn.weight.detach().abs() * bn.running_var.sqrt())
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Union

import torch
from torch import nn

from netslim.config import check_ratio
from netslim.engine.graph import ChannelGraph
from netslim.engine.rules import Rules
from netslim.engine.sparsity import batchnorms
from netslim.engine.trace import trace_channels
from netslim.errors import NetslimError


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
    """Which channel units survive.

    Attributes:
        ratio: the requested share of BatchNorm channels to remove.
        threshold: the global ``|gamma|`` threshold (scores strictly above it are kept).
        graph: the traced channel units and groups of the network.
        keep: per unit, True where it is kept (always True where it is fixed).
        floored: labels of the groups whose channels the floor kept alive.
        round_to: every prunable group keeps a multiple of this many channels (1: any).
        tie_break: ``(removed, tied)`` BatchNorm channels (gammas) at the threshold, where
            ties were broken so as not to remove more than the asked share; else None.
    """

    ratio: float
    threshold: float
    graph: ChannelGraph
    keep: torch.Tensor
    floored: list[str] = field(default_factory=list)
    round_to: int = 1
    tie_break: tuple[int, int] | None = None

    def kept_of(self, units: torch.Tensor) -> torch.Tensor:
        """Bool mask over the entries of a channel space (e.g. a BN's channels)."""
        return self.keep[units]

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """BatchNorm name -> bool mask of its kept channels."""
        return {name: self.keep[units] for name, units in self.graph.norms.items()}

    @property
    def beta_zeroed(self) -> dict[str, torch.Tensor]:
        """BatchNorm name -> the removed channels whose constant compensation cannot fold
        (a gate multiplies it on its way to a layer): there it drops them as the official
        code does, so the reference network zeroes their beta too."""
        lost = ~self.keep & ~self.graph.compensable
        return {name: lost[units] for name, units in self.graph.norms.items()}

    @property
    def fixed_reasons(self) -> list[str]:
        """Why some BatchNorm-scaled channels were kept whatever their gamma."""
        return self.graph.fixed_reasons

    @property
    def kept(self) -> dict[str, tuple[int, int]]:
        """Prunable group label -> (kept, total) channels of its first BatchNorm."""
        result = {}
        for group in self.graph.prunable.values():
            units = self.graph.norms.get(group.label)
            if units is None:
                units = self.graph.layers[group.label].outputs
            result[group.label] = (int(self.keep[units].sum()), len(units))
        return result

    @property
    def pruned_share(self) -> float:
        """The share of all BatchNorm channels actually removed."""
        masks = list(self.masks.values())
        total = sum(m.numel() for m in masks)
        return 1.0 - sum(int(m.sum()) for m in masks) / total if total else 0.0

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the pruned network on one input (as :func:`count_macs`)."""
        total = self.graph.untraced_macs  # layers not traced: not pruned either
        for layer in self.graph.layers.values():
            if not layer.inference:  # an auxiliary head: not part of the deployed network
                continue
            n_in, n_out = int(self.keep[layer.inputs].sum()), int(self.keep[layer.outputs].sum())
            # a grouped conv's output channel reads in/groups inputs, however many groups go
            per_out = len(layer.inputs) // layer.groups if layer.kind == "grouped" else n_in
            total += layer.pixels * layer.kernel * n_out * per_out
        return total


def nothing_to_prune(graph: ChannelGraph) -> NetslimError:
    """The error for a network none of whose BatchNorm-scaled channels may be pruned."""
    reasons = graph.fixed_reasons
    why = (
        f" (fixed: {'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''})"
        if reasons
        else ""
    )
    return NetslimError(
        f"nothing to slim in {graph.model_name}: no BatchNorm scales any prunable channel{why}"
    )


#: ``importance(name, bn) -> one score per channel of BatchNorm ``bn``: how much it matters.
Importance = Callable[[str, nn.Module], torch.Tensor]
#: What :func:`plan_pruning`'s ``ignore`` takes: module names, modules, or module classes.
Ignore = Iterable[Union[str, nn.Module, type]]


def gamma_importance(name: str, bn: nn.Module) -> torch.Tensor:
    """The paper's importance of a channel: ``|gamma|``, its BatchNorm scaling factor."""
    return bn.weight.detach().abs()


def channel_scores(
    model: nn.Module, importance: Importance | None = None
) -> dict[str, torch.Tensor]:
    """Every affine BatchNorm's channel scores (float32, CPU), by name in definition order:
    ``importance(name, bn)`` (default :func:`gamma_importance`), checked to give one finite,
    non-negative score per channel."""
    importance = importance or gamma_importance
    scores = {}
    for name, bn in batchnorms(model):
        score = importance(name, bn)
        if not isinstance(score, torch.Tensor) or score.shape != (bn.num_features,):
            shape = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise NetslimError(
                f"importance({name!r}, bn) must return one score per channel, a tensor of "
                f"shape ({bn.num_features},); it returned {shape}"
            )
        score = score.detach().float().cpu()
        if not bool(torch.isfinite(score).all()) or bool((score < 0).any()):
            raise NetslimError(f"importance({name!r}, bn) returned negative or non-finite scores")
        scores[name] = score
    return scores


def _unit_scores(graph: ChannelGraph, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each unit's score: the largest channel score among the BatchNorms that scale it
    (+inf for a fixed unit)."""
    if not graph.prunable:
        raise nothing_to_prune(graph)
    units = torch.full((graph.num_units,), float("-inf"))
    for name, space in graph.norms.items():
        if name in scores:  # the affine ones: graph.norms holds the others too
            units.scatter_reduce_(0, space, scores[name], "amax")
    return units.masked_fill(graph.fixed, float("inf"))


def ignore_layers(model: nn.Module, graph: ChannelGraph, ignore: Ignore | None) -> ChannelGraph:
    """``graph`` with the channels of the ignored layers fixed (kept whatever their score):
    the outputs of every conv, linear, BatchNorm and channel selection that an entry of
    ``ignore`` names, or that lies inside a module it names (a whole head, say), or whose
    class it names. The prune report lists each, with the reason."""
    if not ignore:
        return graph
    named = dict(model.named_modules())
    prefixes: list[str] = []
    for entry in ignore:
        if isinstance(entry, str):
            if entry not in named:
                raise NetslimError(f"ignore: {type(model).__name__} has no module named {entry!r}")
            prefixes.append(entry)
        elif isinstance(entry, type):
            prefixes += [n for n, m in named.items() if isinstance(m, entry) and n]
        elif isinstance(entry, nn.Module):
            found = [n for n, m in named.items() if m is entry]
            if not found:
                raise NetslimError(
                    f"ignore: a {type(entry).__name__} that is not part of the model"
                )
            prefixes += found
        else:
            raise NetslimError(f"ignore takes module names, modules or classes, not {entry!r}")
    spaces = {
        **{n: layer.outputs for n, layer in graph.layers.items()},
        **graph.norms,
        **graph.gathers,
    }
    fixed, reasons = graph.fixed.clone(), list(graph.fixed_reasons)
    order = {p: i for i, p in reversed(list(enumerate(prefixes)))}  # first mention of each
    for name, units in spaces.items():
        owner = _first_owner(name, order)
        if owner is not None:
            fixed[units] = True
            reason = f"excluded by ignore= ({owner or 'the whole model'})"
            if reason not in reasons:
                reasons.append(reason)
    return replace(graph, fixed=fixed, fixed_reasons=reasons)


def _first_owner(name: str, order: dict[str, int]) -> str | None:
    """The earliest of the prefixes ``order`` ranks that is ``name`` or a module holding it
    ("" holds everything), looked up per ancestor: a scan of every prefix per name was
    quadratic when ``ignore`` named a class of a thousand layers."""
    parts = name.split(".")
    ancestors = ["", *(".".join(parts[:i]) for i in range(1, len(parts) + 1))] if name else [""]
    found = [a for a in ancestors if a in order]
    return min(found, key=order.__getitem__) if found else None


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


def _plan_at(
    graph: ChannelGraph,
    scores: torch.Tensor,
    threshold: float,
    ratio: float,
    min_keep: float,
    round_to: int = 1,
    quota: tuple[torch.Tensor, int] | None = None,
) -> PrunePlan:
    """The plan at ``threshold``; ``quota``, ``(gammas per unit, most gammas to remove)``,
    breaks ties at the threshold (:func:`_break_ties`)."""
    keep = scores > threshold
    tie_break = _break_ties(graph, scores, keep, threshold, *quota) if quota else None
    floored = []
    for group in graph.prunable.values():
        floor = max(1, math.ceil(min_keep * group.size))
        if int(keep[group.units].sum()) < floor:
            best = torch.topk(scores[group.units], min(floor, group.size)).indices
            keep[group.units[best]] = True
            floored.append(group.label)
        if round_to > 1:
            keep[group.units] = round_kept(keep[group.units], scores[group.units], round_to)
    _keep_ties(graph, scores, keep, round_to)
    floored += _keep_an_input(graph, scores, keep)
    return PrunePlan(float(ratio), threshold, graph, keep, floored, round_to, tie_break)


def _keep_an_input(graph: ChannelGraph, scores: torch.Tensor, keep: torch.Tensor) -> list[str]:
    """Every layer keeps an input (in place: its best-scored one where it would keep none);
    returns the layers that needed it."""
    saved = []
    for name, layer in graph.layers.items():
        if len(layer.inputs) and not bool(keep[layer.inputs].any()):
            keep[layer.inputs[scores[layer.inputs].argmax()]] = True
            saved.append(name)
    return saved


def gamma_counts(graph: ChannelGraph, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many scored BatchNorm channels (gammas) each unit has: what removing it removes
    of the gammas the global threshold is taken over."""
    counts = torch.zeros(graph.num_units, dtype=torch.long)
    for name, space in graph.norms.items():
        if name in scores:
            counts.index_add_(0, space, torch.ones_like(space))
    return counts


def removal_quota(total: int, ratio: float) -> int:
    """The gammas the paper's rule removes at ``ratio`` when no two are equal: those at or
    below ``sorted[int(total * ratio)]``."""
    return int(total * ratio) + 1 if ratio > 0 else 0


def _break_ties(
    graph: ChannelGraph,
    scores: torch.Tensor,
    keep: torch.Tensor,
    threshold: float,
    gammas: torch.Tensor,
    quota: int,
) -> tuple[int, int] | None:
    """Keep (in ``keep``, in place) some of the units tied at ``threshold``, where removing
    every one would remove more than ``quota`` gammas: removed are the first of an order that
    takes from each group in proportion to its tied units (the i-th of a group's t tied
    units at ``(i + 1/2) / t``), so that a larger quota removes a superset (the search of
    :func:`plan_for_macs` relies on it). Returns ``(removed, tied)`` gammas, or None where
    nothing was broken (fewer than two units tie, or they fit)."""
    tied = scores == threshold
    if int(tied.sum()) < 2 or int(gammas[~keep].sum()) <= quota:
        return None
    budget = quota - int(gammas[~keep & ~tied].sum())
    order = _proportional_order(graph, tied)
    take = torch.cumsum(gammas[order], 0) <= budget  # a prefix: every tied unit has a gamma
    keep[order[~take]] = True
    return int(gammas[order[take]].sum()), int(gammas[order].sum())


def _proportional_order(graph: ChannelGraph, tied: torch.Tensor) -> torch.Tensor:
    """The tied units, interleaved over their groups in proportion to how many each has
    (a group's own in unit order; equal positions in group order)."""
    ranked = []
    for index, group in enumerate(graph.groups.values()):
        units = group.units[tied[group.units]].sort().values
        for i, unit in enumerate(units.tolist()):
            ranked.append(((i + 0.5) / len(units), index, unit))
    ranked.sort()
    return torch.tensor([unit for _, _, unit in ranked], dtype=torch.long)


def _keep_ties(
    graph: ChannelGraph, scores: torch.Tensor, keep: torch.Tensor, round_to: int
) -> None:
    """Make the pieces of every tie keep as many channels each (in place): each piece short
    of the most any keeps (rounded up to ``round_to``) keeps its next-best channels."""
    for _ in range(len(graph.ties) + 1):  # a unit in two ties may need a second round
        changed = False
        for tie in graph.ties:
            want = max(int(keep[piece].sum()) for piece in tie)
            want = min(min(len(p) for p in tie), math.ceil(want / round_to) * round_to)
            for piece in tie:
                short = want - int(keep[piece].sum())
                if short > 0:
                    priority = torch.where(keep[piece], -torch.inf, scores[piece])
                    keep[piece[torch.topk(priority, short).indices]] = True
                    changed = True
        if not changed:
            return


def _check_min_keep(min_keep: float) -> None:
    if not 0.0 <= min_keep <= 1.0:
        raise NetslimError(
            f"--min-keep must be a share in [0, 1] of each layer's channels, got {min_keep}"
        )


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
    ignore: Ignore | None = None,
    importance: Importance | None = None,
    rules: Rules | None = None,
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
        ignore: layers to leave whole (:func:`ignore_layers`): module names, modules, or
            module classes; a module's whole subtree is left.
        importance: scores channels instead of ``|gamma|`` (:data:`Importance`; see
            :func:`channel_scores`); the global threshold is then taken over these scores.
        rules: what the engine knows beyond ``torch.nn`` (:class:`~netslim.engine.rules.Rules`),
            for the trace when ``graph`` is not given; None: the default rules.
    """
    _check_min_keep(min_keep)
    check_round_to(round_to)
    graph = ignore_layers(model, graph or trace_channels(model, rules=rules), ignore)
    scores = channel_scores(model, importance)
    if threshold is None:
        threshold = global_threshold(_all(scores), ratio)
    ratio = check_ratio(ratio)
    quota = (
        (gamma_counts(graph, scores), removal_quota(len(_all(scores)), ratio)) if ratio else None
    )
    plan = _plan_at(graph, _unit_scores(graph, scores), threshold, ratio, min_keep, round_to, quota)
    _warn_floored(plan, min_keep)
    return plan


def _all(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(scores.values())) if scores else torch.empty(0)


def plan_for_macs(
    model: nn.Module,
    fraction: float,
    min_keep: float = 0.01,
    *,
    graph: ChannelGraph | None = None,
    round_to: int = 1,
    ignore: Ignore | None = None,
    importance: Importance | None = None,
    rules: Rules | None = None,
) -> PrunePlan:
    """The plan with the lowest threshold whose network keeps at most ``fraction`` of the MACs.

    The threshold is searched among the gammas themselves (by bisection: fewer MACs for
    every higher threshold), so the result lands just under the target; the plan's
    ``ratio`` is the equivalent global ratio. With ``round_to`` the search runs over
    rounded plans (rounding up keeps the MACs monotone in the threshold). ``ignore`` and
    ``importance`` and ``rules`` as for :func:`plan_pruning`.
    """
    if not 0.0 < fraction <= 1.0:
        raise NetslimError(f"--target-macs must be a share in (0, 1], e.g. 0.5, got {fraction}")
    _check_min_keep(min_keep)
    check_round_to(round_to)
    graph = ignore_layers(model, graph or trace_channels(model, rules=rules), ignore)
    total = _plan_at(
        graph, _unit_scores(graph, channel_scores(model, importance)), float("-inf"), 0.0, min_keep
    ).macs
    return plan_by_threshold(
        model,
        fraction * total,
        lambda plan: plan.macs,
        min_keep,
        graph=graph,
        round_to=round_to,
        importance=importance,
        what=f"{fraction:.1%} of the MACs",
        unit=total,
    )


def plan_by_threshold(
    model: nn.Module,
    budget: float,
    cost: Callable[[PrunePlan], float],
    min_keep: float = 0.01,
    *,
    graph: ChannelGraph | None = None,
    round_to: int = 1,
    ignore: Ignore | None = None,
    importance: Importance | None = None,
    rules: Rules | None = None,
    what: str | None = None,
    unit: float | None = None,
) -> PrunePlan:
    """The paper's global threshold, as low as keeps ``cost(plan)`` within ``budget``.

    ``cost`` must not grow as the threshold rises (MACs, or a latency table's prediction,
    :meth:`netslim.latency.LatencyTable.predict`). The threshold is searched among the
    gammas by bisection, so the result lands just under the budget; the plan's ``ratio``
    is the equivalent global ratio. The rule's ties, floor and ``round_to`` hold as for
    :func:`plan_pruning`. ``what`` names the budget in the error when it cannot be met,
    and ``unit`` (the unpruned cost) lets that error give shares.
    """
    _check_min_keep(min_keep)
    check_round_to(round_to)
    graph = ignore_layers(model, graph or trace_channels(model, rules=rules), ignore)
    by_bn = channel_scores(model, importance)
    scores = _unit_scores(graph, by_bn)
    ordered = torch.sort(_all(by_bn)).values
    unpruned = _plan_at(graph, scores, float("-inf"), 0.0, min_keep)
    if cost(unpruned) <= budget:
        return unpruned
    gammas = gamma_counts(graph, by_bn)

    def plan(k: int) -> PrunePlan:  # the paper's rule removing k + 1 gammas, ties broken
        return _plan_at(
            graph, scores, ordered[k].item(), k / len(ordered), min_keep, round_to, (gammas, k + 1)
        )

    lo, hi = 0, len(ordered) - 1
    least = cost(plan(hi))
    if least > budget:
        leaves = f"{least / unit:.1%}" if unit else f"{least:.4g}"
        raise NetslimError(
            f"cannot reach {what or f'a cost of {budget:.4g}'}: pruning every prunable channel "
            f"down to the floor (--min-keep {min_keep}) leaves {leaves}; lower --min-keep or "
            "aim higher"
        )
    while lo < hi:  # smallest k whose plan is within the budget
        mid = (lo + hi) // 2
        if cost(plan(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    result = plan(lo)
    _warn_floored(result, min_keep)
    return result


def floor_widths(graph: ChannelGraph, min_keep: float, round_to: int = 1) -> list[int]:
    """The fewest channel units each prunable group may keep: ``max(1, ceil(min_keep *
    size))`` rounded up to a multiple of ``round_to``, a group smaller than that whole."""
    return [
        min(size, math.ceil(max(1, math.ceil(min_keep * size)) / round_to) * round_to)
        for size in (g.size for g in graph.prunable.values())
    ]


def plan_keeping(
    graph: ChannelGraph,
    kept: list[int],
    scores: torch.Tensor | None = None,
    round_to: int = 1,
    order: list[torch.Tensor] | None = None,
) -> PrunePlan:
    """The plan keeping ``kept[i]`` channel units of the i-th prunable group
    (``graph.prunable``), its best by ``scores`` (per unit; None: its first units).

    The engine's guarantees still hold: fixed units stay, the pieces of a tie (a chunk's
    halves) keep as many each, and every layer keeps an input. The plan's ``ratio`` is the
    share removed and its ``threshold`` NaN (no single threshold decides). ``order``:
    each group's units, least important first, when already sorted.
    """
    if scores is None:
        scores = -torch.arange(graph.num_units, dtype=torch.float)
    if order is None:
        order = [
            g.units[torch.argsort(scores[g.units], stable=True)] for g in graph.prunable.values()
        ]
    keep = torch.ones(graph.num_units, dtype=torch.bool)
    for units, n in zip(order, kept):
        keep[units[: len(units) - n]] = False
    keep |= graph.fixed
    _keep_ties(graph, scores, keep, round_to)
    _keep_an_input(graph, scores, keep)
    plan = PrunePlan(0.0, float("nan"), graph, keep, [], round_to)
    return replace(plan, ratio=plan.pruned_share)


#: How long a pruned network takes, in any unit the budget is in: ``latency(plan)``.
Latency = Callable[[PrunePlan], float]


def plan_for_latency(
    model: nn.Module,
    budget: float,
    latency: Latency,
    min_keep: float = 0.01,
    *,
    graph: ChannelGraph | None = None,
    round_to: int = 1,
    ignore: Ignore | None = None,
    importance: Importance | None = None,
    rules: Rules | None = None,
) -> PrunePlan:
    """A plan whose ``latency(plan)`` is at most ``budget``, keeping the most importance.

    Greedy, as HALP's knapsack relaxed: from the unpruned network, each step removes from
    one prunable group its least important ``round_to`` channels (a group's channels go in
    order of their score, ``|gamma|`` or ``importance``), choosing the group whose step
    loses the least importance per unit of time saved, until the budget is met. The time
    comes from ``latency``, evaluated on each candidate plan, so a runtime's width steps
    (a width of 33 slower than 40) steer the choice as measured; a step that saves no time
    is taken only when no step saves any. Then channels are given back, the most importance
    per unit of time first, while the budget still holds (a step can overshoot it). Against
    the brute-force optimum on small networks the kept importance fell short by at most 3.7%
    for budgets from 40% of the unpruned time up, and 19.6% at 20-30%, where a narrow
    layer's width cliff is past what one step at a time sees (bench/latency_plan_margin.py).
    The floor (``min_keep``), fixed units, ties and ``ignore`` hold as for :func:`plan_pruning`; the plan's ``ratio`` is the share removed
    and its ``threshold`` NaN (no single threshold decides).

    Raises:
        NetslimError: a budget that is not a positive number, or one that pruning every
            group to its floor does not meet.
    """
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise NetslimError(f"a latency budget must be a positive number, got {budget!r}")
    _check_min_keep(min_keep)
    check_round_to(round_to)
    graph = ignore_layers(model, graph or trace_channels(model, rules=rules), ignore)
    scores = _unit_scores(graph, channel_scores(model, importance))
    groups = list(graph.prunable.values())
    # each group's units, least important first: the order its channels are removed in
    order = [g.units[torch.argsort(scores[g.units], stable=True)] for g in groups]
    sizes = [len(g.units) for g in groups]
    floors = floor_widths(graph, min_keep, round_to)

    def plan_of(kept: list[int]) -> PrunePlan:
        return plan_keeping(graph, kept, scores, round_to, order)

    kept = list(sizes)
    plan = plan_of(kept)
    time = latency(plan)
    while time > budget:
        best = None  # (importance lost per second saved, -seconds saved, group, plan, time)
        for i, units in enumerate(order):
            step = min(round_to, kept[i] - floors[i])
            if step <= 0:
                continue
            removed = units[sizes[i] - kept[i] : sizes[i] - kept[i] + step]
            lost = float(scores[removed].clamp(min=0).sum())
            if not math.isfinite(lost):
                continue  # a fixed unit: never removed
            trial = kept[:i] + [kept[i] - step] + kept[i + 1 :]
            candidate = plan_of(trial)
            t = latency(candidate)
            saved = time - t
            rate = lost / saved if saved > 0 else math.inf
            key = (rate, -saved, i)
            if best is None or key < best[0]:
                best = (key, trial, candidate, t)
        if best is None:
            raise NetslimError(
                f"cannot reach a latency of {budget:.4g}: pruning every prunable channel down to "
                f"the floor (--min-keep {min_keep}) leaves {time:.4g}; lower --min-keep or aim higher"
            )
        _, kept, plan, time = best
    # a step can save more time than the budget needed: give back what still fits, the
    # most importance per unit of time added first
    while True:
        best = None
        for i, units in enumerate(order):
            step = min(round_to, sizes[i] - kept[i])
            if step <= 0:
                continue
            back = units[sizes[i] - kept[i] - step : sizes[i] - kept[i]]
            gained = float(scores[back].clamp(min=0).sum())
            trial = kept[:i] + [kept[i] + step] + kept[i + 1 :]
            candidate = plan_of(trial)
            t = latency(candidate)
            if t > budget or not math.isfinite(gained):
                continue
            added = t - time
            key = (-(gained / added) if added > 0 else -math.inf, i)
            if best is None or key < best[0]:
                best = (key, trial, candidate, t)
        if best is None:
            return plan
        _, kept, plan, time = best


@torch.no_grad()
def masked_copy(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    zero_beta: bool | dict[str, torch.Tensor] = True,
) -> nn.Module:
    """A copy of ``model`` with the pruned channels' gamma set to 0 (and beta, if ``zero_beta``).

    With ``zero_beta`` this is the official code's masked network, which the pruned
    network without compensation reproduces exactly; without it, the network that
    bias compensation reproduces (away from zero-padded borders). ``zero_beta`` may also
    name, per BatchNorm, the channels whose beta to zero (see :func:`reference_network`).
    """
    masked = copy.deepcopy(model)
    for name, bn in batchnorms(masked):
        if name not in masks or not bn.affine:
            continue
        drop = ~masks[name].to(bn.weight.device)
        bn.weight[drop] = 0.0
        if isinstance(zero_beta, dict):
            bn.bias[zero_beta[name].to(bn.bias.device)] = 0.0
        elif zero_beta:
            bn.bias[drop] = 0.0
    return masked


def reference_network(model: nn.Module, plan: PrunePlan, compensate: bool) -> nn.Module:
    """The network the pruned one computes exactly: the official masked network (gamma and
    beta of removed channels zeroed) without compensation; with it, the gamma-zeroed one
    (beta zeroed only where compensation cannot fold it, :attr:`PrunePlan.beta_zeroed`),
    up to zero padding at feature-map borders."""
    return masked_copy(model, plan.masks, plan.beta_zeroed if compensate else True).eval()
