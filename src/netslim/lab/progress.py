"""Progress lines of a lab: which stage, where in it, the time spent and the time left.

A lab runs for minutes (the demo) to days (the paper's recipe on a CPU), and one epoch can
take minutes, so per-epoch lines alone leave long silences. :class:`LabProgress` prints
lines such as::

    [lab 3/9 train λ=1e-3: epoch 2/4, batch 40/80] 1m12s elapsed, ~1m50s left

at most one every ``every`` seconds (10 by default), and at least one that often while
the lab runs: training reports each batch (``on_step`` of :func:`netslim.train.loop.fit`),
and a background thread speaks for the stretches that report nothing (evaluation,
pruning, the sweep, the report). Under torchrun only rank 0's progress prints.

The time left is the work left divided by the rate of work measured so far in this run.
Work is counted in *units*: one unit is one image through the forward pass of the
unpruned network. A training image costs :data:`TRAIN_COST` units (forward and backward),
a test or recalibration image one, and an image through a pruned network less
(:func:`pruned_cost`). These weights are rough, so each kind of stage (training,
pruning, fine-tuning) is timed on its own: once a kind has run for a few seconds, what is
left of it goes at its own rate; until then, at the rate of all the work so far. Work
that an earlier run did (stages a resumed lab skips, epochs a resumed training run skips)
and work that never comes (epochs after early pruning stopped a run) counts neither as
done nor as left, so it does not distort the rates.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

from netslim.runtime import distributed

Log = Callable[[str], None]

# A kind of stage is timed at its own rate once it has run this long.
KIND_SECONDS = 5.0

# Units of one training image (forward, backward, the L1 term and the SGD step) against
# one evaluated image: 3.3 for the demo's network and for vgg11-small at batch 64 against
# evaluation at batch 1000, fp32 on one core (bench/RESULTS.md, bench/demo_costs.py).
TRAIN_COST = 3.3


def pruned_cost(ratio: float) -> float:
    """The guessed cost of an image through a network pruned at ``ratio``, in units of the
    unpruned network's (until a fine-tuning stage has measured its own rate).

    Time falls more slowly than MACs, and by how much depends on the network and the
    machine: the demo's network pruned at 0.5 and 0.9 trains at 0.50 and 0.20 of its time
    on one core, 0.85 and 0.44 on two (fp32), 1.0 and 1.6 under bf16 autocast, whose
    kernels do badly at odd widths; vgg11-small on one core at 0.32 and 0.07
    (bench/RESULTS.md). Hence a middle guess, and each kind of stage timed on its own.
    """
    return 1.0 - ratio / 2


@dataclass
class Stage:
    """One stage of a lab: its name as the lines show it and its estimated work."""

    name: str
    units: float = 0.0  # image work, see the module docstring
    seconds: float = 0.0  # work that is no image work (the report), a fixed guess
    kind: str = ""  # stages of one kind share a measured rate (training, pruning, ...)


@dataclass
class _Share:
    """How much of a stage this run did (``done``) and will never do (``dropped``)."""

    done: float = 0.0
    dropped: float = 0.0


def _rate(rows: list[tuple[float, float, float]], least: float = 0.0) -> float | None:
    """Units a second over stages' (done, left, seconds) rows; None before any work, or
    before ``least`` seconds of it."""
    done = sum(d for d, _, _ in rows)
    spent = sum(t for d, _, t in rows if d > 0)
    return done / spent if done > 0 and spent > max(least, 0.0) else None


def duration(seconds: float) -> str:
    """``seconds`` as ``45s``, ``1m12s`` or ``2h03m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LabProgress:
    """Progress lines for a sequence of stages; see the module docstring.

    Args:
        stages: every stage of the lab, in the order they run (done ones included).
        log: where lines go; the lab's other lines should go through :meth:`log` too, so
            that the background thread never prints into the middle of one.
        label: the first word of each line (``lab``, ``demo``).
        every: seconds between two progress lines (0: a line at every event).
        clock: seconds, monotonic (tests give their own).
        enabled: whether to print; by default on the main process only (rank 0 under
            torchrun speaks for all).
        heartbeat: print from a background thread when no event came for ``every`` seconds.
    """

    def __init__(
        self,
        stages: list[Stage],
        log: Log,
        *,
        label: str = "lab",
        every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        enabled: bool | None = None,
        heartbeat: bool = True,
    ) -> None:
        self.stages = list(stages)
        self.label, self.every, self.clock = label, every, clock
        self.enabled = distributed.is_main() if enabled is None else enabled
        self._log = log
        self._shares = [_Share() for _ in self.stages]
        self._lock = threading.RLock()  # one line at a time, from either thread
        self._start = clock()
        self._begun = False  # whether a stage has begun
        self._last_line = self._start  # the first line comes after ``every`` seconds
        self._index = -1  # the stage running, -1 when none
        self._stage_start = self._start
        self._fraction = 0.0  # of the running stage, done (including what an earlier run did)
        self._first = 0.0  # of the running stage, done before this run took it over
        self._end = 1.0  # of the running stage, done once it returns normally
        self._detail = ""
        self._seconds: list[float] = [0.0] * len(self.stages)  # each stage's time in this run
        self._heartbeat = heartbeat and self.enabled and every > 0
        self._stop = threading.Event()

    # -- what the lab calls ------------------------------------------------------------

    def log(self, line: str) -> None:
        """Print one of the lab's own lines (never in the middle of a progress line)."""
        if self.enabled:
            with self._lock:
                self._log(line)

    @contextlib.contextmanager
    def running(self) -> Iterator[LabProgress]:
        """Run the background thread (when asked for) until the block ends."""
        thread = None
        if self._heartbeat:
            thread = threading.Thread(target=self._beat, name="lab-progress", daemon=True)
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            if thread is not None:
                thread.join()

    @contextlib.contextmanager
    def stage(self, index: int, headline: str = "") -> Iterator[None]:
        """Stage ``index`` runs in this block, announced by ``headline`` (if any); on a
        normal exit it counts as done (the share set by :meth:`skip` or by training's
        reports excepted)."""
        if headline:
            self.log(headline)
        with self._lock:
            now = self.clock()
            self._begun = True
            self._index, self._stage_start = index, now
            self._fraction = self._first = 0.0
            self._end, self._detail = 1.0, ""
        self._event()
        try:
            yield
        except BaseException:
            with self._lock:
                self._index = -1  # the lab stops: no line names a stage it left
            raise
        with self._lock:
            share = self._shares[index]
            share.done = max(0.0, self._end - self._first)
            share.dropped = 1.0 - share.done
            self._index = -1
            self._seconds[index] = self.clock() - self._stage_start

    def skip(self) -> None:
        """The running stage was done by an earlier run: it counts as neither done nor left."""
        with self._lock:
            self._first = self._fraction = self._end = 1.0  # nothing done here, nothing left

    def update(self, fraction: float, detail: str) -> None:
        """The running stage is ``fraction`` done; ``detail`` says where (``ratio 3/9``)."""
        with self._lock:
            self._fraction, self._detail = fraction, detail
        self._event()

    def train_hook(self, test_share: float = 0.0) -> Callable[[int, int, int, int], None]:
        """An ``on_step`` for :func:`netslim.train.loop.fit` in the running stage.

        ``test_share`` is the share of an epoch's units spent evaluating after the last
        batch. Until the hook is called the stage counts as skipped; epochs that a resumed
        run skips, and those after early pruning stopped it, count as neither done nor left.
        """
        with self._lock:
            self._end = 0.0
        started = False

        def on_step(epoch: int, epochs: int, step: int, steps: int) -> None:
            nonlocal started
            with self._lock:
                if not started:  # epochs before this one were trained by an earlier run
                    self._first = (epoch - 1) / epochs
                    started = True
                into_epoch = (1.0 - test_share) * step / steps
                self._fraction = (epoch - 1 + into_epoch) / epochs
                self._end = epoch / epochs  # fit evaluates and saves the epoch before returning
                self._detail = f"epoch {epoch}/{epochs}, batch {step}/{steps}"
            self._event()

        return on_step

    def summary(self) -> str:
        """Where this run's time went, stage by stage (skipped stages left out)."""
        parts = [
            f"{stage.name} {duration(seconds)}"
            for stage, share, seconds in zip(self.stages, self._shares, self._seconds)
            if share.done > 0
        ]
        return f"{self.label} took {duration(self.clock() - self._start)}: {', '.join(parts)}"

    # -- lines -------------------------------------------------------------------------

    def line(self) -> str:
        """The progress line for now."""
        with self._lock:
            now = self.clock()
            if self._index < 0:
                where = "between stages" if self._begun else "starting"
                head = f"[{self.label} {where}]"
            else:
                name = self.stages[self._index].name
                detail = f": {self._detail}" if self._detail else ""
                head = f"[{self.label} {self._index + 1}/{len(self.stages)} {name}{detail}]"
            left = self.seconds_left(now)
            tail = "time left not known yet" if left is None else f"~{duration(left)} left"
            return f"{head} {duration(now - self._start)} elapsed, {tail}"

    def seconds_left(self, now: float | None = None) -> float | None:
        """The estimated time left (None until some work was measured)."""
        with self._lock:
            now = self.clock() if now is None else now
            rows = [self._stage_work(i, now) for i in range(len(self.stages))]
            overall = _rate(rows)
            total = 0.0
            for i, (stage, (_, left, spent)) in enumerate(zip(self.stages, rows)):
                if i == self._index:
                    total += max(0.0, stage.seconds - spent)
                elif self._untouched(i):
                    total += stage.seconds
                if left > 0:  # a kind's first seconds hold its start-up: not its rate yet
                    same = [r for s, r in zip(self.stages, rows) if s.kind == stage.kind]
                    rate = _rate(same, least=KIND_SECONDS)
                    if (rate or overall) is None:
                        return None
                    total += left / (rate or overall)
            return total

    def units_done(self) -> float:
        """The units of work this run has done so far."""
        with self._lock:  # no clock needed (a test's clock reads this)
            return sum(self._stage_work(i, 0.0)[0] for i in range(len(self.stages)))

    def _untouched(self, index: int) -> bool:
        share = self._shares[index]
        return index != self._index and share.done == 0 and share.dropped == 0

    def _stage_work(self, index: int, now: float) -> tuple[float, float, float]:
        """Stage ``index``'s (units done in this run, units left, seconds spent in this run)."""
        stage = self.stages[index]
        if index == self._index:
            done = (self._fraction - self._first) * stage.units
            return done, (1.0 - self._fraction) * stage.units, now - self._stage_start
        share = self._shares[index]
        return share.done * stage.units, self._untouched(index) * stage.units, self._seconds[index]

    def _event(self) -> None:
        """Something moved: print a line if none was printed for ``every`` seconds."""
        if not self.enabled:
            return
        with self._lock:
            if self.clock() - self._last_line >= self.every:
                self._print()

    def _print(self) -> None:
        self._last_line = self.clock()
        self._log(self.line())

    def _beat(self) -> None:
        """The background thread: a line whenever ``every`` seconds passed without one."""
        while True:
            with self._lock:
                wait = self._last_line + self.every - self.clock()
            if self._stop.wait(max(wait, 0.05)):
                return
            self._event()
