"""The ``netslim`` command: train, prune, finetune, multipass, info, lab, demo, report.

Every subcommand is a thin layer over the library; bad input ends with one line
``netslim: error: ...`` and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import netslim
from netslim.config import (
    ARCH_CHOICES,
    ARCHS,
    DATASETS,
    DEMO,
    LOADERS,
    PRECISIONS,
    RESIZE_POLICIES,
    LabConfig,
    TrainConfig,
    check_arch_name,
    is_spec,
)
from netslim.errors import NetslimError
from netslim.limits import check_batch_memory, check_image_size
from netslim.recipes import RECIPES, SCHEDULES, resolve

if TYPE_CHECKING:
    from torch import nn

    from netslim.data import Dataset

# The parser needs only netslim.config; each command imports torch and the modules that
# do the work when it runs, so that `netslim --help` and `--version` answer at once.
DEFAULTS = TrainConfig()


def _add_data_args(p: argparse.ArgumentParser, default: str | None = "cifar10") -> None:
    p.add_argument(
        "--dataset",
        default=default,
        choices=DATASETS,
        help=f"dataset (default: {default}); 'synthetic' is built in and needs no files",
    )
    p.add_argument(
        "--data-root",
        default=DEFAULTS.data_root,
        help="folder holding cifar-10-batches-py/ or cifar-100-python/ (default: %(default)s)",
    )
    p.add_argument(
        "--no-download",
        dest="download",
        action="store_false",
        help="never download CIFAR; fail if it is not under --data-root",
    )
    p.add_argument(
        "--train-size", type=int, default=None, help="use only the first N training images"
    )
    p.add_argument("--test-size", type=int, default=None, help="use only the first N test images")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps"
    )
    p.add_argument(
        "--seed", type=int, default=DEFAULTS.seed, help="random seed (default: %(default)s)"
    )


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for PyTorch, fixed: a --resume then continues the run bit for bit "
        "(so does a set OMP_NUM_THREADS). Default: the physical cores this process may use, "
        "tuned to the load while training: now and then a few steps are timed at that count "
        "and each halving down to 1, and the fastest is kept",
    )


def _recipe_default(key: str) -> str:
    """Help text naming each recipe's value of a setting."""
    values = ", ".join(f"{name} {recipe[key]}" for name, recipe in RECIPES.items())
    return f"default: the --recipe's ({values})"


def _lam(text: str) -> float | str:
    return "auto" if text == "auto" else float(text)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    """--recipe and the settings it decides; each flag given overrides the recipe's value."""
    p.add_argument(
        "--recipe",
        default="paper",
        choices=RECIPES,
        help="default settings: 'paper' (Liu et al. 2017) or 'fast' (warm-up and linear "
        "decay, Nesterov, label smoothing, batch 256); any flag below overrides one "
        "(default: %(default)s)",
    )
    p.add_argument("--epochs", type=int, help=_recipe_default("epochs"))
    p.add_argument("--batch-size", type=int, help=_recipe_default("batch_size"))
    p.add_argument("--lr", type=float, help="peak learning rate; " + _recipe_default("lr"))
    p.add_argument("--momentum", type=float, help=_recipe_default("momentum"))
    p.add_argument("--weight-decay", type=float, help=_recipe_default("weight_decay"))
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="'step': lr divided by 10 at 50%% and 75%% of the epochs; 'linear': warm-up, "
        "then linear decay to 0, every step; " + _recipe_default("schedule"),
    )
    p.add_argument(
        "--warmup-epochs",
        type=float,
        help="linear schedule: epochs of lr warm-up (at most half the epochs); "
        + _recipe_default("warmup_epochs"),
    )
    p.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        help="Nesterov momentum; " + _recipe_default("nesterov"),
    )
    p.add_argument("--label-smoothing", type=float, help=_recipe_default("label_smoothing"))


def _add_train_args(p: argparse.ArgumentParser, lam: float, auto: bool = False) -> None:
    p.add_argument(
        "--lam",
        type=_lam if auto else float,
        default=lam,
        help="L1 weight on BN gammas, e.g. 1e-4"
        + (", or 'auto': adapted each epoch to reach --target-ratio" if auto else "")
        + " (default: %(default)s)",
    )
    if auto:
        p.add_argument(
            "--target-ratio",
            type=float,
            metavar="R",
            help="with --lam auto: the share of |gamma| that should end below --sparsity-threshold",
        )
    _add_recipe_args(p)
    p.add_argument(
        "--sparsity-threshold",
        type=threshold_type,
        default=DEFAULTS.sparsity_threshold,
        help="|gamma| below this counts as sparse in the logs (default: %(default)s)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 where fast and safe (CUDA, CPUs with AVX512-BF16), else fp32",
    )
    p.add_argument(
        "--out", required=True, help="run folder for metrics.jsonl, last.pth and best.pth"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pth")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (slow to start; bench/RESULTS.md says when it pays)",
    )
    _add_threads_arg(p)


def _add_early_args(p: argparse.ArgumentParser, lab: bool = False) -> None:
    """Early pruning: stop sparsity training once the prune mask settles (netslim.control)."""
    p.add_argument(
        "--prune-when-stable",
        type=float,
        metavar="R",
        help="each epoch, plan pruning at ratio R; once that mask changes by at most "
        "--stable-tol of the channels for --stable-epochs epochs in a row, stop sparsity "
        "training, "
        + (
            "(the --prune-lam run only) and go on with the lab"
            if lab
            else "prune at R (recalibrated) and fine-tune into OUT/finetune/"
        ),
    )
    p.add_argument(
        "--stable-tol",
        type=float,
        default=DEFAULTS.stable_tol,
        help="share of channels the mask may change by and count as settled (default: %(default)s)",
    )
    p.add_argument(
        "--stable-epochs",
        type=int,
        default=DEFAULTS.stable_epochs,
        help="epochs in a row the mask must stay settled (default: %(default)s)",
    )
    if lab:
        return
    p.add_argument(
        "--finetune-epochs",
        type=int,
        help="with --prune-when-stable (default: the same as --epochs)",
    )
    p.add_argument(
        "--recalibrate",
        type=int,
        default=16,
        metavar="N",
        help="with --prune-when-stable: BN recalibration batches of 128 (default: %(default)s)",
    )


def _add_scale_args(
    p: argparse.ArgumentParser, train: bool = True, from_checkpoint: bool = False
) -> None:
    """Flags for your own images (``--dataset imagefolder``) and, with ``train``, for
    training: how to feed the images, and torchrun's ``--sync-bn``. With
    ``from_checkpoint``, the image size defaults to the one the checkpoint records."""
    p.add_argument(
        "--image-size",
        type=image_size_type,
        default=None if from_checkpoint else DEFAULTS.image_size,
        help="imagefolder: images are resized to this square size; the network is traced "
        "and measured at it (default: "
        + ("the checkpoint's, else 32)" if from_checkpoint else "%(default)s)"),
    )
    p.add_argument(
        "--resize",
        default=DEFAULTS.resize,
        choices=RESIZE_POLICIES,
        help="imagefolder: 'crop' scales the shorter side and cuts the centre square, "
        "'stretch' ignores the aspect ratio (default: %(default)s)",
    )
    if not train:  # pruning needs the images in memory (and uses few of them)
        return
    p.add_argument(
        "--loader",
        default="auto",
        choices=LOADERS,
        help="imagefolder: 'memory' decodes all images once, 'stream' decodes each "
        "batch in DataLoader workers; auto: memory if it fits (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="imagefolder: image-decoding processes (default: CPUs per process, at most 8)",
    )
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun on GPUs: BatchNorm statistics over the global batch",
    )


class _Parser(argparse.ArgumentParser):
    """argparse with numbers like ``-1e-4`` read as values: its own pattern for negative
    numbers has no exponent, so ``--lam -1e-4`` ended in "expected one argument" instead
    of the range check's message (no netslim flag looks like a number)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")


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


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="build a checkpoint saved from your own module MODULE (its --arch MODULE:fn), "
        "importing it; netslim imports no module a file names without this (repeatable)",
    )


ARCH_HELP = (
    f"one of {', '.join(ARCHS)}, or torchvision:NAME, timm:NAME (pip install 'netslim[zoo]') "
    "or package.module:callable, your own builder called with num_classes=N "
    "(default: %(default)s)"
)


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--arch", default=DEFAULTS.arch, type=arch_type, help=ARCH_HELP)
    _add_data_args(p)
    _add_train_args(p, lam=1e-4, auto=True)
    _add_early_args(p)
    _add_scale_args(p)

    p = sub.add_parser(
        "prune",
        help="prune channels of a trained checkpoint",
        description="Remove the share RATIO of all channels with the smallest |gamma| "
        "and save the physically smaller network.",
    )
    p.add_argument("checkpoint", help="trained checkpoint (netslim's or the paper's code's)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--ratio", type=float, help="share of BN channels (gammas) to remove, in [0, 1)"
    )
    how.add_argument(
        "--target-macs",
        type=float,
        metavar="F",
        help="instead of --ratio: find the threshold that leaves the share F of the MACs",
    )
    p.add_argument("--out", required=True, help="path of the pruned checkpoint to write")
    p.add_argument(
        "--force",
        action="store_true",
        help="allow --out to be the input checkpoint itself (it is replaced)",
    )
    p.add_argument(
        "--no-compensate",
        dest="compensate",
        action="store_false",
        help="save exactly the official code's network: no bias compensation and no BN "
        "recalibration (with --dataset the report still measures both, on copies)",
    )
    p.add_argument(
        "--min-keep",
        type=float,
        default=0.01,
        help="per-layer floor: share of each layer's channels always kept, at least one "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--round-to",
        type=int,
        default=1,
        metavar="N",
        help="keep a multiple of N channels in every layer (rounded up with the next-best "
        "|gamma|), the widths fast kernels like, e.g. 8 (default: %(default)s)",
    )
    _add_data_args(p, default=None)
    p.add_argument(
        "--recalibrate",
        type=int,
        default=16,
        metavar="N",
        help="with --dataset: re-estimate BN statistics on N batches of 128 training images "
        "(0: off; default: %(default)s); with --no-compensate only measured, not saved",
    )
    _add_scale_args(p, train=False, from_checkpoint=True)
    _add_threads_arg(p)
    _add_trust_arg(p)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a pruned checkpoint",
        description="Fine-tune a pruned network with the training recipe.",
    )
    p.add_argument(
        "checkpoint",
        help="pruned checkpoint written by 'netslim prune' (or the paper's vggprune.py)",
    )
    _add_data_args(p)
    _add_train_args(p, lam=0.0)
    _add_scale_args(p, from_checkpoint=True)
    _add_trust_arg(p)

    p = sub.add_parser(
        "multipass",
        help="several rounds of sparsity training and pruning, then fine-tuning",
        description="The paper's multi-pass scheme: sparsity-train, prune --ratio with at most "
        "--layer-cap of any layer removed, repeat --passes times, then fine-tune. Run the same "
        "command again to continue an interrupted run.",
    )
    p.add_argument("--arch", default=DEFAULTS.arch, type=arch_type, help=ARCH_HELP)
    p.add_argument("--passes", type=int, default=2, help="default: %(default)s")
    p.add_argument(
        "--ratio", type=float, default=0.5, help="share removed per pass (default: %(default)s)"
    )
    p.add_argument(
        "--layer-cap",
        type=float,
        default=0.5,
        help="most of one layer's channels a pass may remove (default: %(default)s)",
    )
    p.add_argument("--finetune-epochs", type=int, help="default: the same as --epochs")
    p.add_argument("--recalibrate", type=int, default=16, metavar="N", help="default: %(default)s")
    _add_data_args(p)
    _add_train_args(p, lam=1e-4, auto=True)
    _add_scale_args(p)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as ONNX, torch.export (.pt2) or the paper's layout, checked",
        description="Export a checkpoint (pruned or not) in eval mode (BatchNorm folded for "
        "ONNX and .pt2), run the written file against the PyTorch network on random batches, "
        "and keep it only if they agree (relative difference <= 1e-4).",
    )
    p.add_argument("checkpoint", help="any checkpoint netslim reads")
    p.add_argument("--out", required=True, help="file to write: .onnx, .pt2 or .pth.tar")
    p.add_argument(
        "--format",
        default=None,
        help="onnx, pt2, or official: the paper's {'cfg', 'state_dict'} file, which its "
        "main.py --refine reads (default: from the --out suffix: .onnx, .pt2, .pth.tar)",
    )
    p.add_argument(
        "--no-fold",
        dest="fold",
        action="store_false",
        help="keep BatchNorm layers instead of folding them into the conv or linear before",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 9 to 20 (default: 18)")
    p.add_argument(
        "--image-size",
        type=image_size_type,
        default=None,
        help="input height and width (default: the checkpoint's, else 32)",
    )
    _add_trust_arg(p)

    p = sub.add_parser(
        "bench",
        help="latency and throughput of checkpoints, side by side",
        description="Time checkpoints on this machine, interleaved: warm-up, then the median "
        "of repeated forward passes, in fp32 with BatchNorm folded. Speed-ups are against the "
        "first checkpoint; efficiency is speed-up / MACs reduction.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    p.add_argument(
        "--batch", default="1,64", help="batch sizes, comma-separated (default: %(default)s)"
    )
    p.add_argument(
        "--runtime",
        default="torch",
        help="comma-separated: torch (eager), onnxruntime (default: %(default)s)",
    )
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (default: %(default)s)")
    p.add_argument(
        "--stat",
        default="median",
        choices=("median", "min"),
        help="latency of a network: the median of its rounds, or the fastest (on a machine "
        "busy with other work, where preempted calls inflate the median; default: %(default)s)",
    )
    p.add_argument(
        "--image-size",
        type=image_size_type,
        default=32,
        help="input height and width (default: %(default)s)",
    )
    _add_trust_arg(p)
    p.add_argument("--device", default="cpu", help="device of the torch runtime (default: cpu)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")

    p = sub.add_parser(
        "info",
        help="describe a checkpoint",
        description="Architecture, parameters, MACs and sparsity of a checkpoint.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--sparsity-threshold", type=threshold_type, default=DEFAULTS.sparsity_threshold)
    _add_trust_arg(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")

    _add_lab_parsers(sub)
    return parser


def _load_data(args: argparse.Namespace) -> Dataset:
    from netslim import distributed
    from netslim.data import load_dataset
    from netslim.imagefolder import open_imagefolder
    from netslim.train import pick_device

    device = pick_device(distributed.local_device(args.device))
    if args.dataset == "imagefolder":
        return open_imagefolder(args.data_root, image_size=args.image_size, resize=args.resize,
                                loader=getattr(args, "loader", "memory"), device=device,
                                train_size=args.train_size, test_size=args.test_size,
                                workers=getattr(args, "workers", None))  # fmt: skip
    with distributed.main_first():  # one process downloads, the others then read
        data = load_dataset(args.dataset, args.data_root, seed=args.seed, download=args.download,
                            train_size=args.train_size, test_size=args.test_size)  # fmt: skip
    return data.to(device)


def _train_config(args: argparse.Namespace, arch: str) -> TrainConfig:
    """The run's TrainConfig: the --recipe's settings, with every flag given in their place."""
    from netslim import control

    recipe = resolve(args.recipe, vars(args))
    auto = args.lam == "auto"
    return TrainConfig(
        arch=arch, dataset=args.dataset, data_root=args.data_root,
        lam=control.LAM_START if auto else args.lam, lam_auto=auto,
        target_ratio=getattr(args, "target_ratio", None), seed=args.seed,
        sparsity_threshold=args.sparsity_threshold, precision=args.precision,
        device=args.device, train_size=args.train_size, test_size=args.test_size,
        compile=args.compile, image_size=args.image_size, resize=args.resize,
        sync_bn=args.sync_bn, recipe=args.recipe, **recipe,
        prune_when_stable=getattr(args, "prune_when_stable", None),
        stable_tol=getattr(args, "stable_tol", DEFAULTS.stable_tol),
        stable_epochs=getattr(args, "stable_epochs", DEFAULTS.stable_epochs),
    )  # fmt: skip


def _new_run(args: argparse.Namespace) -> tuple[TrainConfig, Dataset, nn.Module]:
    """The recipe, the data and a freshly initialised ``--arch`` (seeded by ``--seed``)."""
    import torch

    from netslim.imagefolder import check_image_size
    from netslim.models import build_model, check_arch

    config = _train_config(args, args.arch)
    config.check()
    check_arch(args.arch, load=True)  # a missing package fails before the data loads
    data = _load_data(args)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, num_classes=data.num_classes)
    check_image_size(model, data.image_size)
    return config, data, model


def _meta(arch: str, model: nn.Module, image_size: int, **extra) -> dict:
    """The metadata every checkpoint keeps: how to rebuild the network, and its input size."""
    from netslim.models import num_outputs

    return {"arch": arch, "num_classes": num_outputs(model), "image_size": image_size, **extra}


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def cmd_train(args: argparse.Namespace) -> None:
    from netslim import distributed
    from netslim.train import check_run_folder, fit, run_files

    check_run_folder(args.out)
    config, data, model = _new_run(args)
    if config.prune_when_stable is not None:
        from netslim.early import train_prune_finetune

        if args.recalibrate < 0:
            raise NetslimError(f"--recalibrate must be >= 0 batches, got {args.recalibrate}")
        train_prune_finetune(config, data, model, args.out,
                             finetune_epochs=_or(args.finetune_epochs, config.epochs),
                             recalibrate=args.recalibrate, meta=_meta(args.arch, model, data.image_size),
                             resume=args.resume)  # fmt: skip
        if distributed.is_main():
            print(f"done: sparsity training in {args.out}/, the pruned network in "
                  f"{args.out}/pruned.pth, fine-tuned in {args.out}/finetune/")  # fmt: skip
        return
    meta = _meta(args.arch, model, data.image_size, kind="train")
    fit(config, data, model, args.out, meta=meta, resume=args.resume)
    if distributed.is_main():
        print(f"done: {run_files(args.out)}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from netslim import distributed
    from netslim.checkpoint import arch_name, image_size_of, model_from_checkpoint, read_checkpoint
    from netslim.imagefolder import check_image_size
    from netslim.train import check_run_folder, fit, run_files

    check_run_folder(args.out)
    ckpt = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.checkpoint, trust=args.trust_module)
    arch = arch_name(ckpt, model)
    args.image_size = args.image_size or image_size_of(ckpt, args.checkpoint)
    config = _train_config(args, arch)
    config.check()
    data = _load_data(args)
    meta = _meta(arch, model, data.image_size, kind="finetune", source=str(args.checkpoint))
    if "prune" in (ckpt.get("netslim") or {}):
        meta["prune"] = ckpt["netslim"]["prune"]
    check_image_size(model, data.image_size)
    fit(config, data, model, args.out, meta=meta, resume=args.resume)
    if distributed.is_main():
        print(f"done: fine-tuned {run_files(args.out)}")


def cmd_prune(args: argparse.Namespace) -> None:
    from netslim.checkpoint import (
        arch_name,
        image_size_of,
        model_from_checkpoint,
        read_checkpoint,
        save_checkpoint,
    )
    from netslim.imagefolder import check_image_size
    from netslim.pruning import check_ratio
    from netslim.slim import check_prune_output, prune_model, pruned_checkpoint
    from netslim.train import pick_precision

    ratio = check_ratio(args.ratio) if args.ratio is not None else None
    if args.recalibrate < 0:
        raise NetslimError(f"--recalibrate must be >= 0 batches, got {args.recalibrate}")
    check_prune_output(args.checkpoint, args.out, args.force)
    ckpt = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.checkpoint, trust=args.trust_module)
    args.image_size = args.image_size or image_size_of(ckpt, args.checkpoint)
    data = None
    if args.dataset is not None:
        data = _load_data(args)
        args.image_size = data.image_size
        check_image_size(model, args.image_size)
    elif args.train_size or args.test_size:
        raise NetslimError("--train-size/--test-size need --dataset")
    dtype = pick_precision("auto", data.train_images.device) if data is not None else None
    size = (1, 3, args.image_size, args.image_size)
    pruned, report = prune_model(model, ratio, target_macs=args.target_macs,
                                 compensate=args.compensate, min_keep=args.min_keep,
                                 round_to=args.round_to, data=data,
                                 recalibrate=args.recalibrate, eval_dtype=dtype,
                                 input_size=size)  # fmt: skip
    meta = _meta(arch_name(ckpt, model), model, args.image_size, source=str(args.checkpoint))
    save_checkpoint(pruned_checkpoint(pruned, report, meta), args.out)
    print(report.text())
    print(f"saved the pruned network ({report.saved}) to {args.out}")


def cmd_multipass(args: argparse.Namespace) -> None:
    from netslim.multipass import run_multipass
    from netslim.train import check_run_folder

    check_run_folder(args.out)
    config, data, model = _new_run(args)
    run_multipass(config, data, model, args.out, passes=args.passes, ratio=args.ratio,
                  layer_cap=args.layer_cap, finetune_epochs=_or(args.finetune_epochs, config.epochs),
                  recalibrate=args.recalibrate)  # fmt: skip
    print(f"done: summary in {args.out}/summary.json")


def cmd_info(args: argparse.Namespace) -> None:
    from torch import nn

    from netslim.checkpoint import arch_name, image_size_of, model_from_checkpoint, read_checkpoint
    from netslim.models import VGG, num_outputs
    from netslim.models.gather import ChannelGather
    from netslim.sparsity import bn_sparsity, gamma_quantiles
    from netslim.stats import count_macs, count_params

    ckpt = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.checkpoint, trust=args.trust_module)
    meta = ckpt.get("netslim") or {}
    size = image_size_of(ckpt, args.checkpoint)
    info = {
        "arch": arch_name(ckpt, model),
        "kind": meta.get("kind", "pruned" if "epoch" not in ckpt else "train"),
        "cfg": model.cfg if isinstance(model, VGG) else None,
        "conv_channels": [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)],
        "num_classes": num_outputs(model),
        "params": count_params(model),
        "macs": count_macs(model, (1, 3, size, size)),
        "image_size": size,
        "sparsity": bn_sparsity(model, args.sparsity_threshold),
        "sparsity_threshold": args.sparsity_threshold,
        "gamma_quantiles": gamma_quantiles(model),
        "channel_selections": sum(isinstance(m, ChannelGather) for m in model.modules()),
    }
    if "epoch" in ckpt:
        info["epoch"] = ckpt["epoch"]
    if "best_prec1" in ckpt:
        info["best_test_acc"] = 100.0 * float(ckpt["best_prec1"])
    if "prune" in meta:
        info["prune"] = {k: meta["prune"][k] for k in ("ratio", "pruned_share", "acc_unpruned",
                         "acc_masked", "acc_compensated", "acc_recalibrated") if k in meta["prune"]}  # fmt: skip
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{args.checkpoint}: {info['arch']} ({info['kind']}), {info['num_classes']} classes")
    if info["cfg"] is not None:
        print(f"cfg      {info['cfg']}")
    else:
        channels = info["conv_channels"]
        print(f"convs    {len(channels)} layers, {sum(channels):,} output channels in all")
    if info["channel_selections"]:
        print(f"select   {info['channel_selections']} channel selections (the paper's layout)")
    print(f"params   {info['params']:,}")
    print(f"MACs     {info['macs']:,} per {size}x{size} image")
    print(f"sparsity {100 * info['sparsity']:.1f}% of BN gammas below {args.sparsity_threshold}")
    q = info["gamma_quantiles"]
    if q:
        print("|gamma|  " + "  ".join(f"{k} {v:.3g}" for k, v in q.items()))
    if "epoch" in info:
        print(f"epoch    {info['epoch']}, best test accuracy {info.get('best_test_acc', 0):.2f}%")
    prune = info.get("prune")
    if prune:
        print(
            f"pruned   ratio {prune['ratio']}, {100 * prune['pruned_share']:.1f}% of channels removed"
        )
        steps = [("unpruned", "acc_unpruned"), ("official masking", "acc_masked"),
                 ("bias compensation", "acc_compensated"), ("BN recalibrated", "acc_recalibrated")]  # fmt: skip
        measured = [
            f"{name} {prune[key]:.2f}%" for name, key in steps if prune.get(key) is not None
        ]
        if measured:
            print("test acc right after pruning: " + ", ".join(measured))


def cmd_export(args: argparse.Namespace) -> None:
    from netslim.checkpoint import image_size_of, model_from_checkpoint, read_checkpoint
    from netslim.export import DEFAULT_OPSET, export

    ckpt = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.checkpoint, trust=args.trust_module)
    size = args.image_size or image_size_of(ckpt, args.checkpoint)
    result = export(model, args.out, args.format, fold=args.fold,
                    opset=args.opset or DEFAULT_OPSET, image_size=size)  # fmt: skip
    opset = f", opset {result.opset}" if result.opset is not None else ""
    folded = "BatchNorm folded" if result.folded else "BatchNorm kept"
    print(
        f"wrote {result.path} ({result.format}{opset}, {folded}); checked against PyTorch on "
        f"batches of 1 and 7: max relative difference {result.max_rel_diff:.2g}"
    )


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise NetslimError(
            f"{flag} takes comma-separated whole numbers, e.g. 1,64; got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise NetslimError(f"{flag} takes numbers >= 1, e.g. 1,64; got {text!r}")
    return values


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from netslim.benchmark import benchmark, format_table
    from netslim.checkpoint import load
    from netslim.train import pick_device

    batches = _int_list(args.batch, "--batch")
    for batch in batches:
        check_batch_memory(batch, args.image_size, "--batch")
    runtimes = tuple(r.strip() for r in args.runtime.split(",") if r.strip())
    stems = [Path(p).stem for p in args.checkpoints]  # short names, unless two files share one
    labels = (
        stems
        if len(set(stems)) == len(stems)
        else [f"{i}: {p}" for i, p in enumerate(args.checkpoints)]
    )
    models = {
        label: load(path, trust=args.trust_module) for label, path in zip(labels, args.checkpoints)
    }
    timings = benchmark(models, batches, runtimes, repeats=args.repeats,
                        image_size=args.image_size, device=pick_device(args.device),
                        stat=args.stat)  # fmt: skip
    if args.json:
        print(json.dumps([t.to_dict() for t in timings], indent=2))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.stat} of "
          f"{args.repeats} interleaved rounds; fp32, BatchNorm folded")  # fmt: skip
    print(format_table(timings))


def _add_lab_args(p: argparse.ArgumentParser, preset: LabConfig) -> None:
    """The lab's flags, with ``preset``'s values as defaults (the lab's own or the demo's)."""
    p.add_argument("--arch", type=arch_type, help=ARCH_HELP)
    _add_data_args(p, default=preset.dataset)
    p.add_argument(
        "--lams",
        type=float,
        nargs="+",
        metavar="λ",
        help="L1 weights on BN gammas, one sparsity training each (default: %(default)s)",
    )
    p.add_argument(
        "--prune-lam",
        type=float,
        metavar="λ",
        help="which of --lams to prune and fine-tune (default: %(default)s)",
    )
    p.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        metavar="R",
        help="prune ratios to prune at and fine-tune (default: %(default)s)",
    )
    p.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        metavar="R",
        help="extra ratios, pruned but not fine-tuned, for the accuracy-vs-ratio "
        "figure (default: %(default)s)",
    )
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        help="training settings of every stage, 'paper' or 'fast' (see netslim train "
        "--help; default: %(default)s)",
    )
    p.add_argument(
        "--epochs", type=int, help="sparsity-training epochs; " + _lab_default(preset, "epochs")
    )
    p.add_argument(
        "--finetune-epochs",
        type=int,
        help="fine-tuning epochs; " + _lab_default(preset, "finetune_epochs"),
    )
    p.add_argument("--batch-size", type=int, help=_lab_default(preset, "batch_size"))
    p.add_argument("--lr", type=float, help="peak learning rate; " + _lab_default(preset, "lr"))
    _add_early_args(p, lab=True)
    p.add_argument(
        "--target-ratio",
        type=float,
        metavar="R",
        help="λ auto for the --prune-lam run: start at --prune-lam and adapt λ each epoch "
        "so that the share R of |gamma| ends below the sparsity threshold",
    )
    p.add_argument(
        "--recalibrate",
        type=int,
        metavar="N",
        help="re-estimate BN statistics after pruning on N batches of 128 training "
        "images (0: off; default: %(default)s)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="auto: bf16 where fast and safe (CUDA, CPUs with AVX512-BF16), else fp32",
    )
    p.add_argument(
        "--out",
        help="run folder (default: %(default)s); running the same command "
        "again continues an interrupted lab there",
    )
    _add_threads_arg(p)
    # The recipe's settings stay None here: cmd_lab resolves them (see _lab_config).
    p.set_defaults(**{**asdict(preset), **dict.fromkeys(LAB_RECIPE_KEYS)}, preset=preset)


LAB_RECIPE_KEYS = ("epochs", "finetune_epochs", "batch_size", "lr")


def _lab_default(preset: LabConfig, key: str) -> str:
    if getattr(preset, key) != getattr(LabConfig(), key):  # the demo's own choice
        return f"default: {getattr(preset, key)}"
    return _recipe_default("epochs" if key == "finetune_epochs" else key)


def _lab_config(args: argparse.Namespace) -> LabConfig:
    """The lab's settings: a flag given wins, then the preset's own choice (the demo's
    epochs), then the --recipe's value."""
    names = {f.name for f in fields(LabConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    recipe = resolve(args.recipe, {})
    for key in LAB_RECIPE_KEYS:
        if values[key] is None:
            own = getattr(args.preset, key)
            chosen = own != getattr(LabConfig(), key)
            values[key] = own if chosen else recipe["epochs" if key == "finetune_epochs" else key]
    return LabConfig(**values)


def _add_lab_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lab",
        help="the whole experiment: sparsity training, pruning, fine-tuning, report",
        description="Sparsity-train at each --lams, prune the --prune-lam model at each --ratios "
        "(three ways), fine-tune, and write report.md and report.html with figures into --out. "
        "Resumable: run the same command again to continue.",
    )
    _add_lab_args(p, LabConfig())
    p.set_defaults(out="runs/lab")
    p = sub.add_parser(
        "demo",
        help="the lab on built-in synthetic data, a few minutes on a CPU",
        description="netslim lab with a small preset: vgg11-small on synthetic data, "
        "6 + 3 epochs, λ 0, 1e-3 and 5e-3, pruning the 5e-3 model. "
        "Any lab flag overrides the preset.",
    )
    _add_lab_args(p, DEMO)
    p.set_defaults(out="runs/demo")
    p = sub.add_parser(
        "report",
        help="re-render the report of a lab run folder",
        description="Write report.md, report.html and figures/ from a finished lab's logged "
        "metrics and checkpoints, without training.",
    )
    p.add_argument("run_dir", help="run folder of netslim lab or netslim demo")


def cmd_lab(args: argparse.Namespace) -> None:
    from netslim import distributed
    from netslim.lab import run_lab

    config = _lab_config(args)
    report = run_lab(config, args.out, download=args.download)
    if distributed.is_main():
        print(f"done: report in {report} (self-contained) and {report.with_suffix('.md')}")


def cmd_report(args: argparse.Namespace) -> None:
    from netslim.report import render_report  # imports matplotlib, which other commands skip

    report = render_report(args.run_dir)
    print(f"wrote {report} and {report.with_suffix('.md')}")


COMMANDS = {"train": cmd_train, "prune": cmd_prune, "finetune": cmd_finetune, "info": cmd_info,
            "multipass": cmd_multipass, "export": cmd_export, "bench": cmd_bench,
            "lab": cmd_lab, "demo": cmd_lab, "report": cmd_report}  # fmt: skip


def check_torchrun_command(command: str) -> None:
    """Under torchrun only training makes sense; refuse the other commands clearly."""
    from netslim import distributed

    if distributed.launched_by_torchrun() and command not in ("train", "finetune", "lab", "demo"):
        raise NetslimError(
            f"netslim {command} does not run under torchrun (only train, finetune, lab and "
            f"demo are distributed); run it as a single process: netslim {command} ..."
        )


def _silence_stdout() -> None:
    """Send what is left to print to /dev/null, so that exiting does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # stdout is not a real file (e.g. captured by a test)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"netslim: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and --version exit here, before torch
    from netslim import distributed
    from netslim.threads import set_threads, stop_tuning

    warnings.showwarning = _show_warning
    try:
        check_torchrun_command(args.command)
        if hasattr(args, "threads"):
            set_threads(args.threads)
        with distributed.session(getattr(args, "device", "auto")):
            COMMANDS[args.command](args)
    except BrokenPipeError:  # e.g. `netslim train ... | head -1`: the reader has gone
        _silence_stdout()
        return 141  # what a shell reports for a command ended by SIGPIPE
    except NetslimError as e:
        where = (
            f" (rank {distributed.rank_from_env()})" if distributed.launched_by_torchrun() else ""
        )
        print(f"netslim: error{where}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        again = (
            "the same command"
            if args.command in ("lab", "demo")
            else "the same command plus --resume"
        )
        hint = f"; continue with {again} (run folder {out})" if out else ""
        print(f"netslim: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        stop_tuning()  # the tuner served this command's training, not code run after it
    return 0


if __name__ == "__main__":
    sys.exit(main())
