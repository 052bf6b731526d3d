"""The seed lab's experiment for a YOLO: λ sweep, pruning, a no-fine-tune sweep, fine-tuning.

:func:`run_lab` runs, through Ultralytics' trainer and validator, in the folder ``out``:

1. one sparsity-training run per λ (``lam0`` is plain training, the baseline; ``lamauto``
   is λ auto toward ``target_ratio``; with ``prune_when_stable`` the ``prune_lam`` run stops
   once its prune mask has settled, :func:`control`): ``out/lam{λ}/`` (Ultralytics' run
   folder, with netslim's ``sparsity.jsonl``);
2. each run's final network (``weights/last.pth``, in fp32) pruned at every ratio of ``ratios`` and ``sweep``, mAP measured
   right after pruning the three ways (:func:`netslim.yolo.prune.prune`):
   ``out/pruned/lam{λ}-p{ratio%}.json`` (and the network, ``.pth`` and ``.pt``, where step 3
   fine-tunes it);
3. the ``ratios`` of the ``prune_lam`` run fine-tuned: ``out/ft-lam{λ}-p{ratio%}/``;
4. the report (:mod:`netslim.yolo.report`): ``out/report.md`` and ``out/report.html``, with
   a warning at its top (and on the console) where the numbers mean little
   (:mod:`netslim.lab.health`).

Every step whose result exists is skipped and an interrupted training run resumes, so
running the same command again continues a stopped lab; ``out/lab.json`` holds the
settings, and a folder holding another lab's is refused. The lab keeps only the files its
report and its resume read (:data:`UNNEEDED_TRAIN`, :data:`UNNEEDED_FINETUNE`), and prints
one line per stage rather than Ultralytics' settings (they are in each run's ``args.yaml``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from netslim.config import YoloLab
from netslim.errors import NetslimError
from netslim.files import write_json
from netslim.train import runlock
from netslim.yolo import prune as yolo_prune
from netslim.yolo import run as yolo_run
from netslim.yolo import seam
from netslim.yolo import train as yolo_train
from netslim.yolo.data import check_data
from netslim.yolo.files import read_checkpoint, read_yolo
from netslim.yolo.folder import LAB_FILE, finetune_dir, pruned_path, read_lab, train_dir
from netslim.yolo.settings import check_epochs, check_settings


def finished(run: Path) -> bool:
    """Whether the training run in ``run`` ran to its end: netslim marked it so, or
    Ultralytics stripped its last.pt (epoch -1), which it does once a run is over."""
    info = run / yolo_run.RUN_FILE
    if info.is_file() and json.loads(info.read_text()).get("finished"):
        return True
    last = run / "weights" / "last.pt"
    return last.is_file() and seam.finished_checkpoint(read_checkpoint(last))


# The files of a finished run that neither the report, nor pruning, nor a resumed lab reads
# (the report reads sparsity.jsonl, results.csv and a training run's last.pt, pruning its
# last.pth; a fine-tune's network is finetuned.pth, and its best.pt stays for Ultralytics'
# own exporter); Ultralytics' plots are off (netslim.yolo.run.DEFAULTS).
UNNEEDED_TRAIN = ("weights/best.pt", "weights/best.pth", "weights/start.pt")
UNNEEDED_FINETUNE = ("weights/last.pt", "weights/last.pth", "weights/best.pth", "weights/start.pt")


def _run_once(
    run: Path,
    done: bool,
    start: Callable[[bool], Any],
    log: Callable[[str], None],
    unneeded: tuple[str, ...] = (),
) -> None:
    """``start(resume)`` unless the run is ``done``; resuming when it had begun. Then the
    ``unneeded`` files of the finished run are deleted."""
    if not done:
        resume = (run / "weights" / "last.pt").is_file()
        # one line per stage: Ultralytics' own settings dump is off, they are in args.yaml
        log(
            f"{'resuming' if resume else 'starting'} {run} (Ultralytics' settings: "
            f"{run / 'args.yaml'})"
        )
        start(resume)
    for name in unneeded:
        (run / name).unlink(missing_ok=True)


def best_teacher(out: Path, lams: list[float | str]) -> Path:
    """The teacher of the lab's fine-tunes: of its unpruned networks (each λ run's final
    ``weights/last.pth``), the one of highest final mAP50-95 (as the classifier lab picks,
    :func:`netslim.lab.experiment.best_teacher`: a large λ costs mAP, and a teacher holds its
    student near its own)."""

    def final_map(lam: float | str) -> float:
        values = seam.results_column(train_dir(out, lam), seam.metric_key("mAP50-95"))
        return values[-1] if values else -1.0

    return train_dir(out, max(lams, key=final_map)) / "weights" / yolo_run.LAST_FP32


def control(lab: YoloLab, lam: float | str) -> dict[str, Any]:
    """:func:`netslim.yolo.train.train`'s between-epoch control of the run at ``lam``: λ
    auto's goal for the ``auto`` run, early stopping for the run the lab prunes (as the
    classifier lab does), the same :class:`~netslim.train.control.SparsityControl` as
    ``netslim yolo train``."""
    settings: dict[str, Any] = {}
    if lam == "auto":
        settings["target_ratio"] = lab.target_ratio
    if lam == lab.prune_lam and lab.prune_when_stable is not None:
        settings.update(
            prune_when_stable=lab.prune_when_stable,
            stable_tol=lab.stable_tol,
            stable_epochs=lab.stable_epochs,
        )
    return settings


def run_lab(lab: YoloLab, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Run (or continue) ``lab`` in ``out``; returns the report's path."""
    from netslim.yolo.report import render_report

    out = Path(out)
    data = Path(lab.data)
    options: dict[str, Any] = {"imgsz": lab.image_size, "batch": lab.batch_size, **lab.settings}
    if lab.device is not None:
        options["device"] = lab.device
    # every setting and the data set checked before the lab writes anything
    check_settings(
        {k: v for k, v in options.items() if k != "imgsz"}, epochs=lab.epochs, imgsz=lab.image_size
    )
    check_epochs(lab.finetune_epochs, "--finetune-epochs")
    check_data(data)
    # a .pt is read here, without running its code (Ultralytics' own loader would unpickle
    # it), and so is a netslim .pth; a YAML name is checked by yolo_train.train
    model = read_yolo(lab.model) if lab.model.endswith((".pt", ".pth")) else lab.model
    with runlock.hold(out):  # one lab per folder at a time (its runs hold their own)
        if (out / LAB_FILE).is_file():
            before = read_lab(out)
            if not before.same_experiment(lab):
                raise NetslimError(
                    f"{out} holds another YOLO lab (see its {LAB_FILE}); give a new --out, or the "
                    "same settings to continue it"
                )
        write_json(out / LAB_FILE, asdict(lab))
        for lam in lab.lams:
            run = train_dir(out, lam)
            _run_once(
                run,
                finished(run),
                lambda resume, lam=lam, run=run: yolo_train.train(
                    model,
                    data,
                    run,
                    lam=lam,
                    epochs=lab.epochs,
                    resume=resume,
                    **control(lab, lam),
                    **options,
                ),
                log,
                UNNEEDED_TRAIN,
            )
        for lam in lab.lams:
            weights = train_dir(out, lam) / "weights"
            # the network the run ended with, as the paper prunes: best.pt is the epoch of best
            # mAP, in a sparsity run often an early one whose γs are not yet sparse
            final = weights / yolo_run.LAST_FP32
            final = final if final.is_file() else weights / "last.pt"
            unpruned = None  # the unpruned network's mAPs, validated once per λ
            for ratio in lab.all_ratios():
                target = pruned_path(out, lam, ratio)
                if not target.with_suffix(".json").is_file():
                    log(f"pruning {final} at {ratio:g} into {target}")
                    report = yolo_prune.prune(
                        final,
                        target,
                        ratio=ratio,
                        data=data,
                        imgsz=lab.image_size,
                        batch=lab.batch_size,
                        recalibrate=lab.recalibrate,
                        unpruned=unpruned,
                        device=lab.device or "cpu",
                        log=log,
                        warn=False,  # the report warns, once for the whole lab
                    )
                    unpruned = report.measured["unpruned"]
                if lam != lab.prune_lam or ratio not in lab.ratios:
                    # measured only (the report reads its .json): no fine-tune reads the network
                    for network in (target, target.with_suffix(".pt")):
                        network.unlink(missing_ok=True)
        distilled = lab.distill and yolo_train.task_of(model) in yolo_train.DISTILLED_TASKS
        teacher = best_teacher(out, lab.lams) if distilled else None
        for ratio in lab.ratios:
            source, run = (
                pruned_path(out, lab.prune_lam, ratio),
                finetune_dir(out, lab.prune_lam, ratio),
            )
            _run_once(
                run,
                (run / "finetuned.pth").is_file(),
                lambda resume, source=source, run=run: yolo_train.finetune(
                    source,
                    data,
                    run,
                    epochs=lab.finetune_epochs,
                    resume=resume,
                    teacher=teacher,
                    distill=lab.distill,
                    distill_term={"term": lab.distill_term},
                    **options,
                ),
                log,
                UNNEEDED_FINETUNE,
            )
        return render_report(out)
