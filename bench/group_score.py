"""How to score a channel that several BatchNorms scale: the largest |gamma| or the mean.

    .venv/bin/python bench/group_score.py CHECKPOINT --data-root DATA [--ratios 0.4 0.6]

netslim scores a channel group by the largest |gamma| of its BNs (a channel goes only when
every gamma that scales it is at or below the threshold). This script prunes the
checkpoint both ways at each ratio, recalibrates BN on 16 x 128 training images and
prints MACs kept and test accuracy (CIFAR-10), plus the kept channels of each residual
stream (the groups with more than one BN).
"""

from __future__ import annotations

import argparse
import warnings

import torch

from netslim import load, load_dataset
from netslim.engine.plan import _plan_at, _unit_scores, channel_scores, global_threshold
from netslim.engine.recalibrate import recalibrate_bn
from netslim.engine.sparsity import batchnorms, bn_gammas
from netslim.engine.stats import count_macs
from netslim.engine.surgery import apply_plan
from netslim.engine.trace import trace_channels
from netslim.runtime.device import pick_precision
from netslim.slim import recalibration_batches
from netslim.train.evaluate import evaluate


def mean_scores(model, graph) -> torch.Tensor:
    """Each unit's mean |gamma| over the BatchNorm channels that scale it (fixed: +inf)."""
    bns = dict(batchnorms(model))
    total, count = torch.zeros(graph.num_units), torch.zeros(graph.num_units)
    for name, units in graph.norms.items():
        total.index_add_(0, units, bns[name].weight.detach().abs().float())
        count.index_add_(0, units, torch.ones(len(units)))
    return (total / count.clamp(min=1)).masked_fill(graph.fixed, float("inf"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--data-root", required=True)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.6])
    args = p.parse_args()
    warnings.simplefilter("ignore")
    model = load(args.checkpoint)
    data = load_dataset("cifar10", args.data_root, download=False, train_size=args.train_size)
    dtype = pick_precision("auto", torch.device("cpu"))
    graph = trace_channels(model)
    streams = [g for g in graph.prunable.values() if len(g.members) > 1]
    base = count_macs(model)
    print(
        f"{'score':<6}{'ratio':>6}{'removed':>9}{'MACs kept':>11}{'acc (recal.)':>14}  streams kept"
    )
    for name, scores in (
        ("max", _unit_scores(graph, channel_scores(model))),
        ("mean", mean_scores(model, graph)),
    ):
        for ratio in args.ratios:
            threshold = global_threshold(bn_gammas(model), ratio)
            plan = _plan_at(graph, scores, threshold, ratio, 0.01)
            pruned = apply_plan(model, plan).eval()
            recalibrate_bn(pruned, recalibration_batches(data, 16, 128))
            acc = evaluate(pruned, data, dtype=dtype)[1]
            kept = [f"{int(plan.keep[g.units].sum())}/{g.size}" for g in streams]
            print(
                f"{name:<6}{ratio:>6}{plan.pruned_share:>9.1%}{count_macs(pruned) / base:>11.1%}"
                f"{acc:>13.2f}%  {' '.join(kept)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
