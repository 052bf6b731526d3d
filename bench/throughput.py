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

import torch
from reference import reference_loader, reference_train

from netslim.data import load_dataset
from netslim.models import build_model
from netslim.train import TrainConfig, make_optimizer, pick_device, pick_precision, train_epoch


def netslim_train(model, data, device, lam: float, precision: str, batch_size: int) -> float:
    model = model.to(device, memory_format=torch.channels_last)
    opt = make_optimizer(model, TrainConfig())  # what netslim trains with
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    train_epoch(model, data, opt, lam=lam, batch_size=batch_size, generator=generator,
                dtype=pick_precision(precision, device))  # fmt: skip
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
    args = p.parse_args()

    device = pick_device(args.device)
    name = "cifar10" if args.data_root else "synthetic"
    data = load_dataset(name, args.data_root, train_size=args.images, test_size=100, download=False)
    gpu_data = data.to(device)
    print(f"device {device}, data {name}, {args.images} images, batch {args.batch_size}, "
          f"netslim precision {args.precision} -> {pick_precision(args.precision, device)}")  # fmt: skip
    print(f"{'model':<12} {'reference img/s':>16} {'netslim img/s':>14} {'ratio':>6}")
    for arch in args.archs:
        ref, ours = [], []
        for _ in range(args.repeats):
            torch.manual_seed(0)
            loader = reference_loader(data.train_images, data.train_labels, device)
            ref.append(reference_train(build_model(arch).to(device), loader, device, lam=1e-4))
            torch.manual_seed(0)
            ours.append(netslim_train(build_model(arch), gpu_data, device, 1e-4, args.precision,
                                      args.batch_size))  # fmt: skip
        r, o = max(ref), max(ours)  # best of the repeats: the least disturbed run of each
        print(f"{arch:<12} {r:>16.0f} {o:>14.0f} {o / r:>5.2f}x")


if __name__ == "__main__":
    main()
