"""The ``netslim`` commands: each a thin layer over the library, run on what
:mod:`netslim.cli.parser` parsed; bad input ends with one line ``netslim: error: ...`` and
exit status 2, never a stack trace.

Each command imports torch and the modules that do the work when it runs, so that
``netslim --help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shlex
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netslim.cli.parser import DEFAULTS, LAB_RECIPE_KEYS, parse
from netslim.config import LAM_START, LabConfig, TrainConfig
from netslim.errors import NetslimError
from netslim.limits import check_batch_memory
from netslim.recipes import resolve

if TYPE_CHECKING:
    from torch import nn

    from netslim.data.batches import ImageData


def _load_data(args: argparse.Namespace) -> ImageData:
    """The data set the command's flags name, on the device they name."""
    from netslim.data import open_dataset
    from netslim.runtime import distributed
    from netslim.runtime.device import pick_device

    return open_dataset(
        args.dataset,
        args.data_root,
        device=pick_device(distributed.local_device(args.device)),
        seed=args.seed,
        download=args.download,
        train_size=args.train_size,
        test_size=args.test_size,
        image_size=args.image_size,
        resize=args.resize,
        loader=getattr(args, "loader", "memory"),
        workers=getattr(args, "workers", None),
    )


def _train_config(args: argparse.Namespace, arch: str) -> TrainConfig:
    """The run's TrainConfig: the --recipe's settings, with every flag given in their place."""
    recipe = resolve(args.recipe, vars(args))
    auto = args.lam == "auto"
    return TrainConfig(
        arch=arch,
        dataset=args.dataset,
        data_root=args.data_root,
        lam=LAM_START if auto else args.lam,
        lam_auto=auto,
        target_ratio=getattr(args, "target_ratio", None),
        seed=args.seed,
        sparsity_threshold=args.sparsity_threshold,
        precision=args.precision,
        device=args.device,
        train_size=args.train_size,
        test_size=args.test_size,
        compile=args.compile,
        image_size=args.image_size,
        resize=args.resize,
        sync_bn=args.sync_bn,
        recipe=args.recipe,
        **recipe,
        prune_when_stable=getattr(args, "prune_when_stable", None),
        stable_tol=getattr(args, "stable_tol", DEFAULTS.stable_tol),
        stable_epochs=getattr(args, "stable_epochs", DEFAULTS.stable_epochs),
        distill_weight=getattr(args, "distill_weight", DEFAULTS.distill_weight),
        distill_temperature=getattr(args, "distill_temperature", DEFAULTS.distill_temperature),
    )


YOLO_STEP = {"multipass": "train", "demo": "lab"}  # the YOLO step nearest a classifier command


def _classifier_only(arch: str, what: str, command: str) -> None:
    """Refuse a YOLO where a command trains or measures a classifier (its loss and accuracy
    would fail deep inside torch)."""
    if str(arch).startswith("ultralytics:"):
        raise NetslimError(
            f"{what} is an Ultralytics YOLO ({arch}); netslim {command} trains and measures "
            f"classifiers: use netslim yolo {YOLO_STEP.get(command, command)} (Ultralytics' "
            "trainer and validator)"
        )


def _new_run(args: argparse.Namespace) -> tuple[TrainConfig, ImageData, nn.Module]:
    """The recipe, the data and a freshly initialised ``--arch`` (seeded by ``--seed``)."""
    import torch

    from netslim.data.imagefolder import check_image_size
    from netslim.models import build_model, check_arch

    _classifier_only(args.arch, f"--arch {args.arch}", args.command)
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
    from netslim.runtime import distributed
    from netslim.train.loop import fit
    from netslim.train.runfolder import check_run_folder, run_files

    check_run_folder(args.out)
    config, data, model = _new_run(args)
    if config.prune_when_stable is not None:
        from netslim.lab.early import train_prune_finetune

        if args.recalibrate < 0:
            raise NetslimError(f"--recalibrate must be >= 0 batches, got {args.recalibrate}")
        train_prune_finetune(
            config,
            data,
            model,
            args.out,
            finetune_epochs=_or(args.finetune_epochs, config.epochs),
            recalibrate=args.recalibrate,
            meta=_meta(args.arch, model, data.image_size),
            resume=args.resume,
            distill=args.distill,
        )
        if distributed.is_main():
            print(
                f"done: sparsity training in {args.out}/, the pruned network in "
                f"{args.out}/pruned.pth, fine-tuned in {args.out}/finetune/"
            )
        return
    meta = _meta(args.arch, model, data.image_size, kind="train")
    fit(config, data, model, args.out, meta=meta, resume=args.resume)
    if distributed.is_main():
        print(f"done: {run_files(args.out)}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from netslim.checkpoint import arch_name, image_size_of, model_from_checkpoint, read_checkpoint
    from netslim.data.imagefolder import check_image_size
    from netslim.runtime import distributed
    from netslim.train.distill import teacher_path
    from netslim.train.loop import fit
    from netslim.train.runfolder import check_run_folder, run_files

    check_run_folder(args.out)
    ckpt = read_checkpoint(args.checkpoint)
    _classifier_only((ckpt.get("netslim") or {}).get("arch", ""), args.checkpoint, "finetune")
    model = model_from_checkpoint(ckpt, args.checkpoint, trust=args.trust_module)
    arch = arch_name(ckpt, model)
    args.image_size = args.image_size or image_size_of(ckpt, args.checkpoint)
    config = _train_config(args, arch)
    config.check()
    info = ckpt.get("netslim") or {}
    config.teacher = teacher_path(info, args.teacher, args.distill, args.checkpoint)
    if config.teacher is None and args.distill and not args.resume:
        print(
            f"no teacher: {args.checkpoint} names no unpruned network; fine-tuning from the "
            "labels alone (--teacher PATH distils from one)"
        )
    data = _load_data(args)
    meta = _meta(arch, model, data.image_size, kind="finetune", source=str(args.checkpoint))
    if "prune" in (ckpt.get("netslim") or {}):
        meta["prune"] = ckpt["netslim"]["prune"]
    check_image_size(model, data.image_size)
    fit(config, data, model, args.out, meta=meta, resume=args.resume)
    if distributed.is_main():
        print(f"done: fine-tuned {run_files(args.out)}")


def _checkpoint_to_prune(args: argparse.Namespace, command: str):
    """``(checkpoint, model, data or None)`` of ``netslim prune`` and ``speed-curve``;
    sets ``args.image_size``."""
    from netslim.checkpoint import image_size_of, model_from_checkpoint, read_checkpoint
    from netslim.data.imagefolder import check_image_size

    if args.recalibrate < 0:
        raise NetslimError(f"--recalibrate must be >= 0 batches, got {args.recalibrate}")
    ckpt = read_checkpoint(args.checkpoint)
    if args.dataset is not None:  # without data, pruning is weight surgery: any network
        _classifier_only((ckpt.get("netslim") or {}).get("arch", ""), args.checkpoint, command)
    model = model_from_checkpoint(ckpt, args.checkpoint, trust=args.trust_module)
    args.image_size = args.image_size or image_size_of(ckpt, args.checkpoint)
    data = None
    if args.dataset is not None:
        data = _load_data(args)
        args.image_size = data.image_size
        check_image_size(model, args.image_size)
    elif args.train_size or args.test_size:
        raise NetslimError("--train-size/--test-size need --dataset")
    return ckpt, model, data


def _prune_warnings(model: nn.Module, report, data) -> None:
    """Say when a prune's result means little (:mod:`netslim.lab.health`): a threshold among
    tied γs, an unpruned network at chance."""
    from netslim.engine.sparsity import bn_gammas
    from netslim.lab import health

    accuracy = (report.measured.get("unpruned") or {}).get("accuracy")
    health.warn(
        health.found(
            [
                health.tied(
                    report.tie_break, bn_gammas(model).numel(), report.threshold, report.ratio
                ),
                health.near_chance(accuracy, data.num_classes) if accuracy is not None else None,
            ]
        )
    )


def cmd_prune(args: argparse.Namespace) -> None:
    from netslim.checkpoint import arch_name, save_checkpoint
    from netslim.config import check_ratio
    from netslim.runtime.device import pick_precision
    from netslim.slim import check_prune_output, prune_model, pruned_checkpoint

    ratio = check_ratio(args.ratio) if args.ratio is not None else None
    budget = latency_budget(args)
    check_prune_output(args.checkpoint, args.out, args.force)
    ckpt, model, data = _checkpoint_to_prune(args, "prune")
    dtype = pick_precision("auto", data.device) if data is not None else None
    size = (1, 3, args.image_size, args.image_size)
    pruned, report = prune_model(
        model,
        ratio,
        target_macs=args.target_macs,
        target_latency=budget,
        compensate=args.compensate,
        min_keep=args.min_keep,
        round_to=args.round_to,
        data=data,
        recalibrate=args.recalibrate,
        eval_dtype=dtype,
        input_size=size,
        ignore=args.ignore,
    )
    meta = _meta(
        arch_name(ckpt, model),
        model,
        args.image_size,
        source=str(args.checkpoint),
        teacher=str(Path(args.checkpoint).resolve()),  # fine-tuning distils from it
    )
    save_checkpoint(pruned_checkpoint(pruned, report, meta), args.out)
    _prune_warnings(model, report, data)
    print(report.text())
    print(f"saved the pruned network ({report.saved}) to {args.out}")


def cmd_speed_curve(args: argparse.Namespace) -> None:
    from netslim.runtime.device import pick_precision
    from netslim.slim import format_speed_curve, prune_model, speed_curve

    check = latency_budget(args, budgets=args.budgets)
    _, model, data = _checkpoint_to_prune(args, "speed-curve")
    dtype = pick_precision("auto", data.device) if data is not None else None
    known: dict[str, float] = {}

    def one(budget) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _, report = prune_model(
                model,
                target_latency=budget,
                min_keep=args.min_keep,
                data=data,
                recalibrate=args.recalibrate,
                eval_dtype=dtype,
                acc_unpruned=known.get("accuracy"),
                input_size=(1, 3, args.image_size, args.image_size),
                ignore=args.ignore,
            )
        known.update(report.measured.get("unpruned", {}))
        return report

    rows = speed_curve(one, args.budgets, args.choices, **_budget_fields(check))
    print(json.dumps(rows) if args.json else format_speed_curve(rows))  # one line


def latency_budget(args: argparse.Namespace, device: str = "cpu", budgets: list | None = None):
    """The latency budget the flags ask for (checked: one line when wrong), or None.
    ``budgets``: the shares of a speed curve, each checked (the first stands for all)."""
    from netslim.latency import LatencyBudget

    for share in budgets or []:
        LatencyBudget(share=share).check()
    share = budgets[0] if budgets else getattr(args, "target_latency", None)
    ms = getattr(args, "target_ms", None)
    if share is None and ms is None:
        return None
    return LatencyBudget(
        share=share,
        ms=ms,
        runtime=args.runtime,
        batch=args.batch,
        table=args.latency_table,
        choice=getattr(args, "latency_choice", "threshold"),
        device=device if args.runtime == "torch" else "cpu",
        progress=lambda line: print(f"netslim: {line}", file=sys.stderr, flush=True),
    ).check()


def _budget_fields(budget) -> dict[str, Any]:
    """What a speed curve's budgets share: all but the share and the choice."""
    fields = dataclasses.asdict(budget) | {"progress": budget.progress}
    return {k: v for k, v in fields.items() if k not in ("share", "ms", "choice")}


def cmd_multipass(args: argparse.Namespace) -> None:
    from netslim.lab.multipass import run_multipass
    from netslim.train.runfolder import check_run_folder

    check_run_folder(args.out)
    config, data, model = _new_run(args)
    run_multipass(
        config,
        data,
        model,
        args.out,
        passes=args.passes,
        ratio=args.ratio,
        layer_cap=args.layer_cap,
        finetune_epochs=_or(args.finetune_epochs, config.epochs),
        recalibrate=args.recalibrate,
    )
    print(f"done: summary in {args.out}/summary.json")


def cmd_info(args: argparse.Namespace) -> None:
    from netslim.checkpoint import describe

    info = describe(
        args.checkpoint, sparsity_threshold=args.sparsity_threshold, trust=args.trust_module
    )
    size = info["image_size"]
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
        steps = [
            ("unpruned", "acc_unpruned"),
            ("official masking", "acc_masked"),
            ("bias compensation", "acc_compensated"),
            ("BN recalibrated", "acc_recalibrated"),
        ]
        measured = [
            f"{name} {prune[key]:.2f}%" for name, key in steps if prune.get(key) is not None
        ]
        if measured:
            print("test acc right after pruning: " + ", ".join(measured))
    if info.get("teacher"):
        print(f"teacher  {info['teacher']} (fine-tuning distils from it; --no-distill: not)")


def cmd_export(args: argparse.Namespace) -> None:
    from netslim.checkpoint import image_size_of, model_from_checkpoint, read_checkpoint
    from netslim.export import DEFAULT_OPSET, export

    if str(args.checkpoint).endswith(".pt"):  # an Ultralytics file: its model, read safely
        try:
            from netslim.yolo.export import read_for_export
        except ImportError as e:
            raise NetslimError(
                f"{args.checkpoint} is an Ultralytics checkpoint; reading it needs Ultralytics "
                f"({e}): pip install 'netslim[yolo]'"
            ) from None
        model, size = read_for_export(args.checkpoint)  # the imgsz it records, else None: 640
        size = args.image_size or size
    else:
        ckpt = read_checkpoint(args.checkpoint)
        model = model_from_checkpoint(ckpt, args.checkpoint, trust=args.trust_module)
        size = args.image_size or image_size_of(ckpt, args.checkpoint)
    result = export(
        model,
        args.out,
        args.format,
        fold=args.fold,
        dynamic=args.dynamic,
        opset=args.opset or DEFAULT_OPSET,
        image_size=size,
    )
    opset = f", opset {result.opset}" if result.opset is not None else ""
    folded = "BatchNorm folded" if result.folded else "BatchNorm kept"
    meta = result.metadata
    ultralytics = (
        f", Ultralytics' metadata: task {meta.get('task')}, {len(meta.get('names') or {})} "
        f"classes, stride {meta.get('stride')}"
        if meta
        else ""
    )
    checked = (
        f"checked against PyTorch on {result.checked_on}: max relative difference "
        f"{result.max_rel_diff:.2g}"
        if not result.checked_on.startswith("not checked")
        else result.checked_on
    )
    print(
        f"wrote {result.path} ({result.format}{opset}, {folded}, {result.image_size}x"
        f"{result.image_size} images{ultralytics}); {checked}"
    )
    if meta or result.checked_on.startswith("not checked"):  # written by Ultralytics' exporter
        print(
            f"run it with Ultralytics: yolo predict model={result.path} imgsz={result.image_size}"
            f" (or yolo val model={result.path} data=DATA.yaml imgsz={result.image_size})"
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


def _network_name(path: str | Path) -> str:
    """What the network in ``path`` is, for a column of ``netslim bench``: its architecture
    and how it was made (``vgg19 pruned 0.7 fine-tuned``) where the file records them, else
    its file name."""
    from netslim.checkpoint import read_checkpoint

    stem = Path(path).stem
    if str(path).endswith(".pt"):
        return stem
    try:
        meta = read_checkpoint(path).get("netslim") or {}
    except NetslimError:
        return stem  # loading it says what is wrong
    if not isinstance(meta, dict) or not isinstance(meta.get("arch"), str):
        return stem
    ratio = (meta.get("prune") or {}).get("ratio")
    parts = [meta["arch"].removeprefix("ultralytics:")]
    parts += [f"pruned {ratio:g}"] if isinstance(ratio, (int, float)) else []
    parts += ["fine-tuned"] if meta.get("kind") == "finetune" else []
    return " ".join(parts)


def _network_names(paths: list[str]) -> list[str]:
    """:func:`_network_name` of each file, with the file name added where two are alike."""
    names = [_network_name(p) for p in paths]
    names = [
        f"{n} ({Path(p).stem})" if names.count(n) > 1 and n != Path(p).stem else n
        for n, p in zip(names, paths)
    ]
    if len(set(names)) < len(names):
        names = [f"{i}: {p}" for i, p in enumerate(paths)]
    return names


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from netslim.benchmark import benchmark, format_table
    from netslim.checkpoint import load
    from netslim.runtime.device import pick_device

    batches = _int_list(args.batch, "--batch")
    for batch in batches:
        check_batch_memory(batch, args.image_size, "--batch")
    runtimes = tuple(r.strip() for r in args.runtime.split(",") if r.strip())
    labels = _network_names(args.checkpoints)
    models = {
        label: _ultralytics_model(path)
        if str(path).endswith(".pt")
        else load(path, trust=args.trust_module)
        for label, path in zip(labels, args.checkpoints)
    }
    timings = benchmark(
        models,
        batches,
        runtimes,
        repeats=args.repeats,
        image_size=args.image_size,
        device=pick_device(args.device),
        stat=args.stat,
        progress=lambda line: print(f"netslim: {line}", file=sys.stderr, flush=True),
    )
    if args.json:
        print(json.dumps([t.to_dict() for t in timings], indent=2))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.stat} of "
        f"{args.repeats} interleaved rounds; fp32, BatchNorm folded"
    )
    print(format_table(timings))


def lab_config(args: argparse.Namespace) -> LabConfig:
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


def cmd_lab(args: argparse.Namespace) -> None:
    from netslim.lab.experiment import run_lab
    from netslim.runtime import distributed

    config = lab_config(args)
    _classifier_only(config.arch or "", f"--arch {config.arch}", args.command)
    report = run_lab(config, args.out, download=args.download)
    if distributed.is_main():
        print(f"done: report in {report} (self-contained) and {report.with_suffix('.md')}")


def cmd_report(args: argparse.Namespace) -> None:
    from netslim.lab.report import render_report  # imports matplotlib, which other commands skip

    report = render_report(args.run_dir)
    print(f"wrote {report} and {report.with_suffix('.md')}")


def _ultralytics_model(path: str):
    """The model of an Ultralytics .pt file, read without running its code."""
    try:
        from netslim.yolo.files import read_model
    except ImportError as e:
        raise NetslimError(
            f"{path} is an Ultralytics checkpoint; reading it needs Ultralytics ({e}): "
            "pip install 'netslim[yolo]'"
        ) from None
    return read_model(path)


def _ultralytics_device(device: str) -> str | None:
    """netslim's --device as Ultralytics names devices (None: let it choose); one this
    machine has (netslim.yolo.settings.check_device)."""
    from netslim.yolo.settings import check_device

    return check_device(device)


def _passed_through(settings: list[str], step: str) -> dict:
    """``key=value`` settings, valued as Ultralytics' own command line values them; a key
    that repeats a netslim flag, or that netslim controls, is refused naming the flag."""
    from netslim.yolo.settings import parse_settings

    return parse_settings(settings, step)


def cmd_yolo(args: argparse.Namespace) -> None:
    try:
        from netslim.yolo import files, prune, settings, train
        from netslim.yolo.data import check_data
        from netslim.yolo.run import SPARSITY_LOG
    except ImportError as e:
        raise NetslimError(
            f"netslim yolo needs Ultralytics ({e}); install it with: pip install 'netslim[yolo]'"
        ) from None
    if args.yolo_command == "report":  # reads a lab folder: no device, image size or batch
        from netslim.yolo.report import render_report

        print(f"report: {render_report(args.folder)}")
        return
    device = _ultralytics_device(args.device)
    settings.check_batch(args.batch_size, args.image_size)
    run = {"imgsz": args.image_size, "batch": args.batch_size}
    if device is not None:
        run["device"] = device
    step = args.yolo_command
    if step == "train":
        model = args.model
        if model.endswith((".pt", ".pth")) and not args.resume:  # read without running code
            model = files.read_yolo(model, trust_pickle=args.trust_pickle)
        out = train.train(
            model,
            args.data,
            args.out,
            lam=args.lam,
            epochs=args.epochs,
            resume=args.resume,
            sparsity_threshold=args.sparsity_threshold,
            target_ratio=args.target_ratio,
            prune_when_stable=args.prune_when_stable,
            stable_tol=args.stable_tol,
            stable_epochs=args.stable_epochs,
            **{**run, **_passed_through(args.settings, step)},
        )
        print(
            f"done: {out}/weights/last.pt, best.pt; gamma sparsity per epoch in {out}/{SPARSITY_LOG}"
        )
    elif step == "speed-curve":
        from netslim.slim import format_speed_curve

        budget = latency_budget(args, device or "cpu", budgets=args.budgets)
        rows = prune.speed_curve(
            args.checkpoint,
            args.budgets,
            data=args.data,
            imgsz=args.image_size,
            batch=args.batch_size,
            recalibrate=args.recalibrate,
            device=device or "cpu",
            trust_pickle=args.trust_pickle,
            choices=args.choices,
            latency=_budget_fields(budget),
        )
        print(json.dumps(rows) if args.json else format_speed_curve(rows))  # one line
    elif step == "prune":
        prune.prune(
            args.checkpoint,
            args.out,
            ratio=args.ratio,
            target_macs=args.target_macs,
            target_latency=latency_budget(args, device or "cpu"),
            data=args.data,
            imgsz=args.image_size,
            batch=args.batch_size,
            recalibrate=args.recalibrate,
            compensate=args.compensate,
            round_to=args.round_to,
            min_keep=args.min_keep,
            device=device or "cpu",
            trust_pickle=args.trust_pickle,
            force=args.force,
        )
    elif step == "finetune":
        out = train.finetune(
            args.checkpoint,
            args.data,
            args.out,
            epochs=args.epochs,
            resume=args.resume,
            trust_pickle=args.trust_pickle,
            teacher=args.teacher,
            distill=args.distill,
            distill_term={
                "term": args.distill_term,
                **({"weight": args.distill_weight} if args.distill_weight is not None else {}),
                **(
                    {"temperature": args.distill_temperature}
                    if args.distill_temperature is not None
                    else {}
                ),
            },
            **{**run, **_passed_through(args.settings, step)},
        )
        print(f"done: {out}/weights/best.pt (ultralytics.YOLO loads it) and {out}/finetuned.pth")
    elif step == "lab":
        from netslim.config import YoloLab
        from netslim.yolo.lab import run_lab

        lab = YoloLab(
            model=args.model,
            data=str(Path(args.data).resolve()),
            lams=args.lams,
            prune_lam=args.prune_lam,
            ratios=args.ratios,
            sweep=args.sweep,
            epochs=args.epochs,
            finetune_epochs=args.finetune_epochs,
            image_size=args.image_size,
            batch_size=args.batch_size,
            recalibrate=args.recalibrate,
            device=device,
            settings=_passed_through(args.settings, step),
            command=shlex.join(["netslim", *args.argv]),
            target_ratio=args.target_ratio,
            prune_when_stable=args.prune_when_stable,
            stable_tol=args.stable_tol,
            stable_epochs=args.stable_epochs,
            distill=args.distill,
            distill_term=args.distill_term,
        )
        print(f"report: {run_lab(lab, args.out)}")
    else:  # val
        model = files.read_yolo(args.checkpoint, trust_pickle=args.trust_pickle)
        check_data(Path(args.data), train.task_of(model))
        metrics = prune.validate(
            model, args.data, imgsz=args.image_size, batch=args.batch_size, device=device or "cpu"
        )
        print(
            json.dumps(metrics, indent=2)
            if args.json
            else "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        )


COMMANDS = {
    "train": cmd_train,
    "prune": cmd_prune,
    "speed-curve": cmd_speed_curve,
    "finetune": cmd_finetune,
    "info": cmd_info,
    "multipass": cmd_multipass,
    "export": cmd_export,
    "bench": cmd_bench,
    "lab": cmd_lab,
    "demo": cmd_lab,
    "report": cmd_report,
    "yolo": cmd_yolo,
}


def check_torchrun_command(command: str) -> None:
    """Under torchrun only training makes sense; refuse the other commands clearly."""
    from netslim.runtime import distributed

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


# How an interrupted command continues: with --resume, by running it again, or not at all
# (its files are written whole or not at all); the others only read
RESUMED = {"train", "finetune", "yolo train", "yolo finetune"}
RERUN = {"lab", "demo", "multipass", "yolo lab"}
WRITES = {"prune", "export", "report", "yolo prune", "yolo report"}


def interrupted_text(args: argparse.Namespace) -> str:
    """What netslim says when Ctrl-C stops ``args``' command: how to go on, if anything."""
    command = " ".join(filter(None, [args.command, getattr(args, "yolo_command", None)]))
    out = getattr(args, "out", None)
    if command in RESUMED:
        return (
            f"netslim: interrupted; continue with the same command plus --resume (run folder {out})"
        )
    if command in RERUN:
        return f"netslim: interrupted; run the same command again to continue (run folder {out})"
    if command in WRITES:
        return "netslim: interrupted; nothing was written (files are written whole or not at all)"
    return "netslim: interrupted"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)  # --help and --version exit here, before torch
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        return _run(args)
    except KeyboardInterrupt:  # also while torch or Ultralytics is still being imported
        print(interrupted_text(args), file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from netslim.runtime import distributed
    from netslim.runtime.threads import set_threads, stop_tuning

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
    finally:
        stop_tuning()  # the tuner served this command's training, not code run after it
    return 0


if __name__ == "__main__":
    sys.exit(main())
