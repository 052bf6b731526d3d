"""A lab's run folder: its settings (``lab.json``) and where each stage's files are.

:mod:`netslim.lab.experiment` writes a lab into such a folder and :mod:`netslim.lab.report` reads it; both
take the layout from here (and the settings, :class:`LabConfig`, from :mod:`netslim.config`), so the report never needs the code that runs
the lab. The layout::

    lab.json                        settings, the command, software versions
    train/lam=<λ>/                  fit() run folders (metrics.jsonl, last.pth, ...)
    prune/lam=<λ>-ratio=<r>.pth     pruned (and recalibrated) network
    prune/lam=<λ>-ratio=<r>.json    its PruneReport; written last, so it marks "done"
    sweep.json                      accuracies of the pruning sweep
    finetune/ratio=<r>/             fit() run folders of the fine-tuning
    report.md, report.html, figures/*.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from netslim.config import LabConfig, lam_name, ratio_name
from netslim.errors import NetslimError

LAB_FILE = "lab.json"


def train_dir(run: Path, lam: float) -> Path:
    return run / "train" / f"lam={lam_name(lam)}"


def prune_path(run: Path, lam: float, ratio: float, suffix: str) -> Path:
    return run / "prune" / f"lam={lam_name(lam)}-ratio={ratio_name(ratio)}{suffix}"


def finetune_dir(run: Path, ratio: float) -> Path:
    return run / "finetune" / f"ratio={ratio_name(ratio)}"


def sweep_path(run: Path) -> Path:
    return run / "sweep.json"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # netslim writes atomically, so this file was edited or damaged
        raise NetslimError(f"{path} is not valid JSON ({e}); restore or delete it") from None


def read_lab(run: str | Path) -> tuple[LabConfig, dict[str, Any]]:
    """The config and the raw ``lab.json`` of a lab run folder."""
    lab_file = Path(run) / LAB_FILE
    if not lab_file.is_file():
        raise NetslimError(
            f"{run} holds no lab ({lab_file} is missing); give a folder made by netslim lab or demo"
        )
    info = read_json(lab_file)
    return LabConfig.from_dict(info["config"]), info
