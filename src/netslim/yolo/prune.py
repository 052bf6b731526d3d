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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netslim.engine.sparsity import bn_gammas
from netslim.errors import NetslimError
from netslim.files import write_json
from netslim.lab import health
from netslim.latency import LatencyBudget
from netslim.models import num_outputs
from netslim.slim import PruneReport, check_prune_output, prune_model, save
from netslim.slim import speed_curve as slim_speed_curve
from netslim.yolo import seam
from netslim.yolo.data import check_data
from netslim.yolo.files import arch_of, read_yolo, write_model
from netslim.yolo.train import check_classes, task_of


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


def validate(
    model: nn.Module,
    data: str | Path,
    *,
    imgsz: int = 640,
    batch: int = 16,
    device: str = "cpu",
    workers: int = 0,
) -> dict[str, float]:
    """Ultralytics' validator on ``data``'s val split: mAP50 and mAP50-95 (boxes, and masks
    for a segmenter; top-1 for a classifier). ``model`` is not changed (a copy is fused)."""
    # rect: letterboxed batches, as Ultralytics validates during training and in `yolo val`,
    # so that the numbers are the ones Ultralytics gives (its default, False, is for training)
    args = {
        "data": str(data),
        "imgsz": imgsz,
        "batch": batch,
        "device": device,
        "workers": workers,
        "plots": False,
        "verbose": False,
        "save_json": False,
        "rect": True,
    }
    validator = seam.validator_for(task_of(model))(args=args)
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = validator(model=copy.deepcopy(model).float().eval())
    return seam.named_metrics(results)


def training_images(
    model: nn.Module,
    data: str | Path,
    *,
    imgsz: int,
    batch: int,
    device: str = "cpu",
    workers: int = 0,
):
    """Batches of training images (floats in [0, 1]) from Ultralytics' own training loader,
    with the augmentation of the last epochs of training: Ultralytics turns mosaic off for
    its last ``close_mosaic`` (10) epochs, so the BN statistics a trained YOLO holds were
    learnt without it (measured on yolov8n, λ = 0, 30% pruned: mAP50-95 0.080 recalibrated
    without mosaic, 0.076 with it)."""
    # the trainer is built for its loader only; its run folder goes in a scratch folder
    with tempfile.TemporaryDirectory(prefix="netslim-loader-") as scratch:
        trainer = seam.loader_trainer(
            task_of(model),
            {
                "data": str(data),
                "imgsz": imgsz,
                "batch": batch,
                "device": device,
                "workers": workers,
                "plots": False,
                "verbose": False,
                "model": "netslim.yaml",
                "project": scratch,
                "name": "loader",
                "mosaic": 0.0,
            },
        )
        yield from seam.training_batches(trainer, model, batch)


def _measured(
    source: str | Path,
    data: str | Path | None,
    imgsz: int,
    batch: int,
    device: str,
    workers: int,
    trust_pickle: bool,
) -> tuple[nn.Module, Callable | None, Iterable | None]:
    """The YOLO in ``source``, and given ``data`` how prune_model measures it (Ultralytics'
    validator) and the batches it recalibrates on."""
    model = read_yolo(source, trust_pickle=trust_pickle)
    if data is None:
        return model, None, None
    data = Path(data)
    check_data(data, task_of(model))
    check_classes(model, data)

    def measure(network: nn.Module) -> dict[str, float]:
        threads = torch.get_num_threads()
        try:
            return validate(network, data, imgsz=imgsz, batch=batch, device=device)
        finally:  # Ultralytics' select_device sets it to cores - 1: later timings need it
            torch.set_num_threads(threads)

    calibration = training_images(
        model, data, imgsz=imgsz, batch=batch, device=device, workers=workers
    )
    return model, measure, calibration


def speed_curve(
    source: str | Path,
    budgets: Iterable[float],
    *,
    data: str | Path | None = None,
    imgsz: int = 640,
    batch: int = 16,
    recalibrate: int = 16,
    device: str = "cpu",
    workers: int = 0,
    trust_pickle: bool = False,
    choices: Iterable[str] = ("threshold", "latency"),
    latency: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """:func:`netslim.slim.speed_curve` of the YOLO in ``source``: each budget pruned both
    ways, timed, and (given ``data``) its mAP right after pruning; nothing is written but
    the latency table. ``latency``: the other fields of LatencyBudget (runtime, batch, ...)."""
    model, measure, calibration = _measured(
        source, data, imgsz, batch, device, workers, trust_pickle
    )
    if calibration is not None:
        calibration = list(itertools.islice(calibration, recalibrate))  # for every prune
    unpruned: dict[str, float] = {}

    def one(budget: LatencyBudget) -> PruneReport:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _, report = prune_model(
                model,
                target_latency=budget,
                measure=measure,
                calibration=calibration,
                recalibrate=recalibrate,
                unpruned=unpruned or None,
                input_size=(3, imgsz, imgsz),
            )
        unpruned.update(report.measured.get("unpruned", {}))
        return report

    return slim_speed_curve(one, budgets, choices, **(latency or {}))


def prune(
    source: str | Path,
    out: str | Path,
    *,
    ratio: float | None = None,
    target_macs: float | None = None,
    target_latency: LatencyBudget | None = None,
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
    unpruned: dict[str, float] | None = None,
    log=print,
    warn: bool = True,
) -> PruneReport:
    """Prune the YOLO in ``source`` into ``out`` (a ``.pth``; the ``.pt`` beside it too) and,
    given ``data``, measure its mAP the four ways (see the module docs); the report's
    ``measured`` holds them, and ``out.json`` the whole report. ``force``: let the files
    written replace ``source``; ``unpruned``: the unpruned network's mAPs, when known (a
    sweep over ratios measures them once); ``target_latency``: a latency budget in place of
    ``ratio`` (:class:`netslim.latency.LatencyBudget`, timed at its ``image_size`` or at
    ``imgsz``). The network is traced and pruned once, by
    :func:`netslim.slim.prune_model`, with Ultralytics' validator as its ``measure``.
    ``warn``: warn when the result means little (:func:`run_warnings`; the lab leaves it to
    its report)."""
    out = Path(out)
    if out.suffix != ".pth":
        raise NetslimError(
            f"--out {out}: name the pruned checkpoint NAME.pth (NAME.pt is written beside it)"
        )
    for written, what in (
        (out, "--out"),
        (out.with_suffix(".pt"), "the .pt written beside --out"),
        (out.with_suffix(".json"), "the report written beside --out"),
    ):
        check_prune_output(source, written, force, what)  # never the input, unless forced
    if recalibrate < 0:
        raise NetslimError(f"--recalibrate must be >= 0 batches, got {recalibrate}")
    model, measure, calibration = _measured(
        source, data, imgsz, batch, device, workers, trust_pickle
    )
    with warnings.catch_warnings():  # a floored layer is reported in the report
        warnings.simplefilter("ignore", UserWarning)
        saved, report = prune_model(
            model,
            ratio,
            target_macs=target_macs,
            target_latency=target_latency,
            compensate=compensate,
            min_keep=min_keep,
            round_to=round_to,
            measure=measure,
            calibration=calibration,
            recalibrate=recalibrate,
            unpruned=unpruned,
            input_size=(3, imgsz, imgsz),
        )
    saved = saved.eval()
    save(saved, out, report, arch=arch_of(model), image_size=imgsz, teacher=source)
    write_model(saved, out.with_suffix(".pt"), {"imgsz": imgsz})  # its size, for export
    write_json(
        out.with_suffix(".json"),
        {"source": str(source), "num_classes": num_outputs(model), "prune": report.to_dict()},
    )
    log(report.text())
    log(f"saved the pruned network ({report.saved}) to {out} and {out.with_suffix('.pt')}")
    if warn:
        health.warn(run_warnings(model, report, source))
    return report


def run_warnings(model: nn.Module, report: PruneReport, source: str | Path) -> list[str]:
    """The rules of :mod:`netslim.lab.health` one prune can tell: a threshold among tied γs
    (``model``'s), an unpruned mAP too low to compare."""
    unpruned = report.measured.get("unpruned", {})
    metric = next((k for k in ("mask mAP50-95", "mAP50-95") if k in unpruned), None)
    return health.found(
        [
            health.tied(report.tie_break, bn_gammas(model).numel(), report.threshold, report.ratio),
            health.low_map({f"of {Path(source).name}": unpruned[metric]}, metric)
            if metric
            else None,
        ]
    )
