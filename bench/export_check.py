"""What export's check costs: the PyTorch passes on the check inputs, plain and watched for
value reads, and the whole export.

    python bench/export_check.py --arch vgg19 resnet56 --repeats 3
    python bench/export_check.py --arch ultralytics:yolov8n.yaml --image-size 640 --repeats 1

For each network: the PyTorch network on :func:`netslim.export.check_inputs` (12 images),
timed plain and inside the value-read watcher side by side in each round (medians), the
same for the two random normal batches of 1 and 7 the check ran on before (8 images), and
one whole ONNX export (folding, exporting, the check) to a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import netslim
from netslim.export import _run_watched, check_inputs, declared_image_size, export
from netslim.models.external import for_deployment


def _plain(model: torch.nn.Module, inputs: list) -> None:
    with torch.no_grad():
        for _, x in inputs:
            model(x)


def bench(arch: str, image_size: int | None, repeats: int) -> None:
    model = netslim.build_model(arch, 80 if arch.startswith("ultralytics:") else 10).eval()
    size = image_size or declared_image_size(model)
    reference = for_deployment(copy.deepcopy(model))
    inputs = check_inputs(size)
    before = [("", torch.randn(n, 3, size, size)) for n in (1, 7)]
    steps = {
        "8 images, plain (before)": lambda: _plain(reference, before),
        "12 images, plain": lambda: _plain(reference, inputs),
        "12 images, watched": lambda: _run_watched(reference, inputs, size),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export(model, Path(tmp) / "net.onnx", image_size=size)
        whole = time.perf_counter() - start
    print(f"{arch} at {size}x{size}, {torch.get_num_threads()} threads:")
    for name, values in times.items():
        print(f"  {name:<26} median {statistics.median(values):.2f} s")
    print(f"  {'whole ONNX export':<26} {whole:.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["vgg19", "resnet56"])
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    for arch in args.arch:
        bench(arch, args.image_size, args.repeats)


if __name__ == "__main__":
    main()
