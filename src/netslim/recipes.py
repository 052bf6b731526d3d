"""Training recipes: named sets of default settings, and the learning-rate schedule.

A recipe only changes defaults. :func:`resolve` fills every setting a user did not give
from the recipe; an explicit flag always wins, and the resolved values are what a run's
``config.json`` records.

``paper`` (the default) is the recipe of Liu et al. 2017, unchanged: SGD with momentum
0.9, weight decay 1e-4, batch 64, lr 0.1 divided by 10 at 50% and 75% of 160 epochs.

``fast`` uses what fast CIFAR training has adopted since 2017 (ResNet-9 of DAWNBench,
airbench; Goyal et al. 2017 for the scaling rule), for 40 epochs instead of 160:

- batch 256 at lr 0.2: 4x fewer, larger steps, which the CPU and GPU both run faster
  per image. The lr is half of what the linear scaling rule gives (0.1 * 256/64 = 0.4):
  at 0.4 test accuracy swung by 10-20 points from epoch to epoch and the network was
  worse at the moment of pruning (72.0% against 77.6%), for the same final accuracy
  (bench/RESULTS.md, issue 13);
- a linear warm-up over 2 epochs (the scaled lr is too large for the first steps of a
  fresh network), then a linear decay to zero, set every step (no schedule milestones
  to tune for a short run);
- Nesterov momentum 0.9, label smoothing 0.1 (the loss never rewards over-confident
  logits), weight decay 5e-4 (the usual value for short CIFAR schedules).

The L1 term under any schedule. The sub-gradient ``lam * sign(gamma)`` is added to each
γ's gradient before the optimizer step (see :mod:`netslim.engine.sparsity`), so it passes
through the same lr, momentum (Nesterov included) and step as the loss gradient: the
optimizer minimises ``CE_smoothed + lam * sum|γ| + wd/2 * |w|^2`` whatever the recipe,
and the L1 displacement of one step is ``lr_t * lam * sign(γ)`` before momentum (at the
first step with Nesterov, ``(1 + momentum) * lr_t * lam * sign(γ)``). Per epoch the L1
pull adds up to ``lam * sum_t lr_t`` (times ``1 / (1 - momentum)`` once momentum has built
up): 4x fewer steps at 2x the lr pull half as far per epoch as the paper's, so a λ
given by hand means half the sparsity pressure per epoch under ``fast``; ``--lam auto``
takes the schedule into account by itself.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from netslim.errors import NetslimError

if TYPE_CHECKING:  # config imports this module
    from netslim.config import TrainConfig

SCHEDULES = ("step", "linear")

# The settings a recipe decides; each is a TrainConfig field and a command-line flag.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "epochs": 160,
        "batch_size": 64,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "schedule": "step",
        "warmup_epochs": 0.0,
        "nesterov": False,
        "label_smoothing": 0.0,
    },
    "fast": {
        "epochs": 40,
        "batch_size": 256,
        "lr": 0.2,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "linear",
        "warmup_epochs": 2.0,
        "nesterov": True,
        "label_smoothing": 0.1,
    },
}
RECIPE_KEYS = tuple(RECIPES["paper"])


def resolve(recipe: str, given: dict[str, Any]) -> dict[str, Any]:
    """The recipe's settings with every value in ``given`` that is not None put in their place.

    Args:
        recipe: ``'paper'`` or ``'fast'``.
        given: settings the user gave explicitly (None: not given); keys outside the
            recipe's are ignored.
    """
    if recipe not in RECIPES:
        raise NetslimError(f"unknown --recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    explicit = {k: v for k, v in given.items() if k in RECIPE_KEYS and v is not None}
    return {**RECIPES[recipe], **explicit}


def lr_at_step(config: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps`` in epoch ``epoch`` (0-based).

    ``step`` schedule: the paper's, constant within an epoch (:func:`lr_at`).
    ``linear``: with ``t = epoch + (step + 0.5) / steps`` the training time in epochs (the
    middle of the step), ``lr * t / w`` during the warm-up ``t < w``, then
    ``lr * (E - t) / (E - w)`` down to nearly zero at the end of ``E = epochs``; the
    warm-up is ``w =`` :func:`warmup_epochs`, at most ``E / 2``, so a short fine-tuning still
    decays.
    """
    if config.schedule == "step":
        return lr_at(epoch, config.lr, config.epochs)
    end = config.epochs
    t, w = epoch + (step + 0.5) / steps, warmup_epochs(config)
    if t < w:
        return config.lr * t / w
    return config.lr * (end - t) / (end - w)


def lr_at(epoch: int, base_lr: float, epochs: int) -> float:
    """The paper's step schedule: the learning rate of 0-based ``epoch`` of ``epochs``.

    Divided by 10 from the first epoch at or past 50% of the run and again at 75%, compared
    as floats (``epoch >= epochs * 0.5``): the milestones are ``ceil(epochs / 2)`` and
    ``ceil(3 * epochs / 4)``, so no run decays before its first epoch has run (1 epoch
    stays at ``base_lr``; 2 epochs decay once, in the second). The paper's main.py decays
    when ``epoch in [epochs * 0.5, epochs * 0.75]``: the same where those are whole
    numbers (160 epochs: 80 and 120), never where they are not (3 epochs: 1.5, 2.25).
    """
    return base_lr * 0.1 ** sum(epoch >= epochs * share for share in (0.5, 0.75))


def warmup_epochs(config: TrainConfig) -> float:
    """The ``linear`` schedule's warm-up in epochs: ``--warmup-epochs``, at most half the run."""
    return min(config.warmup_epochs, config.epochs / 2)


def check_schedule(config: TrainConfig) -> None:
    """Raise NetslimError for a schedule setting that makes no sense."""
    if config.schedule not in SCHEDULES:
        raise NetslimError(
            f"--schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}"
        )
    if not config.warmup_epochs >= 0:
        raise NetslimError(f"--warmup-epochs must be >= 0, got {config.warmup_epochs}")
    if not 0 <= config.label_smoothing < 1:
        raise NetslimError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    if config.nesterov and config.momentum <= 0:
        raise NetslimError("--nesterov needs --momentum > 0")


def finetune_of(config: TrainConfig, epochs: int) -> TrainConfig:
    """The fine-tuning recipe of a sparsity-training ``config``: same settings, no L1 term,
    no λ controller, no early pruning, ``epochs`` epochs."""
    return replace(
        config, lam=0.0, lam_auto=False, target_ratio=None, prune_when_stable=None, epochs=epochs
    )
