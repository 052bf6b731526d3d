"""Training images/s by CPU thread count, on a quiet machine and under load.

    env -u OMP_NUM_THREADS python bench/threads.py --threads 1 2 auto --load 0 2 --rounds 3

For each load level, starts that many busy-loop processes (other work on the machine),
then trains vgg11-small on synthetic data for ``--images`` images once per setting,
alternating the settings in each round so that machine noise hits all of them, and
prints the images/s of every run and the median per setting. ``auto`` is netslim's
default (``set_threads(None)``: the physical cores, tuned to the load while training;
it tunes only without OMP_NUM_THREADS): its images/s include the probes' cost, and its
line gives the thread count each run ended at. Each measurement runs in a fresh process
(``--worker``), as a training run would.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def worker(setting: str, images: int) -> None:
    import torch

    from netslim.config import TrainConfig
    from netslim.data import load_dataset
    from netslim.models import build_model
    from netslim.runtime import threads
    from netslim.runtime.device import pick_precision
    from netslim.train.loop import make_optimizer, train_epoch

    if setting == "auto":
        threads.set_threads(None)
    else:
        torch.set_num_threads(int(setting))
    torch.manual_seed(0)
    data = load_dataset("synthetic", train_size=images, test_size=64)
    model = build_model("vgg11-small").to(memory_format=torch.channels_last)
    opt = make_optimizer(model, TrainConfig())
    dtype = pick_precision("auto", torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    train_epoch(model, data, opt, lam=1e-4, batch_size=64, generator=generator, dtype=dtype)
    rate = images / (time.perf_counter() - start)
    tuner = threads.tuner()  # its choice (a probe cut short by the end may hold another)
    print(f"{rate:.1f} {tuner.current if tuner else torch.get_num_threads()}")


def _setting(text: str) -> str:
    if text != "auto" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"a thread count or auto, got {text!r}")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--threads",
        type=_setting,
        nargs="+",
        default=["1", "2", "auto"],
        help="thread counts, or auto (netslim's default)",
    )
    p.add_argument("--load", type=int, nargs="+", default=[0, 3], help="busy processes")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", type=_setting, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        worker(args.worker, args.images)
        return
    for load in args.load:
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            rates: dict[str, list[float]] = {t: [] for t in args.threads}
            ended: dict[str, list[str]] = {t: [] for t in args.threads}
            for _ in range(args.rounds):
                for t in args.threads:
                    out = subprocess.run(
                        [sys.executable, __file__, "--worker", t, "--images", str(args.images)],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    rate, count = out.stdout.split()[-2:]
                    rates[t].append(float(rate))
                    ended[t].append(count)
        finally:
            for proc in busy:
                proc.kill()
        machine = os.getloadavg()[0]  # what else the machine runs shows up here too
        for t, r in rates.items():
            runs = " ".join(f"{x:.0f}" for x in r)
            end = f", ended at {' '.join(ended[t])} threads" if t == "auto" else ""
            print(
                f"{load} busy processes added (1-min load average {machine:.1f}), {t} threads: "
                f"median {statistics.median(r):.0f} images/s  (runs: {runs}{end})"
            )


if __name__ == "__main__":
    main()
