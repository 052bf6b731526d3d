"""What the demo's work costs, per image: training steps, evaluation, pruned networks.

    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python bench/demo_costs.py --precision fp32 [--lab RUN]

Measures CPU seconds of one thread (``time.thread_time``, PyTorch held at one thread), so
the figures hold on a machine busy with other work, where wall-clock times do not. For
the demo's network (``--arch``) on the synthetic data it prints the CPU milliseconds per image of a training
epoch (netslim's ``train_epoch``: augmentation, forward, backward, the L1 term, SGD) at
each ``--batch-sizes``, and of evaluation at batch 1000; then the same for networks pruned
at ``--ratios``: those of a lab folder ``--lab`` (its ``prune/*.pth``, as the lab's
sparsity training shaped them), else pruned from random γ (every layer about equally).
These are the weights of :mod:`netslim.lab.progress`: ``TRAIN_COST`` (a training image
against an evaluated one) and ``pruned_cost`` (a pruned network's image against the
unpruned one's).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from netslim.checkpoint import load
from netslim.config import DEMO, TrainConfig
from netslim.data import load_dataset
from netslim.engine.sparsity import batchnorms
from netslim.models import build_model
from netslim.runtime.device import pick_precision
from netslim.slim import prune_model
from netslim.train.evaluate import evaluate
from netslim.train.loop import make_optimizer, train_epoch


def train_ms(model: torch.nn.Module, data, batch_size: int, dtype, rounds: int) -> float:
    """CPU ms per image of a training epoch over ``data``'s training split (best round)."""
    model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, TrainConfig())
    best = float("inf")
    for r in range(rounds + 1):  # the first round warms oneDNN's kernel caches up
        generator = torch.Generator().manual_seed(r)
        start = time.thread_time()
        train_epoch(
            model,
            data,
            optimizer,
            lam=1e-3,
            batch_size=batch_size,
            generator=generator,
            dtype=dtype,
        )
        if r:
            best = min(best, time.thread_time() - start)
    return 1000 * best / len(data.train_labels)


def eval_ms(model: torch.nn.Module, data, dtype, rounds: int) -> float:
    """CPU ms per image of evaluating ``data``'s test split at batch 1000 (best round)."""
    best = float("inf")
    for r in range(rounds + 1):
        start = time.thread_time()
        evaluate(model, data, 1000, dtype)
        if r:
            best = min(best, time.thread_time() - start)
    return 1000 * best / len(data.test_labels)


def pruned_networks(
    arch: str, lab: Path | None, ratios: list[float], data
) -> dict[float, torch.nn.Module]:
    """The networks pruned at ``ratios``: the lab's, else from a network with random γ."""
    if lab is not None:
        found = {}
        for path in sorted((lab / "prune").glob("*.pth")):
            ratio = float(path.stem.split("ratio=")[1])
            found[ratio] = load(path)
        return found
    torch.manual_seed(0)
    model = build_model(arch, num_classes=data.num_classes)
    for _, bn in batchnorms(model):
        bn.weight.data.uniform_(0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {r: prune_model(model, r)[0] for r in ratios}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", default=DEMO.arch)
    p.add_argument("--precision", default="auto")
    p.add_argument("--images", type=int, default=2048, help="training images per epoch")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.9])
    p.add_argument("--lab", type=Path, default=None, help="a lab folder with prune/*.pth")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    dtype = pick_precision(args.precision, device)
    data = load_dataset("synthetic", train_size=args.images, test_size=args.test_images)
    print(
        f"{args.arch}, torch {torch.__version__}, 1 thread, autocast {dtype}; CPU ms per "
        f"image, best of {args.rounds}"
    )

    torch.manual_seed(0)
    dense = build_model(args.arch, num_classes=data.num_classes)
    train = {b: train_ms(dense, data, b, dtype, args.rounds) for b in args.batch_sizes}
    test = eval_ms(dense, data, dtype, args.rounds)
    first = args.batch_sizes[0]
    for b, ms in train.items():
        print(
            f"unpruned  train batch {b:4d}: {ms:6.3f}  ({ms / test:.2f} evaluated images, "
            f"{train[first] / ms:.2f}x the speed of batch {first})"
        )
    print(f"unpruned  evaluate batch 1000: {test:6.3f}")
    for ratio, model in sorted(pruned_networks(args.arch, args.lab, args.ratios, data).items()):
        tr = train_ms(model, data, first, dtype, args.rounds)
        ev = eval_ms(model, data, dtype, args.rounds)
        print(
            f"pruned {ratio:g}: train batch {first}: {tr:6.3f} ({tr / train[first]:.2f} of "
            f"unpruned), evaluate: {ev:6.3f} ({ev / test:.2f} of unpruned)"
        )


if __name__ == "__main__":
    main()
