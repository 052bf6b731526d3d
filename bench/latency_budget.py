"""Prune to a latency budget against the |gamma| threshold at the same latency (issue 29).

    YOLO_CONFIG_DIR=/tmp/yolo python bench/latency_budget.py OUT \\
        --yolo RUN/weights/last.pt --data data.yaml --classifiers R56.pth V19.pth \\
        --data-root CIFAR_DIR

For each network and budget (a share of the unpruned network's latency measured on
onnxruntime, batch 1, 640 px for the YOLO and 32 px for the classifiers), two plans:
``latency`` (the most |gamma| per millisecond, netslim's choice) and ``threshold`` (the
paper's global threshold raised until the same budget is met). Both are timed whole beside
the unpruned network and corrected the same way, so they land at the same measured
latency (within 10%); their accuracy right after pruning (recalibrated: mAP50-95 by
Ultralytics' validator at the training size, 128 px, or CIFAR-10 test accuracy) is what
the choice buys. One markdown row per prune, with predicted and measured latency; each
prune's report is kept in OUT, so running it again skips what is done.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

THREADS = torch.get_num_threads()  # every prune times at this many threads

ROW = (
    "| {network} | {budget:.0%} | {choice} | {pred:.2f} | {meas:.2f} | {unp:.2f} | {speedup:.2f}x "
    "| {macs:.2f}x | {eff:.2f} | {metric} | {corr} | {secs:.0f} s |"
)
HEADER = (
    "| network | budget | choice | predicted ms | measured ms | unpruned ms | speed-up | "
    "MACs fewer | efficiency | right after pruning | corrections | wall |\n"
    "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
)


def yolo_prune(out: Path, weights: str, data: str, budget: float, choice: str) -> dict:
    from netslim.latency import LatencyBudget
    from netslim.yolo.prune import prune

    path = out / f"yolo-{budget}-{choice}.pth"
    if not path.with_suffix(".json").exists():
        torch.set_num_threads(THREADS)  # Ultralytics' validator set it to cores - 1
        start = time.perf_counter()
        report = prune(
            weights,
            path,
            target_latency=LatencyBudget(
                share=budget,
                choice=choice,
                image_size=640,
                table=out / "yolov8n-640.json",
                progress=lambda line: print(line, file=sys.stderr, flush=True),
            ),
            data=data,
            imgsz=128,
            batch=16,
            log=lambda line: None,
        )
        extra = {"seconds": time.perf_counter() - start}
        record = json.loads(path.with_suffix(".json").read_text())
        record["bench"] = extra
        path.with_suffix(".json").write_text(json.dumps(record))
        del report
    record = json.loads(path.with_suffix(".json").read_text())
    report = record["prune"]
    metric = report["measured"].get("recalibrated", {}).get("mAP50-95")
    return {
        **report["latency"],
        "metric": f"mAP50-95 {metric:.4f}",
        "seconds": record["bench"]["seconds"],
    }


def classifier_prune(
    out: Path, ckpt: str, root: str, budget: float, choice: str, batch: int
) -> dict:
    from netslim.checkpoint import read_checkpoint

    name = Path(ckpt).parent.name + (f"-b{batch}" if batch > 1 else "")
    path = out / f"{name}-{budget}-{choice}.pth"
    seconds_file = path.with_suffix(".seconds")
    if not path.exists():
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "netslim", "prune", ckpt, "--target-latency", str(budget),
             "--latency-choice", choice, "--latency-table", str(out / f"{name}.json"), "--batch", str(batch),
             "--dataset", "cifar10", "--data-root", root, "--out", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        if done.returncode:  # e.g. a budget under what no pruning removes: the row says so
            return {"error": done.stderr.strip().splitlines()[-1]}
        seconds_file.write_text(str(time.perf_counter() - start))
    report = read_checkpoint(path)["netslim"]["prune"]
    metric = report["acc_recalibrated"]
    return {
        **report["latency"],
        "metric": f"{metric:.2f}%",
        "seconds": float(seconds_file.read_text()),
    }


def row(network: str, budget: float, choice: str, r: dict) -> str:
    if "error" in r:
        return f"| {network} | {budget:.0%} | {choice} | {r['error']} |"
    return ROW.format(
        network=network,
        budget=budget,
        choice=choice,
        pred=r["predicted_ms"],
        meas=r["measured_ms"],
        unp=r["measured_unpruned_ms"],
        speedup=r["speedup"],
        macs=r["macs_reduction"],
        eff=r["efficiency"],
        metric=r["metric"],
        corr=len(r["attempts"]) - 1,  # plans made again after the first
        secs=r["seconds"],
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=Path)
    p.add_argument("--yolo", help="a sparsity-trained YOLO (.pt or netslim .pth)")
    p.add_argument("--data", help="its data.yaml")
    p.add_argument("--yolo-budgets", type=float, nargs="+", default=[0.8, 0.6, 0.5])
    p.add_argument(
        "--classifiers", nargs="*", default=[], help="sparsity-trained CIFAR-10 checkpoints"
    )
    p.add_argument("--data-root", help="the CIFAR-10 folder")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.4])
    p.add_argument("--batch", type=int, default=1, help="the classifiers' timing batch")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    for choice in ("latency", "threshold"):
        if args.yolo:
            for budget in args.yolo_budgets:
                r = yolo_prune(args.out, args.yolo, args.data, budget, choice)
                print(row("yolov8n 640 px", budget, choice, r), flush=True)
        for ckpt in args.classifiers:
            for budget in args.budgets:
                r = classifier_prune(args.out, ckpt, args.data_root, budget, choice, args.batch)
                label = Path(ckpt).parent.name + (f", batch {args.batch}" if args.batch > 1 else "")
                print(row(label, budget, choice, r), flush=True)


if __name__ == "__main__":
    main()
