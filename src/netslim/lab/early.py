"""Early pruning in one run: sparsity training until the mask settles, pruning, fine-tuning.

``netslim train --prune-when-stable R`` runs :func:`train_prune_finetune`. Sparsity
training stops once the removal mask at ratio R has settled (:class:`netslim.train.control.
StableMask`), or after its last epoch if it never does; the network is then pruned at R
(with bias compensation and BN recalibration, :func:`netslim.slim.prune_model`) and the
smaller network is fine-tuned with the same recipe minus the L1 term. The run folder::

    OUT/metrics.jsonl, last.pth, best.pth, config.json   sparsity training
    OUT/pruned.pth, OUT/prune.json                      the pruned network, its report
    OUT/finetune/                                       the fine-tuning run

Each stage whose files are complete is skipped on ``--resume``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from netslim.checkpoint import load
from netslim.config import TrainConfig
from netslim.data.batches import ImageData
from netslim.errors import NetslimError
from netslim.lab.folder import read_json
from netslim.lab.stages import Log, prune_stage, train_stage
from netslim.recipes import finetune_of
from netslim.runtime import distributed
from netslim.runtime.device import pick_precision
from netslim.train.loop import fit
from netslim.train.runfolder import read_metrics


def train_prune_finetune(
    config: TrainConfig,
    data: ImageData,
    model: nn.Module,
    out: str | Path,
    *,
    finetune_epochs: int,
    recalibrate: int = 16,
    meta: dict[str, Any] | None = None,
    resume: bool = False,
    log: Log = print,
    distill: bool = True,
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
        distill: fine-tune with the sparsity-trained network as teacher
            (:mod:`netslim.train.distill`; its weight and temperature are ``config``'s).
    """
    if finetune_epochs < 1:
        raise NetslimError(f"--finetune-epochs must be at least 1, got {finetune_epochs}")
    out = Path(out)
    meta = meta or {}
    fit(config, data, model, out, meta={**meta, "kind": "train"}, resume=resume, log=log)
    log(f"== pruning at ratio {config.prune_when_stable:g} into {out / 'pruned.pth'}")
    # Every process calls on_main (it waits for rank 0), which alone prunes.
    distributed.on_main(
        prune_stage,
        out / "last.pth",
        out / "pruned.pth",
        out / "prune.json",
        config.prune_when_stable,
        data=data,
        meta=meta,
        trust=config.arch,
        log=log,
        recalibrate=recalibrate,
        eval_dtype=pick_precision(config.precision, data.device),
    )
    tune = finetune_of(config, finetune_epochs)
    if distill:
        tune.teacher = str((out / "last.pth").resolve())  # the network pruned
    log(f"== fine-tuning the pruned network, {finetune_epochs} epochs: {out / 'finetune'}")
    tune_meta = {
        **meta,
        "kind": "finetune",
        "source": str(out / "pruned.pth"),
        "prune": read_json(out / "prune.json")["prune"],
    }
    train_stage(
        tune,
        data,
        lambda: load(out / "pruned.pth", trust=config.arch),
        out / "finetune",
        tune_meta,
        log,
    )
    return read_metrics(out / "finetune")
