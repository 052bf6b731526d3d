"""The Pareto test (issue 30): is a slimmed network worth more than the simple alternatives?

    YOLO_CONFIG_DIR=/tmp/yolo python bench/pareto.py OUT --family yolo --data D/data.yaml
    python bench/pareto.py OUT --family classifiers --data-root C     # CIFAR-10 under C
    python bench/pareto.py OUT --report                               # table, figure, timings

Every arm of a family gets the same total number of training epochs and the same recipe:

* **yolo** (the CIFAR detection set at 128 px; ``prepare_cifar_detect.py D --train 2000 --val
  500 --size 128``), 24 epochs, Ultralytics' trainer with ``optimizer=SGD lr0=0.01
  workers=2``, batch 16:

  - ``n-dense24``: yolov8n trained 24 epochs;
  - ``n-p50-{kd,plain}-s{0,1}``: yolov8n 10 epochs, 8 at λ 0.05, pruned 50% of its channels,
    fine-tuned 6 epochs with Ultralytics' distillation from the network pruned (``kd``) or
    without (``plain``), seeds 0 and 1 of the fine-tuning;
  - ``n-p50-out-s{0,1}``: the same fine-tuned with netslim's distillation of the head's
    outputs (``--distill-term outputs``) in place of Ultralytics' feature term;
  - ``n-lat60-kd-s0``: the same sparse network pruned to 60% of its latency at 640 px on
    onnxruntime (issue 29's budget), fine-tuned 6 epochs with distillation;
  - ``n-p50-scratch``: the 50% architecture, re-initialised, trained 24 epochs ("Scratch-B",
    Liu et al. 2019);
  - ``s-at-n-kd-s0``: yolov8s 10 + 8 (λ 0.05) epochs, pruned to yolov8n's measured latency,
    fine-tuned 6 epochs with distillation.

* **classifiers** (CIFAR-10, the first 5,000 training and 2,000 test images, ``--recipe
  fast``, 1 thread each: a 2-core CPU's budget), 15 epochs:

  - ``r20``, ``r32``, ``r56``: ResNet-20, -32, -56 trained 15 epochs;
  - ``r56-at-r32-{kd,plain}-s{0,1}``: ResNet-56 sparsity-trained 10 epochs (``--lam auto
    --target-ratio 0.6``), pruned to ResNet-32's measured latency, fine-tuned 5 epochs with
    and without distillation, seeds 0 and 1;
  - ``r56-at-r20-kd-s0``: the same pruned to ResNet-20's latency (if reachable);
  - ``r56-at-r32-kd-w{W}-T{T}-s0``: other distillation weights and temperatures than the
    defaults (1 and 4).

Latency is ``netslim bench`` on onnxruntime, batch 1, every network of a family side by side
in one run, fastest round (``--stat min``: the machine runs the other family's training).
YOLOs are timed at 640 px (where they are deployed), classifiers at 32. Accuracy is the
last epoch's (never the best epoch picked on the evaluation set): mAP50-95 by ``netslim
yolo val`` at 128 px, top-1 on the 2,000 test images.

Each step is skipped when its output exists and a training run resumes where it stopped:
kill the script whenever and start it again. ``OUT/steps.json`` keeps each step's command
and wall time; ``--report`` writes ``OUT/pareto.md`` and ``OUT/pareto.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

NETSLIM = [sys.executable, "-m", "netslim"]
YOLO_SETTINGS = ["optimizer=SGD", "lr0=0.01", "workers=2"]
YOLO_RUN = ["--image-size", "128", "--batch-size", "16", "--device", "cpu"]
YOLO_EPOCHS, YOLO_DENSE, YOLO_SPARSE, YOLO_TUNE, YOLO_LAM = 24, 10, 8, 6, 0.05
YOLO_TIMED_AT = 640
CIFAR = ["--dataset", "cifar10", "--train-size", "5000", "--test-size", "2000", "--threads", "1"]
CLS_EPOCHS, CLS_SPARSE, CLS_TUNE = 15, 10, 5
DISTILL_VARIANTS = [(1.0, 2.0), (1.0, 8.0), (3.0, 4.0)]  # (weight, temperature), seed 0


class Steps:
    """The steps done so far (``OUT/steps.json``): command and wall time."""

    def __init__(self, out: Path):
        self.out, self.path = out, out / "steps.json"
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}

    def record(self, name: str, **values) -> None:
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.done[name] = {**self.done.get(name, {}), **values}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1))
        os.replace(tmp, self.path)  # two families write it: never half a file

    def call(self, name: str, text: str, step, finished: Path) -> None:
        """Run ``step()`` in this process unless ``finished`` exists (``text`` says what)."""
        if finished.exists():
            return
        print(f"\n>>> {text}", flush=True)
        start = time.time()
        step()
        self.record(name, command=text, seconds=round(time.time() - start, 1))

    def run(self, name: str, command: list, finished: Path) -> None:
        """Run ``command`` unless ``finished`` exists; its wall time adds up over restarts."""
        command = [str(c) for c in command]
        if finished.exists():
            return
        text = shlex.join(command).replace(f"{sys.executable} -m netslim", "netslim")
        print(f"\n$ {text}", flush=True)
        start = time.time()
        result = subprocess.run(command)
        spent = time.time() - start + (self.done.get(name) or {}).get("seconds", 0.0)
        self.record(name, command=text, seconds=round(spent, 1))
        if result.returncode != 0:
            raise SystemExit(f"step {name} failed ({result.returncode}); run again to retry")


# -- YOLO ----------------------------------------------------------------------------------


def yolo_train(steps: Steps, name: str, model, epochs: int, lam: float, data: Path, *extra) -> Path:
    run = steps.out / "yolo" / name
    resume = ["--resume"] if (run / "weights" / "last.pt").exists() else []
    command = [*NETSLIM, "yolo", "train", "--model", model, "--data", data, "--lam", lam,
               "--epochs", epochs, *YOLO_RUN, "--out", run, *resume, *YOLO_SETTINGS, *extra]  # fmt: skip
    steps.run(name, command, run / "finished")
    if (run / "netslim.json").exists() and json.loads((run / "netslim.json").read_text()).get(
        "finished"
    ):
        (run / "finished").touch()
    return run


def yolo_finetune(
    steps: Steps, name: str, pruned: Path, data: Path, seed: int, kd: bool, *extra
) -> Path:
    run = steps.out / "yolo" / name
    resume = ["--resume"] if (run / "weights" / "last.pt").exists() else []
    command = [*NETSLIM, "yolo", "finetune", pruned, "--data", data, "--epochs", YOLO_TUNE,
               *YOLO_RUN, "--out", run, *resume, *([] if kd else ["--no-distill"]),
               *extra, *YOLO_SETTINGS, f"seed={seed}"]  # fmt: skip
    steps.run(name, command, run / "finetuned.pth")
    return run


def yolo_prune(steps: Steps, name: str, source: Path, data: Path, **budget) -> Path:
    """Prune ``source`` at a ratio (``ratio=``) or to a latency at 640 px on onnxruntime
    (``share=`` or ``ms=``), validating and recalibrating at the training size (the command
    line's --image-size would set both)."""
    from netslim.latency import LatencyBudget
    from netslim.yolo.prune import prune

    out = steps.out / "yolo" / f"{name}.pth"
    ratio = budget.pop("ratio", None)
    target = (
        LatencyBudget(**budget, runtime="onnxruntime", image_size=YOLO_TIMED_AT) if budget else None
    )
    what = f"ratio {ratio}" if ratio else f"latency {budget} at {YOLO_TIMED_AT} px"
    steps.call(
        name,
        f"netslim.yolo.prune.prune({source}, {out}, {what}, data, imgsz=128)",
        lambda: prune(source, out, ratio=ratio, target_latency=target, data=data, imgsz=128),
        out,
    )
    return out


def reinitialised(steps: Steps, pruned: Path) -> Path:
    """The architecture of ``pruned`` with fresh weights, as Ultralytics initialises a YOLO
    (PyTorch's default for every layer but the DFL's fixed bin weights, then its Detect
    head's bias priors)."""
    start = steps.out / "yolo" / "p50-fresh.pt"
    if not start.exists():
        import torch

        import netslim
        from netslim.yolo.files import write_model

        torch.manual_seed(0)
        model = netslim.load(pruned)
        fixed = {
            id(m)
            for layer in model.modules()
            if type(layer).__name__ == "DFL"
            for m in layer.modules()
        }  # fmt: skip  (DFL's conv: fixed bin indices)
        for module in model.modules():
            if hasattr(module, "reset_parameters") and id(module) not in fixed:
                module.reset_parameters()
        head = model.model[-1]
        head.bias_init()  # Ultralytics' class and box bias priors
        write_model(model, start)
    return start


def latency_ms(checkpoints: list[Path], size: int) -> list[float]:
    """``netslim bench`` of ``checkpoints`` side by side: onnxruntime, batch 1, fastest round."""
    command = [*NETSLIM, "bench", *checkpoints, "--runtime", "onnxruntime", "--batch", "1",
               "--image-size", size, "--stat", "min", "--repeats", "30", "--json"]  # fmt: skip
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, check=True)
    return [row["latency_ms"] for row in json.loads(result.stdout)]


def yolo_family(steps: Steps, data: Path) -> None:
    yolo_train(steps, "n-dense24", "yolov8n.yaml", YOLO_EPOCHS, 0, data)
    dense = yolo_train(steps, "n-dense10", "yolov8n.yaml", YOLO_DENSE, 0, data)
    sparse = yolo_train(
        steps, "n-sparse8", dense / "weights" / "last.pt", YOLO_SPARSE, YOLO_LAM, data
    )
    p50 = yolo_prune(steps, "n-p50", sparse / "weights" / "last.pth", data, ratio=0.5)
    for seed in (0, 1):
        yolo_finetune(steps, f"n-p50-kd-s{seed}", p50, data, seed, kd=True)
        yolo_finetune(steps, f"n-p50-plain-s{seed}", p50, data, seed, kd=False)
    for seed in (0, 1):  # netslim's own term: the head's outputs
        yolo_finetune(
            steps, f"n-p50-out-s{seed}", p50, data, seed, True, "--distill-term", "outputs"
        )
    lat = yolo_prune(steps, "n-lat60", sparse / "weights" / "last.pth", data, share=0.6)
    yolo_finetune(steps, "n-lat60-kd-s0", lat, data, 0, kd=True)
    yolo_train(steps, "n-p50-scratch", reinitialised(steps, p50), YOLO_EPOCHS, 0, data)
    s_dense = yolo_train(steps, "s-dense10", "yolov8s.yaml", YOLO_DENSE, 0, data)
    s_sparse = yolo_train(
        steps, "s-sparse8", s_dense / "weights" / "last.pt", YOLO_SPARSE, YOLO_LAM, data
    )
    n_ms = steps.done.get("n-latency", {}).get("ms")
    if n_ms is None:
        n_ms = latency_ms([steps.out / "yolo" / "n-dense24" / "weights" / "last.pth"], 640)[0]
        steps.record("n-latency", ms=n_ms)
    s_at_n = yolo_prune(steps, "s-at-n", s_sparse / "weights" / "last.pth", data, ms=n_ms)
    yolo_finetune(steps, "s-at-n-kd-s0", s_at_n, data, 0, kd=True)


# -- classifiers ---------------------------------------------------------------------------


def cls_train(steps: Steps, name: str, arch: str, epochs: int, root: Path, *extra) -> Path:
    run = steps.out / "classifiers" / name
    resume = ["--resume"] if (run / "last.pth").exists() else []
    command = [*NETSLIM, "train", "--arch", arch, *CIFAR, "--data-root", root, "--recipe",
               "fast", "--epochs", epochs, "--out", run, *resume, *extra]  # fmt: skip
    steps.run(name, command, run / "finished")
    (run / "finished").touch()
    return run


def cls_finetune(
    steps: Steps, name: str, pruned: Path, root: Path, seed: int, kd: bool, *extra
) -> Path:
    run = steps.out / "classifiers" / name
    resume = ["--resume"] if (run / "last.pth").exists() else []
    command = [*NETSLIM, "finetune", pruned, *CIFAR, "--data-root", root, "--recipe", "fast",
               "--lam", 0, "--epochs", CLS_TUNE, "--seed", seed, "--out", run, *resume,
               *([] if kd else ["--no-distill"]), *extra]  # fmt: skip
    steps.run(name, command, run / "finished")
    (run / "finished").touch()
    return run


def classifier_family(steps: Steps, root: Path) -> None:
    r20 = cls_train(steps, "r20", "resnet20", CLS_EPOCHS, root, "--lam", 0)
    r32 = cls_train(steps, "r32", "resnet32", CLS_EPOCHS, root, "--lam", 0)
    sparse = cls_train(steps, "r56-sparse10", "resnet56", CLS_SPARSE, root, "--lam", "auto",
                       "--target-ratio", 0.6)  # fmt: skip
    if "cls-latency" not in steps.done:
        ms = latency_ms([r20 / "last.pth", r32 / "last.pth", sparse / "last.pth"], 32)
        steps.record("cls-latency", r20=ms[0], r32=ms[1], r56=ms[2])
    ms = steps.done["cls-latency"]
    for target, arms in (("r32", [("kd", 0), ("kd", 1), ("plain", 0), ("plain", 1)]),
                         ("r20", [("kd", 0)])):  # fmt: skip
        pruned = steps.out / "classifiers" / f"r56-at-{target}.pth"
        command = [*NETSLIM, "prune", sparse / "last.pth", "--target-ms", ms[target],
                   "--runtime", "onnxruntime", *CIFAR[:-2], "--data-root", root, "--out", pruned]  # fmt: skip
        try:
            steps.run(f"r56-at-{target}", command, pruned)
        except SystemExit as e:  # a budget out of reach: a finding, recorded, not the end
            steps.record(f"r56-at-{target}", unreachable=str(e))
            continue
        for kind, seed in arms:
            cls_finetune(steps, f"r56-at-{target}-{kind}-s{seed}", pruned, root, seed, kind == "kd")
    pruned = steps.out / "classifiers" / "r56-at-r32.pth"
    for weight, temperature in DISTILL_VARIANTS:  # the defaults (1, 4) against others
        cls_finetune(steps, f"r56-at-r32-kd-w{weight:g}-T{temperature:g}-s0", pruned, root, 0,
                     True, "--distill-weight", weight, "--distill-temperature", temperature)  # fmt: skip
    cls_train(steps, "r56", "resnet56", CLS_EPOCHS, root, "--lam", 0)


# Each arm: (family, name, the run or file holding its final network, the steps it took,
# what it is). Epochs are the same within a family by design.
ARMS = [
    ("yolo", "n-dense24", "n-dense24", ["n-dense24"], "yolov8n, 24 epochs"),
    *[
        ("yolo", f"n-p50-{kind}-s{seed}", f"n-p50-{kind}-s{seed}",
         ["n-dense10", "n-sparse8", "n-p50", f"n-p50-{kind}-s{seed}"],
         f"yolov8n 10 + 8 at λ 0.05, pruned 50%, fine-tuned 6 {'with' if kind == 'kd' else 'without'}"
         f" distillation (seed {seed})")
        for kind in ("kd", "plain") for seed in (0, 1)
    ],
    *[
        ("yolo", f"n-p50-out-s{seed}", f"n-p50-out-s{seed}",
         ["n-dense10", "n-sparse8", "n-p50", f"n-p50-out-s{seed}"],
         f"as n-p50-kd, netslim's distillation of the head's outputs (seed {seed})")
        for seed in (0, 1)
    ],
    ("yolo", "n-lat60-kd-s0", "n-lat60-kd-s0", ["n-dense10", "n-sparse8", "n-lat60", "n-lat60-kd-s0"],
     "yolov8n 10 + 8 at λ 0.05, pruned to 60% of its latency, fine-tuned 6 with distillation"),
    ("yolo", "n-p50-scratch", "n-p50-scratch", ["n-p50-scratch"],
     "the 50% architecture from fresh weights, 24 epochs (Scratch-B)"),
    ("yolo", "s-at-n-kd-s0", "s-at-n-kd-s0", ["s-dense10", "s-sparse8", "s-at-n", "s-at-n-kd-s0"],
     "yolov8s 10 + 8 at λ 0.05, pruned to yolov8n's latency, fine-tuned 6 with distillation"),
    ("classifiers", "r20", "r20", ["r20"], "ResNet-20, 15 epochs"),
    ("classifiers", "r32", "r32", ["r32"], "ResNet-32, 15 epochs"),
    ("classifiers", "r56", "r56", ["r56"], "ResNet-56, 15 epochs"),
    *[
        ("classifiers", f"r56-at-{target}-{kind}-s{seed}", f"r56-at-{target}-{kind}-s{seed}",
         ["r56-sparse10", f"r56-at-{target}", f"r56-at-{target}-{kind}-s{seed}"],
         f"ResNet-56 10 epochs λ auto, pruned to ResNet-{target[1:]}'s latency, fine-tuned 5 "
         f"{'with' if kind == 'kd' else 'without'} distillation (seed {seed})")
        for target, kind, seed in (("r32", "kd", 0), ("r32", "kd", 1), ("r32", "plain", 0),
                                   ("r32", "plain", 1), ("r20", "kd", 0))
    ],
    *[
        ("classifiers", f"r56-at-r32-kd-w{w:g}-T{t:g}-s0", f"r56-at-r32-kd-w{w:g}-T{t:g}-s0",
         ["r56-sparse10", "r56-at-r32", f"r56-at-r32-kd-w{w:g}-T{t:g}-s0"],
         f"as r56-at-r32-kd-s0, distillation weight {w:g} and temperature {t:g}")
        for w, t in DISTILL_VARIANTS
    ],
]  # fmt: skip


def _final(out: Path, family: str, run: str) -> Path | None:
    """The file of an arm's final network (the last epoch's), None while it is not done."""
    folder = out / family / run
    last = folder / ("weights/last.pth" if family == "yolo" else "last.pth")
    finished = (folder / "finished").exists() or (folder / "finetuned.pth").exists()
    return last if finished and last.exists() else None


def _accuracy(out: Path, family: str, run: str) -> float:
    """mAP50-95 of the last epoch (results.csv), or test accuracy of the last epoch."""
    folder = out / family / run
    if family == "yolo":
        lines = (folder / "results.csv").read_text().splitlines()
        names = [n.strip() for n in lines[0].split(",")]
        return float(lines[-1].split(",")[names.index("metrics/mAP50-95(B)")])
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["test_acc"]


def _seconds(steps: Steps, out: Path, names: list[str]) -> float:
    """Wall time of the steps; a YOLO training copied in from elsewhere: its results.csv's."""
    total = 0.0
    for name in names:
        seconds = (steps.done.get(name) or {}).get("seconds")
        csv = out / "yolo" / name / "results.csv"
        if (seconds is None or seconds < 60) and csv.exists():
            # trained before this script (issue 29, with pauses): epochs x the median epoch
            times = [0.0] + [float(x.split(",")[1]) for x in csv.read_text().splitlines()[1:]]
            epochs = sorted(b - a for a, b in zip(times, times[1:]))
            seconds = epochs[len(epochs) // 2] * len(epochs)
        total += seconds or 0.0
    return total


def write_report(out: Path, steps: Steps) -> None:
    """OUT/pareto.md (the table) and OUT/pareto.png (accuracy against measured latency) of
    the arms done so far; latency measured now, side by side per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for family, size in (("yolo", YOLO_TIMED_AT), ("classifiers", 32)):
        arms = [(a, _final(out, family, a[2])) for a in ARMS if a[0] == family]
        arms = [(a, f) for a, f in arms if f is not None]
        if not arms:
            continue
        ms = latency_ms([f for _, f in arms], size)
        for ((_, name, run, names, what), _), latency in zip(arms, ms):
            rows.append(dict(family=family, name=name, what=what, ms=latency,
                             accuracy=_accuracy(out, family, run),
                             hours=_seconds(steps, out, names) / 3600))  # fmt: skip
    lines = [
        "| family | arm | what | latency ms | accuracy | wall time h |",
        "|---|---|---|--:|--:|--:|",
    ]
    for r in rows:
        metric = f"{r['accuracy']:.4f}" if r["family"] == "yolo" else f"{r['accuracy']:.2f}%"
        lines.append(f"| {r['family']} | {r['name']} | {r['what']} | {r['ms']:.2f} | {metric} | "
                     f"{r['hours']:.2f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "pareto.md").write_text(text)
    (out / "pareto.json").write_text(json.dumps(rows, indent=1))
    print(text)
    families = sorted({r["family"] for r in rows})
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.5), squeeze=False)
    for ax, family in zip(axes[0], families):
        for r in (r for r in rows if r["family"] == family):
            ax.scatter(r["ms"], r["accuracy"], color="C1" if "-at-" in r["name"] or "-p50" in
                       r["name"] or "lat" in r["name"] else "C0")  # fmt: skip
            ax.annotate(r["name"], (r["ms"], r["accuracy"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        size = YOLO_TIMED_AT if family == "yolo" else 32
        ax.set_xlabel(f"latency, ms (onnxruntime, batch 1, {size} px)")
        ax.set_ylabel("mAP50-95" if family == "yolo" else "test accuracy, %")
        ax.set_title(f"{family}: blue the family's own sizes, orange slimmed")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--family", choices=("yolo", "classifiers"))
    p.add_argument("--data", type=Path, help="the CIFAR detection set's data.yaml (yolo)")
    p.add_argument("--data-root", type=Path, help="folder holding cifar-10-batches-py")
    p.add_argument("--report", action="store_true", help="write OUT/pareto.md and .png")
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out)
    if args.family == "yolo":
        yolo_family(steps, args.data.resolve())
    elif args.family == "classifiers":
        classifier_family(steps, args.data_root.resolve())
    if args.report:
        write_report(out, steps)


if __name__ == "__main__":
    main()
