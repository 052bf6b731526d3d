"""How netslim's engine (and Torch-Pruning) fare on detectors and segmenters (issue 22).

    YOLO_CONFIG_DIR=/tmp/yolo PYTHONPATH=src:tests python bench/coverage_detect.py [--size 160]

For each network: fresh weights, random BatchNorm statistics, half of every prunable
group's gammas made tiny (as tests/test_detection.py does). netslim: traced or not (why),
the share of BatchNorm channels prunable (not fixed), the same among the channels that are
not themselves returned by the network (the issue's measure), the fixed reasons, the share
removed and the MACs kept at ratio 0.5, and whether the pruned network equals the masked
one on every output tensor (before NMS for torchvision's detectors). Torch-Pruning 1.6.1
(``pip install torch-pruning==1.6.1``, a bench-only dependency): ``BNScalePruner`` at 0.5,
global, the output layers ignored, and whether the result runs with the same output shapes.
Prints one Markdown row per network, and the trace and prune time of yolov8n at 640x640.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torchvision
from test_detection import assert_same, make_sparse, outputs

import netslim
from netslim import engine
from netslim.engine.plan import masked_copy
from netslim.engine.stats import count_macs
from netslim.models import model_inputs

YOLO = [
    "yolov5nu",
    "yolov5su",
    "yolov5mu",
    "yolov8n",
    "yolov8s",
    "yolov8m",
    "yolo11n",
    "yolo11s",
    "yolo11m",
    "yolov8n-seg",
    "yolo11n-seg",
    "yolov8n-cls",
]
TORCHVISION = [
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large",
    "fcn_resnet50",
    "lraspp_mobilenet_v3_large",
]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in YOLO:
        return netslim.build_model(f"ultralytics:{name}.yaml", 1000 if name.endswith("cls") else 80)
    small = (
        {"min_size": 160, "max_size": 160} if name.startswith(("fasterrcnn", "retinanet")) else {}
    )
    return torchvision.models.get_model(name, weights=None, weights_backbone=None, **small)


def output_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What Torch-Pruning must be told not to prune: the heads that produce the outputs."""
    for path in ("model.-1", "rpn", "roi_heads", "head", "classifier", "aux_classifier"):
        found = model
        for part in path.split("."):
            found = found[int(part)] if part.lstrip("-").isdigit() else getattr(found, part, None)
            if found is None:
                break
        if found is not None:
            yield found


def netslim_row(name: str, size: int) -> str:
    model = build(name)
    shape = (1, 3, 64, 64) if name.endswith("cls") else (1, 3, size, size)
    try:
        model, graph = make_sparse(model, shape)
    except netslim.NetslimError as e:
        return f"| {name} | not traced: {e} | | | | | |"
    total = sum(len(u) for u in graph.norms.values())
    fixed = sum(int(graph.fixed[u].sum()) for u in graph.norms.values())
    outputs_fixed = _fixed_by_output(graph)
    reasons = sorted({r.split(" (")[0].split(" in ")[0] for r in graph.fixed_reasons})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = engine.plan_pruning(model, 0.5, graph=graph)
    pruned = engine.apply_plan(model, plan, compensate=False).eval()
    x = torch.randn(shape)
    try:
        assert_same(outputs(pruned, x), outputs(masked_copy(model, plan.masks), x))
        exact = "yes"
    except AssertionError as e:
        exact = f"NO ({str(e).splitlines()[0][:60]})"
    macs = count_macs(pruned, shape) / count_macs(model, shape)
    not_out = total - outputs_fixed
    return (
        f"| {name} | traced | {1 - fixed / total:.1%} | {(not_out - (fixed - outputs_fixed)) / not_out:.1%} "
        f"| {'; '.join(reasons) or '-'} | {plan.pruned_share:.1%} | {macs:.1%} | {exact} |"
    )


def _fixed_by_output(graph) -> int:
    """BatchNorm channels fixed because the network returns them (or what they feed
    without a layer between: a depthwise conv's groups)."""
    marked = torch.zeros(graph.num_units, dtype=torch.bool)
    for group in graph.groups.values():
        if group.fixed == "the network's output":
            marked[group.units] = True
    return sum(int((marked[u] & graph.fixed[u]).sum()) for u in graph.norms.values())


def torch_pruning_row(name: str, size: int) -> str:
    try:
        import torch_pruning as tp
    except ImportError:
        return f"| {name} | Torch-Pruning not installed | | |"
    shape = (1, 3, 64, 64) if name.endswith("cls") else (1, 3, size, size)
    model, _ = make_sparse(build(name), shape)  # the same sparse network netslim prunes
    example = model_inputs(model, torch.randn(shape))
    example = example[0] if len(example) == 1 else example
    macs_before = count_macs(model, shape)
    try:
        with torch.no_grad():
            before = [t.shape for t in outputs(model, torch.randn(shape))]
        pruner = tp.pruner.BNScalePruner(
            model,
            example,
            importance=tp.importance.BNScaleImportance(),
            pruning_ratio=0.5,
            global_pruning=True,
            ignored_layers=list(output_layers(model)),
        )
        pruner.step()
        with torch.no_grad():
            after = [t.shape for t in outputs(model.eval(), torch.randn(shape))]
    except Exception as e:
        return f"| {name} | fails: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''} | | |"
    same = "same output shapes" if after == before else "OUTPUT SHAPES CHANGED"
    return f"| {name} | runs, {same} | {count_macs(model, shape) / macs_before:.1%} | |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--only", nargs="*", help="a subset of the networks")
    p.add_argument("--torch-pruning-only", action="store_true")
    args = p.parse_args()
    names = args.only or [*YOLO, *TORCHVISION]
    if not args.torch_pruning_only:
        print(
            "| network | netslim | BN channels prunable | of those not returned | fixed because | "
            "removed at 0.5 | MACs kept | exact |\n|---|---|--:|--:|---|--:|--:|---|"
        )
        for name in names:
            print(netslim_row(name, args.size), flush=True)
    print(
        "\n| network | Torch-Pruning 1.6.1 BNScalePruner, ratio 0.5 | MACs kept | |\n|---|---|--:|---|"
    )
    for name in names:
        print(torch_pruning_row(name, args.size), flush=True)
    if args.torch_pruning_only:
        return
    model = build("yolov8n").eval()
    start = time.perf_counter()
    engine.trace_channels(model, (1, 3, 640, 640))
    traced = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        netslim.prune_model(model, 0.5, input_size=(3, 640, 640))
    print(
        f"\nyolov8n at 640x640: trace {traced:.2f} s; prune_model (trace, plan, surgery, "
        f"compensation, MACs) {time.perf_counter() - start:.2f} s"
    )


if __name__ == "__main__":
    main()
