"""Where a YOLO lab (:mod:`netslim.yolo.lab`) keeps what it makes, for the lab and its report."""

from __future__ import annotations

import json
from pathlib import Path

from netslim.config import YoloLab
from netslim.errors import NetslimError

LAB_FILE = "lab.json"


def lam_text(lam: float | str) -> str:
    """A λ of the lab as its names and report show it: ``0.02``, or ``auto`` (λ auto)."""
    return lam if isinstance(lam, str) else f"{lam:g}"


def run_name(lam: float | str) -> str:
    return f"lam{lam_text(lam)}"


def pruned_name(lam: float | str, ratio: float) -> str:
    return f"{run_name(lam)}-p{round(ratio * 100)}"


def train_dir(out: Path, lam: float | str) -> Path:
    return out / run_name(lam)


def pruned_path(out: Path, lam: float | str, ratio: float) -> Path:
    return out / "pruned" / f"{pruned_name(lam, ratio)}.pth"


def finetune_dir(out: Path, lam: float | str, ratio: float) -> Path:
    return out / f"ft-{pruned_name(lam, ratio)}"


#: Settings of lab.json that netslim 0.1's first YOLO labs named as Ultralytics does.
LEGACY_NAMES = {"imgsz": "image_size", "batch": "batch_size"}


def read_lab(out: str | Path) -> YoloLab:
    path = Path(out) / LAB_FILE
    if not path.is_file():
        raise NetslimError(f"{out} holds no YOLO lab ({LAB_FILE} is missing)")
    try:
        settings = json.loads(path.read_text())
        if not isinstance(settings, dict):
            raise ValueError(f"it holds a {type(settings).__name__}, not the lab's settings")
        for old, new in LEGACY_NAMES.items():  # a lab.json written before they were renamed
            if old in settings and new not in settings:
                settings[new] = settings.pop(old)
        return YoloLab(**settings)
    except (ValueError, TypeError, UnicodeDecodeError, NetslimError) as e:
        detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise NetslimError(
            f"{path} is damaged ({detail}); restore it, or start the lab again in a new --out"
        ) from None
