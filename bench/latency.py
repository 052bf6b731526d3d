"""Inference latency of unpruned and pruned networks, beside their MACs ratio; time to prune.

    .venv/bin/python bench/latency.py --checkpoint runs/vgg19-sparse/last.pth

The pruned networks come from pruning the checkpoint at each ratio (bias compensation on,
no data). For a network with residual additions, the same ratio is also pruned the way
the paper's code does, keeping every channel joined by an addition at full width
("res. kept"). Without a checkpoint, ``--arch`` with random gammas stands in; its layers
then lose channels evenly, unlike a sparsity-trained network, so prefer a real checkpoint.
Latency is the median of repeated forward passes under ``torch.inference_mode`` in eval
mode, channels_last, for each precision given, the networks timed in interleaved rounds
by :func:`netslim.benchmark.time_interleaved` (``netslim bench`` times checkpoints the
same way, also in onnxruntime). The time to prune (threshold, plan and
surgery) is printed too.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import netslim
from netslim.benchmark import time_interleaved
from netslim.engine.plan import plan_pruning
from netslim.engine.stats import count_macs
from netslim.engine.surgery import apply_plan
from netslim.models import build_model
from netslim.runtime.device import autocast, pick_device


def forward(model, x, device, dtype):
    def run():
        with torch.inference_mode(), autocast(device, dtype):
            return model(x)

    return run


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--arch", default="vgg19", help="without --checkpoint (default: %(default)s)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    device = pick_device(args.device)

    if args.checkpoint:
        model = netslim.load(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = build_model(args.arch)
        with torch.no_grad():
            for _, bn in netslim.sparsity.batchnorms(model):
                bn.weight.copy_(torch.rand_like(bn.weight))
    model.eval()
    models = {"unpruned": model}
    for ratio in args.ratios:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = plan_pruning(model, ratio)
            pruned = apply_plan(model, plan)
            print(
                f"prune {ratio:.0%}: trace + plan + surgery took "
                f"{time.perf_counter() - start:.3f} s"
            )
            models[f"pruned {ratio:.0%}"] = pruned.eval()
            kept = plan.graph.residual_kept()
            if kept is not None:
                plan = plan_pruning(model, ratio, graph=kept)
                models[f"{ratio:.0%} res. kept"] = apply_plan(model, plan).eval()
    base_macs = count_macs(model)

    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"{'model':<16} {'MACs':>10} {'MACs x':>7} {'prec':>5} {'batch':>6} {'ms':>9} {'speedup':>8}"
    )
    for precision in args.precisions:
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        for batch in args.batches:
            x = torch.randn(batch, 3, 32, 32, device=device).contiguous(
                memory_format=torch.channels_last
            )
            models = {k: m.to(device, memory_format=torch.channels_last) for k, m in models.items()}
            repeats = args.repeats if batch <= 16 else max(3, args.repeats // 4)
            sync = torch.cuda.synchronize if device.type == "cuda" else None
            seconds = time_interleaved(
                {k: forward(m, x, device, dtype) for k, m in models.items()}, repeats, sync=sync
            )
            for name, m in models.items():
                macs, ms = count_macs(m), 1000 * seconds[name]
                print(
                    f"{name:<16} {macs / 1e6:>9.1f}M {base_macs / macs:>6.2f}x {precision:>5} "
                    f"{batch:>6} {ms:>9.2f} {seconds['unpruned'] / seconds[name]:>7.2f}x"
                )


if __name__ == "__main__":
    main()
