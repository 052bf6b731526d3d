"""Training throughput: netslim's loop against the paper's pipeline, side by side.

    .venv/bin/python bench/throughput.py --data-root /path/with/cifar --images 10240

For each model, runs the reference pipeline (bench/reference.py: fp32, NCHW, per-sample
PIL transforms, DataLoader, batch 64) and netslim's loop (on-device uint8 data, batched
augmentation, default precision, channels_last) on the same images, alternating so that
machine noise hits both, and prints images/s and the ratio. Real CIFAR-10 when
--data-root holds it, else the synthetic data.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from reference import reference_loader, reference_train

from netslim.config import TrainConfig
from netslim.data import load_dataset
from netslim.models import build_model
from netslim.runtime.device import pick_device, pick_precision
from netslim.train.loop import make_optimizer, train_epoch


def netslim_train(
    model, data, device, lam: float, precision: str, batch_size: int, compile: bool = False
) -> float:
    model = model.to(device, memory_format=torch.channels_last)
    opt = make_optimizer(model, TrainConfig())  # what netslim trains with
    run_model = torch.compile(model) if compile else model
    if compile:  # compile outside the timed epoch: one step on a few images
        warm = replace(
            data,
            train_images=data.train_images[:batch_size],
            train_labels=data.train_labels[:batch_size],
        )
        train_epoch(
            run_model,
            warm,
            opt,
            lam=lam,
            batch_size=batch_size,
            generator=torch.Generator(device=device).manual_seed(1),
            dtype=pick_precision(precision, device),
        )
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    train_epoch(
        run_model,
        data,
        opt,
        lam=lam,
        batch_size=batch_size,
        generator=generator,
        dtype=pick_precision(precision, device),
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(data.train_labels) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-root", default=None, help="folder with cifar-10-batches-py/")
    p.add_argument("--images", type=int, default=10240, help="training images per measurement")
    p.add_argument("--archs", nargs="+", default=["vgg19", "vgg11-small"])
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--compile",
        action="store_true",
        help="add a column: netslim's loop with torch.compile (compiled before timing)",
    )
    args = p.parse_args()

    device = pick_device(args.device)
    name = "cifar10" if args.data_root else "synthetic"
    data = load_dataset(name, args.data_root, train_size=args.images, test_size=100, download=False)
    gpu_data = data.to(device)
    print(
        f"device {device}, data {name}, {args.images} images, batch {args.batch_size}, "
        f"netslim precision {args.precision} -> {pick_precision(args.precision, device)}"
    )
    extra = f" {'compiled img/s':>15} {'ratio':>6}" if args.compile else ""
    print(f"{'model':<12} {'reference img/s':>16} {'netslim img/s':>14} {'ratio':>6}{extra}")
    for arch in args.archs:
        ref, ours, compiled = [], [], [0.0]
        for _ in range(args.repeats):
            torch.manual_seed(0)
            loader = reference_loader(data.train_images, data.train_labels, device)
            ref.append(reference_train(build_model(arch).to(device), loader, device, lam=1e-4))
            torch.manual_seed(0)
            ours.append(
                netslim_train(
                    build_model(arch), gpu_data, device, 1e-4, args.precision, args.batch_size
                )
            )
            if args.compile:
                torch.manual_seed(0)
                compiled.append(
                    netslim_train(
                        build_model(arch),
                        gpu_data,
                        device,
                        1e-4,
                        args.precision,
                        args.batch_size,
                        compile=True,
                    )
                )
        r, o, c = max(ref), max(ours), max(compiled)  # best of the repeats: least disturbed
        extra = f" {c:>15.0f} {c / r:>5.2f}x" if args.compile else ""
        print(f"{arch:<12} {r:>16.0f} {o:>14.0f} {o / r:>5.2f}x{extra}")


if __name__ == "__main__":
    main()
