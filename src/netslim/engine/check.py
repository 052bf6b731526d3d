"""The check after surgery: a pruned network must run and equal its reference network.

The trace sees what the example input made the network do, and surgery builds the smaller
network from that; a size fixed in ``forward()`` that the trace could not see (a reshape of
fixed size reading removed channels) would leave a network that fails, or computes something
else. :func:`check_official` runs the official pruned network (no compensation) beside the
official masked network (:func:`~netslim.engine.plan.reference_network`) on the traced input,
and, where the forward pass reads no tensor values, on a random input too: it must run, and
its outputs must equal the masked network's to float rounding (a difference is looked at
again in float64 before it counts). Where the forward pass reads values, the outputs are
not compared (a detector's boxes after NMS may differ in number where rounding breaks a tie
between scores) but every BatchNorm's output, and every conv's or linear layer's without
one, on the channels it keeps. Compensation changes biases and running means only, never
which channels go, so the compensated network needs only to run (:func:`check_runs`): it
equals its own reference only away from zero-padded borders.

:func:`find_culprit` finds a group of channels whose removal breaks the network, by bisection
over the groups in trace order; :func:`netslim.slim.prune_model` keeps that group whole,
prunes again, and names it in the report.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from netslim.engine.graph import ChannelGraph, tensors
from netslim.engine.plan import PrunePlan, reference_network
from netslim.engine.rules import Rules, default_rules
from netslim.engine.surgery import apply_plan
from netslim.engine.trace import _source_of

#: Largest relative difference (to the largest value of the same output) taken as equal in
#: fp32: what a different summation order leaves.
TOLERANCE = 1e-4


@dataclass
class Verdict:
    """What :func:`check_official` found.

    Attributes:
        difference: the largest relative difference of any compared output (inf when the
            pruned network did not run).
        failure: what is wrong, as a clause ("it fails on ...", "its output differs
            ..."); None when the pruned network is right.
        inputs: the inputs it ran on, in words.
        shapes: the shapes of the masked network's outputs on the first of them.
    """

    difference: float
    failure: str | None
    inputs: str
    shapes: list[tuple[int, ...]] | None = None


def check_official(
    model: nn.Module, plan: PrunePlan, official: nn.Module, wide: bool = False
) -> Verdict:
    """Run ``official`` (``apply_plan(model, plan, compensate=False)``) beside the masked
    network and compare (see the module docs): on the traced input and a random one, the
    network's outputs; where the forward reads values, on the traced input, the output of
    every layer on its kept channels. A difference found in the network's own precision is
    looked at again in float64 (``wide``, on copies), so that rounding that adds up in a
    deep network is no false alarm; where float64 does not run (an op that takes float32
    only, MPS), the first verdict stands."""
    param = next(model.parameters())
    reference, checked, dtype = reference_network(model, plan, False), official, param.dtype
    if wide:
        reference, checked, dtype = (
            reference.double(),
            copy.deepcopy(official).double(),
            torch.float64,
        )
    layers = _compared_layers(plan) if plan.graph.value_reads else {}
    inputs = _inputs(plan.graph, model, dtype)
    names = " and ".join(label for label, _ in inputs)
    rules = plan.graph.rules or default_rules()
    worst, shapes = 0.0, None
    for label, x in inputs:
        expected = _run(reference, x, layers, rules)
        shapes = shapes or [tuple(t.shape) for t in expected[1]]
        try:
            got = _run(checked, x, layers, rules)
        except Exception as e:  # the broken network this check is here to catch
            return Verdict(math.inf, f"it fails on {label}: {_error(e)}", names)
        pairs = [
            (
                f"the output of {name}",
                got[0].get(name, []),
                expected[0].get(name, []),
                *layers[name],
            )
            for name in layers
        ]
        if not layers:
            pairs.append(("its output", got[1], expected[1], 0, None))
        for what, mine, theirs, dim, kept in pairs:
            failure, difference = _compare(mine, theirs, dim, kept, _tolerance(dtype))
            worst = max(worst, difference)
            if failure:
                verdict = Verdict(difference, f"{what} {failure} on {label}", names)
                return _again_wide(model, plan, official, verdict) if not wide else verdict
    return Verdict(worst, None, names, shapes)


def _again_wide(
    model: nn.Module, plan: PrunePlan, official: nn.Module, verdict: Verdict
) -> Verdict:
    """:func:`check_official` in float64, where a difference was found in float32; the
    float32 ``verdict`` where float64 cannot run."""
    if next(model.parameters()).device.type == "mps" or not math.isfinite(verdict.difference):
        return verdict  # (MPS has no float64; a shape mismatch is no rounding)
    try:
        return check_official(model, plan, official, wide=True)
    except Exception:  # an op of the network's own that takes float32 only
        return verdict


def _compare(
    mine: list[torch.Tensor],
    theirs: list[torch.Tensor],
    dim: int,
    kept: torch.Tensor | None,
    tolerance: float,
) -> tuple[str | None, float]:
    """Why two lists of tensors differ (the second on its ``kept`` entries along ``dim``),
    and their largest relative difference."""
    if len(mine) != len(theirs):
        return f"has {len(mine)} tensors, the masked network's {len(theirs)},", math.inf
    worst = 0.0
    for a, b in zip(mine, theirs):
        b = b if kept is None else b.index_select(dim, kept.to(b.device))
        if a.shape != b.shape:
            shapes = f"{tuple(a.shape)} where the masked network's has {tuple(b.shape)}"
            return f"has shape {shapes}", math.inf
        difference = relative_difference(a, b)
        worst = max(worst, difference)
        if not difference <= tolerance:
            return f"differs from the masked network's by {difference:.1e} (relative)", worst
    return None, worst


def check_runs(
    pruned: nn.Module, plan: PrunePlan, model: nn.Module, verdict: Verdict
) -> str | None:
    """Why the (compensated) ``pruned`` network is broken on the traced input: it fails, or
    (where the forward reads no values) its outputs have other shapes than the masked
    network's had there (``verdict.shapes``, from :func:`check_official`); None when it runs."""
    label, x = _inputs(plan.graph, model)[0]
    try:
        got = [tuple(t.shape) for t in _run(pruned, x, {}, plan.graph.rules)[1]]
    except Exception as e:
        return f"fails on {label}: {_error(e)}"
    if not plan.graph.value_reads and verdict.shapes is not None and got != verdict.shapes:
        return f"gives outputs of shapes {got}, not {verdict.shapes}"
    return None


def find_culprit(
    model: nn.Module, plan: PrunePlan, replan: Callable[[ChannelGraph], PrunePlan]
) -> int:
    """A group (its id in ``plan.graph.groups``) whose removal breaks the network: with the
    groups ``plan`` prunes taken in trace order, the last of the shortest run of them whose
    pruning alone (the others kept whole, ``replan`` planning the rest) fails
    :func:`check_official`. ``plan`` itself must fail it."""
    graph = plan.graph
    pruned = [i for i, g in graph.groups.items() if not bool(plan.keep[g.units].all())]

    def fails(count: int) -> bool:
        fixed = graph.fixed.clone()
        for i in pruned[count:]:
            fixed[graph.groups[i].units] = True
        trial = replan(replace(graph, fixed=fixed))
        official = apply_plan(model, trial, compensate=False).eval()
        return check_official(model, trial, official).failure is not None

    low, high = 1, len(pruned)  # the shortest failing run is between them
    while low < high:
        middle = (low + high) // 2
        if fails(middle):
            high = middle
        else:
            low = middle + 1
    return pruned[low - 1]


def keep_group(graph: ChannelGraph, group: int, reason: str) -> ChannelGraph:
    """``graph`` with every unit of ``group`` fixed, and ``reason`` among its reasons."""
    fixed = graph.fixed.clone()
    fixed[graph.groups[group].units] = True
    return replace(graph, fixed=fixed, fixed_reasons=[*graph.fixed_reasons, reason])


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``, NaN where only one of them is NaN (NaN in both matches)."""
    a, b = a.detach().double(), b.detach().double()
    both = torch.isnan(a) & torch.isnan(b)
    gap = torch.where(both, 0.0, (a - b).abs())
    if b.numel() == 0:
        return 0.0
    scale = torch.where(both, 0.0, b.abs()).max().clamp_min(1e-30)
    return float(gap.max() / scale)


def _tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE if dtype in (torch.float32, torch.float64) else 2e-2


def _inputs(
    graph: ChannelGraph, model: nn.Module, dtype: torch.dtype | None = None
) -> list[tuple[str, torch.Tensor]]:
    param = next(model.parameters())
    dtype = dtype or param.dtype
    size = graph.input_size
    traced = [("the traced input", torch.zeros(size))]
    if not graph.value_reads:  # the path depends on no values: any input takes it
        x = torch.randn(size, generator=torch.Generator().manual_seed(0))
        traced.append(("a random input", x))
    return [(label, x.to(param.device, dtype)) for label, x in traced]


def _compared_layers(plan: PrunePlan) -> dict[str, tuple[int, torch.Tensor]]:
    """Layer name -> (its channel dim, the indices of its kept channels): every BatchNorm,
    and every conv and linear layer whose output no BatchNorm alone reads (where one does,
    compensation may have moved a constant from the layer's bias into that norm)."""
    graph = plan.graph
    compared = {}
    for name, layer in graph.layers.items():
        if layer.norm is None and layer.inference:
            compared[name] = (layer.out_dim, plan.kept_of(layer.outputs).nonzero().flatten())
    for name, units in graph.norms.items():
        compared[name] = (1, plan.kept_of(units).nonzero().flatten())
    return compared


def _run(
    net: nn.Module,
    x: torch.Tensor,
    layers: dict[str, tuple[int, torch.Tensor]],
    rules: Rules | None = None,
) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """The outputs of the named layers (each call's, in the order they ran) and the network's."""
    seen: dict[str, list[torch.Tensor]] = {}
    modules = dict(net.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda m, i, out, name=name: seen.setdefault(name, []).extend(tensors(out))
        )
        for name in layers
        if name in modules
    ]
    try:
        with torch.no_grad():
            out = net(*(rules or default_rules()).model_inputs(net, x))
    finally:
        for h in handles:
            h.remove()
    return seen, [t.detach() for t in tensors(out)]


def _error(error: Exception) -> str:
    detail = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}{_source_of(error)}: {detail}"
