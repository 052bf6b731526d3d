"""The ``netslim`` command: train, prune, finetune, multipass, info, lab, demo, report.

Every subcommand is a thin layer over the library; bad input ends with one line
``netslim: error: ...`` and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, fields

import torch
from torch import nn

from netslim import control, distributed
from netslim.checkpoint import arch_name, model_from_checkpoint, read_checkpoint, save_checkpoint
from netslim.data import DATASETS, Dataset, load_dataset
from netslim.errors import NetslimError
from netslim.imagefolder import LOADERS, RESIZE_POLICIES, check_image_size, open_imagefolder
from netslim.lab import DEMO, LabConfig, run_lab
from netslim.models import ARCHS, VGG, build_model, num_outputs
from netslim.multipass import run_multipass
from netslim.pruning import check_ratio
from netslim.recipes import RECIPES, SCHEDULES, resolve
from netslim.slim import prune_model, pruned_checkpoint
from netslim.sparsity import bn_sparsity, gamma_quantiles
from netslim.stats import count_macs, count_params
from netslim.train import PRECISIONS, TrainConfig, fit, pick_device, pick_precision

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
        type=float,
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


def _add_scale_args(p: argparse.ArgumentParser, train: bool = True) -> None:
    """Flags for your own images (``--dataset imagefolder``) and, with ``train``, for
    training: how to feed the images, and torchrun's ``--sync-bn``."""
    p.add_argument(
        "--image-size",
        type=int,
        default=DEFAULTS.image_size,
        help="imagefolder: images are resized to this square size (default: %(default)s)",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netslim",
        description="Network slimming: sparsity training, channel pruning and fine-tuning of CNNs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="(sparsity) training from scratch",
        description="Train a network with an L1 penalty on its BatchNorm gammas.",
    )
    p.add_argument("--arch", default=DEFAULTS.arch, choices=ARCHS, help="default: %(default)s")
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
        "--no-compensate",
        dest="compensate",
        action="store_false",
        help="do not fold pruned channels' constant output into the next layer "
        "(gives exactly the official code's network)",
    )
    p.add_argument(
        "--min-keep",
        type=float,
        default=0.01,
        help="per-layer floor: share of each layer's channels always kept, at least one "
        "(default: %(default)s)",
    )
    _add_data_args(p, default=None)
    p.add_argument(
        "--recalibrate",
        type=int,
        default=16,
        metavar="N",
        help="with --dataset: re-estimate BN statistics on N batches of 128 training images (0: off; default: %(default)s)",
    )
    _add_scale_args(p, train=False)

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
    _add_scale_args(p)

    p = sub.add_parser(
        "multipass",
        help="several rounds of sparsity training and pruning, then fine-tuning",
        description="The paper's multi-pass scheme: sparsity-train, prune --ratio with at most "
        "--layer-cap of any layer removed, repeat --passes times, then fine-tune. Run the same "
        "command again to continue an interrupted run.",
    )
    p.add_argument("--arch", default=DEFAULTS.arch, choices=ARCHS, help="default: %(default)s")
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
        "info",
        help="describe a checkpoint",
        description="Architecture, parameters, MACs and sparsity of a checkpoint.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--sparsity-threshold", type=float, default=DEFAULTS.sparsity_threshold)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    _add_lab_parsers(sub)
    return parser


def _load_data(args: argparse.Namespace) -> Dataset:
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
    config = _train_config(args, args.arch)
    config.check()
    data = _load_data(args)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, num_classes=data.num_classes)
    if args.dataset == "imagefolder":
        check_image_size(model, args.image_size)
    return config, data, model


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def cmd_train(args: argparse.Namespace) -> None:
    config, data, model = _new_run(args)
    if config.prune_when_stable is not None:
        from netslim.early import train_prune_finetune

        if args.recalibrate < 0:
            raise NetslimError(f"--recalibrate must be >= 0 batches, got {args.recalibrate}")
        train_prune_finetune(config, data, model, args.out,
                             finetune_epochs=_or(args.finetune_epochs, config.epochs),
                             recalibrate=args.recalibrate, meta={"arch": args.arch},
                             resume=args.resume)  # fmt: skip
        if distributed.is_main():
            print(f"done: sparsity training in {args.out}/, the pruned network in "
                  f"{args.out}/pruned.pth, fine-tuned in {args.out}/finetune/")  # fmt: skip
        return
    fit(
        config, data, model, args.out, meta={"arch": args.arch, "kind": "train"}, resume=args.resume
    )
    if distributed.is_main():
        print(
            f"done: checkpoints in {args.out}/ (last.pth, best.pth), metrics in {args.out}/metrics.jsonl"
        )


def cmd_finetune(args: argparse.Namespace) -> None:
    ckpt = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.checkpoint)
    arch = arch_name(ckpt, model)
    config = _train_config(args, arch)
    config.check()
    data = _load_data(args)
    meta = {"arch": arch, "kind": "finetune", "source": str(args.checkpoint)}
    if "prune" in (ckpt.get("netslim") or {}):
        meta["prune"] = ckpt["netslim"]["prune"]
    if args.dataset == "imagefolder":
        check_image_size(model, args.image_size)
    fit(config, data, model, args.out, meta=meta, resume=args.resume)
    if distributed.is_main():
        print(f"done: fine-tuned checkpoints in {args.out}/ (last.pth, best.pth)")


def cmd_prune(args: argparse.Namespace) -> None:
    ratio = check_ratio(args.ratio) if args.ratio is not None else None
    if args.recalibrate < 0:
        raise NetslimError(f"--recalibrate must be >= 0 batches, got {args.recalibrate}")
    ckpt = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.checkpoint)
    data = None
    if args.dataset is not None:
        data = _load_data(args)
        if args.dataset == "imagefolder":
            check_image_size(model, args.image_size)
    elif args.train_size or args.test_size:
        raise NetslimError("--train-size/--test-size need --dataset")
    dtype = pick_precision("auto", data.train_images.device) if data is not None else None
    pruned, report = prune_model(model, ratio, target_macs=args.target_macs,
                                 compensate=args.compensate, min_keep=args.min_keep, data=data,
                                 recalibrate=args.recalibrate, eval_dtype=dtype)  # fmt: skip
    meta = {"arch": arch_name(ckpt, model), "num_classes": num_outputs(model),
            "source": str(args.checkpoint)}  # fmt: skip
    save_checkpoint(pruned_checkpoint(pruned, report, meta), args.out)
    print(report.text())
    print(f"saved the pruned network to {args.out}")


def cmd_multipass(args: argparse.Namespace) -> None:
    config, data, model = _new_run(args)
    run_multipass(config, data, model, args.out, passes=args.passes, ratio=args.ratio,
                  layer_cap=args.layer_cap, finetune_epochs=_or(args.finetune_epochs, config.epochs),
                  recalibrate=args.recalibrate)  # fmt: skip
    print(f"done: summary in {args.out}/summary.json")


def cmd_info(args: argparse.Namespace) -> None:
    ckpt = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.checkpoint)
    meta = ckpt.get("netslim") or {}
    info = {
        "arch": arch_name(ckpt, model),
        "kind": meta.get("kind", "pruned" if "epoch" not in ckpt else "train"),
        "cfg": model.cfg if isinstance(model, VGG) else None,
        "conv_channels": [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)],
        "num_classes": num_outputs(model),
        "params": count_params(model),
        "macs": count_macs(model),
        "sparsity": bn_sparsity(model, args.sparsity_threshold),
        "sparsity_threshold": args.sparsity_threshold,
        "gamma_quantiles": gamma_quantiles(model),
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
    print(f"params   {info['params']:,}")
    print(f"MACs     {info['macs']:,} per 32x32 image")
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


def _add_lab_args(p: argparse.ArgumentParser, preset: LabConfig) -> None:
    """The lab's flags, with ``preset``'s values as defaults (the lab's own or the demo's)."""
    p.add_argument("--arch", choices=ARCHS, help="default: %(default)s")
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
        description="netslim lab with a small preset: vgg11-small on synthetic data. "
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
    config = _lab_config(args)
    report = run_lab(config, args.out, download=args.download)
    if distributed.is_main():
        print(f"done: report in {report} (self-contained) and {report.with_suffix('.md')}")


def cmd_report(args: argparse.Namespace) -> None:
    from netslim.report import render_report  # imports matplotlib, which other commands skip

    report = render_report(args.run_dir)
    print(f"wrote {report} and {report.with_suffix('.md')}")


COMMANDS = {"train": cmd_train, "prune": cmd_prune, "finetune": cmd_finetune, "info": cmd_info,
            "multipass": cmd_multipass,
            "lab": cmd_lab, "demo": cmd_lab, "report": cmd_report}  # fmt: skip


def check_torchrun_command(command: str) -> None:
    """Under torchrun only training makes sense; refuse the other commands clearly."""
    if distributed.launched_by_torchrun() and command not in ("train", "finetune", "lab", "demo"):
        raise NetslimError(
            f"netslim {command} does not run under torchrun (only train, finetune, lab and "
            f"demo are distributed); run it as a single process: netslim {command} ..."
        )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"netslim: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        check_torchrun_command(args.command)
        with distributed.session(getattr(args, "device", "auto")):
            COMMANDS[args.command](args)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
