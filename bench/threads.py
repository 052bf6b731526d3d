"""Training images/s by CPU thread count, on a quiet machine and under load.

    env -u OMP_NUM_THREADS python bench/threads.py --threads 1 2 --load 0 3 --rounds 3

For each load level, starts that many busy-loop processes (other work on the machine),
then trains vgg11-small on synthetic data for ``--images`` images once per thread count,
alternating the thread counts in each round so that machine noise hits all of them, and
prints the images/s of every run and the median per setting. Each measurement runs in a
fresh process (``--worker``), as a training run would.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def worker(threads: int, images: int) -> None:
    import torch

    from netslim.data import load_dataset
    from netslim.models import build_model
    from netslim.train import TrainConfig, make_optimizer, pick_precision, train_epoch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = load_dataset("synthetic", train_size=images, test_size=64)
    model = build_model("vgg11-small").to(memory_format=torch.channels_last)
    opt = make_optimizer(model, TrainConfig())
    dtype = pick_precision("auto", torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    train_epoch(model, data, opt, lam=1e-4, batch_size=64, generator=generator, dtype=dtype)
    print(f"{images / (time.perf_counter() - start):.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--load", type=int, nargs="+", default=[0, 3], help="busy processes")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        worker(args.worker, args.images)
        return
    for load in args.load:
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            rates: dict[int, list[float]] = {t: [] for t in args.threads}
            for _ in range(args.rounds):
                for t in args.threads:
                    out = subprocess.run(
                        [sys.executable, __file__, "--worker", str(t), "--images", str(args.images)],
                        capture_output=True, text=True, check=True,
                    )  # fmt: skip
                    rates[t].append(float(out.stdout.split()[-1]))
        finally:
            for proc in busy:
                proc.kill()
        machine = os.getloadavg()[0]  # what else the machine runs shows up here too
        for t, r in rates.items():
            runs = " ".join(f"{x:.0f}" for x in r)
            print(f"{load} busy processes added (1-min load average {machine:.1f}), {t} threads: "
                  f"median {statistics.median(r):.0f} images/s  (runs: {runs})")  # fmt: skip


if __name__ == "__main__":
    main()
