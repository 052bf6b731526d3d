"""Decisions taken between epochs of sparsity training: λ chosen for the user, early pruning.

:class:`AutoLam` (``--lam auto --target-ratio R``) adapts λ once per epoch. The target is
a linear ramp: after epoch ``e`` of ``E``, a share ``R * min(1, e / (E / 2))`` of all
|γ| should lie below the sparsity threshold (R by half-way, the second half lets the
mask settle and the accuracy recover at the lower learning rates). After each epoch:

1. if test accuracy fell more than ``ACC_DROP`` points below its best so far, λ is
   divided by ``FACTOR`` (the penalty is hurting the network);
2. otherwise, if the sparsity lags the ramp, λ is multiplied by ``FACTOR``;
3. otherwise λ stays.

λ starts at ``LAM_START`` (the paper's 1e-4) and stays within ``[LAM_MIN, LAM_MAX]``.

:class:`StableMask` (``--prune-when-stable R``) follows the Early-Bird idea (You et al.,
ICLR 2020): after each epoch it plans pruning at ratio R on the current network
(:func:`netslim.pruning.plan_pruning`, no surgery) and measures the *mask distance*, the
share of BatchNorm channels whose keep/remove decision differs from the previous
epoch's. When that distance is at most ``tol`` for ``epochs`` epochs in a row, the mask
has settled and sparsity training stops.

Both decide only from values every torchrun process holds identically (the weights,
kept equal by DDP, and test accuracy averaged over all processes), so all processes
take the same decision. Their state is saved in every checkpoint, so ``--resume``
repeats the uninterrupted run.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from netslim.channels import ChannelGraph, trace_channels
from netslim.errors import NetslimError
from netslim.pruning import check_ratio, plan_pruning
from netslim.sparsity import batchnorms

LAM_START = 1e-4
LAM_MIN, LAM_MAX = 1e-6, 1e-2
FACTOR = 2.0
ACC_DROP = 5.0  # percentage points below the best test accuracy
RAMP = 0.5  # share of the epochs by which the target ratio should be reached


def check_config(config: Any) -> None:
    """Raise NetslimError for λ-controller or early-pruning settings that make no sense."""
    if config.lam_auto:
        if config.target_ratio is None or not 0 < config.target_ratio < 1:
            raise NetslimError(
                "--lam auto needs --target-ratio R with 0 < R < 1 (the share of |γ| that "
                f"should fall below the sparsity threshold), got {config.target_ratio}"
            )
    elif config.target_ratio is not None:
        raise NetslimError("--target-ratio is the goal of --lam auto; add --lam auto or drop it")
    if config.prune_when_stable is not None:
        if check_ratio(config.prune_when_stable) == 0:
            raise NetslimError("--prune-when-stable needs a ratio above 0, e.g. 0.5")
        if not 0 <= config.stable_tol <= 1:
            raise NetslimError(f"--stable-tol must be a share in [0, 1], got {config.stable_tol}")
        if config.stable_epochs < 1:
            raise NetslimError(f"--stable-epochs must be at least 1, got {config.stable_epochs}")


class AutoLam:
    """The λ controller of ``--lam auto`` (see the module docs)."""

    def __init__(self, target_ratio: float, epochs: int, lam: float = LAM_START):
        self.target_ratio, self.epochs = target_ratio, epochs
        self.lam = lam
        self.best_acc = float("-inf")

    def target(self, epoch: int) -> float:
        """The share of |γ| below the threshold wanted after ``epoch`` (1-based) epochs."""
        return self.target_ratio * min(1.0, epoch / max(1.0, RAMP * self.epochs))

    def update(self, epoch: int, sparsity: float, test_acc: float) -> float:
        """Take the decision after ``epoch`` (1-based); returns the λ of the next epoch."""
        if test_acc < self.best_acc - ACC_DROP:
            self.lam = max(LAM_MIN, self.lam / FACTOR)
        elif sparsity < self.target(epoch):
            self.lam = min(LAM_MAX, self.lam * FACTOR)
        self.best_acc = max(self.best_acc, test_acc)
        return self.lam

    def state_dict(self) -> dict[str, float]:
        return {"lam": self.lam, "best_acc": self.best_acc}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.lam, self.best_acc = float(state["lam"]), float(state["best_acc"])


def removal_mask(model: nn.Module, ratio: float, graph: ChannelGraph | None = None) -> torch.Tensor:
    """One bool per BatchNorm channel of ``model`` (in definition order): True where
    pruning at ``ratio`` would remove it."""
    with warnings.catch_warnings():  # a floored layer is no news at every epoch
        warnings.simplefilter("ignore", UserWarning)
        masks = plan_pruning(model, ratio, graph=graph or trace_channels(model)).masks
    return torch.cat([~masks[name] for name, _ in batchnorms(model)])


def mask_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of channels whose decision differs between two removal masks."""
    return (a != b).float().mean().item()


class StableMask:
    """Watches the removal mask at ``ratio`` epoch by epoch (see the module docs)."""

    def __init__(self, ratio: float, tol: float, epochs: int):
        self.ratio, self.tol, self.epochs = ratio, tol, epochs
        self.previous: torch.Tensor | None = None
        self.streak = 0  # epochs in a row with a distance of at most tol
        self.stopped_at: int | None = None
        self._graph: ChannelGraph | None = None  # traced once, the architecture is fixed

    def update(self, model: nn.Module, epoch: int) -> float | None:
        """Compare ``model``'s mask after ``epoch`` (1-based) with the previous epoch's.

        Returns the mask distance (None after the first epoch watched) and sets
        ``stopped_at`` to ``epoch`` when the mask has settled.
        """
        if self._graph is None:
            self._graph = trace_channels(model)
        mask = removal_mask(model, self.ratio, self._graph)
        distance = None if self.previous is None else mask_distance(mask, self.previous)
        self.previous = mask
        self.streak = self.streak + 1 if distance is not None and distance <= self.tol else 0
        if self.streak >= self.epochs:
            self.stopped_at = epoch
        return distance

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self.previous, "streak": self.streak, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous, self.streak = state["previous"], int(state["streak"])
        self.stopped_at = state["stopped_at"]


class SparsityControl:
    """What :func:`netslim.train.fit` asks between epochs: the λ of the next epoch, and
    whether sparsity training should stop. Inactive parts change nothing."""

    def __init__(self, config: Any):
        self.lam = config.lam
        self.auto = (
            AutoLam(config.target_ratio, config.epochs, config.lam) if config.lam_auto else None
        )
        self.watch = (
            StableMask(config.prune_when_stable, config.stable_tol, config.stable_epochs)
            if config.prune_when_stable is not None
            else None
        )

    @property
    def stopped(self) -> bool:
        return self.watch is not None and self.watch.stopped_at is not None

    def end_epoch(self, model: nn.Module, record: dict[str, Any]) -> None:
        """Add this epoch's λ (and mask distance) to ``record``; decide the next epoch's."""
        record["lam"] = self.lam
        if self.watch is not None:
            record["mask_distance"] = self.watch.update(model, record["epoch"])
            record["stable_epochs"] = self.watch.streak
            if self.stopped:
                record["stopped_early"] = True
        if self.auto is not None:
            record["lam_target"] = self.auto.target(record["epoch"])
            self.lam = self.auto.update(record["epoch"], record["sparsity"], record["test_acc"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "lam": self.lam,
            "auto": self.auto.state_dict() if self.auto else None,
            "watch": self.watch.state_dict() if self.watch else None,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:  # a checkpoint from before these controls: nothing to restore
            return
        self.lam = float(state["lam"])
        if self.auto is not None:
            self.auto.load_state_dict(state["auto"])
        if self.watch is not None:
            self.watch.load_state_dict(state["watch"])
