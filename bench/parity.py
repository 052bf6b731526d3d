"""Accuracy parity: the same short schedule and seed in fp32 and in the default precision.

    .venv/bin/python bench/parity.py --data-root /path/with/cifar --arch vgg11 --epochs 2

For each seed, trains the same model on the same batches twice, once in fp32 and once
in ``--precision`` (default auto: bf16 where supported), and prints the test accuracies,
the mean difference, the fp32 seed-to-seed range (how much noise a short run has) and
the throughput of each.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from netslim.config import TrainConfig
from netslim.data import load_dataset
from netslim.models import build_model
from netslim.runtime.device import pick_device, pick_precision
from netslim.train.loop import fit


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-root", default=None, help="folder with cifar-10-batches-py/")
    p.add_argument("--arch", default="vgg11")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lam", type=float, default=1e-4)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="one fp32 and one default-precision run per seed (model init and batches)",
    )
    args = p.parse_args()

    device = pick_device(args.device)
    name = "cifar10" if args.data_root else "synthetic"
    data = load_dataset(name, args.data_root, train_size=args.train_size, download=False).to(device)
    rows = []
    for seed in args.seeds:
        for precision in ("fp32", args.precision):
            config = TrainConfig(
                arch=args.arch,
                dataset=name,
                lam=args.lam,
                epochs=args.epochs,
                precision=precision,
                seed=seed,
            )
            torch.manual_seed(seed)
            with tempfile.TemporaryDirectory() as out:
                history = fit(config, data, build_model(args.arch, data.num_classes), out)
            speed = sum(r["images_per_s"] for r in history) / len(history)
            dtype = pick_precision(precision, device)
            rows.append((seed, precision, dtype, history[-1]["test_acc"], speed))
    print(f"device {device}, {name}, {args.arch}, {args.epochs} epochs, lam {args.lam}")
    print(f"{'seed':>4} {'precision':<10} {'dtype':<16} {'test acc %':>10} {'img/s':>8}")
    for seed, precision, dtype, acc, speed in rows:
        print(f"{seed:>4} {precision:<10} {str(dtype):<16} {acc:>10.2f} {speed:>8.0f}")
    fp32 = [r[3] for r in rows[0::2]]
    other = [r[3] for r in rows[1::2]]
    diff = sum(o - f for o, f in zip(other, fp32)) / len(fp32)
    print(f"mean difference (default - fp32) over {len(fp32)} seed(s): {diff:+.2f} points")
    if len(fp32) > 1:
        print(f"fp32 seed-to-seed range: {max(fp32) - min(fp32):.2f} points (the noise floor)")


if __name__ == "__main__":
    main()
