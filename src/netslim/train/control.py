"""Decisions taken between epochs of sparsity training: λ chosen for the user, early pruning.

:class:`AutoLam` (``--lam auto --target-ratio R``) sets λ once per epoch. It watches
``q``, the R-quantile of all |γ| (the |γ| below which the share R lies): the run has
reached its target when ``q`` is at most the sparsity threshold ``thr``. ``q`` moves
smoothly from the first epoch on, unlike the share below ``thr``, which stays at 0 until
γs cross it; a controller on that share keeps raising λ while nothing seems to happen,
then overshoots (measured: bench/RESULTS.md, issue 13).

The rule, after epoch ``e`` of ``E``, with the ramp ending at epoch ``ceil(E / 2)``
(the second half lets the mask settle and accuracy recover at the lower learning rates):

1. *Feed-forward.* Once momentum ``m`` has built up, the L1 term moves a γ by
   ``lr_t * λ / (1 - m)`` per step (Nesterov too), so a λ of ``(q - thr) / P``, with ``P``
   the sum of ``lr_t / (1 - m)`` over the steps left before the ramp's end (at least
   ``HOLD`` epochs' worth), would bring ``q`` down to ``thr`` by then if the loss did not
   push back. λ for the next epoch is ``gain * max(q - thr, 0) / P``: it shrinks as ``q``
   nears its goal, so λ settles instead of overshooting. Past the ramp it holds ``q`` at
   ``thr``, removing any excess over the next ``HOLD`` epochs. (Without the momentum
   factor the first λ came out 10x too large at ``m = 0.9``: ``q`` fell from 0.49 to 0.03
   in one epoch, and the network pruned at 0.5 ended 0.8 points lower at equal compute.)
2. *Correction.* The loss does push back, by an amount no formula knows, so ``gain``
   (from 1) is multiplied by ``GAIN_STEP`` when ``q`` lies above its path, the straight
   line from its first value down to ``thr`` at the ramp's end, and divided by it when
   below; within ``[GAIN_MIN, GAIN_MAX]``. Never below 1: the feed-forward assumes no
   resistance, so less than it is never what the loss needs. Even so ``q`` lags its
   path in the last epochs of the ramp, when the network has come to rely on its
   channels, and reaches ``thr`` a few epochs after the ramp's end (bench/RESULTS.md).
3. *Accuracy guard.* If the epoch's training accuracy fell more than ``ACC_DROP`` points
   below its best so far, λ is halved instead (the penalty is hurting the network).
   Training accuracy, not test accuracy: the test set must not steer training, and at
   the fast recipe's peak learning rate test accuracy swings by 10-20 points from one
   epoch to the next while training accuracy, averaged over a whole epoch, does not.

4. *Rate limit.* From the second decision on, λ changes by at most a factor ``FACTOR``
   per epoch: once ``q`` is under ``thr`` the formula asks for no pull at all, while the
   loss at once pulls the smallest γs back up; halving λ instead of dropping it keeps the
   target held (measured: without it λ jumped between 1e-6 and 7e-3 in the hold phase).

The first epoch runs at the λ given (``LAM_START``, the paper's 1e-4, by default);
λ stays within ``[LAM_MIN, LAM_MAX]``.

:class:`StableMask` (``--prune-when-stable R``) follows the Early-Bird idea (You et al.,
ICLR 2020): after each epoch it plans pruning at ratio R on the current network
(:func:`netslim.engine.plan.plan_pruning`, no surgery) and measures the *mask distance*, the
share of BatchNorm channels whose keep/remove decision differs from the previous
epoch's. When that distance is at most ``tol`` for ``epochs`` epochs in a row, the mask
has settled and sparsity training stops.

Both decide only from values every torchrun process holds identically (the weights,
kept equal by DDP, and training accuracy summed over all processes), so all processes
take the same decision. Their state is saved in every checkpoint, so ``--resume``
repeats the uninterrupted run.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from netslim.config import LAM_START, TrainConfig
from netslim.engine.graph import ChannelGraph
from netslim.engine.plan import plan_pruning
from netslim.engine.sparsity import batchnorms, bn_gammas
from netslim.engine.trace import trace_channels
from netslim.recipes import lr_at_step

LAM_MIN, LAM_MAX = 1e-6, 1e-2
FACTOR = 2.0  # the most λ changes from one epoch to the next
GAIN_STEP, GAIN_MIN, GAIN_MAX = 1.5, 1.0, 16.0
HOLD = 3  # epochs: the shortest horizon over which λ means to remove an excess of q
ACC_DROP = 5.0  # percentage points below the best training accuracy
RAMP = 0.5  # share of the epochs by which the target ratio should be reached


class AutoLam:
    """The λ controller of ``--lam auto`` (see the module docs).

    Args:
        target_ratio: R, the share of |γ| that should end below ``threshold``.
        epoch_lr: one per epoch, the sum over its steps of ``lr_t / (1 - momentum)``: how far
            a λ of 1 moves a γ in that epoch.
        lam: the λ of the first epoch.
        threshold: the sparsity threshold on |γ|.
        lam_max: the largest λ it sets (a loss summed over the batch needs larger ones).
    """

    def __init__(
        self,
        target_ratio: float,
        epoch_lr: list[float],
        lam: float = LAM_START,
        threshold: float = 0.01,
        lam_max: float = LAM_MAX,
    ):
        self.target_ratio, self.epoch_lr, self.threshold = target_ratio, epoch_lr, threshold
        self.lam_max = lam_max
        self.ramp_end = max(1, math.ceil(RAMP * len(epoch_lr)))
        self.lam, self.gain = lam, 1.0
        self.start: float | None = None  # q after the first epoch: where the path starts
        self.best_acc = float("-inf")

    def path(self, epoch: int) -> float:
        """The wanted R-quantile of |γ| after ``epoch`` (1-based): a straight line from its
        value after epoch 1 down to the threshold at the ramp's end."""
        assert self.start is not None, "path() before the first update()"
        done = min(1.0, (epoch - 1) / max(1, self.ramp_end - 1))
        return self.start + (min(self.threshold, self.start) - self.start) * done

    def pull_left(self, epoch: int) -> float:
        """Σ lr over the steps after ``epoch`` (1-based) up to the later of the ramp's end
        and ``HOLD`` epochs ahead, within the run (the last epoch's after the last)."""
        last = min(max(self.ramp_end, epoch + HOLD), len(self.epoch_lr))
        return sum(self.epoch_lr[min(epoch, last - 1) : last])

    def update(self, epoch: int, quantile: float, train_acc: float | None) -> float:
        """Take the decision after ``epoch`` (1-based), given the R-quantile of |γ| then and
        the epoch's training accuracy (None where the loop measures none, as a detector's:
        no accuracy guard); returns the λ of the next epoch."""
        if self.start is None:
            self.start = quantile
        hurt = train_acc is not None and train_acc < self.best_acc - ACC_DROP
        if train_acc is not None:
            self.best_acc = max(self.best_acc, train_acc)
        if hurt:
            self.lam = max(LAM_MIN, self.lam / FACTOR)
            return self.lam
        if quantile > self.path(epoch):
            self.gain = min(GAIN_MAX, self.gain * GAIN_STEP)
        elif quantile < self.path(epoch):
            self.gain = max(GAIN_MIN, self.gain / GAIN_STEP)
        wanted = self.gain * max(quantile - self.threshold, 0.0) / self.pull_left(epoch)
        if epoch > 1:  # the first decision replaces the λ given, which may be far off
            wanted = min(self.lam * FACTOR, max(self.lam / FACTOR, wanted))
        self.lam = min(self.lam_max, max(LAM_MIN, wanted))
        return self.lam

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "gain": self.gain, "start": self.start, "best_acc": self.best_acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam, self.best_acc = float(state["lam"]), float(state["best_acc"])
        self.gain, self.start = float(state["gain"]), state["start"]


def gamma_quantile(model: nn.Module, share: float) -> float:
    """The ``share``-quantile of all |γ| of ``model`` (the |γ| below which that share lies)."""
    return torch.quantile(bn_gammas(model).abs().float(), share).item()


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


# --stable-tol's default, one for classifiers and YOLOs (the CLI, LabConfig, netslim.yolo)
STABLE_TOL = TrainConfig.stable_tol


class SparsityControl:
    """The between-epoch control of a sparsity run, for classifiers
    (:func:`netslim.train.fit`) and YOLOs (:mod:`netslim.yolo.train`) alike: the λ of the
    next epoch (``--lam auto``, :class:`AutoLam`) and whether sparsity training should stop
    (``--prune-when-stable``, :class:`StableMask`). Inactive parts change nothing.

    Each epoch, :meth:`end_epoch` adds to that epoch's record (one schema for both flows):

    * ``lam``: the λ the epoch was trained at;
    * with ``prune_when_stable``: ``mask_distance`` (None after the first epoch watched),
      ``stable_epochs`` (epochs in a row within ``stable_tol``) and ``stopped_early``
      (True on the epoch the mask settled);
    * with λ auto: ``gamma_quantile`` (the ``target_ratio``-quantile of |γ|),
      ``gamma_quantile_path`` (where it should be by then) and ``lam_gain``.

    The next epoch's λ is :attr:`lam` afterwards. Its state (:meth:`state_dict`) goes into
    every checkpoint, so that a resumed run takes the decisions of the uninterrupted one.

    Args:
        lam: the λ of the first epoch.
        epoch_lr: with ``target_ratio``, one per epoch: how far a λ of 1 moves a γ in that
            epoch (the sum of ``lr_t / (1 - momentum)`` over its optimizer steps).
        target_ratio: λ auto's target share of |γ| under ``threshold`` (None: λ fixed).
        threshold: the sparsity threshold on |γ|.
        lam_max: λ auto's ceiling.
        prune_when_stable, stable_tol, stable_epochs: stop once the removal mask at ratio
            ``prune_when_stable`` has changed by at most ``stable_tol`` of the channels for
            ``stable_epochs`` epochs in a row (None: never stop early).
    """

    def __init__(
        self,
        lam: float,
        *,
        epoch_lr: list[float] | None = None,
        target_ratio: float | None = None,
        threshold: float = 0.01,
        lam_max: float = LAM_MAX,
        prune_when_stable: float | None = None,
        stable_tol: float = STABLE_TOL,
        stable_epochs: int = 3,
    ):
        self.lam = lam
        self.auto = None
        if target_ratio is not None:
            if epoch_lr is None:
                raise ValueError("λ auto (target_ratio) needs epoch_lr")
            self.auto = AutoLam(target_ratio, epoch_lr, lam, threshold, lam_max=lam_max)
        self.watch = (
            StableMask(prune_when_stable, stable_tol, stable_epochs)
            if prune_when_stable is not None
            else None
        )

    @classmethod
    def from_config(cls, config: Any, steps: int) -> SparsityControl:
        """A classifier run's control (a :class:`netslim.config.TrainConfig`); ``steps``:
        optimizer steps per epoch (λ auto needs each epoch's sum of lr)."""
        epoch_lr = None
        if config.lam_auto:
            epoch_lr = [
                sum(lr_at_step(config, epoch, step, steps) for step in range(steps))
                / (1 - config.momentum)
                for epoch in range(config.epochs)
            ]
        return cls(
            config.lam,
            epoch_lr=epoch_lr,
            target_ratio=config.target_ratio if config.lam_auto else None,
            threshold=config.sparsity_threshold,
            prune_when_stable=config.prune_when_stable,
            stable_tol=config.stable_tol,
            stable_epochs=config.stable_epochs,
        )

    @property
    def active(self) -> bool:
        """Whether anything is decided between epochs."""
        return self.auto is not None or self.watch is not None

    @property
    def stopped(self) -> bool:
        return self.watch is not None and self.watch.stopped_at is not None

    def end_epoch(self, model: nn.Module, record: dict[str, Any]) -> None:
        """Add this epoch's λ and decisions to ``record`` (which holds ``epoch``, 1-based,
        and ``train_acc`` where the loop measures one: λ auto's accuracy guard); decide the
        next epoch's λ (:attr:`lam`)."""
        record["lam"] = self.lam
        if self.watch is not None:
            record["mask_distance"] = self.watch.update(model, record["epoch"])
            record["stable_epochs"] = self.watch.streak
            if self.stopped:
                record["stopped_early"] = True
        if self.auto is not None:
            quantile = gamma_quantile(model, self.auto.target_ratio)
            self.lam = self.auto.update(record["epoch"], quantile, record.get("train_acc"))
            record["gamma_quantile"] = quantile  # at the target ratio
            record["gamma_quantile_path"] = self.auto.path(record["epoch"])
            record["lam_gain"] = self.auto.gain

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

    def to_json(self) -> dict[str, Any]:
        """:meth:`state_dict` as plain JSON (the removal mask as a list of bools)."""
        state = self.state_dict()
        if state["watch"] is not None and state["watch"]["previous"] is not None:
            state["watch"] = {**state["watch"], "previous": state["watch"]["previous"].tolist()}
        return state

    def load_json(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`to_json` wrote."""
        watch = state.get("watch")
        if watch is not None and watch["previous"] is not None:
            watch = {**watch, "previous": torch.tensor(watch["previous"], dtype=torch.bool)}
        self.load_state_dict({**state, "watch": watch})
