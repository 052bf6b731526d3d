"""The settings of runs and labs, and the names the command line offers, without torch.

``netslim --help`` builds its parser from this module alone, so that asking for help
or ``--version`` does not wait seconds for PyTorch to import. The modules that do the
work (:mod:`netslim.train.loop`, :mod:`netslim.lab.experiment`, ...) import their settings from here.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from netslim import recipes
from netslim.errors import NetslimError
from netslim.limits import check_image_size

# The networks netslim.models builds (a test checks that the two lists agree).
ARCHS: tuple[str, ...] = (
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "vgg11-small",
    "vgg5-small",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet164",
    "densenet40",
    "resnet18",
    "mobilenetv2",
)
DATASETS: tuple[str, ...] = ("synthetic", "cifar10", "cifar100", "imagefolder")
RESIZE_POLICIES: tuple[str, ...] = ("crop", "stretch")  # see netslim.data.imagefolder
LOADERS: tuple[str, ...] = ("auto", "memory", "stream")  # see netslim.data.imagefolder
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")  # see netslim.train.loop
ARCH_CHOICES = (
    f"choose one of {', '.join(ARCHS)}, or torchvision:NAME, timm:NAME, package.module:callable"
)


def is_spec(arch: str) -> bool:
    """Whether ``arch`` names an external network (``source:name``, see
    :mod:`netslim.models.external`) rather than one of netslim's own."""
    return ":" in arch


def check_spec(spec: str) -> None:
    """Raise NetslimError if ``spec`` is not of the form ``torchvision:NAME``, ``timm:NAME``,
    ``ultralytics:NAME.yaml`` or ``package.module:callable`` (nothing is imported)."""
    source, _, name = spec.partition(":")
    if not source or not name or ":" in name:
        raise NetslimError(
            f"bad --arch {spec!r}: write torchvision:NAME, timm:NAME or package.module:callable"
        )
    if source == "ultralytics":
        return  # a model YAML's name: a file name, not a Python one
    if source not in ("torchvision", "timm") and not all(
        part.isidentifier() for part in [*source.split("."), name]
    ):
        raise NetslimError(
            f"bad --arch {spec!r}: package.module:callable needs Python names, "
            "e.g. mypkg.models:build"
        )


def check_arch_name(arch: str) -> None:
    """Raise NetslimError unless ``arch`` is one of :data:`ARCHS` or a well-formed spec
    (nothing is imported: :func:`netslim.models.check_arch` also imports what it names)."""
    if is_spec(arch):
        check_spec(arch)
    elif arch not in ARCHS:
        raise NetslimError(f"unknown --arch {arch!r}; {ARCH_CHOICES}")


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` as a float, or raise NetslimError unless ``0 <= ratio < 1``."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise NetslimError(f"prune ratio must be a number in [0, 1), got {ratio!r}") from None
    if not 0.0 <= value < 1.0:
        raise NetslimError(
            f"prune ratio must be in [0, 1) (the share of channels to remove, e.g. 0.7), got {ratio}"
        )
    return value


# λ auto's first epoch (netslim.train.control): the paper's λ, until the controller decides.
LAM_START = 1e-4

# What a YOLO student learns from its teacher (netslim.yolo.seam): Ultralytics' distillation
# of the features entering the head, or netslim's of the head's outputs
# (netslim.yolo.distill); the first is the default (bench/RESULTS.md, issue 30).
YOLO_DISTILL_TERMS: tuple[str, ...] = ("features", "outputs")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in its checkpoints."""

    arch: str = "vgg19"
    dataset: str = "cifar10"
    data_root: str = "data"
    lam: float = 0.0
    epochs: int = 160
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    sparsity_threshold: float = 0.01
    precision: str = "auto"
    device: str = "auto"
    eval_batch_size: int = 1000
    compile: bool = False  # torch.compile the model for training and evaluation
    train_size: int | None = None
    test_size: int | None = None
    image_size: int = 32  # imagefolder datasets are resized to this
    resize: str = "crop"  # and how: see netslim.data.imagefolder
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm over the global batch
    # The recipe's settings (netslim.recipes): its name, and the values it resolved to.
    recipe: str = "paper"
    schedule: str = "step"
    warmup_epochs: float = 0.0
    nesterov: bool = False
    label_smoothing: float = 0.0
    # Decisions between epochs (netslim.train.control): λ chosen for the user, early pruning.
    lam_auto: bool = False
    target_ratio: float | None = None
    prune_when_stable: float | None = None
    stable_tol: float = 0.02
    stable_epochs: int = 3
    # Distillation while fine-tuning (netslim.train.distill): the teacher's checkpoint
    # (None: off), the weight of its term and the softening temperature.
    teacher: str | None = None
    distill_weight: float = 1.0
    distill_temperature: float = 4.0

    def check(self) -> None:
        """Raise NetslimError naming the first setting that makes no sense."""
        # Written as `not ok` so that NaN fails too; inf is refused as well.
        if not 0 <= self.lam < math.inf:
            raise NetslimError(f"--lam must be >= 0 (the L1 weight on BN gammas), got {self.lam}")
        if self.epochs < 1:
            raise NetslimError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise NetslimError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            raise NetslimError(
                f"the evaluation batch size must be at least 1, got {self.eval_batch_size}"
            )
        if not 0 < self.lr < math.inf:
            raise NetslimError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise NetslimError(f"--momentum must be in [0, 1), e.g. 0.9, got {self.momentum}")
        if not 0 <= self.weight_decay < math.inf:
            raise NetslimError(f"--weight-decay must be >= 0, e.g. 1e-4, got {self.weight_decay}")
        if not 0 < self.sparsity_threshold < math.inf:
            raise NetslimError(
                f"--sparsity-threshold must be > 0 and finite, e.g. 0.01, got {self.sparsity_threshold}"
            )
        check_image_size(self.image_size)
        if self.precision not in PRECISIONS:
            raise NetslimError(
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        recipes.check_schedule(self)
        self._check_control()
        if not 0 <= self.distill_weight < math.inf:
            raise NetslimError(
                f"--distill-weight must be >= 0 and finite, e.g. 1.0, got {self.distill_weight}"
            )
        if not 0 < self.distill_temperature < math.inf:
            raise NetslimError(
                "--distill-temperature must be > 0 and finite, e.g. 4.0, got "
                f"{self.distill_temperature}"
            )

    def _check_control(self) -> None:
        """λ auto and early pruning (netslim.train.control): settings that make no sense."""
        if self.lam_auto:
            if self.target_ratio is None or not 0 < self.target_ratio < 1:
                raise NetslimError(
                    "--lam auto needs --target-ratio R with 0 < R < 1 (the share of |γ| that "
                    f"should fall below the sparsity threshold), got {self.target_ratio}"
                )
        elif self.target_ratio is not None:
            raise NetslimError(
                "--target-ratio is the goal of --lam auto; add --lam auto or drop it"
            )
        if self.prune_when_stable is not None:
            if check_ratio(self.prune_when_stable) == 0:
                raise NetslimError("--prune-when-stable needs a ratio above 0, e.g. 0.5")
            if not 0 <= self.stable_tol <= 1:
                raise NetslimError(f"--stable-tol must be a share in [0, 1], got {self.stable_tol}")
            if self.stable_epochs < 1:
                raise NetslimError(f"--stable-epochs must be at least 1, got {self.stable_epochs}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


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
    # early pruning of the prune_lam training (netslim.train.control.StableMask); None: off
    prune_when_stable: float | None = None
    stable_tol: float = 0.02
    stable_epochs: int = 3
    # λ chosen for the user (netslim.train.control.AutoLam): the prune_lam run starts at
    # prune_lam and adapts λ to reach this share of sparse γ; None: off
    target_ratio: float | None = None
    # fine-tuning distils from the network it was pruned from (netslim.train.distill)
    distill: bool = True
    distill_weight: float = 1.0
    distill_temperature: float = 4.0

    def check(self) -> None:
        """Raise NetslimError naming the first setting that makes no sense."""
        check_arch_name(self.arch)  # names only: run_lab imports what a spec names
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
        self.finetune_config().check()  # the distillation's weight and temperature

    def train_config(self, lam: float) -> TrainConfig:
        """The recipe of the sparsity training at ``lam`` (early pruning: the prune_lam run's)."""
        recipe = recipes.resolve(
            self.recipe, {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        )
        pruned = lam_name(lam) == lam_name(self.prune_lam)  # the run the lab prunes
        early = self.prune_when_stable if pruned else None
        target = self.target_ratio if pruned else None
        return TrainConfig(
            arch=self.arch,
            dataset=self.dataset,
            data_root=self.data_root,
            lam=lam,
            seed=self.seed,
            precision=self.precision,
            device=self.device,
            train_size=self.train_size,
            test_size=self.test_size,
            recipe=self.recipe,
            **recipe,
            prune_when_stable=early,
            stable_tol=self.stable_tol,
            stable_epochs=self.stable_epochs,
            lam_auto=target is not None,
            target_ratio=target,
        )

    def finetune_config(self, teacher: str | Path | None = None) -> TrainConfig:
        """The recipe of fine-tuning: the training recipe without the L1 term, distilling
        from ``teacher`` (the network pruned) unless the lab's distillation is off."""
        config = recipes.finetune_of(self.train_config(0.0), self.finetune_epochs)
        if self.distill and teacher is not None:
            config.teacher = str(teacher)
        config.distill_weight = self.distill_weight
        config.distill_temperature = self.distill_temperature
        return config

    def sweep_ratios(self) -> list[float]:
        """The sweep ratios plus the lab's own, sorted, each once."""
        return sorted({float(r) for r in [*self.sweep, *self.ratios]})

    def command(self, out: str | Path) -> str:
        """The ``netslim lab`` command line that reproduces this lab, every setting explicit."""
        args = [
            "netslim",
            "lab",
            "--arch",
            self.arch,
            "--dataset",
            self.dataset,
            "--data-root",
            self.data_root,
        ]
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
            args += [
                "--prune-when-stable",
                repr(self.prune_when_stable),
                "--stable-tol",
                repr(self.stable_tol),
                "--stable-epochs",
                str(self.stable_epochs),
            ]
        if self.target_ratio is not None:
            args += ["--target-ratio", repr(self.target_ratio)]
        if not self.distill:
            args += ["--no-distill"]
        else:
            args += ["--distill-weight", repr(self.distill_weight)]
            args += ["--distill-temperature", repr(self.distill_temperature)]
        args += ["--out", str(out)]
        return shlex.join(args)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LabConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# The demo: the lab on built-in synthetic data, under 5 minutes on any 2-core x86 CPU
# (fp32 on AVX2 included; bench/RESULTS.md, "The demo under 5 minutes"). Its network,
# vgg5-small, is 3.4x cheaper per image than vgg11-small (12 minutes on an AMD EPYC) and
# nearly as accurate here; fewer images or epochs would not do: the shapes take about
# 20,000 images at lr 0.1 to learn. The λ differ from the lab's: in 5 epochs the paper's
# 1e-4 moves γ too little to make any of them small, so the demo trains at 0, 1e-3 (a
# little sparse) and 8e-3, and prunes the 8e-3 model: 87% sparse, it keeps its accuracy
# pruned at ratio 0.5, and at 0.9 loses few enough channels that matter for fine-tuning to
# recover (at 4e-3 the model is 6 points more accurate but 69% sparse: pruned at 0.9 it
# starts from 14% and fine-tunes to 83% only).
DEMO = LabConfig(
    arch="vgg5-small",
    dataset="synthetic",
    train_size=10000,
    test_size=2000,
    epochs=5,
    finetune_epochs=3,
    lams=[0.0, 1e-3, 8e-3],
    prune_lam=8e-3,
)


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


@dataclass
class YoloLab:
    """What a YOLO lab runs (the folder's ``lab.json``)."""

    model: str  # an Ultralytics YAML (fresh weights), or a trained .pt or netslim .pth
    data: str
    # one training run per λ; "auto": λ auto (netslim.train.control), toward target_ratio
    lams: list[float | str] = field(default_factory=lambda: [0.0, 5e-3, 2e-2])
    # the run pruned and fine-tuned; None: the "auto" run if any, else the largest λ
    prune_lam: float | str | None = None
    ratios: list[float] = field(default_factory=lambda: [0.3, 0.5])
    sweep: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9])
    epochs: int = 100
    finetune_epochs: int = 50
    image_size: int = 640  # Ultralytics' imgsz; named as LabConfig and the flags name it
    batch_size: int = 16  # Ultralytics' batch
    recalibrate: int = 16
    device: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # Ultralytics' key=value, passed on
    command: str = ""  # how it was started, for the report
    # λ auto's goal (the "auto" run's share of |γ| under 0.01), and early stopping of the
    # prune_lam run (netslim.train.control, as `netslim yolo train` takes them)
    target_ratio: float | None = None
    prune_when_stable: float | None = None
    stable_tol: float = 0.02
    stable_epochs: int = 3
    # fine-tuning distils from the lab's best unpruned network (netslim.yolo.lab.best_teacher)
    distill: bool = True
    distill_term: str = YOLO_DISTILL_TERMS[0]

    def __post_init__(self) -> None:
        if not self.lams:
            raise NetslimError("--lams needs at least one λ")
        for lam in self.lams:
            if lam != "auto" and not (isinstance(lam, (int, float)) and 0 <= lam < math.inf):
                raise NetslimError(f"--lams takes L1 weights >= 0, or auto, got {lam}")
        if self.prune_lam is None:
            numbers = [lam for lam in self.lams if lam != "auto"]
            self.prune_lam = max(numbers) if len(numbers) == len(self.lams) else "auto"
        if self.prune_lam not in self.lams:
            raise NetslimError(f"--prune-lam {self.prune_lam} is not one of --lams")
        for r in [*self.ratios, *self.sweep]:
            if not 0 < r < 1:
                raise NetslimError(f"a pruning ratio must be in (0, 1), got {r}")
        if self.distill_term not in YOLO_DISTILL_TERMS:
            raise NetslimError(
                f"--distill-term must be one of {', '.join(YOLO_DISTILL_TERMS)}, got "
                f"{self.distill_term!r}"
            )
        if self.recalibrate < 0:
            raise NetslimError(f"--recalibrate must be >= 0 batches, got {self.recalibrate}")
        self._check_control()

    def _check_control(self) -> None:
        """λ auto and early stopping: what `netslim yolo train` would refuse, refused before
        the lab starts."""
        auto = "auto" in self.lams
        if auto and (self.target_ratio is None or not 0 < self.target_ratio < 1):
            raise NetslimError(
                "--lam auto needs --target-ratio R, the share of |gamma| to make sparse, in "
                f"(0, 1), got {self.target_ratio}"
            )
        if not auto and self.target_ratio is not None:
            raise NetslimError(
                "--target-ratio is the goal of λ auto; add --lam auto (auto among --lams) or drop it"
            )
        if auto and str(self.settings.get("optimizer", "auto")).lower() != "sgd":
            raise NetslimError(
                "--lam auto assumes SGD's step (a γ moves by lr * λ / (1 - momentum)); add "
                "optimizer=SGD (Ultralytics' auto picks AdamW for short runs)"
            )
        if self.prune_when_stable is not None:
            if not 0 < self.prune_when_stable < 1:
                raise NetslimError(
                    f"--prune-when-stable takes a ratio in (0, 1), got {self.prune_when_stable}"
                )
            if not 0 <= self.stable_tol <= 1:
                raise NetslimError(f"--stable-tol must be a share in [0, 1], got {self.stable_tol}")
            if self.stable_epochs < 1:
                raise NetslimError(f"--stable-epochs must be at least 1, got {self.stable_epochs}")

    def all_ratios(self) -> list[float]:
        return sorted({*self.ratios, *self.sweep})

    def same_experiment(self, other: YoloLab) -> bool:
        """Whether ``other`` runs the same steps (the command line it came from aside)."""
        mine, theirs = asdict(self), asdict(other)
        mine.pop("command"), theirs.pop("command")
        return mine == theirs
