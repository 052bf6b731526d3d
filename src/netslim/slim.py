"""Pruning as a user runs it: plan, surgery, compensation, recalibration, and a report.

:func:`prune_model` ties :mod:`netslim.engine.plan`, :mod:`netslim.engine.surgery` and
:mod:`netslim.engine.recalibrate` together and measures each step. It returns the network with
bias compensation (and, given data, BN recalibration), or with ``compensate=False``
exactly the official code's network: pruned by the same threshold, nothing folded in,
BN statistics untouched (given data, the other two are still measured, on copies).
Every pruned network is run before it is returned, beside the official masked network
(:mod:`netslim.engine.check`): one that fails or differs is repaired by keeping the group
of channels that causes it, or refused; never returned. :func:`pruned_checkpoint`
packs the result as ``{'channels', 'state_dict'}`` plus netslim's metadata (and, for a
VGG, the official ``'cfg'`` that the paper's code reads).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from netslim.checkpoint import save_checkpoint
from netslim.config import check_ratio
from netslim.data.batches import ImageData
from netslim.engine.check import Verdict, check_official, check_runs, find_culprit, keep_group
from netslim.engine.graph import ChannelGraph
from netslim.engine.guard import (
    check_nesting,
    check_not_compiled,
    check_prune_cost,
    recursion_error,
)
from netslim.engine.plan import (
    Ignore,
    Importance,
    PrunePlan,
    floor_widths,
    ignore_layers,
    plan_by_threshold,
    plan_for_latency,
    plan_for_macs,
    plan_keeping,
    plan_pruning,
)
from netslim.engine.recalibrate import recalibrate_bn
from netslim.engine.rules import Rules
from netslim.engine.stats import count_macs, count_params, nonfinite_tensors
from netslim.engine.surgery import apply_plan, channel_counts
from netslim.engine.trace import trace_channels
from netslim.errors import NetslimError
from netslim.files import check_output_file
from netslim.latency import CORRECTIONS, TOLERANCE, LatencyBudget, LatencyTable, table_for
from netslim.limits import check_image_size, check_memory
from netslim.models import VGG, CfgItem, num_outputs
from netslim.train.evaluate import check_classes, evaluate

#: How a network is measured right after pruning: ``measure(network) -> {metric: value}``
#: (test accuracy for a classifier, Ultralytics' validator's mAPs for a YOLO).
Measure = Callable[[nn.Module], dict[str, float]]

#: The networks measured, in order (``PruneReport.measured``'s keys).
MEASURED_WAYS = ("unpruned", "official", "compensated", "recalibrated")


@dataclass
class PruneReport:
    """What pruning did, and (given data or ``measure``) each network's metrics."""

    ratio: float
    threshold: float
    pruned_share: float
    cfg: list[CfgItem] | None  # a VGG's cfg; None for other networks
    layers: list[tuple[str, int, int]]  # (channel group, kept, total)
    floored: list[str]
    compensated: bool
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    # MACs left when every channel joined by a residual addition is kept at full width,
    # as the paper's code does (None for networks without residual additions)
    macs_residual_kept: int | None = None
    target_macs: float | None = None
    # --round-to: each group's kept count before rounding up, and the MACs it would leave
    round_to: int = 1
    kept_unrounded: list[int] | None = None
    macs_unrounded: int | None = None
    recalibration_images: int = 0
    acc_unpruned: float | None = None
    acc_masked: float | None = None  # official: pruned gamma and beta zeroed
    acc_compensated: float | None = None
    acc_recalibrated: float | None = None
    # which of the networks above prune_model returned (and netslim prune saves):
    # "official masking", "bias compensation" or "BN recalibrated"
    saved: str = "bias compensation"
    # why some BatchNorm-scaled channels were kept whatever their gamma (op, module, line)
    fixed: list[str] = field(default_factory=list)
    # where the forward pass read tensor values (control flow, masks, NMS): exact on that path
    value_reads: list[str] = field(default_factory=list)
    # (removed, tied) gammas at the threshold, where ties were broken to keep to the ratio
    tie_break: tuple[int, int] | None = None
    # the check after surgery: the inputs the official pruned network ran on beside the
    # masked one, and the largest relative difference of what was compared
    checked_on: str | None = None
    check_difference: float | None = None
    input_size: tuple[int, ...] = (1, 3, 32, 32)
    # what ``measure`` gave for each network: {"unpruned" | "official" | "compensated" |
    # "recalibrated": {metric: value}}; a classifier's "accuracy" is also in the acc_* fields
    measured: dict[str, dict[str, float]] = field(default_factory=dict)
    # with a latency budget (--target-latency, --target-ms): see _latency_lines
    latency: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """The human-readable summary printed by ``netslim prune``."""
        width = max([len(name) for name, _, _ in self.layers] + [14]) + 2
        lines = [f"{'channel group':<{width}}{'kept':>6} / {'total':<6}"]
        lines += [f"{name:<{width}}{kept:>6} / {total:<6}" for name, kept, total in self.layers]
        if self.kept_unrounded is not None:
            lines[0] += f"  before rounding to a multiple of {self.round_to}"
            lines[1:] = [
                f"{line}  {before:>6}" for line, before in zip(lines[1:], self.kept_unrounded)
            ]
        if math.isnan(self.threshold):  # a latency budget's plan: no single threshold
            lines.append(
                f"the most importance per millisecond within the budget: removed "
                f"{100 * self.pruned_share:.1f}% of channels"
            )
        else:
            lines.append(
                f"threshold |gamma| > {self.threshold:.4g}: removed {100 * self.pruned_share:.1f}% "
                f"of channels (asked {100 * self.ratio:.0f}%)"
            )
        if self.tie_break:
            removed, tied = self.tie_break
            lines.append(
                f"{tied} channels tie at the threshold: removed {removed} of them, taken from "
                "the layers in proportion, so as not to remove more than asked"
            )
        if self.floored:
            lines.append(f"per-layer floor kept channels alive in: {', '.join(self.floored)}")
        if self.fixed:
            lines.append("kept whatever their gamma (the engine cannot prune them exactly):")
            lines += [f"  - {reason}" for reason in self.fixed]
        if self.value_reads:
            shown = ", ".join(self.value_reads[:3]) + (", ..." if len(self.value_reads) > 3 else "")
            lines.append(
                f"the forward pass read tensor values ({shown}): the pruned network is exact "
                "on the path traced; an input taking another path was not traced"
            )
        lines.append(
            f"params {self.params_before:,} -> {self.params_after:,} "
            f"({100 * (1 - self.params_after / self.params_before):.1f}% fewer)"
        )
        lines.append(
            f"MACs   {self.macs_before:,} -> {self.macs_after:,} "
            f"({100 * (1 - self.macs_after / self.macs_before):.1f}% fewer)"
        )
        if self.macs_unrounded is not None:
            lines.append(
                f"       before rounding to multiples of {self.round_to}: {self.macs_unrounded:,} "
                f"({100 * (1 - self.macs_unrounded / self.macs_before):.1f}% fewer)"
            )
        if self.macs_residual_kept is not None:
            lines.append(
                f"       residual path kept at full width (the paper's code) would leave "
                f"{self.macs_residual_kept:,} ({100 * (1 - self.macs_residual_kept / self.macs_before):.1f}% fewer)"
            )
        lines += _latency_lines(self.latency)
        if self.acc_unpruned is not None:
            lines.append(f"test accuracy unpruned             {self.acc_unpruned:6.2f}%")
            lines.append(f"  pruned, official masking         {self.acc_masked:6.2f}%")
            lines.append(f"  pruned, bias compensation        {self.acc_compensated:6.2f}%")
            if self.acc_recalibrated is not None:
                lines.append(
                    f"  pruned, BN recalibrated ({self.recalibration_images} images) "
                    f"{self.acc_recalibrated:6.2f}%"
                )
        elif self.measured:
            lines += [
                f"{way:>12}: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items())
                for way, values in self.measured.items()
            ]
        if self.checked_on:
            lines.append(
                f"checked after surgery on {self.checked_on}: equal to the official masked "
                f"network (max relative difference {self.check_difference:.1e})"
            )
        lines.append(f"saved network: {self.saved}")
        return "\n".join(lines)


def _latency_lines(latency: dict[str, Any] | None) -> list[str]:
    if not latency:
        return []
    height, width = latency["image_size"]
    budget = (
        f"{latency['share']:.0%} of the unpruned network's"
        if latency["share"] is not None
        else f"{latency['budget_ms']:.2f} ms"
    )
    lines = [
        f"latency on {latency['runtime']}, batch {latency['batch']}, {height}x{width}, "
        f"budget {budget} ({latency['choice']} choice; {latency['table']})",
        f"  predicted {latency['predicted_ms']:.2f} ms (unpruned {latency['predicted_unpruned_ms']:.2f} ms)",
    ]
    if latency.get("measured_ms") is not None:
        lines.append(
            f"  measured  {latency['measured_ms']:.2f} ms against {latency['measured_unpruned_ms']:.2f} ms "
            f"unpruned, side by side: {latency['speedup']:.2f}x faster, {latency['macs_reduction']:.2f}x "
            f"fewer MACs, efficiency {latency['efficiency']:.2f}"
        )
    attempts = latency.get("attempts", [])
    for attempt in (a for i, a in enumerate(attempts) if i != latency.get("chosen")):
        lines.append(
            f"  replanned: a plan measured {attempt['measured_ms']:.2f} ms against a budget of "
            f"{attempt['target_ms']:.2f} ms (predicted {attempt['predicted_ms']:.2f} ms)"
        )
    if latency.get("note"):
        lines.append(f"  {latency['note']}")
    return lines


def speed_curve(
    prune: Callable[[LatencyBudget], PruneReport],
    budgets: Iterable[float],
    choices: Iterable[str] = ("threshold", "latency"),
    **budget: Any,
) -> list[dict[str, Any]]:
    """What each latency budget buys, before choosing one: for every budget (a share of the
    unpruned network's measured latency) and choice, ``prune(LatencyBudget(...))``'s
    measured speed-up, MACs reduction, efficiency and the metric right after pruning
    (recalibrated where it was, else compensated). ``budget``: the other fields of
    :class:`~netslim.latency.LatencyBudget` (runtime, batch, table, ...)."""
    rows = []
    for share in budgets:
        for choice in choices:
            try:
                report = prune(LatencyBudget(share=share, choice=choice, **budget).check())
            except NetslimError as e:  # a budget out of reach is a row of the curve
                if not str(e).startswith("cannot reach"):
                    raise
                rows.append({"budget": share, "choice": choice, "error": str(e)})
                continue
            latency = report.latency
            way = "recalibrated" if "recalibrated" in report.measured else "compensated"
            rows.append(
                {
                    "budget": share,
                    "choice": choice,
                    "predicted_ms": latency["predicted_ms"],
                    "measured_ms": latency["measured_ms"],
                    "unpruned_ms": latency.get("measured_unpruned_ms"),
                    "speedup": latency.get("speedup"),
                    "macs_reduction": report.macs_before / report.macs_after,
                    "efficiency": latency.get("efficiency"),
                    "params": report.params_after,
                    "metrics": report.measured.get(way, {}),
                    "unpruned": report.measured.get("unpruned", {}),
                }
            )
    return rows


def format_speed_curve(rows: list[dict[str, Any]]) -> str:
    """:func:`speed_curve`'s rows as an aligned table (metrics right after pruning)."""
    names = sorted({name for row in rows for name in row.get("metrics", {})})
    header = (
        f"{'budget':>6} {'choice':<9} {'predicted':>10} {'measured':>9} {'speed-up':>8} "
        f"{'MACs ×':>7} {'effic.':>6} {'params':>10}" + "".join(f" {n:>12}" for n in names)
    )
    lines = [header]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['budget']:>6.0%} {row['choice']:<9} {row['error']}")
            continue
        measured = (
            f"{row['measured_ms']:>7.2f}ms" if row["measured_ms"] is not None else f"{'-':>9}"
        )
        speedup = f"{row['speedup']:>7.2f}×" if row["speedup"] is not None else f"{'-':>8}"
        efficiency = f"{row['efficiency']:>6.2f}" if row["efficiency"] is not None else f"{'-':>6}"
        lines.append(
            f"{row['budget']:>6.0%} {row['choice']:<9} {row['predicted_ms']:>8.2f}ms {measured} "
            f"{speedup} {row['macs_reduction']:>6.2f}× {efficiency} {row['params']:>10,}"
            + "".join(f" {row['metrics'].get(n, float('nan')):>12.4f}" for n in names)
        )
    unpruned = next((row["unpruned"] for row in rows if row.get("unpruned")), {})
    if unpruned:
        lines.append("unpruned: " + "  ".join(f"{k} {v:.4f}" for k, v in unpruned.items()))
    return "\n".join(lines)


def recalibration_batches(data: ImageData, num: int, batch_size: int = 128, seed: int = 0):
    """``num`` random batches of unlabeled training images, augmented as in training.

    The running statistics being replaced were learned on augmented images (padded, cropped,
    flipped), and so was everything downstream of them; matching that distribution keeps
    the network's behaviour. Measured on a sparsity-trained VGG-11 on CIFAR-10
    (bench/RESULTS.md): 1.5 to 1.8 points more test accuracy than un-augmented images.
    """
    generator = torch.Generator(device=data.device).manual_seed(seed)
    for i, (x, _) in enumerate(data.train_batches(batch_size, generator, shard=False)):
        if i >= num:
            break
        yield x


def check_input_size(input_size: tuple[int, ...]) -> tuple[int, ...]:
    """``(1, C, H, W)`` from ``(C, H, W)`` or ``(1, C, H, W)``; NetslimError unless H and W
    lie within the bounds of ``--image-size`` (:func:`netslim.limits.check_image_size`) and
    one float32 input fits in memory (:func:`netslim.limits.check_memory`)."""
    shape = "input_size must be (C, H, W) or (1, C, H, W) with positive sizes"
    try:
        size = tuple(input_size)
    except TypeError:
        raise NetslimError(f"{shape}, got {input_size!r}") from None
    if len(size) == 3:
        size = (1, *size)
    whole = all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size)
    if len(size) != 4 or not whole or size[0] != 1:
        raise NetslimError(f"{shape}, got {input_size!r}")
    _, channels, height, width = size
    check_image_size(height, "input_size's height")
    check_image_size(width, "input_size's width")
    check_memory(
        4 * channels * height * width,
        f"an input of {channels}x{height}x{width}",
        "pass a smaller input_size",
    )
    return size


def prune_model(
    model: nn.Module,
    ratio: float | None = None,
    *,
    target_macs: float | None = None,
    target_latency: LatencyBudget | None = None,
    compensate: bool = True,
    min_keep: float = 0.01,
    round_to: int = 1,
    data: ImageData | None = None,
    measure: Measure | None = None,
    calibration: Iterable[torch.Tensor] | None = None,
    recalibrate: int = 16,
    batch_size: int = 128,
    eval_dtype: torch.dtype | None = None,
    acc_unpruned: float | None = None,
    unpruned: dict[str, float] | None = None,
    input_size: tuple[int, ...] = (3, 32, 32),
    ignore: Ignore | None = None,
    importance: Importance | None = None,
    max_seconds: float | None = None,
    rules: Rules | None = None,
) -> tuple[nn.Module, PruneReport]:
    """Prune ``model`` at ``ratio`` (or to ``target_macs``) and report; with ``data`` (or
    ``measure``), also measure and recalibrate.

    The one way netslim prunes: ``netslim prune``, the lab and ``netslim yolo prune`` all
    call it, so that the network is traced, planned, cut and checked once, and each flow
    brings only how it measures a network and where recalibration images come from.

    Args:
        model: the sparsity-trained network (left unchanged).
        ratio: share of BatchNorm channels to remove, in [0, 1).
        target_macs: instead of ``ratio``, the share of the MACs to keep, in (0, 1].
        target_latency: instead of ``ratio``, a latency budget on a runtime
            (:class:`netslim.latency.LatencyBudget`): the network's latency table is
            measured (or read), the plan keeps the most importance per millisecond within
            the budget (or raises the |gamma| threshold to it), and the pruned network is
            timed beside the unpruned one and planned again when more than 10% off
            (``report.latency``).
        compensate: fold the pruned channels' constant output into the next layer.
        min_keep: per-group floor, as a share of each group's channels.
        round_to: every prunable group keeps a multiple of this many channels (rounded up
            with its next-best channels; with ``target_macs``, the target is met rounded).
        data: a classifier's data: ``measure`` becomes its test accuracy (%, metric
            ``"accuracy"``, also in the report's ``acc_*`` fields) and ``calibration`` its
            augmented training images (:func:`recalibration_batches`).
        measure: instead of ``data``, ``measure(network) -> {metric: value}``, called on
            the unpruned network, the official pruned one, the compensated one and the
            recalibrated one (``report.measured``); it must not change the network.
        calibration: with ``measure``, batches of input images (on the network's device)
            for BN recalibration; the first ``recalibrate`` are used.
        recalibrate: batches of training images for BN recalibration (0: none).
        batch_size: images per recalibration batch (with ``data``).
        eval_dtype: autocast dtype for the accuracy measurements (None: fp32).
        acc_unpruned: with ``data``, the unpruned model's test accuracy, when already
            measured (e.g. by an earlier call of a sweep over ratios).
        unpruned: with ``measure``, what it gave for the unpruned network, when known.
        input_size: the shape of one input, ``(C, H, W)`` or ``(1, C, H, W)``: the network
            is traced, its MACs counted and the compensation measured at this size.
        ignore: layers to leave unpruned: module names, modules or module classes (a
            module's whole subtree is left; :func:`netslim.engine.plan.ignore_layers`).
        importance: a score per BatchNorm channel in place of ``|gamma|``, as
            ``importance(name, bn) -> tensor`` (:func:`netslim.engine.plan.channel_scores`).
        max_seconds: the most seconds pruning may be estimated to take. Before tracing, an
            input larger than 128x128 is estimated from two runs of the network at up to
            128x128, scaled by pixels (:func:`netslim.engine.guard.estimate_prune_cost`);
            pruning is refused when that exceeds ``max_seconds``, or when its peak memory
            exceeds half of the RAM. None: the environment variable
            ``NETSLIM_MAX_PRUNE_SECONDS``, else 300 s; ``math.inf`` lifts the bound.
        rules: what the engine knows of the network's layers (:class:`netslim.engine.Rules`:
            your own activations, opaque layers, prunable layers of your own); None: the
            default rules, with every adapter.

    Returns:
        The pruned network and its :class:`PruneReport` (whose ``saved`` names which
        network it is): with ``compensate=False`` the official network, exactly; else
        the compensated one, recalibrated when data was given and ``recalibrate > 0``.
        Either was checked after surgery (``report.checked_on``, ``report.check_difference``);
        a group of channels kept whole to repair it is listed in ``report.fixed``.

    Raises:
        NetslimError: for bad arguments, a network that cannot be traced or pruned, or a
            pruned network still broken after the repairs (:data:`MAX_REPAIRS`).
    """
    if sum(x is not None for x in (ratio, target_macs, target_latency)) != 1:
        raise NetslimError(
            "give exactly one of a prune ratio (--ratio), a MACs target (--target-macs) and a "
            "latency budget (--target-latency or --target-ms)"
        )
    if target_latency is not None:
        target_latency.check()
    if data is not None and measure is not None:
        raise NetslimError("give data (a classifier's test accuracy) or measure=, not both")
    input_size = check_input_size(input_size)
    check_nesting(model)  # before anything walks the modules recursively
    check_not_compiled(model)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # said before tracing: a large transformer is slow to trace, and has nothing to slim
        raise NetslimError(
            f"nothing to slim in {type(model).__name__}: no BatchNorm scales any prunable channel"
        )
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise NetslimError(
            f"the network's tensors are on the meta device (e.g. {meta[0]}): they hold no "
            "values to rank or copy; load its weights first (model.to_empty(device='cpu'), "
            "then load_state_dict)"
        )
    bad = nonfinite_tensors(model)
    if bad:
        raise NetslimError(
            f"the network holds NaN or Inf in {len(bad)} of its tensors (e.g. {bad[0]}): it comes from "
            "a diverged run, and |gamma| cannot rank its channels; prune an earlier checkpoint"
        )
    if data is not None:
        check_classes(model, data)
    check_prune_cost(model, input_size, max_seconds, rules=rules)
    was_training = model.training
    try:
        graph = ignore_layers(model, trace_channels(model, input_size, rules=rules), ignore)
        pruned, plan, official, report = _prune_model(
            model,
            graph,
            ratio,
            target_macs,
            compensate,
            min_keep,
            round_to,
            importance,
            input_size,
            target_latency,
        )
        if data is not None:
            return _measure_classifier(
                model,
                pruned,
                plan,
                official,
                report,
                data,
                recalibrate,
                batch_size,
                eval_dtype,
                acc_unpruned,
            )
        if measure is not None:
            return _measure(
                model, pruned, plan, official, report, measure, calibration, recalibrate, unpruned
            )
        return pruned, report
    except RecursionError:  # deeper than check_nesting's count (a forward of many frames)
        raise recursion_error(model) from None
    finally:
        model.train(was_training)  # the caller's model is left as it was


def _prune_model(
    model: nn.Module,
    graph: ChannelGraph,
    ratio: float | None,
    target_macs: float | None,
    compensate: bool,
    min_keep: float,
    round_to: int,
    importance: Importance | None,
    input_size: tuple[int, ...],
    target_latency: LatencyBudget | None = None,
) -> tuple[nn.Module, PrunePlan, nn.Module, PruneReport]:
    """Plan, surgery and its check: ``(network returned, plan, official network, report)``."""
    model.eval()
    if target_latency is not None:
        return _prune_to_latency(
            model, graph, target_latency, compensate, min_keep, round_to, importance, input_size
        )

    def plan_on(graph: ChannelGraph, like: PrunePlan | None = None) -> PrunePlan:
        """The plan on ``graph``; with ``like``, at its ratio and threshold."""
        if like is not None:
            return plan_pruning(
                model,
                like.ratio,
                min_keep,
                graph=graph,
                threshold=like.threshold,
                round_to=round_to,
                importance=importance,
            )
        if target_macs is not None:
            return plan_for_macs(
                model, target_macs, min_keep, graph=graph, round_to=round_to, importance=importance
            )
        return plan_pruning(
            model,
            check_ratio(ratio),
            min_keep,
            graph=graph,
            round_to=round_to,
            importance=importance,
        )

    plan = plan_on(graph)
    pruned, plan, official, verdict = _checked_surgery(model, plan, compensate, plan_on)
    report = _report(
        model, pruned, plan, verdict, compensate, min_keep, round_to, importance, input_size
    )
    report.target_macs = target_macs
    return pruned, plan, official, report


def _report(
    model: nn.Module,
    pruned: nn.Module,
    plan: PrunePlan,
    verdict: Verdict,
    compensate: bool,
    min_keep: float,
    round_to: int,
    importance: Importance | None,
    input_size: tuple[int, ...],
) -> PruneReport:
    """What the plan removed, before anything is measured."""
    graph = plan.graph  # with any channels the check kept
    if math.isnan(plan.threshold):  # a latency plan: no one threshold to compare against
        residual_kept = unrounded = None
        return _report_of(
            model, pruned, plan, verdict, compensate, input_size, round_to, None, None
        )
    kept_graph = graph.residual_kept()
    residual_kept = unrounded = None
    with warnings.catch_warnings():  # the floor was already reported once
        warnings.simplefilter("ignore")
        if kept_graph is not None:
            residual_kept = plan_pruning(
                model,
                plan.ratio,
                min_keep,
                graph=kept_graph,
                threshold=plan.threshold,
                round_to=round_to,
                importance=importance,
            ).macs
        if round_to > 1:
            unrounded = plan_pruning(
                model,
                plan.ratio,
                min_keep,
                graph=graph,
                threshold=plan.threshold,
                importance=importance,
            )
    return _report_of(
        model, pruned, plan, verdict, compensate, input_size, round_to, residual_kept, unrounded
    )


def _report_of(
    model: nn.Module,
    pruned: nn.Module,
    plan: PrunePlan,
    verdict: Verdict,
    compensate: bool,
    input_size: tuple[int, ...],
    round_to: int,
    residual_kept: int | None,
    unrounded: PrunePlan | None,
) -> PruneReport:
    graph = plan.graph
    return PruneReport(
        ratio=plan.ratio,
        threshold=plan.threshold,
        pruned_share=plan.pruned_share,
        cfg=list(pruned.cfg) if isinstance(pruned, VGG) else None,
        layers=[(name, kept, total) for name, (kept, total) in plan.kept.items()],
        floored=plan.floored,
        compensated=compensate,
        saved="bias compensation" if compensate else "official masking",
        params_before=count_params(model),
        params_after=count_params(pruned),
        macs_before=count_macs(model, input_size, rules=graph.rules),
        macs_after=count_macs(pruned, input_size, rules=graph.rules),
        macs_residual_kept=residual_kept,
        fixed=list(plan.fixed_reasons),
        value_reads=list(graph.value_reads),
        tie_break=plan.tie_break,
        checked_on=verdict.inputs,
        check_difference=verdict.difference,
        input_size=input_size,
        round_to=round_to,
        kept_unrounded=[kept for kept, _ in unrounded.kept.values()] if unrounded else None,
        macs_unrounded=unrounded.macs if unrounded else None,
    )


def _prune_to_latency(
    model: nn.Module,
    graph: ChannelGraph,
    budget: LatencyBudget,
    compensate: bool,
    min_keep: float,
    round_to: int,
    importance: Importance | None,
    input_size: tuple[int, ...],
) -> tuple[nn.Module, PrunePlan, nn.Module, PruneReport]:
    """Plan to a latency budget, cut, time the result beside the unpruned network, and
    plan again with a corrected budget while the measurement is more than
    :data:`~netslim.latency.TOLERANCE` off (NetAdapt's loop, :data:`CORRECTIONS` times)."""
    say = budget.progress or (lambda line: None)
    table, table_line = table_for(model, graph, budget)
    size = (
        (*input_size[:2], budget.image_size, budget.image_size) if budget.image_size else input_size
    )
    step = round_to if round_to > 1 else table.step  # the widths the table measured
    aim = budget.ms if budget.ms is not None else budget.share * table.whole_ms

    def plan_on(graph: ChannelGraph, like: PrunePlan | None = None) -> PrunePlan:
        return _latency_plan(model, graph, table, aim, budget.choice, min_keep, step, importance)

    attempts, results = [], []
    for attempt in range(1 + CORRECTIONS):
        plan = plan_on(graph)
        pruned, plan, official, verdict = _checked_surgery(model, plan, compensate, plan_on)
        predicted = table.predict(plan)
        results.append((pruned, plan, official, verdict))
        if not budget.verify:
            break
        say(f"timing the pruned network beside the unpruned one on {budget.runtime}")
        unpruned_ms, measured_ms, macs_reduction = _time_side_by_side(model, pruned, budget, size)
        target = budget.ms if budget.ms is not None else budget.share * unpruned_ms
        attempts.append(
            {
                "budget_ms": aim,
                "predicted_ms": predicted,
                "measured_ms": measured_ms,
                "measured_unpruned_ms": unpruned_ms,
                "target_ms": target,
                "macs_reduction": macs_reduction,
            }
        )
        if abs(measured_ms / target - 1) <= TOLERANCE or attempt == CORRECTIONS:
            break
        aim *= target / measured_ms  # the runtime runs this plan at measured/predicted
    best = min(
        range(len(results)),
        key=lambda i: (
            abs(attempts[i]["measured_ms"] / attempts[i]["target_ms"] - 1) if attempts else 0
        ),
    )
    pruned, plan, official, verdict = results[best]
    report = _report(
        model, pruned, plan, verdict, compensate, min_keep, step, importance, input_size
    )
    latency: dict[str, Any] = {
        "runtime": budget.runtime,
        "batch": budget.batch,
        "image_size": list(size[2:]),
        "share": budget.share,
        "budget_ms": budget.ms if budget.ms is not None else budget.share * table.whole_ms,
        "choice": budget.choice,
        "table": table_line,
        "table_seconds": table.seconds,
        "predicted_unpruned_ms": table.whole_ms,
        "predicted_ms": table.predict(plan),
        "measured_ms": None,
        "attempts": attempts,
        "chosen": best,
        "note": None,
    }
    if attempts:
        chosen = attempts[best]
        speedup = chosen["measured_unpruned_ms"] / chosen["measured_ms"]
        latency.update(
            measured_ms=chosen["measured_ms"],
            measured_unpruned_ms=chosen["measured_unpruned_ms"],
            speedup=speedup,
            macs_reduction=chosen["macs_reduction"],
            efficiency=speedup / chosen["macs_reduction"],
        )
        off = chosen["measured_ms"] / chosen["target_ms"] - 1
        if abs(off) > TOLERANCE:
            latency["note"] = (
                f"still {abs(off):.0%} {'over' if off > 0 else 'under'} the budget after "
                f"{len(attempts) - 1} correction{'s' * (len(attempts) != 2)}: the runtime's time "
                "does not follow the widths closely enough here (a floor of fixed costs, "
                "or width steps the table's grid misses); the closest plan is kept"
            )
    report.latency = latency
    return pruned, plan, official, report


def _latency_plan(
    model: nn.Module,
    graph: ChannelGraph,
    table: LatencyTable,
    budget_ms: float,
    choice: str,
    min_keep: float,
    step: int,
    importance: Importance | None,
) -> PrunePlan:
    if choice == "threshold":
        return plan_by_threshold(
            model,
            budget_ms,
            table.predict,
            min_keep,
            graph=graph,
            round_to=step,
            importance=importance,
            what=f"{budget_ms:.2f} ms ({budget_ms / table.whole_ms:.0%} of the unpruned "
            f"{table.whole_ms:.2f} ms) on {table.key['runtime']}",
            unit=table.whole_ms,
        )
    try:
        return plan_for_latency(
            model,
            budget_ms,
            table.predict,
            min_keep,
            graph=graph,
            round_to=step,
            importance=importance,
        )
    except NetslimError as e:
        if not str(e).startswith("cannot reach"):
            raise
        least = table.predict(plan_keeping(graph, floor_widths(graph, min_keep, step)))
        raise NetslimError(
            f"cannot reach {budget_ms:.2f} ms ({budget_ms / table.whole_ms:.0%} of the unpruned "
            f"{table.whole_ms:.2f} ms) on {table.key['runtime']}: every prunable channel pruned to "
            f"the floor (--min-keep {min_keep}) still takes {least:.2f} ms "
            f"({least / table.whole_ms:.0%}), the time no channel pruning removes (each op's "
            "fixed cost, layers kept whole); aim higher or time a larger --batch"
        ) from None


def _time_side_by_side(
    model: nn.Module, pruned: nn.Module, budget: LatencyBudget, input_size: tuple[int, ...]
) -> tuple[float, float, float]:
    """(unpruned ms, pruned ms, MACs reduction), timed in interleaved rounds."""
    from netslim.benchmark import benchmark

    timings = benchmark(
        {"unpruned": model, "pruned": pruned},
        (budget.batch,),
        (budget.runtime,),
        image_size=tuple(input_size[2:]),
        device=budget.device,
        stat="min",
    )
    return timings[0].latency_ms, timings[1].latency_ms, timings[1].macs_reduction


def _measure(
    model: nn.Module,
    pruned: nn.Module,
    plan: PrunePlan,
    official: nn.Module,
    report: PruneReport,
    measure: Measure,
    calibration: Iterable[torch.Tensor] | None,
    recalibrate: int,
    unpruned: dict[str, float] | None,
) -> tuple[nn.Module, PruneReport]:
    """Each network measured (``report.measured``); the compensated one recalibrated on
    ``calibration`` and returned when ``report.compensated``."""
    compensate = report.compensated
    # the network not returned, measured too: the official one, or the compensated one
    other = official if compensate else apply_plan(model, plan, True).eval()
    masked, compensated = (other, pruned) if compensate else (pruned, other)
    measured = report.measured
    measured["unpruned"] = dict(unpruned) if unpruned is not None else measure(model)
    measured["official"] = measure(masked)
    measured["compensated"] = measure(compensated)
    if recalibrate > 0 and calibration is not None:
        # BN recalibration starts from the compensated network; the official one is
        # returned untouched, so --no-compensate always saves exactly the official network.
        recalibrated, images = copy.deepcopy(compensated), [0]

        def counted() -> Iterable[torch.Tensor]:
            for batch in itertools.islice(calibration, recalibrate):
                images[0] += len(batch)
                yield batch

        recalibrate_bn(recalibrated, counted())
        report.recalibration_images = images[0]
        measured["recalibrated"] = measure(recalibrated)
        if compensate:
            pruned, report.saved = recalibrated, "BN recalibrated"
    return pruned.eval(), report


def _measure_classifier(
    model: nn.Module,
    pruned: nn.Module,
    plan: PrunePlan,
    official: nn.Module,
    report: PruneReport,
    data: ImageData,
    recalibrate: int,
    batch_size: int,
    eval_dtype: torch.dtype | None,
    acc_unpruned: float | None,
) -> tuple[nn.Module, PruneReport]:
    """:func:`_measure` by test accuracy on ``data``, on its device, recalibrated on its
    augmented training images; the accuracies also go to the report's ``acc_*`` fields."""
    device = data.device
    if next(model.parameters()).device != device:  # measured on a copy: the caller's stays put
        model = copy.deepcopy(model).to(device)

    def accuracy(network: nn.Module) -> dict[str, float]:
        return {"accuracy": evaluate(network, data, dtype=eval_dtype)[1]}

    known = None if acc_unpruned is None else {"accuracy": acc_unpruned}
    batches = recalibration_batches(data, recalibrate, batch_size)
    pruned, report = _measure(
        model,
        pruned.to(device),
        plan,
        official.to(device),
        report,
        accuracy,
        batches,
        recalibrate,
        known,
    )
    acc = {way: values["accuracy"] for way, values in report.measured.items()}
    report.acc_unpruned, report.acc_masked = acc["unpruned"], acc["official"]
    report.acc_compensated, report.acc_recalibrated = acc["compensated"], acc.get("recalibrated")
    return pruned, report


#: How many groups of channels the check after surgery may keep whole before giving up.
MAX_REPAIRS = 8


def _checked_surgery(
    model: nn.Module,
    plan: PrunePlan,
    compensate: bool,
    plan_on: Callable[..., PrunePlan],
) -> tuple[nn.Module, PrunePlan, nn.Module, Verdict]:
    """Surgery, checked (:mod:`netslim.engine.check`): ``(pruned, plan, official network,
    verdict)``. Where the official pruned network fails or differs from the masked one, the
    group of channels that causes it is found, kept whole with the reason, and the network
    planned again (``plan_on(graph)``; ``plan_on(graph, plan)`` at that plan's threshold
    while searching); after :data:`MAX_REPAIRS` groups, or where the compensated network
    fails, NetslimError: a broken network is never returned."""
    for repairs in range(MAX_REPAIRS + 1):
        official = apply_plan(model, plan, compensate=False).eval()
        verdict = check_official(model, plan, official)
        if verdict.failure is None:
            break
        if repairs == MAX_REPAIRS:
            raise NetslimError(
                f"pruning {plan.graph.model_name} gives a broken network ({verdict.failure}), "
                f"even with {repairs} group{'s' * (repairs != 1)} of channels kept whole; no "
                "pruned network is returned. "
                "Leave the modules it names unpruned (ignore=, --ignore)"
            )
        with warnings.catch_warnings():  # the search plans many times: the floor warns once
            warnings.simplefilter("ignore")
            group = find_culprit(model, plan, lambda g, like=plan: plan_on(g, like))
            label = plan.graph.groups[group].label
            reason = (
                f"removing channels of {label} broke the pruned network "
                f"({verdict.failure}); kept whole, found by running it after surgery"
            )
            plan = plan_on(keep_group(plan.graph, group, reason))
    if not compensate:
        return official, plan, official, verdict
    pruned = apply_plan(model, plan, compensate=True).eval()
    failure = check_runs(pruned, plan, model, verdict)
    if failure:
        raise NetslimError(
            f"the bias-compensated network of {plan.graph.model_name} {failure}, where the "
            "official one runs; prune without compensation (compensate=False, --no-compensate)"
        )
    return pruned, plan, official, verdict


def check_prune_output(
    source: str | Path, out: str | Path, force: bool = False, what: str = "--out"
) -> None:
    """Check, before pruning, that ``out`` can be written and is not the input ``source``
    (which it would replace), unless ``force``; ``what`` names ``out`` in the message."""
    source, out = Path(source), Path(out)
    same = out.exists() and source.exists() and os.path.samefile(source, out)
    if same and not force:
        raise NetslimError(
            f"{what} {out} is the checkpoint being pruned and would replace it; choose another "
            "--out (or add --force to replace it)"
        )
    check_output_file(out)


def pruned_checkpoint(
    pruned: nn.Module, report: PruneReport | None, meta: dict[str, Any]
) -> dict[str, Any]:
    """``{'channels', 'state_dict', 'netslim'}`` (plus the official ``'cfg'`` for a VGG)."""
    state_dict = {k: v.detach().cpu().contiguous() for k, v in pruned.state_dict().items()}
    info = {**meta, "kind": "pruned", "prune": report.to_dict()} if report else dict(meta)
    checkpoint = {"channels": channel_counts(pruned), "state_dict": state_dict, "netslim": info}
    if isinstance(pruned, VGG):
        checkpoint["cfg"] = list(pruned.cfg)
    return checkpoint


def save(
    model: nn.Module,
    path: str | Path,
    report: PruneReport | None = None,
    *,
    arch: str | None = None,
    image_size: int = 32,
    kind: str | None = None,
    teacher: str | Path | None = None,
) -> None:
    """Save ``model`` (pruned or not) so that :func:`netslim.load` rebuilds it.

    The file holds the weights and every layer's channel counts, never a pickled module.

    Args:
        model: the network, e.g. the one :func:`prune_model` returned.
        path: the file to write (atomically).
        report: the :class:`PruneReport` of the pruning, kept in the file's metadata.
        arch: what ``netslim.load(path)`` builds the unpruned network from: one of
            :data:`netslim.ARCHS` or a spec such as ``"torchvision:resnet18"``,
            ``"ultralytics:yolov8n.yaml"`` (the model's own YAML is stored too) or
            ``"mypkg.models:build"``. Without it, load with ``netslim.load(path, builder)``.
        image_size: the square input size the network takes (recorded for ``netslim info``
            and later pruning).
        kind: what the network is, for ``netslim info`` (``"train"``, ``"finetune"``; with
            a report, ``"pruned"``).
        teacher: the file of the unpruned network ``model`` was pruned from: fine-tuning
            distils from it by default (:mod:`netslim.train.distill`).
    """
    meta = {"arch": arch, "num_classes": num_outputs(model), "image_size": int(image_size)}
    if teacher is not None:
        meta["teacher"] = str(Path(teacher).resolve())
    if kind:
        meta["kind"] = kind
    if arch and arch.startswith("ultralytics:") and isinstance(getattr(model, "yaml", None), dict):
        meta["yaml"] = model.yaml  # what it was built from, so that it rebuilds without the file
        # its class names, for Ultralytics' metadata when it is exported
        names = getattr(model, "names", None)
        if isinstance(names, dict) and all(
            isinstance(k, int) and isinstance(v, str) for k, v in names.items()
        ):
            meta["names"] = dict(names)
    save_checkpoint(pruned_checkpoint(model, report, meta), path)
