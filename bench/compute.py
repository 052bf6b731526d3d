"""Training compute of netslim runs: images x MACs per image, summed over every stage.

    python bench/compute.py RUN [RUN ...]

Each RUN is a fit() run folder (``netslim train``/``finetune``); an early-pruning run
(``train --prune-when-stable``) counts its ``finetune/`` folder too. Per folder:
epochs trained x training images x forward MACs per 32x32 image of the network it
trained (from ``last.pth``; a pruned network's own, smaller MACs). Backward passes cost
about twice a forward pass in every stage, so ratios of these totals are ratios of
training compute. Prints one line per folder and the total, final test accuracy (of the
last folder) and wall time (summed epoch seconds).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from netslim.checkpoint import load
from netslim.data import SYNTHETIC_TRAIN_SIZE
from netslim.engine.stats import count_macs
from netslim.train.runfolder import read_metrics

FULL_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "synthetic": SYNTHETIC_TRAIN_SIZE}


def stage_compute(run: Path) -> dict:
    """The compute of one fit() run folder."""
    config = json.loads((run / "config.json").read_text())
    records = read_metrics(run)
    images = config["train_size"] or FULL_SIZES[config["dataset"]]
    macs = count_macs(load(run / "last.pth"))
    return {
        "run": str(run),
        "epochs": len(records),
        "images": images,
        "macs": macs,
        "compute": len(records) * images * macs,
        "test_acc": records[-1]["test_acc"],
        "seconds": sum(r["seconds"] for r in records),
    }


def main(runs: list[str]) -> None:
    folders: list[Path] = []
    for run in map(Path, runs):
        folders.append(run)
        if (run / "finetune" / "metrics.jsonl").exists():  # early pruning's second stage
            folders.append(run / "finetune")
    # a folder named as well as found (RUN RUN/finetune) counts once
    folders = list({folder.resolve(): folder for folder in folders}.values())
    stages = [stage_compute(folder) for folder in folders]
    for s in stages:
        print(
            f"{s['run']}: {s['epochs']} epochs x {s['images']} images x {s['macs']:,} MACs "
            f"= {s['compute']:.4g}, test acc {s['test_acc']:.2f}%, {s['seconds']:.0f} s"
        )
    total = sum(s["compute"] for s in stages)
    print(
        f"total {total:.4g} image-MACs, final test acc {stages[-1]['test_acc']:.2f}%, "
        f"{sum(s['seconds'] for s in stages):.0f} s of epochs"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
