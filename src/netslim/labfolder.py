"""A lab's run folder: its settings (``lab.json``) and where each stage's files are.

:mod:`netslim.lab` writes a lab into such a folder and :mod:`netslim.report` reads it; both
take the layout and the settings from here, so the report never needs the code that runs
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
import shlex
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from netslim.errors import NetslimError
from netslim.files import atomic_write_text
from netslim.models import ARCHS
from netslim.pruning import check_ratio
from netslim.train import TrainConfig

LAB_FILE = "lab.json"


@dataclass
class LabConfig:
    """Everything that defines a lab; saved in ``lab.json`` and compared on every re-run."""

    arch: str = "vgg19"
    dataset: str = "cifar10"
    data_root: str = "data"
    train_size: int | None = None
    test_size: int | None = None
    lams: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-2])
    prune_lam: float = 1e-4
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.9])
    epochs: int = 160
    finetune_epochs: int = 160
    batch_size: int = 64
    lr: float = 0.1
    recalibrate: int = 16
    sweep: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0

    def check(self) -> None:
        """Raise NetslimError naming the first setting that makes no sense."""
        if self.arch not in ARCHS:
            raise NetslimError(f"unknown --arch {self.arch!r}; choose one of: {', '.join(ARCHS)}")
        if not self.lams:
            raise NetslimError("--lams needs at least one λ, e.g. --lams 0 1e-4 1e-2")
        if not all(x >= 0 for x in self.lams):  # also catches NaN
            raise NetslimError(
                f"--lams must all be >= 0 (L1 weights on BN gammas), got {self.lams}"
            )
        names = [lam_name(x) for x in self.lams]
        _check_unique("--lams", names)
        if lam_name(self.prune_lam) not in names:
            raise NetslimError(
                f"--prune-lam {lam_name(self.prune_lam)} is not among --lams {' '.join(names)}; "
                "add it there or prune one of those"
            )
        if not self.ratios:
            raise NetslimError("--ratios needs at least one prune ratio, e.g. --ratios 0.5 0.9")
        for r in [*self.ratios, *self.sweep]:
            check_ratio(r)
        _check_unique("--ratios", [ratio_name(r) for r in self.ratios])
        if self.finetune_epochs < 1:
            raise NetslimError(f"--finetune-epochs must be at least 1, got {self.finetune_epochs}")
        if self.recalibrate < 0:
            raise NetslimError(f"--recalibrate must be >= 0 batches, got {self.recalibrate}")
        for lam in self.lams:
            self.train_config(lam).check()  # epochs, batch size, lr, precision

    def train_config(self, lam: float) -> TrainConfig:
        """The recipe of the sparsity training at ``lam``."""
        return TrainConfig(
            arch=self.arch, dataset=self.dataset, data_root=self.data_root, lam=lam,
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
            precision=self.precision, device=self.device, train_size=self.train_size,
            test_size=self.test_size,
        )  # fmt: skip

    def finetune_config(self) -> TrainConfig:
        """The recipe of fine-tuning: the training recipe without the L1 term."""
        return replace(self.train_config(0.0), epochs=self.finetune_epochs)

    def sweep_ratios(self) -> list[float]:
        """The sweep ratios plus the lab's own, sorted, each once."""
        return sorted({float(r) for r in [*self.sweep, *self.ratios]})

    def command(self, out: str | Path) -> str:
        """The ``netslim lab`` command line that reproduces this lab, every setting explicit."""
        args = ["netslim", "lab", "--arch", self.arch, "--dataset", self.dataset,
                "--data-root", self.data_root]  # fmt: skip
        if self.train_size is not None:
            args += ["--train-size", str(self.train_size)]
        if self.test_size is not None:
            args += ["--test-size", str(self.test_size)]
        args += ["--lams", *map(repr, self.lams), "--prune-lam", repr(self.prune_lam)]
        args += ["--ratios", *map(repr, self.ratios), "--sweep", *map(repr, self.sweep)]
        args += ["--epochs", str(self.epochs), "--finetune-epochs", str(self.finetune_epochs)]
        args += ["--batch-size", str(self.batch_size), "--lr", repr(self.lr)]
        args += ["--recalibrate", str(self.recalibrate), "--precision", self.precision]
        args += ["--device", self.device, "--seed", str(self.seed), "--out", str(out)]
        return shlex.join(args)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LabConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _check_unique(flag: str, names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise NetslimError(f"{flag} lists {', '.join(repeated)} more than once; give each once")


def lam_name(lam: float) -> str:
    """λ as a short folder-name and label part: 0, 1e-4, 2.5e-3, 0.5 (not 0.0001 or 1e-04)."""
    if lam == 0:
        return "0"
    if abs(lam) >= 0.1:
        return repr(float(lam))
    mantissa, exponent = f"{lam:.15e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def ratio_name(ratio: float) -> str:
    return repr(float(ratio))


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


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_lab(run: str | Path) -> tuple[LabConfig, dict[str, Any]]:
    """The config and the raw ``lab.json`` of a lab run folder."""
    lab_file = Path(run) / LAB_FILE
    if not lab_file.is_file():
        raise NetslimError(
            f"{run} holds no lab ({lab_file} is missing); give a folder made by netslim lab or demo"
        )
    info = read_json(lab_file)
    return LabConfig.from_dict(info["config"]), info
