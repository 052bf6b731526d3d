"""The ``netslim`` command line: every flag declared once, and the commands that take them.

Torch-free (it imports only :mod:`netslim.config`, :mod:`netslim.recipes`,
:mod:`netslim.limits` and :mod:`netslim.errors`), so that ``netslim --help`` and
``--version`` answer at once. :data:`FLAGS` declares each flag's names, type and help
once; a command takes a flag with :func:`add`, overriding at most its default, help or
requiredness (``--image-size`` defaults to 32 when training, to the checkpoint's when
pruning). :mod:`netslim.cli.commands` runs what the parser returns.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict
from typing import Any

import netslim
from netslim.config import (
    ARCH_CHOICES,
    ARCHS,
    DATASETS,
    DEMO,
    LOADERS,
    PRECISIONS,
    RESIZE_POLICIES,
    YOLO_DISTILL_TERMS,
    LabConfig,
    TrainConfig,
    YoloLab,
    check_arch_name,
    is_spec,
    lam_name,
)
from netslim.errors import NetslimError
from netslim.limits import check_image_size
from netslim.recipes import RECIPES, SCHEDULES

DEFAULTS = TrainConfig()
LAB_RECIPE_KEYS = ("epochs", "finetune_epochs", "batch_size", "lr")  # resolved by the command


# -- argument types -----------------------------------------------------------------------


def arch_type(arch: str) -> str:
    """argparse type of ``--arch``: a netslim name or a well-formed spec (imported later)."""
    try:
        check_arch_name(arch)
    except NetslimError:
        if is_spec(arch):
            raise argparse.ArgumentTypeError(
                f"bad spec {arch!r}: write torchvision:NAME, timm:NAME or package.module:callable"
            ) from None
        raise argparse.ArgumentTypeError(f"invalid choice: {arch!r} ({ARCH_CHOICES})") from None
    return arch


def image_size_type(text: str) -> int:
    """argparse type of ``--image-size``: whole pixels within :mod:`netslim.limits`' bounds."""
    try:
        return check_image_size(int(text))
    except (ValueError, NetslimError) as e:
        message = str(e) if isinstance(e, NetslimError) else f"must be a whole number, got {text!r}"
        raise argparse.ArgumentTypeError(message.replace("--image-size ", "")) from None


def threshold_type(text: str) -> float:
    """argparse type of ``--sparsity-threshold``: a positive, finite |gamma|."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, e.g. 0.01, got {text!r}") from None
    if not 0 < value < math.inf:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, e.g. 0.01, got {text}")
    return value


def lam_type(text: str) -> float | str:
    """argparse type of ``--lam`` where λ auto is offered: a number or ``auto``."""
    return "auto" if text == "auto" else float(text)


def recipe_default(key: str) -> str:
    """Help text naming each recipe's value of a setting."""
    values = ", ".join(f"{name} {recipe[key]}" for name, recipe in RECIPES.items())
    return f"default: the --recipe's ({values})"


def lab_default(preset: LabConfig, key: str) -> str:
    """Help text of a lab setting: the preset's own value (the demo's), else the recipe's."""
    if getattr(preset, key) != getattr(LabConfig(), key):
        return f"default: {getattr(preset, key)}"
    return recipe_default("epochs" if key == "finetune_epochs" else key)


ARCH_HELP = (
    f"one of {', '.join(ARCHS)}, or torchvision:NAME, timm:NAME (pip install 'netslim[zoo]') "
    "or package.module:callable, your own builder called with num_classes=N "
    "(default: %(default)s)"
)
PRECISION_HELP = "auto: bf16 where fast and safe (CUDA, CPUs with AVX512-BF16), else fp32"

# -- every flag, once -----------------------------------------------------------------------


def _flag(*names: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return names, kwargs


FLAGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    # what to train: the network and the data
    "arch": _flag("--arch", type=arch_type, default=DEFAULTS.arch, help=ARCH_HELP),
    "dataset": _flag(
        "--dataset",
        choices=DATASETS,
        default="cifar10",
        help="dataset (default: %(default)s); 'synthetic' is built in and needs no files",
    ),
    "data_root": _flag(
        "--data-root",
        default=DEFAULTS.data_root,
        help="folder holding cifar-10-batches-py/ or cifar-100-python/ (default: %(default)s)",
    ),
    "download": _flag(
        "--no-download",
        dest="download",
        action="store_false",
        help="never download CIFAR; fail if it is not under --data-root",
    ),
    "train_size": _flag(
        "--train-size", type=int, default=None, help="use only the first N training images"
    ),
    "test_size": _flag(
        "--test-size", type=int, default=None, help="use only the first N test images"
    ),
    "device": _flag(
        "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps"
    ),
    "seed": _flag(
        "--seed", type=int, default=DEFAULTS.seed, help="random seed (default: %(default)s)"
    ),
    "image_size": _flag(
        "--image-size",
        type=image_size_type,
        default=DEFAULTS.image_size,
        help="imagefolder: images are resized to this square size; the network is "
        "traced and measured at it (default: %(default)s)",
    ),
    "resize": _flag(
        "--resize",
        choices=RESIZE_POLICIES,
        default=DEFAULTS.resize,
        help="imagefolder: 'crop' scales the shorter side and cuts the centre square, "
        "'stretch' ignores the aspect ratio (default: %(default)s)",
    ),
    "loader": _flag(
        "--loader",
        choices=LOADERS,
        default="auto",
        help="imagefolder: 'memory' decodes all images once, 'stream' decodes each "
        "batch in DataLoader workers; auto: memory if it fits (default: %(default)s)",
    ),
    "workers": _flag(
        "--workers",
        type=int,
        default=None,
        help="imagefolder: image-decoding processes (default: CPUs per process, at most 8)",
    ),
    # the recipe: --recipe sets defaults, each flag overrides one (None: the recipe's)
    "recipe": _flag(
        "--recipe",
        choices=RECIPES,
        default="paper",
        help="default settings: 'paper' (Liu et al. 2017) or 'fast' (warm-up and linear "
        "decay, Nesterov, label smoothing, batch 256); any flag below overrides one "
        "(default: %(default)s)",
    ),
    "epochs": _flag("--epochs", type=int, help=recipe_default("epochs")),
    "batch_size": _flag("--batch-size", type=int, help=recipe_default("batch_size")),
    "lr": _flag("--lr", type=float, help="peak learning rate; " + recipe_default("lr")),
    "momentum": _flag("--momentum", type=float, help=recipe_default("momentum")),
    "weight_decay": _flag("--weight-decay", type=float, help=recipe_default("weight_decay")),
    "schedule": _flag(
        "--schedule",
        choices=SCHEDULES,
        help="'step': lr divided by 10 at 50%% and 75%% of the epochs; 'linear': "
        "warm-up, then linear decay to 0, every step; " + recipe_default("schedule"),
    ),
    "warmup_epochs": _flag(
        "--warmup-epochs",
        type=float,
        help="linear schedule: epochs of lr warm-up (at most half the epochs); "
        + recipe_default("warmup_epochs"),
    ),
    "nesterov": _flag(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        help="Nesterov momentum; " + recipe_default("nesterov"),
    ),
    "label_smoothing": _flag(
        "--label-smoothing", type=float, help=recipe_default("label_smoothing")
    ),
    # sparsity training
    "lam": _flag(
        "--lam", type=float, help="L1 weight on BN gammas, e.g. 1e-4 (default: %(default)s)"
    ),
    "target_ratio": _flag(
        "--target-ratio",
        type=float,
        metavar="R",
        help="with --lam auto: the share of |gamma| that should end below --sparsity-threshold",
    ),
    "sparsity_threshold": _flag(
        "--sparsity-threshold",
        type=threshold_type,
        default=DEFAULTS.sparsity_threshold,
        help="|gamma| below this counts as sparse in the logs (default: %(default)s)",
    ),
    "precision": _flag("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP),
    "out": _flag(
        "--out", required=True, help="run folder for metrics.jsonl, last.pth and best.pth"
    ),
    "resume": _flag(
        "--resume", action="store_true", help="continue the run in --out from last.pth"
    ),
    "compile": _flag(
        "--compile",
        action="store_true",
        help="torch.compile the model (slow to start; bench/RESULTS.md says when it pays)",
    ),
    "sync_bn": _flag(
        "--sync-bn",
        action="store_true",
        help="under torchrun on GPUs: BatchNorm statistics over the global batch",
    ),
    "threads": _flag(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for PyTorch, fixed: a --resume then continues the run bit "
        "for bit (so does a set OMP_NUM_THREADS). Default: the physical cores this "
        "process may use, tuned to the load while training (see the README)",
    ),
    # early pruning (netslim.train.control)
    "prune_when_stable": _flag(
        "--prune-when-stable",
        type=float,
        metavar="R",
        help="each epoch, plan pruning at ratio R; once that mask changes "
        "by at most --stable-tol of the channels for --stable-epochs epochs "
        "in a row, stop sparsity training, prune at R (recalibrated) and "
        "fine-tune into OUT/finetune/",
    ),
    "stable_tol": _flag(
        "--stable-tol",
        type=float,
        default=DEFAULTS.stable_tol,
        help="share of channels the mask may change by and count as settled (default: %(default)s)",
    ),
    "stable_epochs": _flag(
        "--stable-epochs",
        type=int,
        default=DEFAULTS.stable_epochs,
        help="epochs in a row the mask must stay settled (default: %(default)s)",
    ),
    "finetune_epochs": _flag(
        "--finetune-epochs",
        type=int,
        help="with --prune-when-stable (default: the same as --epochs)",
    ),
    "recalibrate": _flag(
        "--recalibrate",
        type=int,
        default=16,
        metavar="N",
        help="BN recalibration batches of 128 training images after pruning "
        "(0: off; default: %(default)s)",
    ),
    # the lab
    "lams": _flag(
        "--lams",
        type=float,
        nargs="+",
        metavar="λ",
        help="L1 weights on BN gammas, one sparsity training each (default: %(default)s)",
    ),
    "prune_lam": _flag(
        "--prune-lam",
        type=float,
        metavar="λ",
        help="which of --lams to prune and fine-tune (default: %(default)s)",
    ),
    "ratios": _flag(
        "--ratios",
        type=float,
        nargs="+",
        metavar="R",
        help="prune ratios to prune at and fine-tune (default: %(default)s)",
    ),
    "sweep": _flag(
        "--sweep",
        type=float,
        nargs="*",
        metavar="R",
        help="extra ratios, pruned but not fine-tuned, for the accuracy-vs-ratio "
        "figure (default: %(default)s)",
    ),
    # pruning
    "ratio": _flag(
        "--ratio", type=float, help="share of BN channels (gammas) to remove, in [0, 1)"
    ),
    "target_macs": _flag(
        "--target-macs",
        type=float,
        metavar="F",
        help="instead of --ratio: find the threshold that leaves the share F of the MACs",
    ),
    "target_latency": _flag(
        "--target-latency",
        type=float,
        metavar="F",
        help="instead of --ratio: prune to the share F of the unpruned network's latency "
        "measured on --runtime (e.g. 0.6), the most |gamma| kept per millisecond; the "
        "result is timed and corrected when more than 10%% off",
    ),
    "target_ms": _flag(
        "--target-ms",
        type=float,
        metavar="MS",
        help="instead of --ratio: prune to MS milliseconds per batch on --runtime",
    ),
    "runtime": _flag(
        "--runtime",
        default="onnxruntime",
        choices=("onnxruntime", "torch", "openvino"),
        help="with a latency budget: the runtime the network ships to, where its latency "
        "table is measured (onnxruntime and openvino on the CPU; default: %(default)s)",
    ),
    "batch": _flag(
        "--batch",
        type=int,
        default=1,
        metavar="N",
        help="with a latency budget: images per call when timing (default: %(default)s)",
    ),
    "latency_table": _flag(
        "--latency-table",
        metavar="PATH",
        help="with a latency budget: the latency table file, reused when it was measured "
        "for the same network, runtime, machine, size and batch, else measured again "
        "(default: one per network in ~/.cache/netslim/latency)",
    ),
    "latency_choice": _flag(
        "--latency-choice",
        choices=("threshold", "latency"),
        default="threshold",
        help="with a latency budget: raise the paper's global |gamma| threshold until the "
        "measured budget is met (threshold), or keep the most |gamma| per millisecond "
        "(latency: HALP's greedy, which strips costly early layers; see docs; "
        "default: %(default)s)",
    ),
    "min_keep": _flag(
        "--min-keep",
        type=float,
        default=0.01,
        help="per-layer floor: share of each layer's channels always kept, at least "
        "one (default: %(default)s)",
    ),
    "round_to": _flag(
        "--round-to",
        type=int,
        default=1,
        metavar="N",
        help="keep a multiple of N channels in every layer (rounded up with the "
        "next-best |gamma|), the widths fast kernels like, e.g. 8 (default: %(default)s)",
    ),
    "ignore": _flag(
        "--ignore",
        action="append",
        default=[],
        metavar="MODULE",
        help="leave this module unpruned (its name in the network, e.g. fc or "
        "layer4.1; a module's whole subtree; repeatable)",
    ),
    "force": _flag(
        "--force",
        action="store_true",
        help="allow --out to be the input checkpoint itself (it is replaced)",
    ),
    "trust_module": _flag(
        "--trust-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="build a checkpoint saved from your own module MODULE (its --arch "
        "MODULE:fn), importing it; netslim imports no module a file names "
        "without this (repeatable)",
    ),
    # distillation while fine-tuning (netslim.train.distill; YOLO: Ultralytics' own)
    "teacher": _flag(
        "--teacher",
        metavar="PATH",
        help="distil from this network while fine-tuning (default: the unpruned network "
        "the checkpoint was pruned from, as netslim prune recorded it)",
    ),
    "distill": _flag(
        "--no-distill",
        dest="distill",
        action="store_false",
        help="fine-tune from the labels alone, without the unpruned network as teacher",
    ),
    "distill_weight": _flag(
        "--distill-weight",
        type=float,
        default=DEFAULTS.distill_weight,
        help="weight of the distillation term beside the label loss (default: %(default)s)",
    ),
    "distill_temperature": _flag(
        "--distill-temperature",
        type=float,
        default=DEFAULTS.distill_temperature,
        help="temperature softening both networks' logits (default: %(default)s)",
    ),
    "distill_term": _flag(
        "--distill-term",
        choices=YOLO_DISTILL_TERMS,
        default=YOLO_DISTILL_TERMS[0],
        help="what a YOLO learns from its teacher: Ultralytics' distillation of the features "
        "entering the head (features), or netslim's of the head's outputs (outputs; "
        "default: %(default)s)",
    ),
    # reading and writing
    "json": _flag("--json", action="store_true", help="print machine-readable JSON"),
}

DISTILL = ("teacher", "distill", "distill_weight", "distill_temperature")
DATA = ("dataset", "data_root", "download", "train_size", "test_size", "device", "seed")
RECIPE = (
    "recipe",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    "nesterov",
    "label_smoothing",
)
FROM_CHECKPOINT = "the checkpoint's, else 32"


def _add_curve(p: argparse.ArgumentParser) -> None:
    """The flags of a speed curve: its budgets, choices and runtime."""
    p.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[0.8, 0.6, 0.5, 0.4],
        metavar="F",
        help="shares of the unpruned network's measured latency (default: %(default)s)",
    )
    p.add_argument(
        "--choices",
        nargs="+",
        choices=("threshold", "latency"),
        default=["threshold", "latency"],
        help="how each budget is spent (see --latency-choice; default: both)",
    )
    add(p, "runtime", "batch", "latency_table")


#: The flags of a latency budget (with --target-latency or --target-ms).
LATENCY = ("runtime", "batch", "latency_table", "latency_choice")


def add(p: argparse.ArgumentParser, *keys: str, **overrides: dict[str, Any]) -> None:
    """Add the flags ``keys`` of :data:`FLAGS` to ``p``; ``overrides[key]`` changes one's
    default, help or requiredness for this command."""
    for key in keys:
        names, kwargs = FLAGS[key]
        p.add_argument(*names, **{**kwargs, **overrides.get(key, {})})


def _add_training(p: argparse.ArgumentParser, lam: float, auto: bool, resume: bool = True) -> None:
    """The flags of a training run (train, finetune, multipass)."""
    add(p, *DATA)
    if auto:
        add(
            p,
            "lam",
            "target_ratio",
            lam=dict(
                type=lam_type,
                default=lam,
                help="L1 weight on BN gammas, e.g. 1e-4, or 'auto': "
                "adapted each epoch to reach --target-ratio (default: %(default)s)",
            ),
        )
    else:
        add(p, "lam", lam=dict(default=lam))
    add(
        p,
        *RECIPE,
        "sparsity_threshold",
        "precision",
        "out",
        *["resume"] * resume,
        "compile",
        "threads",
    )


def _add_images(p: argparse.ArgumentParser, train: bool, checkpoint: bool) -> None:
    """Your own images: size and resizing; for training also how they are fed."""
    size = (
        {
            "default": None,
            "help": FLAGS["image_size"][1]["help"].replace("%(default)s", FROM_CHECKPOINT),
        }
        if checkpoint
        else {}
    )
    add(p, "image_size", "resize", image_size=size)
    if train:
        add(p, "loader", "workers", "sync_bn")


class _Parser(argparse.ArgumentParser):
    """argparse with numbers like ``-1e-4`` read as values: its own pattern for negative
    numbers has no exponent, so ``--lam -1e-4`` ended in "expected one argument" instead
    of the range check's message (no netslim flag looks like a number)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (see ``netslim COMMAND --help``)."""
    parser = _Parser(
        prog="netslim",
        description="Network slimming: sparsity training, channel pruning and fine-tuning of CNNs.",
    )
    parser.add_argument("--version", action="version", version=f"netslim {netslim.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="(sparsity) training from scratch",
        description="Train a network with an L1 penalty on its BatchNorm gammas.",
    )
    add(p, "arch")
    _add_training(p, lam=1e-4, auto=True)
    add(
        p,
        "prune_when_stable",
        "stable_tol",
        "stable_epochs",
        "finetune_epochs",
        "distill",
        "distill_weight",
        "distill_temperature",
        "recalibrate",
        recalibrate=dict(
            help="with --prune-when-stable: BN recalibration batches of 128 (default: %(default)s)"
        ),
    )
    _add_images(p, train=True, checkpoint=False)

    p = sub.add_parser(
        "prune",
        help="prune channels of a trained checkpoint",
        description="Remove the share RATIO of all channels with the smallest |gamma| and save "
        "the physically smaller network.",
    )
    p.add_argument("checkpoint", help="trained checkpoint (netslim's or the paper's code's)")
    add(
        p.add_mutually_exclusive_group(required=True),
        "ratio",
        "target_macs",
        "target_latency",
        "target_ms",
    )
    add(p, *LATENCY)
    add(p, "out", out=dict(help="path of the pruned checkpoint to write"))
    add(p, "force")
    p.add_argument(
        "--no-compensate",
        dest="compensate",
        action="store_false",
        help="save exactly the official code's network: no bias compensation and no "
        "BN recalibration (with --dataset the report still measures both, on copies)",
    )
    add(
        p,
        "min_keep",
        "round_to",
        "ignore",
        *DATA,
        "recalibrate",
        dataset=dict(default=None),
        recalibrate=dict(
            help="with --dataset: re-estimate BN statistics on N batches of 128 "
            "training images (0: off; default: %(default)s); with --no-compensate "
            "only measured, not saved"
        ),
    )
    _add_images(p, train=False, checkpoint=True)
    add(p, "threads", "trust_module")

    p = sub.add_parser(
        "speed-curve",
        help="what each latency budget buys: speed-up and accuracy right after pruning",
        description="Prune a checkpoint to each latency budget both ways (the |gamma| "
        "threshold and the most |gamma| per millisecond), time each beside the unpruned "
        "network on --runtime and, with --dataset, measure its accuracy right after pruning; "
        "prints a table and saves no network.",
    )
    p.add_argument("checkpoint", help="a sparsity-trained checkpoint")
    _add_curve(p)
    add(p, "min_keep", "ignore", *DATA, "recalibrate", dataset=dict(default=None))
    _add_images(p, train=False, checkpoint=True)
    add(p, "threads", "trust_module", "json")

    p = sub.add_parser(
        "finetune",
        help="fine-tune a pruned checkpoint",
        description="Fine-tune a pruned network with the training recipe.",
    )
    p.add_argument(
        "checkpoint",
        help="pruned checkpoint written by 'netslim prune' (or the paper's vggprune.py)",
    )
    _add_training(p, lam=0.0, auto=False)
    _add_images(p, train=True, checkpoint=True)
    add(p, "trust_module", *DISTILL)

    p = sub.add_parser(
        "multipass",
        help="several rounds of sparsity training and pruning, then fine-tuning",
        description="The paper's multi-pass scheme: sparsity-train, prune --ratio with at most "
        "--layer-cap of any layer removed, repeat --passes times, then fine-tune. Run the same "
        "command again to continue an interrupted run.",
    )
    add(p, "arch")
    p.add_argument("--passes", type=int, default=2, help="default: %(default)s")
    add(p, "ratio", ratio=dict(default=0.5, help="share removed per pass (default: %(default)s)"))
    p.add_argument(
        "--layer-cap",
        type=float,
        default=0.5,
        help="most of one layer's channels a pass may remove (default: %(default)s)",
    )
    add(
        p,
        "finetune_epochs",
        "recalibrate",
        finetune_epochs=dict(help="default: the same as --epochs"),
        recalibrate=dict(help="default: %(default)s"),
    )
    _add_training(p, lam=1e-4, auto=True, resume=False)  # it continues when run again
    _add_images(p, train=True, checkpoint=False)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as ONNX, torch.export (.pt2) or the paper's layout, checked",
        description="Export a checkpoint (pruned or not) in eval mode (BatchNorm folded for "
        "ONNX and .pt2), run the written file against the PyTorch network on random batches, "
        "and keep it only if they agree (relative difference <= 1e-4). A YOLO (a .pt, or a "
        "netslim .pth of one) is written by Ultralytics' own exporter, with its metadata, so "
        "that yolo val / yolo predict and YOLO() run the file; --format then also takes "
        "Ultralytics' formats (openvino, engine, coreml, litert, ...) where installed.",
    )
    p.add_argument("checkpoint", help="any checkpoint netslim reads, or an Ultralytics .pt")
    out_help = "file to write: .onnx, .pt2 or .pth.tar; a YOLO also NAME_openvino_model, ..."
    add(p, "out", out=dict(help=out_help + " as Ultralytics names them"))
    p.add_argument(
        "--format",
        default=None,
        help="onnx, pt2, or official: the paper's {'cfg', 'state_dict'} file, which its "
        "main.py --refine reads; a YOLO also any of Ultralytics' export formats "
        "(default: from the --out suffix: .onnx, .pt2, .pth.tar, _openvino_model, ...)",
    )
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="a YOLO: free batch, height and width (Ultralytics' dynamic=True; default: a "
        "batch of 1 at the image size, as yolo export writes)",
    )
    p.add_argument(
        "--no-fold",
        dest="fold",
        action="store_false",
        help="keep BatchNorm layers instead of folding them into the conv or linear before",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 9 to 20 (default: 18)")
    add(
        p,
        "image_size",
        "trust_module",
        image_size=dict(
            default=None,
            help=f"input height and width (default: {FROM_CHECKPOINT}; "
            "a YOLO .pt: the imgsz it was trained at, else 640)",
        ),
    )

    p = sub.add_parser(
        "bench",
        help="latency and throughput of checkpoints, side by side",
        description="Time checkpoints on this machine, interleaved: warm-up, then the median of "
        "repeated forward passes, in fp32 with BatchNorm folded. Speed-ups are against the first "
        "checkpoint; efficiency is speed-up / MACs reduction.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    p.add_argument(
        "--batch", default="1,64", help="batch sizes, comma-separated (default: %(default)s)"
    )
    p.add_argument(
        "--runtime",
        default="torch",
        help="comma-separated: torch (eager), onnxruntime, openvino (pip install "
        '"netslim[openvino]"; default: %(default)s)',
    )
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (default: %(default)s)")
    p.add_argument(
        "--stat",
        default="median",
        choices=("median", "min"),
        help="latency of a network: the median of its rounds, or the fastest (on a "
        "machine busy with other work, where preempted calls inflate the median; "
        "default: %(default)s)",
    )
    add(
        p,
        "image_size",
        "trust_module",
        "device",
        "json",
        image_size=dict(help="input height and width (default: %(default)s)"),
        device=dict(default="cpu", help="device of the torch runtime (default: cpu)"),
    )

    p = sub.add_parser(
        "info",
        help="describe a checkpoint",
        description="Architecture, parameters, MACs and sparsity of a checkpoint.",
    )
    p.add_argument("checkpoint")
    add(p, "sparsity_threshold", "trust_module", "json", sparsity_threshold=dict(help=None))

    for name, preset, out, help_, description in (
        (
            "lab",
            LabConfig(),
            "runs/lab",
            "the whole experiment: sparsity training, pruning, fine-tuning, report",
            "Sparsity-train at each --lams, prune the --prune-lam model at each --ratios (three "
            "ways), fine-tune, and write report.md and report.html with figures into --out. "
            "Resumable: run the same command again to continue.",
        ),
        (
            "demo",
            DEMO,
            "runs/demo",
            "the lab on built-in synthetic data, under 5 minutes on a 2-core CPU",
            f"netslim lab with a small preset: {DEMO.arch} on {DEMO.train_size:,} synthetic images, "
            f"{DEMO.epochs} + {DEMO.finetune_epochs} epochs, λ {' '.join(map(lam_name, DEMO.lams))}, "
            f"pruning the {lam_name(DEMO.prune_lam)} model. It prints where it is and the time "
            "left every 10 seconds. Any lab flag overrides the preset.",
        ),
    ):
        _add_lab(sub.add_parser(name, help=help_, description=description), preset, out)

    p = sub.add_parser(
        "report",
        help="re-render the report of a lab run folder",
        description="Write report.md, report.html and figures/ from a finished lab's logged "
        "metrics and checkpoints, without training.",
    )
    p.add_argument("run_dir", help="run folder of netslim lab or netslim demo")
    _add_yolo(sub)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; Ultralytics' ``key=value`` settings may stand anywhere in it.

    argparse gives all positionals at once, so ``yolo finetune P.pth --epochs 3 lr0=0.01`` would
    leave ``lr0=0.01`` unparsed: such leftovers join ``settings`` where the step has them.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "settings", None) is None or any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        try:
            args.settings += [_settings_type(a) for a in extra]
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
    return args


def _settings_type(text: str) -> str:
    """argparse type of an Ultralytics ``key=value`` setting passed through."""
    key, sep, _ = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"an Ultralytics setting is key=value (e.g. lr0=0.01), got {text!r}"
        )
    return text


RUN_HELP = "the run folder: Ultralytics' weights/, results.csv, and netslim's sparsity.jsonl"
YOLO_SETTINGS = (
    "Ultralytics training settings passed through as they are, e.g. lr0=0.01 "
    "mosaic=0.5 workers=4 amp=False (see Ultralytics' docs)"
)


def _add_yolo(sub: argparse._SubParsersAction) -> None:
    """``netslim yolo STEP``: the same steps for an Ultralytics YOLO, through its trainer."""
    p = sub.add_parser(
        "yolo",
        help="slim an Ultralytics YOLO: sparsity training, pruning, fine-tuning, lab",
        description="Network slimming of Ultralytics YOLO detectors and segmenters, trained and "
        "validated by Ultralytics' own trainer and validator (pip install 'netslim[yolo]').",
    )
    steps = p.add_subparsers(dest="yolo_command", required=True, metavar="STEP")
    common = dict(
        device=dict(help="auto, cpu, cuda, cuda:N (default: %(default)s)"),
        image_size=dict(default=640, help="input size (Ultralytics' imgsz; default: %(default)s)"),
        batch_size=dict(default=16, help="images per batch (default: %(default)s)"),
    )

    t = steps.add_parser(
        "train",
        help="(sparsity) training through Ultralytics' trainer",
        description="Train a YOLO with an L1 penalty on its BatchNorm gammas, "
        "by Ultralytics' own trainer (AMP, EMA, DDP, its augmentation).",
    )
    t.add_argument(
        "--model",
        required=True,
        help="an Ultralytics model YAML (yolov8n.yaml, yolo11n-seg.yaml: fresh weights) "
        "or a trained .pt (read without running its code)",
    )
    t.add_argument("--data", required=True, help="an Ultralytics data.yaml")
    add(
        t,
        "lam",
        "target_ratio",
        "prune_when_stable",
        "stable_tol",
        "stable_epochs",
        "epochs",
        "image_size",
        "batch_size",
        "device",
        "sparsity_threshold",
        "out",
        "resume",
        lam=dict(
            default=1e-3,
            type=lam_type,
            help="L1 weight on BN gammas, per optimizer step "
            "(default: %(default)s; 0: plain training), or 'auto': adapted each epoch to "
            "reach --target-ratio (with optimizer=SGD)",
        ),
        prune_when_stable=dict(
            help="each epoch, plan pruning at ratio R; once that mask changes "
            "by at most --stable-tol of the channels for --stable-epochs epochs "
            "in a row, stop (then prune the run's last.pt)"
        ),
        epochs=dict(default=100, help="default: %(default)s"),
        out=dict(help=RUN_HELP),
        **common,
    )
    _add_pickle(t)
    t.add_argument(
        "settings", nargs="*", type=_settings_type, metavar="KEY=VALUE", help=YOLO_SETTINGS
    )

    q = steps.add_parser(
        "prune",
        help="prune a YOLO, mAP measured right after three ways",
        description="Prune a trained YOLO (.pt or netslim .pth) and measure mAP "
        "with Ultralytics' validator: unpruned, official, compensated, recalibrated.",
    )
    q.add_argument("checkpoint", help="an Ultralytics .pt or a netslim .pth of a YOLO")
    add(
        q.add_mutually_exclusive_group(required=True),
        "ratio",
        "target_macs",
        "target_latency",
        "target_ms",
    )
    add(q, *LATENCY)
    q.add_argument(
        "--data", help="an Ultralytics data.yaml: measure mAP and recalibrate (optional)"
    )
    add(
        q,
        "out",
        "force",
        "image_size",
        "batch_size",
        "device",
        "recalibrate",
        "round_to",
        "min_keep",
        out=dict(help="the pruned checkpoint NAME.pth to write (NAME.pt beside it)"),
        recalibrate=dict(
            help="BN recalibration batches of --batch-size training images, "
            "Ultralytics' augmentation, mosaic off (0: off; default: %(default)s)"
        ),
        **common,
    )
    q.add_argument(
        "--no-compensate",
        dest="compensate",
        action="store_false",
        help="save the official network: no bias compensation, no recalibration",
    )
    _add_pickle(q)

    c = steps.add_parser(
        "speed-curve",
        help="what each latency budget buys: speed-up and mAP right after pruning",
        description="Prune a YOLO to each latency budget both ways, time each beside the "
        "unpruned network on --runtime at --image-size and, with --data, measure its mAP "
        "right after pruning (recalibrated); prints a table and saves no network.",
    )
    c.add_argument("checkpoint", help="an Ultralytics .pt or a netslim .pth of a YOLO")
    _add_curve(c)
    c.add_argument("--data", help="an Ultralytics data.yaml: measure mAP and recalibrate")
    add(c, "image_size", "batch_size", "device", "recalibrate", "json", **common)
    _add_pickle(c)

    f = steps.add_parser(
        "finetune",
        help="fine-tune a pruned YOLO with Ultralytics' trainer",
        description="Fine-tune a pruned YOLO, keeping its pruned widths (never "
        "rebuilt from its YAML); OUT/weights/best.pt loads with ultralytics.YOLO.",
    )
    f.add_argument("checkpoint", help="the pruned .pth (or .pt) 'netslim yolo prune' wrote")
    f.add_argument("--data", required=True, help="an Ultralytics data.yaml")
    add(
        f,
        "epochs",
        "image_size",
        "batch_size",
        "device",
        "out",
        "resume",
        "teacher",
        "distill",
        "distill_weight",
        "distill_temperature",
        distill_weight=dict(
            default=None,
            help="with --distill-term outputs: the weight of netslim's term (default: 1; "
            "Ultralytics' features term takes dis=, default 6)",
        ),
        distill_temperature=dict(
            default=None, help="with --distill-term outputs: the temperature (default: 1)"
        ),
        epochs=dict(default=100, help="default: %(default)s"),
        out=dict(help=RUN_HELP),
        **common,
    )
    _add_pickle(f)
    add(f, "distill_term")
    f.add_argument(
        "settings", nargs="*", type=_settings_type, metavar="KEY=VALUE", help=YOLO_SETTINGS
    )

    lab = YoloLab(model="", data="")  # its defaults
    b = steps.add_parser(
        "lab",
        help="the seed lab's experiment for a YOLO, with its report",
        description="λ sweep, pruning at --ratios and --sweep (mAP right after, "
        "three ways), fine-tuning, and the report in mAP; run the same command "
        "again to continue a stopped lab. Put KEY=VALUE settings before flags "
        "that take lists (--lams, --ratios, --sweep).",
    )
    b.add_argument(
        "--model",
        required=True,
        help="an Ultralytics model YAML (yolov8n.yaml: fresh weights), or a trained .pt or "
        "netslim .pth to start from (read without running its code; nothing downloads)",
    )
    b.add_argument("--data", required=True, help="an Ultralytics data.yaml")
    b.add_argument(
        "--lams",
        "--lam",
        type=lam_type,
        nargs="+",
        metavar="λ",
        default=lab.lams,
        help="L1 weights on BN gammas, one sparsity training each, or 'auto': λ auto toward "
        "--target-ratio (with optimizer=SGD); --lam auto alone trains only that run "
        "(default: %(default)s)",
    )
    add(
        b,
        "prune_lam",
        "target_ratio",
        "prune_when_stable",
        "stable_tol",
        "stable_epochs",
        "ratios",
        "sweep",
        "epochs",
        "finetune_epochs",
        "image_size",
        "batch_size",
        "device",
        "recalibrate",
        "out",
        "distill",
        "distill_term",
        **common,
        prune_lam=dict(
            type=lam_type,
            help="which of --lams to prune and fine-tune (default: auto if listed, else the "
            "largest)",
        ),
        target_ratio=dict(
            help="with --lam auto: the share of |gamma| that should end below 0.01 (as "
            "netslim yolo train takes it)"
        ),
        prune_when_stable=dict(
            help="each epoch of the --prune-lam run, plan pruning at ratio R; once that mask "
            "changes by at most --stable-tol of the channels for --stable-epochs epochs in a "
            "row, stop its sparsity training and go on with the lab"
        ),
        ratios=dict(default=lab.ratios),
        sweep=dict(default=lab.sweep),
        epochs=dict(default=lab.epochs, help="sparsity-training epochs (default: %(default)s)"),
        finetune_epochs=dict(default=lab.finetune_epochs, help="default: %(default)s"),
        recalibrate=dict(
            help="BN recalibration batches of --batch-size training images "
            "(0: off; default: %(default)s)"
        ),
        out=dict(help="the lab folder; the same command again continues a stopped lab"),
    )
    b.add_argument(
        "settings", nargs="*", type=_settings_type, metavar="KEY=VALUE", help=YOLO_SETTINGS
    )
    r = steps.add_parser("report", help="(re)write a finished YOLO lab's report")
    r.add_argument("folder", help="the lab folder (its lab.json)")

    v = steps.add_parser("val", help="mAP of a YOLO checkpoint by Ultralytics' validator")
    v.add_argument("checkpoint", help="an Ultralytics .pt or a netslim .pth of a YOLO")
    v.add_argument("--data", required=True, help="an Ultralytics data.yaml")
    add(v, "image_size", "batch_size", "device", "json", **common)
    _add_pickle(v)


def _add_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read an Ultralytics .pt naming code outside Ultralytics' and torch's layers "
        "with the full unpickler, which runs that code: only for files you trust",
    )


def _add_lab(p: argparse.ArgumentParser, preset: LabConfig, out: str) -> None:
    """The lab's flags, with ``preset``'s values as defaults (the lab's own or the demo's)."""
    add(p, "arch", *DATA, arch=dict(default=None), dataset=dict(default=preset.dataset))
    add(p, "lams", "prune_lam", "ratios", "sweep")
    add(
        p,
        "recipe",
        "epochs",
        "finetune_epochs",
        "batch_size",
        "lr",
        recipe=dict(
            default=None,
            help="training settings of every stage, 'paper' or 'fast' (see "
            "netslim train --help; default: %(default)s)",
        ),
        epochs=dict(help="sparsity-training epochs; " + lab_default(preset, "epochs")),
        finetune_epochs=dict(help="fine-tuning epochs; " + lab_default(preset, "finetune_epochs")),
        batch_size=dict(help=lab_default(preset, "batch_size")),
        lr=dict(help="peak learning rate; " + lab_default(preset, "lr")),
    )
    add(
        p,
        "prune_when_stable",
        "stable_tol",
        "stable_epochs",
        "target_ratio",
        "recalibrate",
        "precision",
        "out",
        "threads",
        "distill",
        "distill_weight",
        "distill_temperature",
        prune_when_stable=dict(
            help="each epoch, plan pruning at ratio R; once that mask changes "
            "by at most --stable-tol of the channels for --stable-epochs epochs "
            "in a row, stop sparsity training, (the --prune-lam run only) and "
            "go on with the lab"
        ),
        target_ratio=dict(
            help="λ auto for the --prune-lam run: start at --prune-lam and adapt λ "
            "each epoch so that the share R of |gamma| ends below the sparsity "
            "threshold"
        ),
        recalibrate=dict(
            default=None,
            help="re-estimate BN statistics after pruning on N batches "
            "of 128 training images (0: off; default: %(default)s)",
        ),
        precision=dict(default=None),
        out=dict(
            required=False,
            help="run folder (default: %(default)s); running the same "
            "command again continues an interrupted lab there",
        ),
    )
    # The recipe's settings stay None here: the command resolves them (commands.lab_config).
    p.set_defaults(**{**asdict(preset), **dict.fromkeys(LAB_RECIPE_KEYS)}, preset=preset, out=out)
