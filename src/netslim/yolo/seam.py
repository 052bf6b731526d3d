"""Where netslim meets Ultralytics' trainer, in one module.

The rest of :mod:`netslim.yolo` calls this module, never Ultralytics' trainer classes, their
methods and callbacks, its task map, its metric names or its checkpoint keys directly, so
that a new Ultralytics release that moves one of them is met here (``make
test-ultralytics-latest`` runs the YOLO tests against the newest release). Outside it stay
only what reads Ultralytics' other parts for what they are: its ``.pt`` format, read without
running code (:mod:`.files`), its settings and data-set checks (:mod:`.settings`,
:mod:`.data`) and its exporter. What it holds:

* **the task map**: Ultralytics' own (:func:`task_map`, the ``task_map`` of its ``YOLO``
  model class), from which :func:`trainer_for` and :func:`validator_for` pick a task's
  classes; :func:`task_of` is Ultralytics' guess of a model's task.
* **netslim's trainer** (:func:`trainer_for`): Ultralytics' trainer of the task with
  netslim's mixin, which changes only

  - *the L1 term*: a step pre-hook on the optimizer (``register_step_pre_hook``),
    installed by ``build_optimizer`` (so a rebuilt optimizer gets it too). Ultralytics'
    ``optimizer_step`` unscales the gradients (AMP's GradScaler), clips them (total norm
    10) and then steps the optimizer through the scaler: the hook runs inside that step,
    after the unscaling and the clipping, and adds ``lam * sign(gamma)`` to every
    BatchNorm gamma's gradient of the unwrapped model (under DDP after the all-reduce,
    identically on every process). A step the scaler skips (inf or NaN gradients) runs
    no hook. λ is read at every step from the run (:attr:`SparsityRun.lam`);
  - *the network*: ``setup_model`` gives Ultralytics the network netslim built (a pruned
    one as it is), and on resume rebuilds the checkpoint's network at the widths its
    weights have (Ultralytics would rebuild it from its YAML at full width);
  - *distillation*: with a teacher (``--teacher``, or the unpruned network a pruned
    ``.pth`` records), ``setup_model`` wraps the student in Ultralytics' own
    ``DistillationModel`` (its projector and score-weighted feature loss, weight ``dis=``)
    with a teacher netslim read without running its file's code (Ultralytics would unpickle
    the ``distill_model`` path); on resume it rebuilds the wrapper from ``last.pt``'s student
    and projector. Everything netslim reads of the run (the L1 term's γs, the record, the
    fp32 copies) is the student alone (:func:`student_of`);
  - *between epochs and on saving*: Ultralytics' callbacks (``on_train_start``,
    ``on_train_epoch_end``, ``on_fit_epoch_end``, ``on_model_save``) call the run's
    :class:`netslim.yolo.run.SparsityRun` with plain values (the epoch, the weights,
    the EMA network, the metrics);
  - *the configuration dump*: Ultralytics prints all its settings whenever a trainer is
    built (they are in the run's ``args.yaml``); netslim's trainers print none.

* **metric names** (:data:`METRICS`, :func:`metric_key`, :func:`fitness`), the columns of
  ``results.csv`` (:data:`TIME_COLUMN`, :func:`results_column`) and **checkpoint keys**
  (:func:`finished_checkpoint`: Ultralytics marks a finished run's ``last.pt`` with epoch
  -1; which network a ``.pt`` holds is :func:`netslim.yolo.files.checkpoint_network`, with
  the rest of the file layout, which the seam reads through it).

The oldest Ultralytics release whose APIs this module uses is pinned in pyproject.toml's
``yolo`` extra.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from functools import cache
from pathlib import Path
from typing import Any

from torch import nn

from netslim.engine.sparsity import add_bn_l1_grad
from netslim.errors import NetslimError
from netslim.yolo.files import (
    checkpoint_network,
    model_of,
    module_weights,
    read_checkpoint,
    read_model,
    read_yolo,
)
from netslim.yolo.run import SparsityRun

# --------------------------------------------------------------------------------------
# Metric names, results.csv and checkpoint keys
# --------------------------------------------------------------------------------------

# netslim's name of a metric -> Ultralytics' key in its validator's results, results.csv
# and the trainer's metrics (B: boxes, M: masks)
METRICS = {
    "mAP50": "metrics/mAP50(B)",
    "mAP50-95": "metrics/mAP50-95(B)",
    "mask mAP50": "metrics/mAP50(M)",
    "mask mAP50-95": "metrics/mAP50-95(M)",
    "top1": "metrics/accuracy_top1",
}
FITNESS = "fitness"  # the trainer's score of an epoch: best.pt is the epoch of highest fitness
TIME_COLUMN = "time"  # results.csv: seconds since the (re)start of the run, cumulative
FINISHED_EPOCH = -1  # the epoch of a last.pt Ultralytics stripped at the end of its run


def metric_key(metric: str) -> str:
    """Ultralytics' key of one of netslim's metric names (``"mAP50-95"``, ...)."""
    return METRICS[metric]


def fitness(record: dict[str, Any]) -> float:
    """The fitness of an epoch's record (its box mAP50-95 where it holds no fitness)."""
    return record.get(FITNESS, record.get(METRICS["mAP50-95"], 0.0))


def named_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Ultralytics' validation results under netslim's metric names."""
    return {name: float(results[key]) for name, key in METRICS.items() if key in results}


def results_column(run: str | Path, column: str) -> list[float] | None:
    """One column of a run's ``results.csv`` (None without the file or the column)."""
    csv = Path(run) / "results.csv"
    if not csv.is_file():
        return None
    lines = csv.read_text().splitlines()
    names = [c.strip() for c in lines[0].split(",")] if lines else []
    if column not in names:
        return None
    index = names.index(column)
    return [float(line.split(",")[index]) for line in lines[1:] if line.strip()]


def checkpoint_epoch(checkpoint: dict[str, Any]) -> int | None:
    """The 0-based epoch a checkpoint was saved after (:data:`FINISHED_EPOCH` once stripped)."""
    return checkpoint.get("epoch")


def finished_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """Whether Ultralytics stripped this ``last.pt``: it does so once its run is over."""
    return checkpoint_epoch(checkpoint) == FINISHED_EPOCH


# --------------------------------------------------------------------------------------
# The task map
# --------------------------------------------------------------------------------------


@cache
def task_map() -> dict[str, dict[str, Any]]:
    """Ultralytics' own map of a task to its model, trainer, validator and predictor."""
    from ultralytics import YOLO

    return YOLO.task_map.fget(None)  # a property that reads nothing of the model


def task_of(model: nn.Module | str | Path) -> str:
    """``"detect"``, ``"segment"``, ``"classify"``, ... of a model or a model YAML name."""
    from ultralytics.nn.tasks import guess_model_task, yaml_model_load

    if isinstance(model, (str, Path)) and str(model).endswith((".yaml", ".yml")):
        model = yaml_model_load(str(model))  # its head names the task (the file name may not)
    return guess_model_task(model)


def _classes(task: str) -> dict[str, Any]:
    if task not in task_map():
        raise NetslimError(f"no Ultralytics trainer for the task {task!r}")
    return task_map()[task]


def validator_for(task: str) -> type:
    """Ultralytics' validator class of ``task``."""
    return _classes(task)["validator"]


def trainer_for(task: str) -> type:
    """netslim's trainer of ``task``: Ultralytics' with :class:`NetslimTrainer` mixed in
    (see the module docs). One class per task, named ``Sparsity<Ultralytics' name>`` and
    importable from this module (Ultralytics' DDP processes import it by name)."""
    base = _classes(task)["trainer"]
    name = f"Sparsity{base.__name__}"
    if name not in globals():
        cls = type(
            name,
            (NetslimTrainer, base),
            {
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"Ultralytics' {base.__name__} with netslim's L1 term and model handling.",
            },
        )
        globals()[name] = cls
    return globals()[name]


@cache
def _outputs_distillation() -> type:
    """:class:`OutputsDistillation`: Ultralytics' ``DistillationModel`` (its teacher handling,
    freezing, EMA and checkpoint stripping, resume) with :mod:`netslim.yolo.distill`'s term
    in place of its feature term. Built on first use (Ultralytics is imported then)."""
    import copyreg

    import torch
    from ultralytics.nn.distill_model import DistillationModel

    from netslim.yolo.distill import outputs_loss

    class OutputsDistillation(DistillationModel):
        """Ultralytics' distillation wrapper, distilling the head's outputs (netslim's term)."""

        netslim_distill: dict[str, float] = {}

        def __reduce_ex__(self, protocol):
            # pickled, and deep-copied (Ultralytics' EMA is a copy), as Ultralytics' own
            # wrapper: a checkpoint names no netslim class, which Ultralytics' loader would
            # refuse; a resumed run rebuilds this one (setup_model), and the EMA computes no loss
            return copyreg._reconstructor, (DistillationModel, object, None), self.__getstate__()

        def loss(self, batch, preds=None):
            if not self.training:  # validation while training: the student's loss alone
                return super().loss(batch, preds)
            with torch.no_grad():
                teacher = self.teacher_model(batch["img"])
            student = self.student_model(batch["img"])
            regular, items = self.student_model.loss(batch, student)
            settings = self.netslim_distill
            # the teacher (eval mode) returns (decoded, raw); an end-to-end head, two branches
            term = settings.get("weight", 1.0) * outputs_loss(
                self.decouple_outputs(student, branch="one2many"),
                self.decouple_outputs(teacher, branch="one2many"),
                settings.get("temperature", 1.0),
            )
            items["dis_loss"] = term.detach().reshape(1)
            return torch.cat([regular, term.reshape(1) * batch["img"].shape[0]]), items

    OutputsDistillation.__module__, OutputsDistillation.__qualname__ = (
        __name__,
        "OutputsDistillation",
    )
    return OutputsDistillation


def __getattr__(name: str) -> Any:
    """``SparsityDetectionTrainer`` and the others, built on first use (an unpickler, as in
    Ultralytics' DDP processes, asks for them by name); ``OutputsDistillation`` likewise."""
    if name == "OutputsDistillation":
        return _outputs_distillation()
    if name.startswith("Sparsity") and name.endswith("Trainer"):
        for task, classes in task_map().items():
            if f"Sparsity{classes['trainer'].__name__}" == name:
                return trainer_for(task)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------
# netslim's trainer
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet(level: int = logging.WARNING):
    """Ultralytics' informational lines off (its logger), e.g. the settings dump."""
    logger = logging.getLogger("ultralytics")
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (or the model)."""
    return model.module if hasattr(model, "module") else model


def student_of(model: nn.Module) -> nn.Module:
    """The network being trained: inside DDP, and inside Ultralytics' distillation wrapper
    (``DistillationModel``, whose teacher and projector are not part of the network)."""
    model = unwrap(model)
    student = getattr(model, "student_model", None)
    return model if student is None else student


def distillation(
    student: nn.Module, teacher: nn.Module, args: Any, settings: dict[str, Any] | None = None
) -> nn.Module:
    """Ultralytics' ``DistillationModel`` of ``student`` learning from ``teacher`` (both
    built by netslim: Ultralytics would unpickle a teacher's file, running its code), with the
    run's settings ``args`` (its ``imgsz``, and ``dis``, the weight of the feature term); with
    ``settings["term"] == "outputs"``, netslim's :class:`OutputsDistillation` in its place."""
    from ultralytics.nn.distill_model import DistillationModel

    settings = settings or {}
    student.args = args  # what Ultralytics sets on the model it trains; the wrapper reads it
    try:
        if settings.get("term") == "outputs":
            wrapper = _outputs_distillation()(teacher_model=teacher, student_model=student)
            wrapper.netslim_distill = {k: settings[k] for k in ("weight", "temperature")}
            return wrapper
        return DistillationModel(teacher_model=teacher, student_model=student)
    except ValueError as e:  # "No Detect head found in model", different feature levels
        raise NetslimError(
            f"Ultralytics' distillation cannot pair this network with its teacher ({e}); it "
            "distils the features entering a Detect head (detect, segment, pose, obb): pass "
            "--no-distill"
        ) from None


def _resumed_distillation(
    record: Any, path: str, teacher: nn.Module, args: Any, settings: dict[str, Any]
) -> nn.Module:
    """The distillation wrapper a resumed run's ``last.pt`` held (its ``record``, read without
    running code): the student at its widths, the trained projector, the teacher given."""
    parts = record.__dict__.get("_modules") or {}
    student = model_of(parts["student_model"], path).train()
    wrapper = distillation(student, teacher, args, settings)
    wrapper.projector.load_state_dict(module_weights(parts["projector"], path))
    return wrapper


def add_l1_hook(optimizer: Any, trainer: Any) -> Any:
    """Install the L1 term on ``optimizer`` (see the module docs); returns the hook's handle.
    λ is ``trainer.netslim.lam`` at each step, the model ``trainer.model`` unwrapped."""

    def l1_term(optimizer: Any, args: Any, kwargs: Any) -> None:
        # inside the optimizer's step: the gradients are unscaled and clipped by now, so the
        # L1 step is exactly lr * lam * sign(gamma), whatever the loss scale
        lam = trainer.netslim.lam
        if lam:
            add_bn_l1_grad(student_of(trainer.model), lam)

    return optimizer.register_step_pre_hook(l1_term)


class NetslimTrainer:
    """Mixed into an Ultralytics trainer (see the module docs). The run's settings come
    from the environment (:meth:`netslim.yolo.run.SparsityRun.from_environment`), so that
    the processes Ultralytics starts for DDP, which build their trainer afresh, get them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with quiet():  # its settings dump: they are in the run's args.yaml
            super().__init__(*args, **kwargs)
        self.netslim = SparsityRun.from_environment()
        self.netslim_epoch_trained = False
        self.add_callback("on_train_start", _train_start)
        self.add_callback("on_train_epoch_end", _epoch_trained)
        self.add_callback("on_fit_epoch_end", _fit_epoch_end)
        self.add_callback("on_model_save", _model_saved)

    def setup_model(self):
        if self.args.resume:
            # Ultralytics would rebuild the network at its YAML's full width and fail to load a
            # pruned one's weights: rebuild it at the widths last.pt holds (read without running
            # its code), and give Ultralytics that network as the checkpoint's EMA to resume
            checkpoint = read_checkpoint(self.args.resume)
            record = checkpoint_network(checkpoint)
            if self.netslim.teacher:  # the EMA of a distillation: student and projector
                teacher = read_yolo(self.netslim.teacher)
                self.model = _resumed_distillation(
                    record, self.args.resume, teacher, self.args, self.netslim.distill
                )
                ema = nn.Module()  # what Ultralytics' EMA of the wrapper holds: no teacher
                ema.student_model, ema.projector = self.model.student_model, self.model.projector
                return {**checkpoint, "ema": ema, "model": None}
            self.model = model_of(record, self.args.resume)
            return {**checkpoint, "ema": self.model, "model": None}
        if self.netslim.start:  # the network given, pruned or not, as it is
            self.model = read_model(self.netslim.start)
            checkpoint = None
        else:
            checkpoint = super().setup_model()
        if self.netslim.teacher:  # Ultralytics would wrap it too, unpickling the teacher's file
            self.model = distillation(
                self.model, read_yolo(self.netslim.teacher), self.args, self.netslim.distill
            )
        return checkpoint

    def build_optimizer(self, *args: Any, **kwargs: Any):
        optimizer = super().build_optimizer(*args, **kwargs)
        add_l1_hook(optimizer, self)
        return optimizer


def _epoch_lr(trainer: Any) -> list[float]:
    """Per epoch, how far a λ of 1 moves a γ: lr / (1 - momentum) per optimizer step (SGD
    with momentum), summed over the epoch's steps."""
    steps = max(1.0, len(trainer.train_loader) / max(1, trainer.accumulate))
    factor = steps * trainer.args.lr0 / (1 - trainer.args.momentum)
    return [factor * trainer.lf(e) for e in range(trainer.epochs)]


def _train_start(trainer: Any) -> None:
    trainer.netslim.begin(
        _epoch_lr(trainer),
        Path(trainer.save_dir),
        resumed=bool(trainer.args.resume),
        start_epoch=int(trainer.start_epoch),
    )


def _epoch_trained(trainer: Any) -> None:
    trainer.netslim_epoch_trained = True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def _fit_epoch_end(trainer: Any) -> None:
    """An epoch ended (trained, validated, saved): the run decides (on every DDP process
    alike) and records it; a stop ends Ultralytics' training after this epoch."""
    from ultralytics.utils import RANK

    if not trainer.netslim_epoch_trained:
        return  # the final validation of best.pt (Ultralytics calls this again): no epoch
    trainer.netslim_epoch_trained = False
    if trainer.netslim.control is None:
        _train_start(trainer)
    weights = student_of(trainer.model)  # the same on every process, unlike the EMA
    ema = student_of(trainer.ema.ema) if getattr(trainer, "ema", None) else weights
    metrics = {k: float(v) for k, v in (trainer.metrics or {}).items() if _number(v)}
    stop = trainer.netslim.end_epoch(
        int(trainer.epoch) + 1,
        weights,
        ema,
        metrics,
        Path(trainer.save_dir),
        main=RANK in (-1, 0),
    )
    if stop:
        trainer.stop = True  # Ultralytics stops after this epoch (all DDP processes)


def _model_saved(trainer: Any) -> None:
    """Ultralytics just wrote last.pt (and best.pt when this epoch is the best), in fp16."""
    network = copy.deepcopy(student_of(trainer.ema.ema)).float()  # no distillation wrapper
    trainer.netslim.saved(
        network,
        Path(trainer.wdir),
        best=trainer.best_fitness == trainer.fitness,
        image_size=trainer.args.imgsz,
    )


def loader_trainer(task: str, overrides: dict[str, Any]) -> Any:
    """A trainer of ``task`` built for its data loader and batch preprocessing only
    (:func:`training_batches`)."""
    return trainer_for(task)(overrides=overrides)


def training_batches(trainer: Any, model: nn.Module, batch: int):
    """Images (floats in [0, 1]) of ``trainer``'s training loader, preprocessed as
    Ultralytics trains on them."""
    trainer.model = model
    loader = trainer.get_dataloader(trainer.data["train"], batch_size=batch, rank=-1, mode="train")
    for batch_ in loader:
        yield trainer.preprocess_batch(batch_)["img"]
