"""When a lab's numbers mean nothing: the rules, each a one-line warning that says how to fix it.

Both lab reports (:mod:`netslim.lab.report`, :mod:`netslim.yolo.report`) put these lines at
their top and :func:`warn` prints them on the console; ``netslim yolo prune`` warns of ties
and of a meaningless unpruned mAP. Each rule takes plain numbers and returns the line, or
None when the run is healthy:

* :func:`dense` -- sparsity training left the γs dense at the ratio pruned: the share of
  |γ| under the sparsity threshold at the end of the run is under half that ratio
  (:data:`DENSE_SHARE`), so the prune cuts channels whose γ still matters;
* :func:`tied` -- the prune threshold sits among tied γs: at least :data:`TIE_SHARE` of all
  γs equal it (an untrained network's are all 1) and it is not itself sparse, so which tied
  channels go is chosen by position, not importance;
* :func:`low_map` -- an unpruned YOLO's mAP is under :data:`MAP_FLOOR`: every mAP after it
  is noise;
* :func:`near_chance` -- an unpruned classifier's test accuracy is within
  :data:`CHANCE_MARGIN` points of chance (100 / classes): every accuracy after it is noise.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

DENSE_SHARE = 0.5  # sparse share under DENSE_SHARE * ratio: the prune reaches dense γs
TIE_SHARE = 0.01  # the threshold's tie covers at least this share of all γs
MAP_FLOOR = 0.01  # mAP50-95 under it: a network that has not learnt to detect yet
CHANCE_MARGIN = 2.0  # percentage points above chance that still count as chance


class RunWarning(UserWarning):
    """A lab's (or a prune's) result means little: see the module docs."""


def dense(
    sparsity: float, ratio: float, threshold: float, lam: str, auto: str = "--lam auto "
) -> str | None:
    """``sparsity``: the share of |γ| under ``threshold`` at the end of the λ = ``lam`` run,
    which is pruned at ``ratio``; ``auto``: the flag that turns λ auto on, where the command
    has one (the classifier lab's --target-ratio alone does)."""
    if sparsity >= DENSE_SHARE * ratio:
        return None
    return (
        f"sparsity training left the γs dense: at the end of the λ = {lam} run {sparsity:.1%} "
        f"of |γ| are under {threshold:g}, far below the {ratio:.0%} it is pruned at, so pruning "
        "cuts channels that still matter; train more epochs or with a larger λ, or let "
        f"{auto}--target-ratio {ratio:g} choose λ"
    )


def tied(
    tie_break: Sequence[int] | None,
    total: int,
    threshold: float,
    ratio: float | None,
    sparse: float = 0.01,
) -> str | None:
    """``tie_break``: the prune report's ``(removed, tied)`` γs at ``threshold`` (None: no tie
    was broken) out of ``total`` γs. A tie under ``sparse`` (γs already near 0) is harmless."""
    if not tie_break or total <= 0 or abs(threshold) < sparse:
        return None
    removed, count = tie_break
    if count < TIE_SHARE * total:
        return None
    return (
        f"the prune threshold{'' if ratio is None else f' at ratio {ratio:g}'} sits among "
        f"tied γs: {count} of {total} "
        f"|γ| ({count / total:.0%}) equal {threshold:.4g} (as in an untrained network), and "
        f"the {removed} removed were picked by position, not importance; sparsity-train "
        "first (a λ > 0, or --lam auto) so that |γ| tells which channels matter"
    )


def low_map(values: dict[str, float], metric: str) -> str | None:
    """``values``: the unpruned networks' ``metric`` (mAP50-95), each under a phrase that
    names the network (``"at λ = 0.01"``, ``"of last.pth"``)."""
    low = {where: value for where, value in values.items() if value < MAP_FLOOR}
    if not low:
        return None
    which = ", ".join(f"{value:.4f} {where}" for where, value in low.items())
    return (
        f"the unpruned {metric} is under {MAP_FLOOR:g} ({which}): too low to compare, every "
        f"{metric} after it is noise; train longer (more epochs, or start from a trained .pt) "
        "before pruning"
    )


def near_chance(accuracy: float, num_classes: int) -> str | None:
    """``accuracy``: the unpruned network's test accuracy in %."""
    chance = 100.0 / num_classes
    if num_classes < 2 or accuracy >= chance + CHANCE_MARGIN:
        return None
    return (
        f"the unpruned test accuracy {accuracy:.2f}% is within {CHANCE_MARGIN:g} points of "
        f"chance ({chance:.2f}% for {num_classes} classes): every accuracy after it is noise; "
        "train longer (more epochs) before pruning"
    )


def found(lines: Iterable[str | None]) -> list[str]:
    """The warnings among the rules' results (None: that rule found nothing)."""
    return [line for line in lines if line]


def warn(lines: Iterable[str]) -> None:
    """Each line as a :class:`RunWarning` (the CLI prints ``netslim: warning: LINE``)."""
    for line in lines:
        warnings.warn(line, RunWarning, stacklevel=2)
