"""How the pruning engine's cost grows: with the number of layers, and with the input size.

Part 1 builds a chain of L blocks (conv 3x3, BatchNorm, ReLU; the first conv reads the 3
input channels) of C channels each, gives it random BatchNorm statistics, and times each
stage of pruning it at ratio 0.5 on an 8x8 input: the trace, the plan, the surgery (bias
compensation included), the MAC counts, and ``prune_model`` end to end (all of them, plus
the report). It prints one line per L and the ratio of each stage's time at the largest L
to its time at the smallest: linear work gives about the ratio of the Ls (10 for 1,000 and
10,000 layers).

Part 2 (``--yolo SIZE ...``) times ``prune_model`` of a freshly built yolov8n at each input
size, beside the time and peak memory that ``prune_model`` estimates before tracing
(:func:`netslim.engine.guard.estimate_prune_cost`; the bound itself is lifted here with
``max_seconds=inf``), and the peak memory measured (the growth of the maximum resident set
of a fresh process per size, over what it held before pruning).

Times are CPU seconds of this process (``time.process_time``) and wall seconds, with one
torch thread: on a shared machine the CPU time is the steadier of the two.

    .venv/bin/python bench/deep_chain.py                       # L = 1000 2000 4000 10000, C = 1 and 4
    .venv/bin/python bench/deep_chain.py --layers 1000 2000 --channels 4
    YOLO_OFFLINE=1 .venv/bin/python bench/deep_chain.py --layers --yolo 640 1280 2048
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from netslim.engine.plan import plan_pruning
from netslim.engine.sparsity import batchnorms
from netslim.engine.stats import count_macs
from netslim.engine.surgery import apply_plan
from netslim.engine.trace import trace_channels
from netslim.slim import prune_model

STAGES = ["trace", "plan", "surgery", "macs", "prune_model"]


def chain(layers: int, channels: int, seed: int = 0) -> nn.Module:
    """L blocks of conv 3x3, BatchNorm, ReLU, with random gammas (half of them tiny)."""
    torch.manual_seed(seed)
    blocks = [
        nn.Sequential(
            nn.Conv2d(3 if i == 0 else channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        for i in range(layers)
    ]
    model = nn.Sequential(*blocks)
    with torch.no_grad():
        for _, bn in batchnorms(model):
            weight = torch.rand(channels)
            weight[::2] *= 1e-3  # every other channel unimportant
            bn.weight.copy_(weight)
            bn.bias.copy_(torch.randn(channels) * 0.1)
    return model.eval()


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """``fn(*args, **kwargs)``, its CPU seconds and its wall seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.process_time() - cpu, time.perf_counter() - wall


def stage_times(layers: int, channels: int) -> dict[str, tuple[float, float]]:
    """Each stage's (CPU, wall) seconds of pruning the chain at ratio 0.5 on 8x8 inputs."""
    model, size = chain(layers, channels), (1, 3, 8, 8)
    times = {}
    graph, *times["trace"] = timed(trace_channels, model, size)
    plan, *times["plan"] = timed(plan_pruning, model, 0.5, graph=graph)
    pruned, *times["surgery"] = timed(apply_plan, model, plan)
    _, *times["macs"] = timed(lambda: (count_macs(model, size), count_macs(pruned, size)))
    _, *times["prune_model"] = timed(prune_model, model, 0.5, input_size=size[1:])
    return times


def chain_table(layer_counts: list[int], channel_counts: list[int]) -> None:
    print("CPU seconds (wall seconds) of each stage, one torch thread")
    for channels in channel_counts:
        print(f"\nC = {channels}")
        print(f"{'L':>7} " + " ".join(f"{s:>18}" for s in STAGES))
        rows = {}
        for layers in layer_counts:
            rows[layers] = stage_times(layers, channels)
            cells = [f"{cpu:8.2f} ({wall:7.2f})" for cpu, wall in rows[layers].values()]
            print(f"{layers:>7} " + " ".join(f"{c:>18}" for c in cells), flush=True)
        if len(rows) > 1:
            low, high = min(rows), max(rows)
            ratios = [rows[high][s][0] / max(rows[low][s][0], 1e-9) for s in STAGES]
            print(
                f"time({high:,}) / time({low:,}), CPU (linear: {high / low:.3g}): "
                + "  ".join(f"{s} {r:.1f}" for s, r in zip(STAGES, ratios))
            )


def _max_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def yolo_row(size: int) -> tuple[float, float, float, int, int]:
    """In a fresh process: CPU and wall seconds of pruning yolov8n at ``size``, the
    estimated seconds and peak bytes, and the peak bytes measured."""
    from netslim.engine.guard import estimate_prune_cost
    from netslim.models import build_model

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model = build_model("ultralytics:yolov8n.yaml", 80).eval()
    estimate = estimate_prune_cost(model, (1, 3, size, size))
    before = _max_rss()
    _, cpu, wall = timed(prune_model, model, 0.5, input_size=(3, size, size), max_seconds=math.inf)
    return cpu, wall, estimate.seconds, estimate.peak_bytes, _max_rss() - before


def yolo_table(sizes: list[int]) -> None:
    print("\nyolov8n (80 classes, fresh weights), prune_model at ratio 0.5, one torch thread")
    print(
        f"{'size':>6} {'CPU s':>8} {'wall s':>8} {'estimated s':>12} "
        f"{'estimated peak':>15} {'measured peak':>14}"
    )
    for size in sizes:
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh peak per size
            cpu, wall, seconds, peak, measured = pool.apply(yolo_row, (size,))
        print(
            f"{size:>6} {cpu:8.1f} {wall:8.1f} {seconds:12.1f} {peak / 2**30:11.2f} GiB "
            f"{measured / 2**30:10.2f} GiB",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="*", default=[1000, 2000, 4000, 10000])
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--yolo", type=int, nargs="*", default=[], metavar="SIZE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the per-layer floor's warning, once per plan
    if args.layers:
        chain_table(args.layers, args.channels)
    if args.yolo:
        yolo_table(args.yolo)


if __name__ == "__main__":
    main()
