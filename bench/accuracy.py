"""Test accuracy of checkpoints after BN recalibration, on the same CIFAR-10 test images.

    python bench/accuracy.py DATA_ROOT A.pth B.pth ... [--test-size 2000] [--recalibrate 8]

Each network's BatchNorm statistics are re-estimated on ``--recalibrate`` batches of 128
training images (as ``netslim prune --dataset`` does), then it is evaluated; an unpruned
checkpoint is evaluated as it is. Cheaper than ``prune --dataset`` when many pruned
variants of one network are compared (one evaluation each instead of four).
"""

from __future__ import annotations

import argparse
import copy

import netslim
from netslim.checkpoint import read_checkpoint
from netslim.slim import recalibration_batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("data_root")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--recalibrate", type=int, default=8)
    args = p.parse_args()
    data = netslim.load_dataset(
        "cifar10",
        args.data_root,
        download=False,
        train_size=args.train_size,
        test_size=args.test_size,
    )
    for path in args.checkpoints:
        model = netslim.load(path)
        pruned = (read_checkpoint(path).get("netslim") or {}).get("kind") == "pruned"
        if pruned and args.recalibrate:
            model = copy.deepcopy(model)
            netslim.recalibrate_bn(model, recalibration_batches(data, args.recalibrate))
        acc = netslim.evaluate(model, data)[1]
        how = "recalibrated" if pruned and args.recalibrate else "as trained"
        print(f"{path}  {acc:6.2f}%  ({how}, {len(data.test_labels)} test images)", flush=True)


if __name__ == "__main__":
    main()
