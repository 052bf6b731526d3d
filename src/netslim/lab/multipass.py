"""Multi-pass slimming (the paper's section 4.5): sparsity-train and prune, several times.

Pass 1 sparsity-trains the network from scratch; each later pass sparsity-trains the
network the previous pass pruned (which doubles as its fine-tuning). Every pass ends by
pruning at ``ratio`` of the current network's BatchNorm channels, capped per layer: no
pass removes more than ``layer_cap`` of any channel group (the paper caps at 50% so that
no layer of a VGG is destroyed; it is the floor ``min_keep = 1 - layer_cap``). A final
fine-tuning without the L1 term follows. The run folder::

    OUT/pass-1/train/   metrics.jsonl, last.pth, best.pth of the sparsity training
    OUT/pass-1/pruned.pth, OUT/pass-1/prune.json
    OUT/pass-2/...
    OUT/finetune/       the fine-tuning run
    OUT/summary.json    one record per pass, then the fine-tuned result

Running the same command again continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from netslim.checkpoint import load
from netslim.config import TrainConfig, check_ratio
from netslim.data.batches import ImageData
from netslim.engine.stats import count_macs, count_params
from netslim.errors import NetslimError
from netslim.files import remove_temp_files, write_json
from netslim.lab.stages import Log, prune_stage, train_stage
from netslim.models import num_outputs
from netslim.recipes import finetune_of
from netslim.runtime.device import pick_precision
from netslim.train import runlock
from netslim.train.runfolder import read_metrics


def run_multipass(
    config: TrainConfig,
    data: ImageData,
    model: nn.Module,
    out: str | Path,
    *,
    passes: int,
    ratio: float,
    layer_cap: float = 0.5,
    finetune_epochs: int,
    recalibrate: int = 16,
    log: Log = print,
) -> list[dict[str, Any]]:
    """Run ``passes`` rounds of sparsity training and pruning, then fine-tune (see module docs).

    Args:
        config: the sparsity-training recipe of every pass (its ``lam``, ``epochs``, ...).
        data: the dataset, on the training device.
        model: the network pass 1 starts from.
        out: the run folder.
        passes: number of train-and-prune rounds (at least 1).
        ratio: share of the BatchNorm channels each pass removes, in [0, 1).
        layer_cap: the most any pass may remove from one channel group, in (0, 1].
        finetune_epochs: epochs of the final fine-tuning (lam 0, same recipe otherwise).
        recalibrate: batches for BN recalibration after each pruning (0: none).

    Returns:
        The summary records (also written to ``out/summary.json``).
    """
    if passes < 1:
        raise NetslimError(f"--passes must be at least 1, got {passes}")
    if not 0.0 < layer_cap <= 1.0:
        raise NetslimError(f"--layer-cap must be a share in (0, 1], e.g. 0.5, got {layer_cap}")
    if finetune_epochs < 1:
        raise NetslimError(f"--finetune-epochs must be at least 1, got {finetune_epochs}")
    check_ratio(ratio)
    config.check()
    out = Path(out)
    with runlock.hold(out):
        remove_temp_files(out)
        return _multipass(
            config, data, model, out, passes, ratio, layer_cap, finetune_epochs, recalibrate, log
        )


def _multipass(
    config: TrainConfig,
    data: ImageData,
    model: nn.Module,
    out: Path,
    passes: int,
    ratio: float,
    layer_cap: float,
    finetune_epochs: int,
    recalibrate: int,
    log: Log,
) -> list[dict[str, Any]]:
    dtype = pick_precision(config.precision, data.device)
    meta = {"arch": config.arch, "num_classes": num_outputs(model), "image_size": data.image_size}
    input_size = (1, 3, data.image_size, data.image_size)
    summary: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []  # each pass's prune report
    for k in range(1, passes + 1):
        folder = out / f"pass-{k}"
        log(f"== pass {k}/{passes}: sparsity training (lambda {config.lam:g}) into {folder}")
        current = model
        train_stage(
            config,
            data,
            lambda m=current: m,
            folder / "train",
            {**meta, "kind": "train", "pass": k},
            log,
        )
        pruned_file = folder / "pruned.pth"
        log(f"== pass {k}/{passes}: pruning at ratio {ratio:g} into {pruned_file}")
        report = prune_stage(
            folder / "train" / "last.pth",
            pruned_file,
            folder / "prune.json",
            ratio,
            data=data,
            meta={**meta, "pass": k},
            trust=config.arch,
            log=log,
            layout=lambda info, report: report,
            min_keep=1.0 - layer_cap,
            recalibrate=recalibrate,
            eval_dtype=dtype,
            input_size=input_size,
        )
        model = load(pruned_file, trust=config.arch)
        reports.append(report)
        summary.append(
            {
                "pass": k,
                "trained_acc": read_metrics(folder / "train")[-1]["test_acc"],
                "params": report["params_after"],
                "macs": report["macs_after"],
                "pruned_acc": report["acc_recalibrated"]
                if recalibrate
                else report["acc_compensated"],
            }
        )
    log(f"== fine-tuning the pass-{passes} network into {out / 'finetune'}")
    tune = finetune_of(config, finetune_epochs)
    train_stage(tune, data, lambda: model, out / "finetune", {**meta, "kind": "finetune"}, log)
    history = read_metrics(out / "finetune")
    final = load(out / "finetune" / "last.pth", trust=config.arch)
    summary.append(
        {
            "pass": "finetune",
            "trained_acc": history[-1]["test_acc"],
            "params": count_params(final),
            "macs": count_macs(final, input_size),
            "params_original": reports[0]["params_before"],
            "macs_original": reports[0]["macs_before"],
        }
    )
    write_json(out / "summary.json", summary)
    for r in summary:
        log(
            f"pass {r['pass']}: test acc {r['trained_acc']:.2f}%  params {r['params']:,}  "
            f"MACs {r['macs']:,}"
        )
    return summary
