"""What a teacher adds to a fine-tuning step (issue 30), timed interleaved on this machine.

    python bench/distill_cost.py STUDENT.pth TEACHER.pth [--batch 256] [--size 32] [--steps 20]
    YOLO_CONFIG_DIR=/tmp/yolo python bench/distill_cost.py P.pth U.pth --batch 16 --size 128

A step without a teacher is the student's forward, a loss and its backward; with one, the
teacher's forward under ``torch.no_grad`` (eval mode) comes on top, which is all
distillation adds to a classifier's step (the KL term itself is a few element-wise ops on
the logits). For a YOLO the student's loss here is the sum of its outputs, not Ultralytics'
detection loss, and Ultralytics' feature term adds its projector: the figure is the
teacher's forward against the rest of a step, a lower bound of the extra time. Steps with
and without the teacher alternate, after warm-up; the medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import netslim


def _loss(out) -> torch.Tensor:
    """A scalar of a network's training output (logits, or a YOLO's dict of tensors)."""
    if isinstance(out, dict):
        return sum(v.float().mean() for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (list, tuple)):
        return sum(_loss(o) for o in out)
    return out.float().logsumexp(1).mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("student")
    p.add_argument("teacher")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    student, teacher = netslim.load(args.student).train(), netslim.load(args.teacher).eval()
    x = torch.rand(args.batch, 3, args.size, args.size)
    times: dict[str, list[float]] = {"plain": [], "teacher": []}
    for i in range(args.steps + 3):
        for kind in ("plain", "teacher"):
            start = time.perf_counter()
            if kind == "teacher":
                with torch.no_grad():
                    teacher(x)
            _loss(student(x)).backward()
            if i >= 3:  # warm-up
                times[kind].append(time.perf_counter() - start)
    plain, taught = (statistics.median(times[k]) for k in ("plain", "teacher"))
    print(
        f"step without teacher {1000 * plain:.1f} ms, with {1000 * taught:.1f} ms: "
        f"+{1000 * (taught - plain):.1f} ms (+{100 * (taught / plain - 1):.0f}%), "
        f"batch {args.batch} at {args.size} px, {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
