"""How long ``netslim --help``, ``netslim train --help`` and ``netslim --version`` take,
for one or more source trees side by side (best of N runs each, interleaved).

    python bench/cli_startup.py src                     # this checkout
    git archive 02ad3c7 src | tar -x -C /tmp/before     # an older netslim, to compare
    python bench/cli_startup.py /tmp/before/src src

Each run is a fresh ``python -m netslim ...`` with ``PYTHONPATH`` set to the tree, so the
time is what a user waits: interpreter start, imports and the parser.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

COMMANDS = (["--help"], ["train", "--help"], ["--version"])


def seconds(src: str, argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "netslim", *argv],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", help="src folders to time (e.g. src)")
    parser.add_argument("--runs", type=int, default=5, help="best of this many (default: 5)")
    args = parser.parse_args()
    for argv in COMMANDS:
        best = {src: float("inf") for src in args.trees}
        for _ in range(args.runs):
            for src in args.trees:
                try:
                    best[src] = min(best[src], seconds(src, argv))
                except subprocess.CalledProcessError:  # e.g. --version before it existed
                    best[src] = float("nan")
        figures = "  ".join(f"{src}: {t:.2f} s" for src, t in best.items())
        print(f"netslim {' '.join(argv):<14} {figures}")


if __name__ == "__main__":
    main()
