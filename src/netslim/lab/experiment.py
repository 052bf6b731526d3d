"""The whole slimming experiment in one resumable call: train, prune, sweep, fine-tune, report.

:func:`run_lab` runs the lab of the network-slimming paper into one run folder:

1. sparsity training at each λ of ``lams``, all from the same initial weights;
2. pruning of the ``prune_lam`` model at each of ``ratios``, measured three ways
   (official masking, bias compensation, BN recalibration);
3. a sweep over ``sweep`` ratios, pruned and measured but never trained (figure 5);
4. fine-tuning of each pruned model;
5. the report (:mod:`netslim.lab.report`).

Progress lines say which stage of how many runs, and the time spent and left
(:mod:`netslim.lab.progress`).

Every stage leaves files behind, and a stage whose files are complete is skipped, so
running the same lab again continues where an interrupted one stopped (an interrupted
training run continues from its ``last.pth``). ``lab.json`` records the settings;
a lab whose settings differ from the folder's is refused rather than mixed in.

The run folder's layout is defined in :mod:`netslim.lab.folder`, ``LabConfig`` and ``DEMO``
in :mod:`netslim.config`.
"""

from __future__ import annotations

import contextlib
import json
import platform
import warnings
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from netslim.checkpoint import load
from netslim.config import LabConfig, lam_name
from netslim.data import load_dataset
from netslim.data.batches import ImageData
from netslim.errors import NetslimError
from netslim.files import remove_temp_files, write_json
from netslim.lab.folder import LAB_FILE, finetune_dir, prune_path, read_json, sweep_path, train_dir
from netslim.lab.progress import TRAIN_COST, LabProgress, Stage, pruned_cost
from netslim.lab.stages import Log, prune_stage, train_stage
from netslim.models import build_model, check_arch
from netslim.runtime import distributed
from netslim.runtime.device import pick_device, pick_precision
from netslim.slim import prune_model
from netslim.train import runlock
from netslim.train.loop import StepHook
from netslim.train.runfolder import changed_settings, read_metrics

# --------------------------------------------------------------------------------------
# lab.json: the settings, checked on every run
# --------------------------------------------------------------------------------------


def environment(device: torch.device, dtype: torch.dtype | None) -> dict[str, str]:
    """The software and hardware a lab ran on, for the report."""
    if device.type == "cuda":
        hardware = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        hardware = f"{device} ({_cpu_name()}, {torch.get_num_threads()} threads)"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "matplotlib": _version("matplotlib"),
        "netslim": _version("netslim"),
        "platform": platform.platform(),
        "device": hardware,
        "autocast": str(dtype).replace("torch.", "") if dtype is not None else "off (fp32)",
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def check_lab_folder(config: LabConfig, out: Path) -> dict[str, Any] | None:
    """The ``lab.json`` of the lab in ``out`` (None if there is none yet), if ``config`` fits it.

    The device may change between runs (results do not depend on where they ran);
    any other difference raises NetslimError naming it, and so does a folder that
    holds something other than a lab.
    """
    lab_file = out / LAB_FILE
    if not lab_file.exists():
        if out.exists() and (
            not out.is_dir() or any(p.name != runlock.LOCK_NAME for p in out.iterdir())
        ):
            raise NetslimError(
                f"{out} is not empty and holds no lab ({LAB_FILE} is missing); "
                "choose a new or empty --out"
            )
        return None
    info = read_json(lab_file)
    # settings added since the lab was made take their defaults (what it ran with)
    saved = {**json.loads(json.dumps(asdict(LabConfig()))), **info.get("config", {})}
    now = json.loads(json.dumps(asdict(config)))  # tuples become lists, as in the file
    changed = changed_settings(saved, now, "the lab")
    if changed:
        raise NetslimError(
            f"{out} holds a lab made with different settings: {', '.join(changed)}; "
            f"rerun with the lab's settings (see {lab_file}: {info.get('command', '')}) "
            "or choose another --out"
        )
    return info


def record_lab(
    config: LabConfig, out: Path, info: dict[str, Any] | None, env: dict[str, str]
) -> None:
    """Write ``lab.json`` for a new lab, or add an environment that has not run this lab yet."""
    if info is None:
        info = {"config": asdict(config), "command": config.command(out), "software": []}
    known = info.get("software", [])
    if env not in known:  # every environment that ran a part, for the report
        write_json(out / LAB_FILE, {**info, "software": [*known, env]})


# --------------------------------------------------------------------------------------
# The stages and their work, for the progress lines
# --------------------------------------------------------------------------------------

RECALIBRATION_BATCH = 128  # images per batch of BN recalibration (prune_model's default)
REPORT_SECONDS = 5.0  # rendering the report and its figures, a guess (the demo: 2 s)


def lab_stages(config: LabConfig, train_size: int, test_size: int) -> list[Stage]:
    """Every stage of the lab in the order :func:`run_lab` runs them, with its estimated
    work in units (:mod:`netslim.lab.progress`)."""
    epoch = TRAIN_COST * train_size + test_size
    recalibration = min(config.recalibrate * RECALIBRATION_BATCH, train_size)

    def measured(ratio: float) -> float:
        """Pruning at ``ratio`` with data: the official and the compensated network
        evaluated, recalibrated and evaluated again (the unpruned one aside)."""
        cost = pruned_cost(ratio)
        return test_size * (1 + 2 * cost) + recalibration * cost

    stages = [
        Stage(f"train λ={lam_name(lam)}", config.epochs * epoch, kind="train")
        for lam in config.lams
    ]
    stages += [
        Stage(f"prune ratio {r:g}", test_size + measured(r), kind="prune") for r in config.ratios
    ]
    sweep = test_size + sum(measured(r) for r in config.sweep_ratios())
    stages.append(Stage("sweep", sweep, kind="prune"))
    stages += [
        Stage(
            f"fine-tune ratio {r:g}",
            config.finetune_epochs * epoch * pruned_cost(r),
            kind="fine-tune",
        )
        for r in config.ratios
    ]
    stages.append(Stage("report", seconds=REPORT_SECONDS, kind="report"))
    return stages


def best_teacher(out: Path, lams: list[float]) -> Path:
    """The teacher of the lab's fine-tunes: of its unpruned networks (one per λ, each run's
    ``last.pth``), the one of highest final test accuracy. The network pruned is one of
    them, but a large λ costs accuracy (the demo's λ = 8e-3 model ends at 91% where λ = 0
    reaches 98%), and a teacher holds its student near its own accuracy: with the pruned
    network as teacher the demo's 90%-pruned network fine-tuned to 90.8%, with λ = 0's to
    (bench/RESULTS.md, issue 30)."""

    def final_accuracy(lam: float) -> float:
        records = read_metrics(train_dir(out, lam))
        return records[-1]["test_acc"] if records else -1.0

    return (train_dir(out, max(lams, key=final_accuracy)) / "last.pth").resolve()


def _train_hook(progress: LabProgress, data: ImageData) -> StepHook:
    """The running training stage's ``on_step``: a test pass ends each epoch."""
    test, train = len(data.test_labels), len(data.train_labels)
    return progress.train_hook(test_share=test / (TRAIN_COST * train + test))


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------


def _prune_ratio(
    config: LabConfig,
    data: ImageData,
    run: Path,
    ratio: float,
    dtype: torch.dtype | None,
    progress: LabProgress,
) -> None:
    """Prune the ``prune_lam`` model at ``ratio``; save the network and its report."""
    source = train_dir(run, config.prune_lam) / "last.pth"
    record = prune_path(run, config.prune_lam, ratio, ".json")
    if record.exists():
        progress.skip()
    prune_stage(
        source,
        record.with_suffix(".pth"),
        record,
        ratio,
        data=data,
        meta={"arch": config.arch},
        trust=config.arch,
        log=progress.log,
        layout=lambda info, report: {**info, "lam": config.prune_lam, "prune": report},
        recalibrate=config.recalibrate,
        eval_dtype=dtype,
    )


SWEEP_KEYS = (
    "ratio",
    "threshold",
    "pruned_share",
    "floored",
    "params_after",
    "macs_after",
    "acc_unpruned",
    "acc_masked",
    "acc_compensated",
    "acc_recalibrated",
)


def sweep_stage(
    config: LabConfig,
    data: ImageData,
    run: Path,
    dtype: torch.dtype | None,
    log: Log,
    progress: LabProgress | None = None,
) -> None:
    """Prune at every sweep ratio without training and record the three accuracies.

    ``progress``, when given, runs this stage and hears of each ratio."""
    path = sweep_path(run)
    ratios = config.sweep_ratios()
    if path.exists():
        log("   done already")
        if progress is not None:
            progress.skip()
        return
    model = load(train_dir(run, config.prune_lam) / "last.pth", trust=config.arch)
    points = []
    acc_unpruned = None  # measured by the first ratio, then reused
    for i, ratio in enumerate(ratios):
        if progress is not None:  # an even share per ratio: close enough for a progress line
            progress.update(i / len(ratios), f"ratio {i + 1}/{len(ratios)} ({ratio:g})")
        with warnings.catch_warnings():  # floored layers are recorded in the point instead
            warnings.simplefilter("ignore", UserWarning)
            _, report = prune_model(
                model,
                ratio,
                data=data,
                recalibrate=config.recalibrate,
                eval_dtype=dtype,
                acc_unpruned=acc_unpruned,
            )
        acc_unpruned = report.acc_unpruned
        points.append({k: report.to_dict()[k] for k in SWEEP_KEYS})
        accuracies = "  ".join(
            f"{label} {_pct(points[-1][f'acc_{label}'])}"
            for label in ("masked", "compensated", "recalibrated")
        )
        log(f"   ratio {ratio:4.2f}: {accuracies}")
    write_json(path, {"lam": config.prune_lam, "recalibrate": config.recalibrate, "points": points})


def _pct(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:5.1f}%"


def run_lab(
    config: LabConfig,
    out: str | Path,
    *,
    download: bool = True,
    log: Log = print,
    progress: type[LabProgress] = LabProgress,
) -> Path:
    """Run (or continue) the lab ``config`` in the folder ``out``; returns the HTML report's path.

    Args:
        config: the lab's settings.
        out: the run folder; created if missing, continued if it holds this lab.
        download: allow downloading CIFAR when it is not under ``config.data_root``.
        log: where the lab's lines go, progress lines included.
        progress: the class that makes the progress lines (tests give one with its own clock).
    """
    config.check()
    check_arch(config.arch, load=True)  # a missing package fails before anything is written
    out = Path(out)
    device = pick_device(distributed.local_device(config.device))
    dtype = pick_precision(config.precision, device)
    info = check_lab_folder(config, out)
    # Loaded before lab.json is written: a lab whose data cannot load leaves no folder behind.
    with distributed.main_first():  # one process downloads, the others then read
        data = load_dataset(
            config.dataset,
            config.data_root,
            seed=config.seed,
            download=download,
            train_size=config.train_size,
            test_size=config.test_size,
        ).to(device)
    stages = lab_stages(config, len(data.train_labels), len(data.test_labels))
    tracker = progress(stages, log)  # prints on rank 0 alone
    # Under torchrun only training is shared; the other stages run on rank 0 alone.
    # Rank 0 writes the lab's own files, so it alone holds the folder's lock.
    with runlock.hold(out) if distributed.is_main() else contextlib.nullcontext():
        if distributed.is_main():
            remove_temp_files(out)
        with tracker.running():
            report = _run_stages(config, data, out, device, dtype, info, tracker)
        tracker.log(tracker.summary())
        return report


def _run_stages(
    config: LabConfig,
    data: ImageData,
    out: Path,
    device: torch.device,
    dtype: torch.dtype | None,
    info: dict[str, Any] | None,
    progress: LabProgress,
) -> Path:
    # Imported here: the report needs matplotlib, which every other command can do without.
    from netslim.lab.report import render_report

    distributed.on_main(record_lab, config, out, info, environment(device, dtype))
    log = progress.log
    stage = iter(range(len(progress.stages)))  # the stages in lab_stages' order

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(config.seed)  # every λ starts from the same weights
        return build_model(config.arch, num_classes=data.num_classes)

    for lam in config.lams:
        run_dir = train_dir(out, lam)
        headline = f"== sparsity training λ={lam_name(lam)}, {config.epochs} epochs: {run_dir}"
        with progress.stage(next(stage), headline):
            meta = {"arch": config.arch, "num_classes": data.num_classes, "kind": "train"}
            train_stage(
                config.train_config(lam),
                data,
                fresh_model,
                run_dir,
                meta,
                log,
                on_step=_train_hook(progress, data),
            )

    for ratio in config.ratios:
        record = prune_path(out, config.prune_lam, ratio, ".json")
        headline = f"== pruning λ={lam_name(config.prune_lam)} at ratio {ratio:g}: {record}"
        with progress.stage(next(stage), headline):
            distributed.on_main(_prune_ratio, config, data, out, ratio, dtype, progress)
    headline = (
        f"== pruning sweep over {len(config.sweep_ratios())} ratios, no training: {sweep_path(out)}"
    )
    with progress.stage(next(stage), headline):
        distributed.on_main(sweep_stage, config, data, out, dtype, log, progress)

    for ratio in config.ratios:
        source = prune_path(out, config.prune_lam, ratio, ".pth")
        run_dir = finetune_dir(out, ratio)
        headline = f"== fine-tuning ratio {ratio:g}, {config.finetune_epochs} epochs: {run_dir}"
        with progress.stage(next(stage), headline):
            meta = {
                "arch": config.arch,
                "kind": "finetune",
                "source": str(source),
                "prune": read_json(source.with_suffix(".json"))["prune"],
            }
            teacher = best_teacher(out, config.lams)
            train_stage(
                config.finetune_config(teacher),
                data,
                lambda s=source: load(s, trust=config.arch),
                run_dir,
                meta,
                log,
                on_step=_train_hook(progress, data),
            )

    with progress.stage(next(stage), "== report"):
        report = distributed.on_main(render_report, out)
    return report or out / "report.html"  # on the other ranks: where rank 0 wrote it
