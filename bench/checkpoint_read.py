"""What the CRC-32 check of every archive record costs when a checkpoint is read.

    python bench/checkpoint_read.py --arch vgg19 --repeats 5

Saves a fresh network's checkpoint to a temporary folder, then times, side by side in
each round, the CRC check alone, plain ``torch.load(weights_only=True)`` and netslim's
``read_checkpoint`` (both together), and prints the medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import netslim
from netslim.checkpoint import _check_archive, read_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vgg19")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pth"
        netslim.save(netslim.build_model(args.arch), path, arch=args.arch)
        steps = {
            "CRC check": lambda: _check_archive(path),
            "torch.load": lambda: torch.load(path, weights_only=True),
            "read_checkpoint (both)": lambda: read_checkpoint(path),
        }
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        print(f"{args.arch}: {path.stat().st_size / 2**20:.1f} MiB")
        for name, values in times.items():
            print(f"  {name:<24} median {1000 * statistics.median(values):.0f} ms")


if __name__ == "__main__":
    main()
