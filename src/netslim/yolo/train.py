"""Sparsity training and fine-tuning of a YOLO through Ultralytics' own trainer.

:func:`train` runs Ultralytics' trainer for the model's task (detect, segment, classify,
...) with two changes, and nothing else of Ultralytics' recipe altered (its augmentation,
loss, schedule, EMA, AMP, DDP, checkpoints, validation):

* **the L1 term**: after Ultralytics unscales the gradients (AMP's GradScaler) and clips
  them (total norm 10), right before the optimizer steps, ``lam * sign(gamma)`` is added to
  the gradient of every BatchNorm gamma (:func:`netslim.engine.sparsity.add_bn_l1_grad`),
  once per optimizer step, on the unwrapped model: under DDP after the all-reduce,
  identically on every process; the EMA follows. After the clipping, not before: Ultralytics
  multiplies its loss by the batch size and the gradient norm is far above 10, so a term
  added before would be shrunk with the data gradient by a factor that changes from step
  to step (measured on yolov8n, CIFAR detection set: λ = 0.02 moved the median |γ| from 1
  to 0.984 in 7 epochs). After it, every step moves γ by lr * λ (SGD, before momentum) as
  the paper's loop does, which has no clipping, and ``--lam auto`` can predict it.
* **the model it is given is the model it trains**: a pruned network is never rebuilt from
  its YAML (Ultralytics would build the full-width one and load the weights that fit).

Ultralytics saves its checkpoints in fp16; whenever it writes ``weights/last.pt`` or
``weights/best.pt``, the same network goes to ``weights/last.pth`` or ``weights/best.pth``
in fp32 as well (netslim checkpoints).

After every epoch a record of the EMA model's gammas goes to ``OUT/sparsity.jsonl`` beside
Ultralytics' ``results.csv``: λ, the share of |γ| under the threshold, quantiles, a
histogram on log-spaced bins, and Ultralytics' metrics of that epoch. Ultralytics' automatic downloads stay off, and so do
its plots (they download a font).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.models import yolo  # netslim[yolo]; the core never imports this package

from netslim.config import LAM_START
from netslim.engine.sparsity import (
    add_bn_l1_grad,
    bn_gammas,
    bn_sparsity,
    gamma_histogram,
    gamma_quantiles,
)
from netslim.errors import NetslimError
from netslim.files import atomic_write, atomic_write_text, write_json
from netslim.models import num_outputs
from netslim.models.yolo_yaml import checked_yaml
from netslim.slim import save
from netslim.train import runlock
from netslim.train.control import AutoLam, StableMask
from netslim.yolo.data import check_data
from netslim.yolo.files import (
    arch_of,
    model_of,
    read_checkpoint,
    read_model,
    read_yolo,
    write_model,
)
from netslim.yolo.settings import check_settings

SPARSITY_LOG = "sparsity.jsonl"
BEST_FP32 = "best.pth"  # weights/best.pth: best.pt's network in fp32, a netslim checkpoint
LAST_FP32 = "last.pth"  # weights/last.pth: last.pt's network in fp32
RUN_FILE = "netslim.json"  # the task and λ of a run, for --resume
# netslim's choices where Ultralytics' defaults would reach the network or the screen
DEFAULTS = {"plots": False, "exist_ok": True, "verbose": False}
# What a trainer reads from the environment, so that torchrun's processes (Ultralytics
# starts DDP in new processes that build the trainer afresh) get it too.
ENV_LAM, ENV_START, ENV_THRESHOLD, ENV_CONTROL = (
    "NETSLIM_YOLO_LAM",
    "NETSLIM_YOLO_START",
    "NETSLIM_YOLO_THRESHOLD",
    "NETSLIM_YOLO_CONTROL",
)
CONTROL_FILE = "control.json"  # λ auto's and the mask watch's state after the last epoch
LAM_AUTO_MAX = 1.0  # λ auto's ceiling: Ultralytics' loss is summed over the batch, so its λ
# are larger than a classifier's (netslim.train.control.LAM_MAX)


def task_of(model: nn.Module | str) -> str:
    """``"detect"``, ``"segment"``, ``"classify"``, ... of a model or a model YAML name."""
    from ultralytics.nn.tasks import guess_model_task, yaml_model_load

    if isinstance(model, (str, Path)) and str(model).endswith((".yaml", ".yml")):
        model = yaml_model_load(str(model))  # its head names the task (the file name may not)
    return guess_model_task(model)


class _SparsityMixin:
    """Mixed into an Ultralytics trainer (see the module docs). λ and the network to start
    from come from the environment (:data:`ENV_LAM`, :data:`ENV_START`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.netslim_lam = float(os.environ.get(ENV_LAM, "0") or 0)
        self.netslim_threshold = float(os.environ.get(ENV_THRESHOLD, "0.01") or 0.01)
        self.netslim_control = Control(**json.loads(os.environ.get(ENV_CONTROL) or "{}"))
        self.add_callback("on_train_start", _restore_control)
        self.add_callback("on_train_epoch_end", _epoch_trained)
        self.add_callback("on_fit_epoch_end", _end_of_epoch)

    def setup_model(self):
        if self.args.resume:
            # Ultralytics would rebuild the network at its YAML's full width and fail to load a
            # pruned one's weights: rebuild it at the widths last.pt holds (read without running
            # its code), and give Ultralytics that network as the checkpoint's EMA to resume
            checkpoint = read_checkpoint(self.args.resume)
            self.model = model_of(checkpoint.get("ema") or checkpoint["model"], self.args.resume)
            return {**checkpoint, "ema": self.model, "model": None}
        start = os.environ.get(ENV_START)
        if start:  # the network given, pruned or not, as it is
            self.model = read_model(start)
            return None
        return super().setup_model()

    def save_model(self):
        saved = super().save_model()
        if saved is not False:  # last.pt (and maybe best.pt) was just written, in fp16
            # (Ultralytics' format): keep the same networks in fp32 beside them
            network = copy.deepcopy(self.ema.ema).float()
            names = [LAST_FP32] + [BEST_FP32] * (self.best_fitness == self.fitness)
            for name in names:
                save(network, Path(self.wdir) / name, arch=arch_of(network),
                     image_size=self.args.imgsz, kind="train")  # fmt: skip
        return saved

    def optimizer_step(self):
        lam, model = self.netslim_lam, _unwrap(self.model)
        if lam == 0:
            return super().optimizer_step()
        step = self.scaler.step

        def penalise_then_step(optimizer, *args, **kwargs):
            # the gradients are unscaled (Ultralytics called unscale_) and clipped by now:
            # the L1 step is exactly lr * lam * sign(gamma), whatever the loss scale
            add_bn_l1_grad(model, lam)
            return step(optimizer, *args, **kwargs)

        self.scaler.step = penalise_then_step
        try:
            return super().optimizer_step()
        finally:
            self.scaler.step = step


class SparsityDetectionTrainer(_SparsityMixin, yolo.detect.DetectionTrainer):
    """Ultralytics' detection trainer with netslim's L1 term and model handling."""


class SparsitySegmentationTrainer(_SparsityMixin, yolo.segment.SegmentationTrainer):
    """Ultralytics' segmentation trainer with netslim's L1 term and model handling."""


class SparsityClassificationTrainer(_SparsityMixin, yolo.classify.ClassificationTrainer):
    """Ultralytics' classification trainer with netslim's L1 term and model handling."""


class SparsityPoseTrainer(_SparsityMixin, yolo.pose.PoseTrainer):
    """Ultralytics' pose trainer with netslim's L1 term and model handling."""


class SparsityOBBTrainer(_SparsityMixin, yolo.obb.OBBTrainer):
    """Ultralytics' oriented-box trainer with netslim's L1 term and model handling."""


TRAINERS = {"detect": SparsityDetectionTrainer, "segment": SparsitySegmentationTrainer,
            "classify": SparsityClassificationTrainer, "pose": SparsityPoseTrainer,
            "obb": SparsityOBBTrainer}  # fmt: skip


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@dataclass
class Control:
    """Between epochs, as for classifiers (:mod:`netslim.train.control`): ``target_ratio``
    (λ auto: λ adapted each epoch so that this share of |γ| ends under the sparsity
    threshold) and ``prune_when_stable`` (stop once the removal mask at that ratio has
    changed by at most ``stable_tol`` of the channels for ``stable_epochs`` epochs in a row).
    Both decide from the trained weights, which every DDP process holds alike; λ auto has no
    accuracy guard here (a detector's training loop measures no accuracy)."""

    target_ratio: float | None = None
    prune_when_stable: float | None = None
    stable_tol: float = 0.01
    stable_epochs: int = 3
    auto: AutoLam | None = None
    stable: StableMask | None = None

    def start(self, trainer: Any) -> None:
        """Build the controllers once the trainer knows its schedule."""
        if self.target_ratio is not None and self.auto is None:
            # a λ of 1 moves a γ by lr / (1 - momentum) per optimizer step (SGD with momentum)
            steps = max(1.0, len(trainer.train_loader) / max(1, trainer.accumulate))
            factor = steps * trainer.args.lr0 / (1 - trainer.args.momentum)
            epoch_lr = [factor * trainer.lf(e) for e in range(trainer.epochs)]
            self.auto = AutoLam(self.target_ratio, epoch_lr, lam=trainer.netslim_lam,
                                threshold=trainer.netslim_threshold, lam_max=LAM_AUTO_MAX)  # fmt: skip
        if self.prune_when_stable is not None and self.stable is None:
            self.stable = StableMask(self.prune_when_stable, self.stable_tol, self.stable_epochs)

    def state(self, epoch: int, lam: float) -> dict[str, Any]:
        stable = self.stable.state_dict() if self.stable else None
        if stable and stable["previous"] is not None:
            stable["previous"] = stable["previous"].tolist()
        return {"epoch": epoch, "lam": lam, "auto": self.auto.state_dict() if self.auto else None,
                "stable": stable}  # fmt: skip

    def load(self, state: dict[str, Any]) -> None:
        if self.auto and state.get("auto"):
            self.auto.load_state_dict(state["auto"])
        if self.stable and state.get("stable"):
            stable = dict(state["stable"])
            if stable["previous"] is not None:
                stable["previous"] = torch.tensor(stable["previous"], dtype=torch.bool)
            self.stable.load_state_dict(stable)


def _restore_control(trainer: Any) -> None:
    """On resume, the controllers' state and λ after the last epoch saved."""
    control: Control = trainer.netslim_control
    control.start(trainer)
    path = Path(trainer.save_dir) / CONTROL_FILE
    if trainer.args.resume and path.is_file():
        state = json.loads(path.read_text())
        if state["epoch"] == trainer.start_epoch:  # the state after the epoch last.pt holds
            control.load(state)
            trainer.netslim_lam = float(state["lam"])


def _epoch_trained(trainer: Any) -> None:
    trainer.netslim_epoch_trained = True


def _end_of_epoch(trainer: Any) -> None:
    """Take the control decisions (on every DDP process alike), then record the epoch:
    the gamma statistics of the EMA model (which Ultralytics validates and saves) and
    Ultralytics' metrics, in ``sparsity.jsonl``."""
    from ultralytics.utils import RANK

    if not getattr(trainer, "netslim_epoch_trained", False):
        return  # the final validation of best.pt (Ultralytics calls this again): no epoch
    trainer.netslim_epoch_trained = False
    epoch, control = int(trainer.epoch) + 1, trainer.netslim_control
    control.start(trainer)
    weights = _unwrap(trainer.model)  # the same on every process, unlike the EMA
    decisions: dict[str, Any] = {}
    lam = trainer.netslim_lam
    if control.auto is not None:
        quantile = torch.quantile(bn_gammas(weights).abs().float(), control.target_ratio).item()
        trainer.netslim_lam = control.auto.update(epoch, quantile, train_acc=0.0)
        decisions.update(quantile=quantile, lam_next=trainer.netslim_lam)
    if control.stable is not None:
        decisions["mask_distance"] = control.stable.update(weights, epoch)
        if control.stable.stopped_at == epoch:
            trainer.stop = True  # Ultralytics stops after this epoch (all DDP processes)
            decisions["stopped"] = True
    if RANK not in (-1, 0):
        return
    model = trainer.ema.ema if getattr(trainer, "ema", None) else weights
    record = {
        "epoch": epoch,
        "lam": lam,
        "sparsity": bn_sparsity(model, trainer.netslim_threshold),
        "gamma_quantiles": gamma_quantiles(model),
        "gamma_histogram": gamma_histogram(model),
        **decisions,
        **{k: float(v) for k, v in (trainer.metrics or {}).items() if _number(v)},
    }
    if control.auto is not None or control.stable is not None:
        write_json(Path(trainer.save_dir) / CONTROL_FILE, control.state(epoch, trainer.netslim_lam))
    path = Path(trainer.save_dir) / SPARSITY_LOG
    kept = [line for line in _lines(path) if json.loads(line)["epoch"] < record["epoch"]]
    atomic_write_text(path, "".join(line + "\n" for line in [*kept, json.dumps(record)]))


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
        except ValueError:
            continue  # a line cut by a kill: the epoch is written again
        lines.append(line)
    return lines


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def read_sparsity(run: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records a :func:`train` run wrote."""
    return [json.loads(line) for line in _lines(Path(run) / SPARSITY_LOG)]


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
    stable_tol: float = 0.01,
    stable_epochs: int = 3,
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
            ``prune_when_stable`` has settled (see :class:`Control`).
        overrides: any other Ultralytics training setting (``batch=16``, ``lr0=0.01``, ...).

    Returns:
        ``out``.
    """
    control = Control(target_ratio=target_ratio, prune_when_stable=prune_when_stable,
                      stable_tol=stable_tol, stable_epochs=stable_epochs)  # fmt: skip
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
        control.target_ratio = None
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
    with runlock.hold(out):  # one writer per run folder, as for classifiers
        if resume:
            last = out / "weights" / "last.pt"
            if not last.is_file():
                raise NetslimError(f"cannot resume: {last} does not exist; start without --resume")
            info = _run_info(out)
            if bool(info.get("auto")) != (control.target_ratio is not None) or (
                control.target_ratio is None and "lam" in info and info["lam"] != lam
            ):
                raise NetslimError(
                    f"cannot resume {out}: it was trained at --lam {_lam_text(info)}, not "
                    f"{'auto' if control.target_ratio is not None else f'{lam:g}'}; resume "
                    "with the run's own λ"
                )
            # this file is unpickled by Ultralytics itself when it resumes: read it safely first
            if read_checkpoint(last).get("epoch") == -1:  # stripped: Ultralytics had finished
                write_json(out / RUN_FILE, {**_run_info(out), "finished": True})
                return out
        elif (out / "weights" / "last.pt").is_file():  # a run that saved an epoch
            raise NetslimError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        _train(model, data, out, lam, epochs, imgsz, resume, sparsity_threshold, control, overrides)
    return out


def _train(model: nn.Module | str, data: Path, out: Path, lam: float, epochs: int, imgsz: int,
           resume: bool, sparsity_threshold: float, control: Control,
           overrides: dict[str, Any]) -> None:  # fmt: skip
    """:func:`train` once its arguments are checked and the run folder is held."""
    settings = {**DEFAULTS, **overrides, "data": str(data.resolve()), "epochs": epochs, "imgsz": imgsz,
                "project": str(out.parent.resolve()), "name": out.name}  # fmt: skip
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
        write_json(out / RUN_FILE, {"task": task, "lam": lam, "auto": control.target_ratio is not None,
                                    "control": {k: v for k, v in asdict(control).items() if k not in ("auto", "stable")},
                                    "model": settings["model"]})  # fmt: skip
    if task not in TRAINERS:
        raise NetslimError(f"no Ultralytics trainer for the task {task!r}")
    if resume and _run_info(out).get("control"):  # the run's own controls
        control = Control(**_run_info(out)["control"])
    wanted = {k: v for k, v in asdict(control).items() if k not in ("auto", "stable")}
    environment = {ENV_LAM: repr(float(lam)), ENV_THRESHOLD: repr(sparsity_threshold),
                   ENV_START: str(start) if start else "", ENV_CONTROL: json.dumps(wanted)}  # fmt: skip
    saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    try:
        TRAINERS[task](overrides=settings).train()
        write_json(out / RUN_FILE, {**_run_info(out), "finished": True})  # for the lab's resume
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def finetune(pruned: str | Path, data: str | Path, out: str | Path, *, epochs: int = 100,
             imgsz: int = 640, resume: bool = False, trust_pickle: bool = False,
             **overrides: Any) -> Path:  # fmt: skip
    """Fine-tune a pruned YOLO (netslim's ``.pth`` or an Ultralytics ``.pt``) with Ultralytics'
    trainer, keeping its pruned widths; ``OUT/weights/best.pt`` loads with
    ``ultralytics.YOLO``, and ``OUT/finetuned.pth`` (the same network in fp32, where best.pt
    holds it in fp16 as Ultralytics saves) with netslim's ``export``, ``bench`` and
    ``netslim.load``. Returns ``out``."""
    out = Path(out)
    model = None if resume else read_yolo(pruned, trust_pickle=trust_pickle)
    train(model if model is not None else "", data, out, lam=0.0, epochs=epochs, imgsz=imgsz,
          resume=resume, **overrides)  # fmt: skip
    fp32 = out / "weights" / BEST_FP32
    if fp32.is_file():  # the same network as best.pt, without its rounding to fp16
        contents = fp32.read_bytes()
        atomic_write(out / "finetuned.pth", lambda f: f.write(contents))
    else:
        best = read_model(out / "weights" / "best.pt")  # this run's, read all the same safely
        save(best, out / "finetuned.pth", arch=arch_of(best), image_size=imgsz)
    return out


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
