"""The whole slimming experiment in one resumable call: train, prune, sweep, fine-tune, report.

:func:`run_lab` runs the lab of the network-slimming paper into one run folder:

1. sparsity training at each λ of ``lams``, all from the same initial weights;
2. pruning of the ``prune_lam`` model at each of ``ratios``, measured three ways
   (official masking, bias compensation, BN recalibration);
3. a sweep over ``sweep`` ratios, pruned and measured but never trained (figure 5);
4. fine-tuning of each pruned model;
5. the report (:mod:`netslim.report`).

Every stage leaves files behind, and a stage whose files are complete is skipped, so
running the same lab again continues where an interrupted one stopped (an interrupted
training run continues from its ``last.pth``). ``lab.json`` records the settings;
a lab whose settings differ from the folder's is refused rather than mixed in.

Run folder layout::

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
import platform
import shlex
import warnings
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from netslim import distributed, recipes
from netslim.checkpoint import load, read_checkpoint, save_checkpoint
from netslim.data import Dataset, load_dataset
from netslim.errors import NetslimError
from netslim.files import atomic_write_text
from netslim.models import ARCHS, build_model, num_outputs
from netslim.pruning import check_ratio
from netslim.slim import prune_model, pruned_checkpoint
from netslim.train import (
    TrainConfig,
    changed_settings,
    fit,
    pick_device,
    pick_precision,
    read_metrics,
)

LAB_FILE = "lab.json"
Log = Callable[[str], None]  # where progress lines go


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
    # netslim.recipes: the training settings; epochs, batch size and lr above are resolved
    recipe: str = "paper"
    # early pruning of the prune_lam training (netslim.control.StableMask); None: off
    prune_when_stable: float | None = None
    stable_tol: float = 0.02
    stable_epochs: int = 3
    # λ chosen for the user (netslim.control.AutoLam): the prune_lam run starts at
    # prune_lam and adapts λ to reach this share of sparse γ; None: off
    target_ratio: float | None = None

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
        """The recipe of the sparsity training at ``lam`` (early pruning: the prune_lam run's)."""
        recipe = recipes.resolve(
            self.recipe, {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        )
        pruned = lam_name(lam) == lam_name(self.prune_lam)  # the run the lab prunes
        early = self.prune_when_stable if pruned else None
        target = self.target_ratio if pruned else None
        return TrainConfig(
            arch=self.arch, dataset=self.dataset, data_root=self.data_root, lam=lam,
            seed=self.seed, precision=self.precision, device=self.device,
            train_size=self.train_size, test_size=self.test_size, recipe=self.recipe, **recipe,
            prune_when_stable=early, stable_tol=self.stable_tol, stable_epochs=self.stable_epochs,
            lam_auto=target is not None, target_ratio=target,
        )  # fmt: skip

    def finetune_config(self) -> TrainConfig:
        """The recipe of fine-tuning: the training recipe without the L1 term."""
        return recipes.finetune_of(self.train_config(0.0), self.finetune_epochs)

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
        args += ["--device", self.device, "--seed", str(self.seed), "--recipe", self.recipe]
        if self.prune_when_stable is not None:
            args += ["--prune-when-stable", repr(self.prune_when_stable),
                     "--stable-tol", repr(self.stable_tol), "--stable-epochs", str(self.stable_epochs)]  # fmt: skip
        if self.target_ratio is not None:
            args += ["--target-ratio", repr(self.target_ratio)]
        args += ["--out", str(out)]
        return shlex.join(args)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LabConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# The demo: the lab on built-in synthetic data, small enough for a 2-core CPU in minutes.
# Only the network, the data and the epochs differ from the lab's defaults.
DEMO = LabConfig(
    arch="vgg11-small", dataset="synthetic", train_size=10000, test_size=2000,
    epochs=6, finetune_epochs=3,
)  # fmt: skip


def _check_unique(flag: str, names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise NetslimError(f"{flag} lists {', '.join(repeated)} more than once; give each once")


# --------------------------------------------------------------------------------------
# Run folder layout
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# lab.json: the settings, checked on every run
# --------------------------------------------------------------------------------------


def environment(device: torch.device, dtype: torch.dtype | None) -> dict[str, str]:
    """The software and hardware a lab ran on, for the report."""
    if device.type == "cuda":
        hardware = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        hardware = f"{device} ({_cpu_name()}, {torch.get_num_threads()} threads)"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "matplotlib": _version("matplotlib"),
        "netslim": _version("netslim"),
        "platform": platform.platform(),
        "device": hardware,
        "autocast": str(dtype).replace("torch.", "") if dtype is not None else "off (fp32)",
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def check_lab_folder(config: LabConfig, out: Path) -> dict[str, Any] | None:
    """The ``lab.json`` of the lab in ``out`` (None if there is none yet), if ``config`` fits it.

    The device may change between runs (results do not depend on where they ran);
    any other difference raises NetslimError naming it, and so does a folder that
    holds something other than a lab.
    """
    lab_file = out / LAB_FILE
    if not lab_file.exists():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise NetslimError(
                f"{out} is not empty and holds no lab ({LAB_FILE} is missing); "
                "choose a new or empty --out"
            )
        return None
    info = read_json(lab_file)
    # settings added since the lab was made take their defaults (what it ran with)
    saved = {**json.loads(json.dumps(asdict(LabConfig()))), **info.get("config", {})}
    now = json.loads(json.dumps(asdict(config)))  # tuples become lists, as in the file
    changed = changed_settings(saved, now, "the lab")
    if changed:
        raise NetslimError(
            f"{out} holds a lab made with different settings: {', '.join(changed)}; "
            f"rerun with the lab's settings (see {lab_file}: {info.get('command', '')}) "
            "or choose another --out"
        )
    return info


def record_lab(
    config: LabConfig, out: Path, info: dict[str, Any] | None, env: dict[str, str]
) -> None:
    """Write ``lab.json`` for a new lab, or add an environment that has not run this lab yet."""
    if info is None:
        info = {"config": asdict(config), "command": config.command(out), "software": []}
    known = info.get("software", [])
    if env not in known:  # every environment that ran a part, for the report
        write_json(out / LAB_FILE, {**info, "software": [*known, env]})


def read_lab(run: str | Path) -> tuple[LabConfig, dict[str, Any]]:
    """The config and the raw ``lab.json`` of a lab run folder."""
    lab_file = Path(run) / LAB_FILE
    if not lab_file.is_file():
        raise NetslimError(
            f"{run} holds no lab ({lab_file} is missing); give a folder made by netslim lab or demo"
        )
    info = read_json(lab_file)
    return LabConfig.from_dict(info["config"]), info


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------


def epochs_done(run_dir: Path) -> int:
    """How many epochs the fit() run in ``run_dir`` has finished (0: none saved)."""
    last = run_dir / "last.pth"
    return int(read_checkpoint(last)["epoch"]) if last.exists() else 0


def stopped_early(run_dir: Path) -> bool:
    """Whether early pruning ended the fit() run in ``run_dir`` (see netslim.control)."""
    last = run_dir / "last.pth"
    if not last.exists():
        return False
    state = read_checkpoint(last)["netslim"].get("control") or {}
    return (state.get("watch") or {}).get("stopped_at") is not None


def train_stage(
    config: TrainConfig,
    data: Dataset,
    make_model: Callable[[], torch.nn.Module],
    run_dir: Path,
    meta: dict[str, Any],
    log: Log,
) -> None:
    """Run ``fit`` into ``run_dir``: skip it when finished, continue it when interrupted."""
    done = epochs_done(run_dir)
    if done >= config.epochs or stopped_early(run_dir):
        # Stopped between last.pth and metrics.jsonl; rank 0 alone writes under torchrun.
        if len(read_metrics(run_dir)) < done and distributed.is_main():
            history = read_checkpoint(run_dir / "last.pth")["netslim"]["history"]
            lines = "".join(json.dumps(record) + "\n" for record in history)
            atomic_write_text(run_dir / "metrics.jsonl", lines)
        log(f"   done already ({done} epochs): {run_dir}")
        return
    fit(config, data, make_model(), run_dir, meta=meta, resume=done > 0, log=log)


def prune_stage(
    config: LabConfig, data: Dataset, run: Path, dtype: torch.dtype | None, log: Log
) -> None:
    """Prune the ``prune_lam`` model at each lab ratio; save the network and its report."""
    source = train_dir(run, config.prune_lam) / "last.pth"
    for ratio in config.ratios:
        report_file = prune_path(run, config.prune_lam, ratio, ".json")
        log(f"== pruning λ={lam_name(config.prune_lam)} at ratio {ratio:g}: {report_file}")
        if report_file.exists():
            log("   done already")
            continue
        model = load(source)
        pruned, report = prune_model(model, ratio, data=data, recalibrate=config.recalibrate,
                                     eval_dtype=dtype)  # fmt: skip
        meta = {"arch": config.arch, "num_classes": num_outputs(model), "source": str(source)}
        save_checkpoint(pruned_checkpoint(pruned, report, meta), report_file.with_suffix(".pth"))
        write_json(report_file, {**meta, "lam": config.prune_lam, "prune": report.to_dict()})
        log(report.text())


SWEEP_KEYS = ("ratio", "threshold", "pruned_share", "floored", "params_after", "macs_after",
              "acc_unpruned", "acc_masked", "acc_compensated", "acc_recalibrated")  # fmt: skip


def sweep_stage(
    config: LabConfig, data: Dataset, run: Path, dtype: torch.dtype | None, log: Log
) -> None:
    """Prune at every sweep ratio without training and record the three accuracies."""
    path = sweep_path(run)
    log(f"== pruning sweep over {len(config.sweep_ratios())} ratios, no training: {path}")
    if path.exists():
        log("   done already")
        return
    model = load(train_dir(run, config.prune_lam) / "last.pth")
    points = []
    acc_unpruned = None  # measured by the first ratio, then reused
    for ratio in config.sweep_ratios():
        with warnings.catch_warnings():  # floored layers are recorded in the point instead
            warnings.simplefilter("ignore", UserWarning)
            _, report = prune_model(model, ratio, data=data, recalibrate=config.recalibrate,
                                    eval_dtype=dtype, acc_unpruned=acc_unpruned)  # fmt: skip
        acc_unpruned = report.acc_unpruned
        points.append({k: report.to_dict()[k] for k in SWEEP_KEYS})
        accuracies = "  ".join(f"{label} {_pct(points[-1][f'acc_{label}'])}"
                               for label in ("masked", "compensated", "recalibrated"))  # fmt: skip
        log(f"   ratio {ratio:4.2f}: {accuracies}")
    write_json(path, {"lam": config.prune_lam, "recalibrate": config.recalibrate, "points": points})


def _pct(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:5.1f}%"


def run_lab(
    config: LabConfig,
    out: str | Path,
    *,
    download: bool = True,
    log: Log = print,
) -> Path:
    """Run (or continue) the lab ``config`` in the folder ``out``; returns the HTML report's path.

    Args:
        config: the lab's settings.
        out: the run folder; created if missing, continued if it holds this lab.
        download: allow downloading CIFAR when it is not under ``config.data_root``.
        log: where progress lines go.
    """
    # Imported here: the report needs matplotlib, which every other command can do without.
    from netslim.report import render_report

    config.check()
    out = Path(out)
    device = pick_device(distributed.local_device(config.device))
    dtype = pick_precision(config.precision, device)
    info = check_lab_folder(config, out)
    # Loaded before lab.json is written: a lab whose data cannot load leaves no folder behind.
    with distributed.main_first():  # one process downloads, the others then read
        data = load_dataset(
            config.dataset, config.data_root, seed=config.seed, download=download,
            train_size=config.train_size, test_size=config.test_size,
        ).to(device)  # fmt: skip
    log = distributed.main_log(log)
    # Under torchrun only training is shared; the other stages run on rank 0 alone.
    distributed.on_main(record_lab, config, out, info, environment(device, dtype))

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(config.seed)  # every λ starts from the same weights
        return build_model(config.arch, num_classes=data.num_classes)

    for lam in config.lams:
        run_dir = train_dir(out, lam)
        log(f"== sparsity training λ={lam_name(lam)}, {config.epochs} epochs: {run_dir}")
        meta = {"arch": config.arch, "kind": "train"}
        train_stage(config.train_config(lam), data, fresh_model, run_dir, meta, log)

    distributed.on_main(prune_stage, config, data, out, dtype, log)
    distributed.on_main(sweep_stage, config, data, out, dtype, log)

    for ratio in config.ratios:
        source = prune_path(out, config.prune_lam, ratio, ".pth")
        run_dir = finetune_dir(out, ratio)
        log(f"== fine-tuning ratio {ratio:g}, {config.finetune_epochs} epochs: {run_dir}")
        meta = {"arch": config.arch, "kind": "finetune", "source": str(source),
                "prune": read_json(source.with_suffix(".json"))["prune"]}  # fmt: skip
        train_stage(config.finetune_config(), data, lambda s=source: load(s), run_dir, meta, log)

    log("== report")
    report = distributed.on_main(render_report, out)
    return report or out / "report.html"  # on the other ranks: where rank 0 wrote it
