"""netslim's side of a YOLO training run: λ, the between-epoch control, the record, the files.

:class:`SparsityRun` is what netslim's trainer (:mod:`netslim.yolo.seam`) calls with plain
values -- the epoch, the weights, the EMA network, Ultralytics' metrics -- so that nothing
here knows Ultralytics' internals; :mod:`netslim.yolo.train` starts the runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from netslim.config import YOLO_DISTILL_TERMS
from netslim.engine.sparsity import bn_sparsity, gamma_histogram, gamma_quantiles
from netslim.files import atomic_write_text, write_json
from netslim.slim import save
from netslim.train.control import SparsityControl
from netslim.yolo.files import arch_of

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
ENV_TEACHER = "NETSLIM_YOLO_TEACHER"  # the network to distil from ("": no distillation)
ENV_DISTILL = "NETSLIM_YOLO_DISTILL"  # {"term": "features" | "outputs", "weight", "temperature"}

CONTROL_FILE = "control.json"  # λ auto's and the mask watch's state after the last epoch
LAM_AUTO_MAX = 1.0  # λ auto's ceiling: Ultralytics' loss is summed over the batch, so its λ
# are larger than a classifier's (netslim.train.control.LAM_MAX)


class SparsityRun:
    """netslim's side of a training run, called by netslim's trainer (:mod:`.seam`) with plain
    values: λ at every optimizer step, the between-epoch control (one
    :class:`~netslim.train.control.SparsityControl`, as for classifiers), the per-epoch
    record and the fp32 copies of the checkpoints.

    Args:
        lam: the λ of the first epoch (afterwards the control's, :attr:`lam`).
        threshold: |γ| under it counts as sparse.
        start: the network to train, as :func:`train` wrote it ("": Ultralytics builds it).
        teacher: the network the student learns from by Ultralytics' distillation ("": none).
        distill: which term (``"features"``: Ultralytics', ``"outputs"``:
            :mod:`netslim.yolo.distill`'s, with its ``"weight"`` and ``"temperature"``).
        settings: the control's (``target_ratio``, ``prune_when_stable``, ``stable_tol``,
            ``stable_epochs``).
    """

    def __init__(
        self,
        lam: float = 0.0,
        threshold: float = 0.01,
        start: str = "",
        settings: dict[str, Any] | None = None,
        teacher: str = "",
        distill: dict[str, Any] | None = None,
    ):
        self.first_lam, self.threshold, self.start = lam, threshold, start
        self.teacher = teacher
        self.distill = {"term": YOLO_DISTILL_TERMS[0], **(distill or {})}
        self.settings = dict(settings or {})
        self.control: SparsityControl | None = None

    @classmethod
    def from_environment(cls) -> SparsityRun:
        return cls(
            lam=float(os.environ.get(ENV_LAM, "0") or 0),
            threshold=float(os.environ.get(ENV_THRESHOLD, "0.01") or 0.01),
            start=os.environ.get(ENV_START, ""),
            settings=json.loads(os.environ.get(ENV_CONTROL) or "{}"),
            teacher=os.environ.get(ENV_TEACHER, ""),
            distill=json.loads(os.environ.get(ENV_DISTILL) or "{}"),
        )

    @property
    def lam(self) -> float:
        """The λ of the epoch being trained."""
        return self.control.lam if self.control is not None else self.first_lam

    def begin(
        self, epoch_lr: list[float], save_dir: Path, *, resumed: bool, start_epoch: int
    ) -> None:
        """Build the control once the trainer knows its schedule (``epoch_lr``: per epoch, how
        far a λ of 1 moves a γ); on resume, restore its state after the epoch last.pt holds."""
        if self.control is not None:
            return
        wanted = {
            k: v
            for k, v in self.settings.items()
            if k in ("target_ratio", "prune_when_stable", "stable_tol", "stable_epochs")
        }
        self.control = SparsityControl(
            self.first_lam,
            epoch_lr=epoch_lr,
            threshold=self.threshold,
            lam_max=LAM_AUTO_MAX,
            **wanted,
        )
        path = save_dir / CONTROL_FILE
        if resumed and path.is_file():
            state = json.loads(path.read_text())
            if state.get("epoch") == start_epoch:  # the state after the epoch last.pt holds
                if "stable" in state:  # written before the two controls became one
                    state["watch"] = state.pop("stable")
                self.control.load_json(state)

    def end_epoch(
        self,
        epoch: int,
        weights: nn.Module,
        ema: nn.Module,
        metrics: dict[str, float],
        save_dir: Path,
        *,
        main: bool,
    ) -> bool:
        """After ``epoch`` (1-based): the control's decisions, from ``weights`` (the same on
        every DDP process), then on the ``main`` process the record of the EMA network's
        gammas and Ultralytics' ``metrics`` in ``sparsity.jsonl``. Returns whether to stop."""
        assert self.control is not None, "end_epoch() before begin()"
        decided: dict[str, Any] = {"epoch": epoch}
        self.control.end_epoch(weights, decided)
        if not main:
            return self.control.stopped
        record = {
            "epoch": epoch,
            "lam": decided.pop("lam"),
            "sparsity": bn_sparsity(ema, self.threshold),
            "gamma_quantiles": gamma_quantiles(ema),
            "gamma_histogram": gamma_histogram(ema),
            **{k: v for k, v in decided.items() if k != "epoch"},
            **metrics,
        }
        if self.control.active:
            write_json(save_dir / CONTROL_FILE, {"epoch": epoch, **self.control.to_json()})
        path = save_dir / SPARSITY_LOG
        kept = [line for line in _lines(path) if json.loads(line)["epoch"] < epoch]
        atomic_write_text(path, "".join(line + "\n" for line in [*kept, json.dumps(record)]))
        return self.control.stopped

    def saved(self, network: nn.Module, weights_dir: Path, *, best: bool, image_size: int) -> None:
        """Ultralytics wrote last.pt (and best.pt when ``best``) in fp16: the same network in
        fp32 beside them, as netslim checkpoints."""
        for name in [LAST_FP32] + [BEST_FP32] * best:
            save(
                network,
                weights_dir / name,
                arch=arch_of(network),
                image_size=image_size,
                kind="train",
            )


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


def read_sparsity(run: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records a :func:`train` run wrote."""
    return [json.loads(line) for line in _lines(Path(run) / SPARSITY_LOG)]
