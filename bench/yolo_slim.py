"""Slim yolov8n on the CIFAR detection set with ``netslim yolo lab``, then time it (issue 23).

    YOLO_CONFIG_DIR=/tmp/yolo python bench/yolo_slim.py OUT [--epochs 20] [--finetune-epochs 10]

1. the data: ``prepare_cifar_detect.py OUT/data --train 2000 --val 500 --size 128``;
2. ``netslim yolo lab``: yolov8n from its YAML (no pretrained weights: nothing downloads)
   trained at λ = 0 (the baseline) and at each ``--lams``, every run pruned at 30% and 50%
   of its BN channels and at the sweep's ratios (mAP right after pruning, official /
   compensated / recalibrated), the largest λ's 30% and 50% fine-tuned; OUT/report.md;
3. ``netslim bench`` of the baseline against the fine-tuned networks (onnxruntime, batch 1
   and 16, at 160 and 640 pixels), side by side in one run: OUT/bench-{160,640}.txt.

Each command is printed before it runs. Stop it whenever: running it again continues
(the lab resumes its training runs and skips the steps it has done).
Optimizer SGD at lr0 0.01 for every run: Ultralytics' ``auto`` picks AdamW for runs this
short, whose per-parameter step sizes rescale an L1 sub-gradient (it is no longer a penalty).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

PREPARE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "prepare_cifar_detect.py"
SIZE, BATCH = 128, 16


def run(command: list, save: Path | None = None) -> None:
    command = [str(c) for c in command]
    print(
        "\n$ " + shlex.join(command).replace(f"{sys.executable} -m netslim", "netslim"), flush=True
    )
    if save is None:
        subprocess.run(command, check=True)
        return
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    print(result.stdout, flush=True)
    save.write_text(result.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--lams", type=float, nargs="+", default=[3e-2], help="besides 0")
    args = p.parse_args()
    out = args.out.resolve()
    data = out / "data" / "cifar-detect" / "data.yaml"  # where prepare_cifar_detect.py puts it
    if not data.exists():
        run([sys.executable, PREPARE, out / "data", "--train", 2000, "--val", 500, "--size", SIZE])
    netslim = [sys.executable, "-m", "netslim"]
    lab = out  # the data set sits in it, under data/
    lams = [0.0, *args.lams]
    run(
        [
            *netslim,
            "yolo",
            "lab",
            "--model",
            "yolov8n.yaml",
            "--data",
            data,
            "optimizer=SGD",
            "lr0=0.01",
            "workers=2",
            "--lams",
            *lams,
            "--ratios",
            0.3,
            0.5,
            "--sweep",
            0.1,
            0.2,
            0.4,
            0.6,
            0.7,
            0.8,
            0.9,
            "--epochs",
            args.epochs,
            "--finetune-epochs",
            args.finetune_epochs,
            "--image-size",
            SIZE,
            "--batch-size",
            BATCH,
            "--device",
            "cpu",
            "--out",
            lab,
        ]
    )
    tuned = [lab / f"ft-lam{max(lams):g}-p{r}" / "finetuned.pth" for r in (30, 50)]
    for size in (160, 640):
        if not (out / f"bench-{size}.txt").exists():
            run(
                [
                    *netslim,
                    "bench",
                    lab / "lam0" / "weights" / "best.pt",
                    *tuned,
                    "--runtime",
                    "onnxruntime",
                    "--batch",
                    "1,16",
                    "--image-size",
                    size,
                    "--repeats",
                    20,
                ],
                save=out / f"bench-{size}.txt",
            )


if __name__ == "__main__":
    main()
