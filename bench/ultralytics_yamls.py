"""Every model YAML the installed Ultralytics ships, pruned by netslim (issue 27).

    YOLO_CONFIG_DIR=/tmp/yolo PYTHONPATH=src:tests python bench/ultralytics_yamls.py \\
        [--size 64] [--threads 1] [NAME ...]
    ... bench/ultralytics_yamls.py [NAME] --cost [PX ...]   # what the check costs

For each YAML (the file as shipped; Ultralytics takes its first scale, n where there is
one): built with 3 classes, random BatchNorm statistics, half of every prunable group's
gammas made tiny (tests/conftest.py's make_sparse), wrap-around padding; pruned at 0.5 at
SIZE px (2x or 4x where a map would be smaller than a conv's wrap-around padding: the px
column) with and without compensation and compared with the reference network on a random
input (tests/test_reliability_engine_exact.py's check_yaml, which the tests assert on);
then pruned again through ``netslim.prune_model`` at that size (zero padding, both ways),
whose check after surgery must pass or repair. Prints one Markdown row per YAML: builds?,
traced?, the share of BN channels prunable, the share removed, the max relative
difference of each pruned network (exact: < 1e-4), what prune_model's check said (its max
difference, and how many groups it had to keep whole), and the seconds (build to last
check). A YAML that is not built or traced ends in netslim's one-line error, printed
below the table.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from conftest import make_sparse
from test_reliability_engine_exact import TOLERANCE, YamlResult, check_yaml, shipped_yamls

import netslim
from netslim.errors import NetslimError
from netslim.runtime.threads import set_threads


def prune_model_check(name: str, size: int) -> str:
    """What ``netslim.prune_model``'s check after surgery said, both ways."""
    torch.manual_seed(0)
    model, _ = make_sparse(netslim.build_model(f"ultralytics:{name}", 3), (1, 3, size, size))
    said = []
    for compensate in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, report = netslim.prune_model(
                    model, 0.5, input_size=(3, size, size), compensate=compensate
                )
        except NetslimError as e:
            said.append(f"refused: {e}"[:120])
            continue
        repairs = sum(r.startswith("removing channels of") for r in report.fixed)
        said.append(f"{report.check_difference:.0e}" + (f", {repairs} kept" if repairs else ""))
    return " / ".join(said)


def check_cost(name: str, size: int, repeats: int = 3) -> None:
    """Print how long ``netslim.prune_model`` takes on ``name`` at ``size`` px (compensated),
    with the check after surgery and without it (surgery alone, as before issue 27): the
    least CPU time (this process's, which a busy machine disturbs less than the wall clock)
    of ``repeats`` runs each, interleaved."""
    import netslim.slim as slim
    from netslim.engine.check import Verdict
    from netslim.engine.surgery import apply_plan

    torch.manual_seed(0)
    model, _ = make_sparse(netslim.build_model(f"ultralytics:{name}", 3), (1, 3, size, size))

    def unchecked(model, plan, compensate, plan_on):
        pruned = apply_plan(model, plan, compensate=compensate).eval()
        return pruned, plan, pruned, Verdict(0.0, None, "")

    checked_surgery, best = slim._checked_surgery, {"with the check": [], "without": []}
    try:
        for _ in range(repeats):
            for label, surgery in (("with the check", checked_surgery), ("without", unchecked)):
                slim._checked_surgery = surgery
                start = time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    netslim.prune_model(model, 0.5, input_size=(3, size, size))
                best[label].append(time.process_time() - start)
    finally:
        slim._checked_surgery = checked_surgery
    times = {label: min(t) for label, t in best.items()}
    print(
        f"prune_model({name}, 0.5) at {size} px, compensated, least CPU time of {repeats}: "
        + ", ".join(f"{label} {t:.2f} s" for label, t in times.items())
        + f" (the check: +{times['with the check'] / times['without'] - 1:.0%})"
    )


def row(result: YamlResult, checked: str) -> str:
    def exact(difference: float) -> str:
        return f"{'yes' if difference < TOLERANCE else 'NO'} ({difference:.0e})"

    built = "no" if result.stage == "build" else "yes"
    traced = "no" if result.stage in ("build", "trace") else "yes"
    done = result.stage == "done" and result.error is None
    return (
        f"| {result.name} | {built} | {traced} | {result.size if traced == 'yes' else ''} | "
        + (f"{result.prunable:.0%} | {result.removed:.0%} | " if traced == "yes" else "| | ")
        + (f"{exact(result.official)} | {exact(result.compensated)} | " if done else "| | ")
        + f"{checked} | {result.seconds:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="YAML file names (default: all shipped)")
    parser.add_argument("--size", type=int, default=64, help="input size in px (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--cost",
        metavar="PX",
        type=int,
        nargs="*",
        help="only time prune_model of the first NAME (default yolov8n.yaml) at "
        "these sizes, with and without the check after surgery",
    )
    args = parser.parse_args()
    set_threads(args.threads)
    if args.cost is not None:
        for px in args.cost or [64, 320, 640]:
            check_cost((args.names or ["yolov8n.yaml"])[0], px)
        return
    names = [n for n in shipped_yamls() if not args.names or n in args.names]
    print(
        f"{len(names)} YAMLs, {args.size} px, torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(
        "| YAML | builds | traced | px | prunable | removed | exact, official (max rel. diff.) "
        "| exact, compensated | prune_model's check (official / compensated) | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    refused, start = [], time.perf_counter()
    for name in names:
        result = check_yaml(name, args.size)
        checked = ""
        if result.error is None:
            began = time.perf_counter()
            checked = prune_model_check(name, result.size)
            result.seconds += time.perf_counter() - began
        else:
            refused.append(f"{name}: {result.error}")
        print(row(result, checked), flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if refused:
        print("\nnot built or not traced (netslim's one line):")
        print("\n".join(f"- {line}" for line in refused))


if __name__ == "__main__":
    main()
