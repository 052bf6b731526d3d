"""The resumable stages every experiment is built of: train a run folder, prune a network.

A stage whose files are complete is skipped, and an interrupted one continues, so running
an experiment's command again goes on where it stopped. The lab (:mod:`.experiment`),
early pruning (:mod:`.early`) and multi-pass slimming (:mod:`.multipass`) all use these two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from netslim.checkpoint import load, read_checkpoint, save_checkpoint
from netslim.config import TrainConfig
from netslim.data.batches import ImageData
from netslim.files import write_json
from netslim.lab.folder import read_json
from netslim.models import num_outputs
from netslim.runtime import distributed
from netslim.slim import prune_model, pruned_checkpoint
from netslim.train.loop import StepHook, fit
from netslim.train.runfolder import read_metrics, write_metrics

Log = Callable[[str], None]  # where progress lines go


def epochs_done(run_dir: Path) -> int:
    """How many epochs the fit() run in ``run_dir`` has finished (0: none saved)."""
    last = run_dir / "last.pth"
    return int(read_checkpoint(last)["epoch"]) if last.exists() else 0


def stopped_early(run_dir: Path) -> bool:
    """Whether early pruning ended the fit() run in ``run_dir`` (see netslim.train.control)."""
    last = run_dir / "last.pth"
    if not last.exists():
        return False
    state = read_checkpoint(last)["netslim"].get("control") or {}
    return (state.get("watch") or {}).get("stopped_at") is not None


def train_stage(
    config: TrainConfig,
    data: ImageData,
    make_model: Callable[[], torch.nn.Module],
    run_dir: Path,
    meta: dict[str, Any],
    log: Log,
    on_step: StepHook | None = None,
) -> None:
    """Run ``fit`` into ``run_dir``: skip it when finished, continue it when interrupted.

    ``on_step`` goes to ``fit``: it hears of every training step (never of a skipped run).
    """
    done = epochs_done(run_dir)
    if done >= config.epochs or stopped_early(run_dir):
        # Stopped between last.pth and metrics.jsonl; rank 0 alone writes under torchrun.
        if len(read_metrics(run_dir)) < done and distributed.is_main():
            write_metrics(run_dir, read_checkpoint(run_dir / "last.pth")["netslim"]["history"])
        log(f"   done already ({done} epochs): {run_dir}")
        return
    fit(config, data, make_model(), run_dir, meta=meta, resume=done > 0, log=log, on_step=on_step)


def prune_stage(
    source: Path,
    pruned: Path,
    record: Path,
    ratio: float,
    *,
    data: ImageData | None,
    meta: dict[str, Any],
    trust: str,
    log: Log,
    layout: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
    **prune_kwargs: Any,
) -> dict[str, Any]:
    """Prune the network in ``source`` at ``ratio`` into ``pruned``, unless done; returns
    the prune report (as a dict).

    ``record``, a JSON file written last (so that it marks the stage done), holds
    ``layout(info, report)``: by default the checkpoint's metadata ``info`` (``meta``, the
    number of classes, the source) with the report under ``"prune"``; multipass keeps the
    bare report. ``trust`` is the experiment's own ``--arch`` (its module may be imported);
    ``prune_kwargs`` go to :func:`netslim.slim.prune_model` (recalibration, precision,
    floor, input size).
    """
    if record.exists():
        log("   done already")
        done = read_json(record)
        return done.get("prune", done)
    model = load(source, trust=trust)
    network, report = prune_model(model, ratio, data=data, **prune_kwargs)
    info = {**meta, "num_classes": num_outputs(model), "source": str(source)}
    save_checkpoint(pruned_checkpoint(network, report, info), pruned)
    layout = layout or (lambda info, report: {**info, "prune": report})
    write_json(record, layout(info, report.to_dict()))
    log(report.text())
    return report.to_dict()
