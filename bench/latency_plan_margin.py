"""How far plan_for_latency's greedy choice falls short of the brute-force optimum.

On the small networks and the synthetic runtime of tests/test_plan_latency.py (MACs, a
layer writing a width off a multiple of 4 1.5x slower), for 12 seeds x 2 networks x
budgets of 20-80% of the unpruned runtime: the worst share of the optimum's importance the
greedy keeps, per budget. Quoted in docs/engine.md and in plan_for_latency's docstring.

    .venv/bin/python bench/latency_plan_margin.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_plan_latency import (  # noqa: E402
    brute_force,
    chain,
    kept_importance,
    runtime,
    unpruned,
)

from netslim.engine.plan import plan_for_latency  # noqa: E402
from netslim.engine.trace import trace_channels  # noqa: E402
from netslim.errors import NetslimError  # noqa: E402


def main() -> None:
    warnings.simplefilter("ignore")
    worst: dict[float, float] = {}
    cases: dict[float, int] = {}
    for seed in range(12):
        for widths in [(6, 5, 6), (4, 7, 5)]:
            model = chain(widths, seed)
            graph = trace_channels(model, (1, 3, 8, 8))
            for share in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
                budget = share * unpruned(graph)
                try:
                    plan = plan_for_latency(model, budget, runtime, graph=graph)
                except NetslimError:
                    continue  # below what the floor leaves
                assert runtime(plan) <= budget
                kept = kept_importance(model, plan) / brute_force(model, budget)
                worst[share] = min(worst.get(share, 1.0), kept)
                cases[share] = cases.get(share, 0) + 1
    print("budget (share of unpruned runtime)  cases  worst greedy / optimum importance")
    for share in sorted(worst):
        print(f"{share:>34.1f}  {cases[share]:>5}  {worst[share]:.4f}")


if __name__ == "__main__":
    main()
