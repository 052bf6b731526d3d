"""Early pruning in one run: sparsity training until the mask settles, pruning, fine-tuning.

``netslim train --prune-when-stable R`` runs :func:`train_prune_finetune`. Sparsity
training stops once the removal mask at ratio R has settled (:class:`netslim.control.
StableMask`), or after its last epoch if it never does; the network is then pruned at R
(with bias compensation and BN recalibration, :func:`netslim.slim.prune_model`) and the
smaller network is fine-tuned with the same recipe minus the L1 term. The run folder::

    OUT/metrics.jsonl, last.pth, best.pth, config.json   sparsity training
    OUT/pruned.pth, OUT/prune.json                      the pruned network, its report
    OUT/finetune/                                       the fine-tuning run

Each stage whose files are complete is skipped on ``--resume``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from torch import nn

from netslim import distributed
from netslim.checkpoint import load, save_checkpoint
from netslim.data import Dataset
from netslim.errors import NetslimError
from netslim.files import atomic_write_text
from netslim.lab import train_stage
from netslim.models import num_outputs
from netslim.recipes import finetune_of
from netslim.slim import prune_model, pruned_checkpoint
from netslim.train import TrainConfig, fit, pick_precision, read_metrics


def train_prune_finetune(
    config: TrainConfig,
    data: Dataset,
    model: nn.Module,
    out: str | Path,
    *,
    finetune_epochs: int,
    recalibrate: int = 16,
    meta: dict[str, Any] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the three stages (see the module docs); returns the fine-tuning's metrics records.

    Args:
        config: the sparsity-training recipe; ``config.prune_when_stable`` is the ratio.
        data: the dataset, on the training device.
        model: the network to sparsity-train.
        out: the run folder.
        finetune_epochs: epochs of fine-tuning the pruned network.
        recalibrate: batches of 128 training images for BN recalibration (0: none).
        meta: extra metadata for the checkpoints (e.g. ``{'arch': 'vgg19'}``).
        resume: continue an interrupted run in ``out``.
    """
    if finetune_epochs < 1:
        raise NetslimError(f"--finetune-epochs must be at least 1, got {finetune_epochs}")
    out = Path(out)
    meta = meta or {}
    fit(config, data, model, out, meta={**meta, "kind": "train"}, resume=resume, log=log)
    report_file = out / "prune.json"
    # Every process calls on_main (it waits for rank 0), which alone checks and prunes.
    distributed.on_main(_prune, config, data, out, recalibrate, meta, log)
    tune = finetune_of(config, finetune_epochs)
    log(f"== fine-tuning the pruned network, {finetune_epochs} epochs: {out / 'finetune'}")
    tune_meta = {**meta, "kind": "finetune", "source": str(out / "pruned.pth"),
                 "prune": json.loads(report_file.read_text())["prune"]}  # fmt: skip
    train_stage(
        tune,
        data,
        lambda: load(out / "pruned.pth", trust=config.arch),
        out / "finetune",
        tune_meta,
        log,
    )
    return read_metrics(out / "finetune")


def _prune(
    config: TrainConfig, data: Dataset, out: Path, recalibrate: int, meta: dict[str, Any],
    log: Callable[[str], None],
) -> None:  # fmt: skip
    if (out / "prune.json").exists():  # written last: pruned already
        return
    log(f"== pruning at ratio {config.prune_when_stable:g} into {out / 'pruned.pth'}")
    model = load(out / "last.pth", trust=config.arch)
    # An image folder streamed from disk has no images in memory to measure or recalibrate on.
    measure = data if isinstance(data, Dataset) else None
    pruned, report = prune_model(model, config.prune_when_stable, data=measure,
                                 recalibrate=recalibrate,
                                 eval_dtype=pick_precision(config.precision, data.device))  # fmt: skip
    info = {**meta, "num_classes": num_outputs(model), "source": str(out / "last.pth")}
    save_checkpoint(pruned_checkpoint(pruned, report, info), out / "pruned.pth")
    # Written last: its presence marks the stage done.
    atomic_write_text(
        out / "prune.json", json.dumps({**info, "prune": report.to_dict()}, indent=2) + "\n"
    )
    log(report.text())
