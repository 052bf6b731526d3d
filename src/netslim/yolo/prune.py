"""Pruning a YOLO, measured by Ultralytics' own validator: mAP right after pruning, three ways.

:func:`prune` takes a trained YOLO (an Ultralytics ``.pt``, read without running its code,
or a netslim ``.pth``), prunes it at a ratio or to a share of the MACs (``round_to`` as for
classifiers) and validates with Ultralytics' validator, on the ``data.yaml``'s val split:

* unpruned;
* **official**: threshold and copy, nothing else -- what the public YOLO-slimming
  repositories do;
* **compensated**: each removed channel's constant output folded into the next layer;
* **recalibrated**: then BatchNorm statistics re-estimated on ``recalibrate`` batches of
  training images, from Ultralytics' own training loader: its augmentation, mosaic off, as
  in the last epochs of Ultralytics' training (``close_mosaic``), whose images the
  statistics being replaced were learnt on.

The network saved (the recalibrated one by default, the official one with
``compensate=False``) goes to a netslim ``.pth`` (rebuilt from the model's YAML and channel
counts, no pickles) and beside it an Ultralytics ``.pt`` that ``ultralytics.YOLO`` loads.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import logging
import tempfile
import warnings
from pathlib import Path

from torch import nn

from netslim.engine.recalibrate import recalibrate_bn
from netslim.errors import NetslimError
from netslim.files import write_json
from netslim.models import num_outputs
from netslim.slim import PruneReport, check_prune_output, prune_model, save
from netslim.yolo.data import check_data
from netslim.yolo.files import arch_of, read_yolo, write_model
from netslim.yolo.train import TRAINERS, check_classes, task_of

METRICS = {"mAP50": "metrics/mAP50(B)", "mAP50-95": "metrics/mAP50-95(B)",
           "mask mAP50": "metrics/mAP50(M)", "mask mAP50-95": "metrics/mAP50-95(M)",
           "top1": "metrics/accuracy_top1"}  # fmt: skip


@contextlib.contextmanager
def _quiet():
    """Ultralytics' progress and summary lines off stdout (``--json`` prints only JSON): its
    logger writes to the stdout it found at import, which redirect_stdout does not reach."""
    logger, level = logging.getLogger("ultralytics"), logging.getLogger("ultralytics").level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def validate(model: nn.Module, data: str | Path, *, imgsz: int = 640, batch: int = 16,
             device: str = "cpu", workers: int = 0) -> dict[str, float]:  # fmt: skip
    """Ultralytics' validator on ``data``'s val split: mAP50 and mAP50-95 (boxes, and masks
    for a segmenter; top-1 for a classifier). ``model`` is not changed (a copy is fused)."""
    from ultralytics.models import yolo

    validators = {"detect": yolo.detect.DetectionValidator,
                  "segment": yolo.segment.SegmentationValidator,
                  "classify": yolo.classify.ClassificationValidator,
                  "pose": yolo.pose.PoseValidator, "obb": yolo.obb.OBBValidator}  # fmt: skip
    # rect: letterboxed batches, as Ultralytics validates during training and in `yolo val`,
    # so that the numbers are the ones Ultralytics gives (its default, False, is for training)
    args = {"data": str(data), "imgsz": imgsz, "batch": batch, "device": device, "workers": workers,
            "plots": False, "verbose": False, "save_json": False, "rect": True}  # fmt: skip
    validator = validators[task_of(model)](args=args)
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = validator(model=copy.deepcopy(model).float().eval())
    return {name: float(results[key]) for name, key in METRICS.items() if key in results}


def training_images(model: nn.Module, data: str | Path, *, imgsz: int, batch: int,
                    device: str = "cpu", workers: int = 0):  # fmt: skip
    """Batches of training images (floats in [0, 1]) from Ultralytics' own training loader,
    with the augmentation of the last epochs of training: Ultralytics turns mosaic off for
    its last ``close_mosaic`` (10) epochs, so the BN statistics a trained YOLO holds were
    learnt without it (measured on yolov8n, λ = 0, 30% pruned: mAP50-95 0.080 recalibrated
    without mosaic, 0.076 with it)."""
    # the trainer is built for its loader only; its run folder goes in a scratch folder
    with tempfile.TemporaryDirectory(prefix="netslim-loader-") as scratch:
        trainer = TRAINERS[task_of(model)](overrides={
            "data": str(data), "imgsz": imgsz, "batch": batch, "device": device, "workers": workers,
            "plots": False, "verbose": False, "model": "netslim.yaml", "project": scratch,
            "name": "loader", "mosaic": 0.0,
        })  # fmt: skip
        trainer.model = model
        loader = trainer.get_dataloader(
            trainer.data["train"], batch_size=batch, rank=-1, mode="train"
        )
        for batch_ in loader:
            yield trainer.preprocess_batch(batch_)["img"]


def prune(
    source: str | Path,
    out: str | Path,
    *,
    ratio: float | None = None,
    target_macs: float | None = None,
    data: str | Path | None = None,
    imgsz: int = 640,
    batch: int = 16,
    recalibrate: int = 16,
    compensate: bool = True,
    round_to: int = 1,
    min_keep: float = 0.01,
    device: str = "cpu",
    workers: int = 0,
    trust_pickle: bool = False,
    force: bool = False,
    log=print,
) -> PruneReport:
    """Prune the YOLO in ``source`` into ``out`` (a ``.pth``; the ``.pt`` beside it too) and,
    given ``data``, measure its mAP the four ways (see the module docs); the report's
    ``extra["map"]`` holds them, and ``out.json`` the whole report. ``force``: let the files
    written replace ``source``."""
    out = Path(out)
    if out.suffix != ".pth":
        raise NetslimError(
            f"--out {out}: name the pruned checkpoint NAME.pth (NAME.pt is written beside it)"
        )
    for written, what in ((out, "--out"), (out.with_suffix(".pt"), "the .pt written beside --out"),
                          (out.with_suffix(".json"), "the report written beside --out")):  # fmt: skip
        check_prune_output(source, written, force, what)  # never the input, unless forced
    if recalibrate < 0:
        raise NetslimError(f"--recalibrate must be >= 0 batches, got {recalibrate}")
    model = read_yolo(source, trust_pickle=trust_pickle)
    if data is not None:
        data = Path(data)
        check_data(data, task_of(model))
        check_classes(model, data)
    size = (3, imgsz, imgsz)
    with warnings.catch_warnings():  # a floored layer is reported in the report
        warnings.simplefilter("ignore", UserWarning)
        pruned, report = prune_model(model, ratio, target_macs=target_macs, compensate=True,
                                     min_keep=min_keep, round_to=round_to, input_size=size)  # fmt: skip
        official, _ = prune_model(model, ratio, target_macs=target_macs, compensate=False,
                                  min_keep=min_keep, round_to=round_to, input_size=size)  # fmt: skip
    saved = pruned if compensate else official
    report.compensated, report.saved = (
        compensate,
        "bias compensation" if compensate else "official masking",
    )
    if data is not None:
        measured = {"unpruned": validate(model, data, imgsz=imgsz, batch=batch, device=device),
                    "official": validate(official, data, imgsz=imgsz, batch=batch, device=device),
                    "compensated": validate(pruned, data, imgsz=imgsz, batch=batch, device=device)}  # fmt: skip
        if recalibrate > 0:
            recalibrated = copy.deepcopy(pruned)
            images = training_images(
                model, data, imgsz=imgsz, batch=batch, device=device, workers=workers
            )
            used = recalibrate_bn(recalibrated, itertools.islice(images, recalibrate))
            report.recalibration_images = used * batch
            measured["recalibrated"] = validate(
                recalibrated, data, imgsz=imgsz, batch=batch, device=device
            )
            if compensate:
                saved, report.saved = recalibrated, "BN recalibrated"
        report.extra["map"] = measured
    saved = saved.eval()
    save(saved, out, report, arch=arch_of(model), image_size=imgsz)
    write_model(saved, out.with_suffix(".pt"))
    write_json(out.with_suffix(".json"), {"source": str(source), "num_classes": num_outputs(model),
                                          "prune": report.to_dict()})  # fmt: skip
    log(report.text())
    for way, values in report.extra.get("map", {}).items():
        log(f"{way:>12}: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    log(f"saved the pruned network ({report.saved}) to {out} and {out.with_suffix('.pt')}")
    return report
