"""How long netslim's check of a YOLO data set takes (netslim.yolo.data.check_data): every
label file parsed, every image opened and verified by PIL, before Ultralytics' trainer starts.

    python ../shared/datasets/prepare_cifar_detect.py /tmp/cd --train 2000 --val 500 --size 128
    python bench/yolo_data_check.py /tmp/cd/cifar-detect/data.yaml

Prints the images checked, then the median and the fastest of N runs (the first, cold run
apart: it also reads the files from disk, unless the page cache holds them), and the time per
image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="an Ultralytics data.yaml")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (default: 5)")
    parser.add_argument("--task", default=None, help="the model's task (default: any layout)")
    args = parser.parse_args()
    from netslim.yolo.data import check_data, read_spec, split_images

    spec = read_spec(args.data)
    images = sum(len(split_images(spec, args.data, split)) for split in ("train", "val"))
    start = time.perf_counter()
    check_data(args.data, args.task)
    first = time.perf_counter() - start
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        check_data(args.data, args.task)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"{images} images (train + val) in {args.data}")
    print(
        f"first run {first:.3f} s; then median {median:.3f} s, fastest {min(times):.3f} s "
        f"of {args.runs}; {1e3 * median / images:.3f} ms per image"
    )


if __name__ == "__main__":
    main()
