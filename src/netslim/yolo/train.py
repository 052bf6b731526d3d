"""Sparsity training and fine-tuning of a YOLO through Ultralytics' own trainer.

:func:`train` runs Ultralytics' trainer for the model's task (detect, segment, classify,
...) with two changes, and nothing else of Ultralytics' recipe altered (its augmentation,
loss, schedule, EMA, AMP, DDP, checkpoints, validation):

* **the L1 term**: after Ultralytics unscales the gradients (AMP's GradScaler) and clips
  them (total norm 10), right before the optimizer steps, ``lam * sign(gamma)`` is added to
  the gradient of every BatchNorm gamma (:func:`netslim.engine.sparsity.add_bn_l1_grad`),
  once per optimizer step, on the unwrapped model: under DDP after the all-reduce,
  identically on every process; the EMA follows. It is a step pre-hook on the optimizer,
  installed where Ultralytics builds it (:mod:`netslim.yolo.seam`, which holds every
  touchpoint with Ultralytics' internals). After the clipping, not before: Ultralytics
  multiplies its loss by the batch size and the gradient norm is far above 10, so a term
  added before would be shrunk with the data gradient by a factor that changes from step
  to step (measured on yolov8n, CIFAR detection set: λ = 0.02 moved the median |γ| from 1
  to 0.984 in 7 epochs). After it, every step moves γ by lr * λ (SGD, before momentum) as
  the paper's loop does, which has no clipping, and ``--lam auto`` can predict it.
* **the model it is given is the model it trains**: a pruned network is never rebuilt from
  its YAML (Ultralytics would build the full-width one and load the weights that fit).

Ultralytics saves its checkpoints in fp16; whenever it writes ``weights/last.pt`` or
``weights/best.pt`` (its ``on_model_save`` callback), the same network goes to
``weights/last.pth`` or ``weights/best.pth`` in fp32 as well (netslim checkpoints).

Between epochs, λ auto and the mask watch (``--lam auto``, ``--prune-when-stable``) are the
classifiers' own control (:class:`netslim.train.control.SparsityControl`), with the same
record keys; a resumed run restores its state from ``control.json``.

After every epoch a record of the EMA model's gammas goes to ``OUT/sparsity.jsonl`` beside
Ultralytics' ``results.csv``: λ, the share of |γ| under the threshold, quantiles, a
histogram on log-spaced bins, the control's decisions and Ultralytics' metrics of that
epoch. Ultralytics' automatic downloads stay off, and so do its plots (they download a
font).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from netslim.checkpoint import read_checkpoint as read_netslim_checkpoint
from netslim.config import LAM_START, YOLO_DISTILL_TERMS
from netslim.errors import NetslimError
from netslim.files import atomic_write, write_json
from netslim.models import num_outputs
from netslim.models.yolo_yaml import checked_yaml
from netslim.slim import save
from netslim.train import runlock
from netslim.train.control import STABLE_TOL
from netslim.train.distill import teacher_path
from netslim.yolo import distill as outputs
from netslim.yolo import seam
from netslim.yolo.data import check_data
from netslim.yolo.files import arch_of, read_checkpoint, read_model, read_yolo, write_model
from netslim.yolo.run import (
    BEST_FP32,
    DEFAULTS,
    ENV_CONTROL,
    ENV_DISTILL,
    ENV_LAM,
    ENV_START,
    ENV_TEACHER,
    ENV_THRESHOLD,
    RUN_FILE,
)
from netslim.yolo.seam import task_of
from netslim.yolo.settings import check_settings


def train(
    model: nn.Module | str,
    data: str | Path,
    out: str | Path,
    *,
    lam: float | str = 0.0,
    epochs: int = 100,
    imgsz: int = 640,
    resume: bool = False,
    sparsity_threshold: float = 0.01,
    target_ratio: float | None = None,
    prune_when_stable: float | None = None,
    stable_tol: float = STABLE_TOL,
    stable_epochs: int = 3,
    teacher: str | Path | None = None,
    distill: dict[str, Any] | None = None,
    **overrides: Any,
) -> Path:
    """Train ``model`` with Ultralytics' trainer on ``data`` into the run folder ``out``.

    Args:
        model: an Ultralytics model YAML name (``"yolov8n.yaml"``, fresh weights) or a
            model (e.g. :func:`netslim.yolo.files.read_model` of a ``.pt`` file, or a pruned
            network: trained as it is, never rebuilt).
        data: an Ultralytics ``data.yaml``.
        out: the run folder (Ultralytics' ``project``/``name``): ``weights/last.pt``,
            ``weights/best.pt``, ``results.csv`` and netslim's ``sparsity.jsonl``.
        lam: the L1 weight on BatchNorm gammas (0: plain training, e.g. fine-tuning), or
            ``"auto"``: adapted each epoch to reach ``target_ratio`` (needs ``optimizer="SGD"``).
        epochs, imgsz: as Ultralytics takes them.
        resume: continue the run in ``out`` from its ``weights/last.pt`` (a file this run
            wrote: read by Ultralytics itself).
        sparsity_threshold: |gamma| under it counts as sparse in ``sparsity.jsonl``.
        target_ratio: with ``lam="auto"``, the share of |gamma| to end under the threshold.
        prune_when_stable, stable_tol, stable_epochs: stop once the removal mask at ratio
            ``prune_when_stable`` has settled (see
            :class:`~netslim.train.control.SparsityControl`).
        teacher: a YOLO (``.pt`` or netslim ``.pth``) the model learns from by Ultralytics'
            feature distillation (its ``DistillationModel``, weight ``dis=``), read by netslim
            without running the file's code; on resume, the run's own.
        distill: the term (``{"term": "features"}``, Ultralytics', the default; or
            ``{"term": "outputs", "weight": w, "temperature": t}``, :mod:`netslim.yolo.distill`).
        overrides: any other Ultralytics training setting (``batch=16``, ``lr0=0.01``, ...).

    Returns:
        ``out``.
    """
    control = {
        "target_ratio": target_ratio,
        "prune_when_stable": prune_when_stable,
        "stable_tol": stable_tol,
        "stable_epochs": stable_epochs,
    }
    if lam == "auto":
        if target_ratio is None or not 0 < target_ratio < 1:
            raise NetslimError(
                "--lam auto needs --target-ratio R, the share of |gamma| to make sparse, in (0, 1)"
            )
        if str(overrides.get("optimizer", "auto")).lower() != "sgd":
            raise NetslimError(
                "--lam auto assumes SGD's step (a γ moves by lr * λ / (1 - momentum)); add "
                "optimizer=SGD (Ultralytics' auto picks AdamW for short runs)"
            )
        lam = LAM_START
    else:
        control["target_ratio"] = None
    if not 0 <= lam < math.inf:
        raise NetslimError(f"--lam must be >= 0 (the L1 weight on BN gammas), got {lam}")
    if isinstance(model, (str, Path)) and Path(model).suffix in (".pt", ".pth") and not resume:
        model = read_yolo(model)  # read here without running its code, not by Ultralytics
    elif isinstance(model, (str, Path)) and not resume:
        checked_yaml(str(model))  # Ultralytics builds it, once netslim has checked it
    check_settings(overrides, epochs=epochs, imgsz=imgsz)
    data = Path(data)
    check_data(data, _run_info(Path(out)).get("task") if resume else task_of(model))
    out = Path(out)
    distill = check_distill(distill)
    if resume:
        teacher = _run_info(out).get("teacher") or None  # the run's own
        distill = _run_info(out).get("distill") or distill
    elif teacher is not None:
        teacher = check_teacher(teacher, model)
    with runlock.hold(out):  # one writer per run folder, as for classifiers
        if resume:
            last = out / "weights" / "last.pt"
            if not last.is_file():
                raise NetslimError(f"cannot resume: {last} does not exist; start without --resume")
            info = _run_info(out)
            auto = control["target_ratio"] is not None
            if bool(info.get("auto")) != auto or (
                not auto and "lam" in info and info["lam"] != lam
            ):
                raise NetslimError(
                    f"cannot resume {out}: it was trained at --lam {_lam_text(info)}, not "
                    f"{'auto' if auto else f'{lam:g}'}; resume "
                    "with the run's own λ"
                )
            # this file is unpickled by Ultralytics itself when it resumes: read it safely first
            if seam.finished_checkpoint(read_checkpoint(last)):  # Ultralytics had finished
                write_json(out / RUN_FILE, {**_run_info(out), "finished": True})
                return out
        elif (out / "weights" / "last.pt").is_file():  # a run that saved an epoch
            raise NetslimError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        _train(
            model,
            data,
            out,
            lam,
            epochs,
            imgsz,
            resume,
            sparsity_threshold,
            control,
            {**overrides, **({"distill_model": teacher} if teacher else {})},
            distill,
        )
    return out


def _train(
    model: nn.Module | str,
    data: Path,
    out: Path,
    lam: float,
    epochs: int,
    imgsz: int,
    resume: bool,
    sparsity_threshold: float,
    control: dict[str, Any],
    overrides: dict[str, Any],
    distill: dict[str, Any],
) -> None:
    """:func:`train` once its arguments are checked and the run folder is held."""
    settings = {
        **DEFAULTS,
        **overrides,
        "data": str(data.resolve()),
        "epochs": epochs,
        "imgsz": imgsz,
        "project": str(out.parent.resolve()),
        "name": out.name,
    }
    if resume:
        last = out / "weights" / "last.pt"
        task = _run_info(out).get("task", "detect")
        settings.update(resume=str(last), model=str(last))
        start = None
    else:
        if isinstance(model, nn.Module):
            task = task_of(model)
            check_classes(model, data)
            start = out / "weights" / "start.pt"  # the network, as it is, for every process
            write_model(model, start)
            settings["model"] = str(start)
        else:
            task, start = task_of(model), None
            settings["model"] = model
        out.mkdir(parents=True, exist_ok=True)
        write_json(
            out / RUN_FILE,
            {
                "task": task,
                "lam": lam,
                "auto": control["target_ratio"] is not None,
                "control": control,
                "model": settings["model"],
                "teacher": settings.get("distill_model"),
                "distill": distill,
            },
        )
    trainer = seam.trainer_for(task)
    if resume and _run_info(out).get("control"):  # the run's own controls
        control = _run_info(out)["control"]
    environment = {
        ENV_LAM: repr(float(lam)),
        ENV_THRESHOLD: repr(sparsity_threshold),
        ENV_START: str(start) if start else "",
        ENV_CONTROL: json.dumps(control),
        ENV_TEACHER: str(settings.get("distill_model") or ""),
        ENV_DISTILL: json.dumps(distill),
    }
    saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    try:
        trainer(overrides=settings).train()
        write_json(out / RUN_FILE, {**_run_info(out), "finished": True})  # for the lab's resume
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def finetune(
    pruned: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    epochs: int = 100,
    imgsz: int = 640,
    resume: bool = False,
    trust_pickle: bool = False,
    teacher: str | Path | None = None,
    distill: bool = True,
    distill_term: dict[str, Any] | None = None,
    **overrides: Any,
) -> Path:
    """Fine-tune a pruned YOLO (netslim's ``.pth`` or an Ultralytics ``.pt``) with Ultralytics'
    trainer, keeping its pruned widths; ``OUT/weights/best.pt`` loads with
    ``ultralytics.YOLO``, and ``OUT/finetuned.pth`` (the same network in fp32, where best.pt
    holds it in fp16 as Ultralytics saves) with netslim's ``export``, ``bench`` and
    ``netslim.load``. The student learns from ``teacher`` by Ultralytics' distillation
    (weight ``dis=``); by default from the unpruned network ``netslim yolo prune`` recorded
    in the pruned ``.pth``; ``distill=False`` fine-tunes from the labels alone;
    ``distill_term``: see :func:`train`'s ``distill``. Returns ``out``."""
    out = Path(out)
    model = None if resume else read_yolo(pruned, trust_pickle=trust_pickle)
    if not resume:
        if task_of(model) not in DISTILLED_TASKS and teacher is None:
            distill = False  # Ultralytics distils the features entering a Detect head only
        teacher = _teacher_of(pruned, teacher, distill)
    train(
        model if model is not None else "",
        data,
        out,
        lam=0.0,
        epochs=epochs,
        imgsz=imgsz,
        resume=resume,
        teacher=teacher,
        distill=distill_term,
        **overrides,
    )
    fp32 = out / "weights" / BEST_FP32
    if fp32.is_file():  # the same network as best.pt, without its rounding to fp16
        contents = fp32.read_bytes()
        atomic_write(out / "finetuned.pth", lambda f: f.write(contents))
    else:
        best = read_model(out / "weights" / "best.pt")  # this run's, read all the same safely
        save(best, out / "finetuned.pth", arch=arch_of(best), image_size=imgsz)
    return out


# The tasks whose heads Ultralytics' distillation reaches (a Detect head and its subclasses)
DISTILLED_TASKS = ("detect", "segment", "pose", "obb")


def _teacher_of(pruned: str | Path, given: str | Path | None, distill: bool) -> str | None:
    """The teacher of a fine-tuning: ``given``, else the network a netslim ``.pth`` says it
    was pruned from (None: distillation off, or nothing recorded, as in a ``.pt``)."""
    meta: dict[str, Any] = {}
    if Path(pruned).suffix == ".pth":
        meta = read_netslim_checkpoint(pruned).get("netslim") or {}
    return teacher_path(meta, None if given is None else str(given), distill, str(pruned))


def check_distill(distill: dict[str, Any] | None) -> dict[str, Any]:
    """The distillation term's settings, complete, or one line naming what is wrong."""
    settings = {"term": YOLO_DISTILL_TERMS[0], **(distill or {})}
    if settings["term"] not in YOLO_DISTILL_TERMS:
        raise NetslimError(
            f"--distill-term must be one of {', '.join(YOLO_DISTILL_TERMS)}, got "
            f"{settings['term']!r}"
        )
    if settings["term"] == "outputs":
        weight = settings.setdefault("weight", outputs.WEIGHT)
        temperature = settings.setdefault("temperature", outputs.TEMPERATURE)
        if not 0 <= weight < math.inf:
            raise NetslimError(f"--distill-weight must be >= 0 and finite, got {weight}")
        if not 0 < temperature < math.inf:
            raise NetslimError(f"--distill-temperature must be > 0 and finite, got {temperature}")
    return settings


def check_teacher(teacher: str | Path, student: nn.Module | str) -> str:
    """``teacher``'s path, resolved, once it is a YOLO of the student's task and classes."""
    path = Path(teacher)
    if not path.is_file():
        raise NetslimError(
            f"--teacher {teacher} does not exist; name the unpruned network's .pt or .pth, or "
            "pass --no-distill"
        )
    model = read_yolo(path)
    if isinstance(student, nn.Module) and task_of(student) not in DISTILLED_TASKS:
        raise NetslimError(
            f"Ultralytics' distillation reaches the features entering a Detect head "
            f"({', '.join(DISTILLED_TASKS)}), not a {task_of(student)} model; pass --no-distill"
        )
    if isinstance(student, nn.Module):
        if task_of(model) != task_of(student):
            raise NetslimError(
                f"--teacher {teacher} is a {task_of(model)} model but the network trained is "
                f"a {task_of(student)} one; name a teacher of the same task"
            )
        if num_outputs(model) != num_outputs(student):
            raise NetslimError(
                f"--teacher {teacher} has {num_outputs(model)} classes but the network trained "
                f"has {num_outputs(student)}; name the network it was pruned from"
            )
    return str(path.resolve())


def _lam_text(info: dict[str, Any]) -> str:
    return "auto" if info.get("auto") else f"{info['lam']:g}"


def _run_info(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def check_classes(model: nn.Module, data: Path) -> None:
    """Refuse a model whose classes are not the data set's (Ultralytics would train a head
    of the wrong width, or fail deep inside its loss)."""
    import yaml

    names = (yaml.safe_load(data.read_text()) or {}).get("names") or {}
    classes = len(names) if isinstance(names, (list, dict)) else None
    if classes and num_outputs(model) != classes:
        raise NetslimError(
            f"the model has {num_outputs(model)} classes but {data} names {classes}; use the "
            "data set it was trained on (or train a new model from its YAML)"
        )
