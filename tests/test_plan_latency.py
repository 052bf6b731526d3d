"""Pruning to a latency budget (issue 29, the selection): plan_for_latency against the
brute-force optimum on tiny networks, under a synthetic runtime whose cost is known."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import randomize_bn
from torch import nn

from netslim.engine.plan import PrunePlan, _unit_scores, channel_scores, plan_for_latency
from netslim.engine.surgery import apply_plan
from netslim.engine.trace import trace_channels
from netslim.errors import NetslimError

PENALTY = 1.5  # a layer whose output width is not a multiple of 4 runs this much slower


def chain(widths: tuple[int, ...], seed: int) -> nn.Module:
    """Convs with BatchNorm and ReLU of the given widths, pooled into a linear head."""
    torch.manual_seed(seed)
    layers, n_in = [], 3
    for w in widths:
        layers += [nn.Conv2d(n_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        n_in = w
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(n_in, 5))
    return randomize_bn(model, seed).eval()


def runtime(plan: PrunePlan) -> float:
    """MACs, with a layer writing a width that is not a multiple of 4 PENALTY times slower."""
    total = 0.0
    for layer in plan.graph.layers.values():
        n_in, n_out = int(plan.keep[layer.inputs].sum()), int(plan.keep[layer.outputs].sum())
        slow = PENALTY if n_out % 4 and layer.kind == "conv" else 1.0
        total += slow * layer.pixels * layer.kernel * n_in * n_out
    return total


def unpruned(graph) -> float:
    return runtime(PrunePlan(0.0, math.nan, graph, torch.ones(graph.num_units, dtype=torch.bool)))


def brute_force(model: nn.Module, budget: float) -> float:
    """The most importance any per-group choice of kept counts keeps within ``budget``
    (within a group, the best-scored channels are kept: the cost depends on counts only)."""
    graph = trace_channels(model, (1, 3, 8, 8))
    scores = _unit_scores(graph, channel_scores(model, None))
    groups = list(graph.prunable.values())
    order = [g.units[torch.argsort(scores[g.units], descending=True)] for g in groups]
    best = -math.inf
    for kept in itertools.product(*[range(1, len(g.units) + 1) for g in groups]):
        keep = torch.zeros(graph.num_units, dtype=torch.bool) | graph.fixed
        for units, n in zip(order, kept):
            keep[units[:n]] = True
        plan = PrunePlan(0.0, math.nan, graph, keep)
        if runtime(plan) <= budget:
            best = max(best, float(scores[keep & ~graph.fixed].sum()))
    return best


def kept_importance(model: nn.Module, plan: PrunePlan) -> float:
    scores = _unit_scores(plan.graph, channel_scores(model, None))
    return float(scores[plan.keep & ~plan.graph.fixed].sum())


#: The greedy's worst share of the optimum's importance, by budget (a share of the unpruned
#: runtime). Measured over 12 seeds x 2 networks (bench/latency_plan_margin.py): at most
#: 3.7% short from 40% of the unpruned time up (120 cases), 19.6% at 20-30% (48 cases),
#: where a narrow first layer's width cliff is a choice a one-step-at-a-time greedy cannot
#: see past.
LEAST = {0.3: 0.80, 0.5: 0.95, 0.7: 0.95}


@pytest.mark.parametrize("widths", [(6, 5, 6), (4, 7, 5)])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("share", sorted(LEAST))
def test_the_greedy_choice_respects_the_budget_within_a_margin_of_the_optimum(seed, share, widths):
    model = chain(widths, seed)
    graph = trace_channels(model, (1, 3, 8, 8))
    budget = share * unpruned(graph)
    plan = plan_for_latency(model, budget, runtime, graph=graph)
    assert runtime(plan) <= budget
    assert kept_importance(model, plan) >= LEAST[share] * brute_force(model, budget)


def test_the_width_penalty_steers_the_choice_to_multiples_of_four():
    """Where a width off a multiple of 4 costs more, the widths chosen land on multiples."""
    model = chain((8, 8, 8), 0)
    graph = trace_channels(model, (1, 3, 8, 8))
    full = unpruned(graph)
    plan = plan_for_latency(model, 0.4 * full, runtime, graph=graph, round_to=4)
    assert all(kept % 4 == 0 for kept, _ in plan.kept.values())


def test_a_latency_plan_is_pruned_exactly():
    model = chain((6, 5, 6), 1)
    graph = trace_channels(model, (1, 3, 8, 8))
    full = unpruned(graph)
    plan = plan_for_latency(model, 0.5 * full, runtime, graph=graph)
    from netslim.engine.plan import reference_network

    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        pruned, masked = (
            apply_plan(model, plan, compensate=False),
            reference_network(model, plan, False),
        )
        torch.testing.assert_close(pruned(x), masked(x))


@pytest.mark.parametrize("budget", [0, -1.0, math.nan, "fast"])
def test_a_budget_that_is_not_a_positive_number_is_one_line(budget):
    with pytest.raises(NetslimError, match="a latency budget must be a positive number"):
        plan_for_latency(chain((4,), 0), budget, runtime)


def test_a_budget_out_of_reach_says_what_the_floor_leaves():
    model = chain((6, 5), 0)
    with pytest.raises(NetslimError, match="cannot reach a latency of"):
        plan_for_latency(model, 1.0, runtime)
