"""A training run's folder: its metrics, its settings, and what a resumed run checks and repairs.

A run folder holds ``config.json`` (the settings), ``metrics.jsonl`` (one record per epoch),
``last.pth`` and ``best.pth``; :mod:`netslim.train.runlock` keeps it to one writer.
``metrics.jsonl`` is rewritten whole and atomically after every epoch
(:func:`write_metrics`), so a reader sees one epoch or the next, never half a line.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from netslim.checkpoint import read_checkpoint, save_checkpoint
from netslim.config import TrainConfig
from netslim.errors import NetslimError
from netslim.files import atomic_write_text


def write_metrics(run_dir: str | Path, history: list[dict[str, Any]]) -> None:
    """Write the records of every epoch so far as ``run_dir/metrics.jsonl``, atomically."""
    atomic_write_text(
        Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history)
    )


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run folder's ``metrics.jsonl`` (empty if there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def changed_settings(
    saved: dict[str, Any], now: dict[str, Any], where: str, ignore: tuple[str, ...] = ("device",)
) -> list[str]:
    """Each setting of ``now`` that differs from ``saved``, as ``"lr (0.1 in the run, 0.5 now)"``.

    Settings in ``ignore`` may change freely (where a run executes does not change its result).
    """
    return [
        f"{key} ({saved.get(key)!r} in {where}, {value!r} now)"
        for key, value in now.items()
        if key not in ignore and saved.get(key) != value
    ]


def run_files(out_dir: str | Path) -> str:
    """What a finished run folder holds, for the closing line: only files that exist."""
    out = Path(out_dir)
    checkpoints = [name for name in ("last.pth", "best.pth") if (out / name).is_file()]
    text = (
        f"checkpoints in {out}/ ({', '.join(checkpoints)})"
        if checkpoints
        else f"no checkpoint in {out}/"
    )
    if (out / "metrics.jsonl").is_file():
        text += f", metrics in {out / 'metrics.jsonl'}"
    return text


def check_run_folder(out_dir: str | Path) -> None:
    """Refuse, before any work, a run folder that is a file or lies under a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NetslimError(f"--out {out} is a file; a run needs a folder (choose another --out)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NetslimError(
                    f"--out {out} lies under {parent}, which is a file; choose another --out"
                )
            break


def resume_state(out: Path, config: TrainConfig) -> dict[str, Any]:
    """The checkpoint ``out/last.pth`` to continue, checked to be a netslim run of ``config``."""
    last = out / "last.pth"
    if not last.exists():
        raise NetslimError(f"cannot resume: {last} does not exist; start the run without --resume")
    ckpt = read_checkpoint(last)
    meta = ckpt.get("netslim")
    if not (
        isinstance(meta, dict)
        and "config" in meta
        and "history" in meta
        and "optimizer" in ckpt
        and "epoch" in ckpt
    ):
        raise NetslimError(
            f"cannot resume {out}: {last} was not written by netslim train or finetune (it holds "
            "no run settings or history, e.g. a checkpoint of the paper's main.py); to train "
            f"from its weights use netslim finetune {last} --out NEW_FOLDER"
        )
    saved = asdict(TrainConfig.from_dict(meta["config"]))
    changed = changed_settings(saved, asdict(config), "the run", ignore=("device", "compile"))
    if changed:
        raise NetslimError(
            f"cannot resume {out}: settings differ from the run's: {', '.join(changed)}; "
            "resume with the original settings (see its config.json)"
        )
    return ckpt


def repair_run_folder(out: Path, ckpt: dict[str, Any], log: Callable[[str], None]) -> None:
    """Put back what a resumed run's folder lost (rank 0): its metrics.jsonl and best.pth."""
    history = ckpt["netslim"]["history"]
    try:
        logged = read_metrics(out)
    except ValueError:  # a damaged metrics.jsonl: the checkpoint's history is the truth
        logged = None
    if logged != history:
        write_metrics(out, history)
    if history and not (out / "best.pth").exists():
        earlier = max((r["test_acc"] for r in history[:-1]), default=-1.0)
        if history[-1]["test_acc"] > earlier:
            save_checkpoint(ckpt, out / "best.pth")  # the last epoch is the best one
        else:
            log(
                f"note: {out / 'best.pth'} is missing and its epoch is lost; the next epoch "
                "that beats it writes a new one"
            )
