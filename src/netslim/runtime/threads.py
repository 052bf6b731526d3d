"""How many CPU threads PyTorch computes with, and by default a tuner that follows the load.

PyTorch's CPU kernels run on a pool of OpenMP threads, by default one per physical core.
When other work shares the cores, those threads wait on each other at every kernel's
barrier: one of them is always descheduled and training can slow several-fold (measured
in bench/RESULTS.md); fewer threads than cores then run faster. Whether they do depends
on a load that comes and goes, so the default measures instead of guessing:
:class:`ThreadTuner` now and then times a few training steps at each candidate count and
keeps the fastest. A probe costs steps at the slower counts, so on Linux it first reads
how much CPU other processes take on this process's CPUs (``/proc/stat`` less this
process's own CPU time, :func:`cpu_load`): on a quiet machine at the full count it does
not probe at all, and at the first check of a run under load it starts at the count the
load leaves free (later probes verify it).

``--threads N`` (or ``OMP_NUM_THREADS``) fixes the pool and turns the tuner off. Without
either netslim starts at the physical cores this process may run on (CPU affinity and a
cgroup CPU quota count), shared among torchrun's local processes, and tunes from there
(not under torchrun: each process would time the others' waits). The thread count
changes floating-point summation order, so only a fixed count makes a run, and its
``--resume``, bit-identical. Library code tunes only after ``set_threads(None)``.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from netslim.limits import check_threads


def _cpu_quota() -> int | None:
    """The CPUs a cgroup v2 quota allows (``cpu.max``, e.g. docker --cpus), if there is one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.floor(int(quota) / int(period)))


@functools.cache
def _torch_default() -> int:
    """torch's own thread count before netslim changes it: OMP_NUM_THREADS, else the
    physical cores."""
    import torch

    return torch.get_num_threads()


def _set_torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def default_threads() -> int:
    """The thread count netslim uses when ``--threads`` is not given (see module docs)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return _torch_default()  # torch already follows it
    cores = _torch_default()
    if hasattr(os, "sched_getaffinity"):
        cores = min(cores, len(os.sched_getaffinity(0)))
    quota = _cpu_quota()
    if quota is not None:
        cores = min(cores, quota)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun processes here
    return max(1, cores // max(1, local))


def cpu_load() -> tuple[float, float] | None:
    """``(busy, own)``: CPU seconds spent so far on the CPUs this process may use, by
    anything, and by this process (all its threads); None where ``/proc/stat`` does not
    say. Their differences over a stretch of time tell what other processes took."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        if allowed is not None and int(name[3:]) not in allowed:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        ticks += sum(values) - values[3] - values[4]  # not idle, not waiting for the disk
    return ticks / os.sysconf("SC_CLK_TCK"), time.process_time()


def candidates(count: int) -> list[int]:
    """The counts the tuner tries: ``count`` and its halvings down to 1 (8: 8, 4, 2, 1)."""
    counts = [count]
    while counts[-1] > 1:
        counts.append(counts[-1] // 2)
    return counts


class ThreadTuner:
    """Keeps the thread count at which training steps take the least time per image.

    Call :meth:`new_loop` before each training loop and :meth:`step` after each of its
    steps. A loop's first step is a warm-up and never timed, and no timing is compared
    with one of another loop (evaluation runs between epochs). A probe times
    ``probe_steps`` steps at each candidate count, the current one first (the first step
    after a switch is not timed), and keeps the count of the lowest median time per
    image; another count must be ``margin`` faster to replace the current one. A
    candidate is dropped as soon as over half its steps are too slow for its median to
    win, so a probe that changes nothing costs few steps. The first probe starts after
    the first warm-up; the next comes ``first_interval`` seconds after the first one or
    one that changed the count, and twice the last wait (at most ``max_interval``) after
    one that kept it or that a loop's end cut short.

    With ``load`` (:func:`cpu_load`, or a fake), a probe is due only when it can help:
    the CPU other processes took since the last check (at least ``window`` seconds) is
    read first. Under ``quiet`` cores at the full count there is nothing to gain and the
    probe is skipped (the wait backs off as after one that held). At the run's first
    check under load the tuner moves straight to the largest candidate that the other
    processes leave free (a probe there would run its slow steps first), and probes
    ``first_interval`` seconds later to verify it.

    ``apply`` sets the thread count and ``clock`` tells the time in seconds, so that
    tests can drive it with a fake clock.
    """

    def __init__(
        self,
        counts: Sequence[int],
        *,
        apply: Callable[[int], None] = _set_torch_threads,
        clock: Callable[[], float] = time.perf_counter,
        probe_steps: int = 3,
        first_interval: float = 10.0,
        max_interval: float = 120.0,
        margin: float = 0.05,
        load: Callable[[], tuple[float, float] | None] | None = None,
        quiet: float = 0.5,
        window: float = 0.2,
    ):
        self.counts = list(counts)  # the first is the count in use now
        self.current = self.counts[0]
        self.probe_steps, self.margin = probe_steps, margin
        self.first_interval, self.max_interval = first_interval, max_interval
        self._apply, self._clock = apply, clock
        self.wait = 0.0  # seconds from the end of the last probe to the next one
        self.next_probe = -math.inf  # clock time; the first probe starts at once
        self._last: float | None = None  # when the last step ended; None: a loop's start
        self._queue: list[int] = []  # counts the running probe has still to time
        self._times: dict[int, list[float]] = {}  # its seconds per image, by count
        self._settling = False  # the next step is the first at a new count: not timed
        self._applied = self.current  # the count set now (set_threads set the first)
        self._load, self.quiet, self.window = load, quiet, window
        self._since: tuple[float, tuple[float, float] | None] | None = None  # last check
        self._checked = False  # whether the run's first check has been made

    @property
    def probing(self) -> bool:
        return bool(self._queue)

    def new_loop(self) -> None:
        """A training loop starts: its first step is a warm-up, timed against nothing."""
        self._last = None
        if self.probing:  # cut short by the last loop's end: try again later
            self._end_probe(self.current, self._clock())
        if self._since is None and self._load is not None:  # the load is read from here on
            self._since = (self._clock(), self._load())

    def step(self, images: int) -> None:
        """One training step of ``images`` images has finished."""
        now = self._clock()
        last, self._last = self._last, now
        if not self.probing:
            if now < self.next_probe or not self._probe_helps(now):
                return
            self._queue = [self.current, *(c for c in self.counts if c != self.current)]
            self._times = {}
        if last is None:  # a loop's warm-up step: timed against nothing
            return
        if self._settling:
            self._settling = False
            return
        count = self._queue[0]
        times = self._times.setdefault(count, [])
        times.append((now - last) / images)
        if len(times) < self.probe_steps and not self._lost(count):
            return
        self._queue.pop(0)
        if self.probing:
            self._use(self._queue[0])
            self._settling = True
        else:
            self._end_probe(self._choice(), now)

    def _probe_helps(self, now: float) -> bool:
        """Whether a probe is worth its slow steps now (see the class docs); when it is
        not, this may switch the count itself and schedules the next check."""
        sample = self._load() if self._load is not None else None
        if sample is None:
            return True  # nothing to read: measure
        if self._since is None:
            self._since = (now, sample)
        start, before = self._since
        if before is None or now - start < self.window:
            return False  # too short a stretch to read the load from; check again next step
        self._since = (now, sample)
        others = max(0.0, (sample[0] - before[0] - (sample[1] - before[1])) / (now - start))
        first, self._checked = not self._checked, True
        if others < self.quiet and self.current == self.counts[0]:
            self._end_probe(self.current, now)  # nothing else runs: all cores it is
            return False
        if first:  # start where the load leaves room; the next probe verifies it
            free = max(1.0, self.counts[0] - round(others))
            choice = max(c for c in self.counts if c <= free)
            if choice != self.current:
                self._end_probe(choice, now)
                return False
        return True

    def _use(self, count: int) -> None:
        self._apply(count)
        self._applied = count

    def _median(self, count: int) -> float:
        """The median seconds per image of ``count``; inf while it has fewer probe steps."""
        times = self._times.get(count, [])
        return statistics.median(times) if len(times) == self.probe_steps else math.inf

    def _bar(self, count: int) -> float:
        """The median ``count`` must go under to win: the current count's less the margin,
        and every other candidate's."""
        others = [self._median(c) for c in self._times if c not in (count, self.current)]
        return min([self._median(self.current) * (1 - self.margin), *others])

    def _lost(self, count: int) -> bool:
        """Over half the steps of ``count`` are at or above its bar, and so is its median."""
        if count == self.current:
            return False
        bar = self._bar(count)
        return sum(t >= bar for t in self._times[count]) > self.probe_steps // 2

    def _choice(self) -> int:
        best = min(self._times, key=self._median)
        return best if self._median(best) < self._bar(best) else self.current

    def _end_probe(self, choice: int, now: float) -> None:
        held = choice == self.current  # then back off
        self.wait = min(2 * self.wait, self.max_interval) if held else 0.0
        self.wait = max(self.wait, self.first_interval)
        self.next_probe = now + self.wait
        self._queue, self._times, self._settling = [], {}, False
        if self._applied != choice:
            self._use(choice)
        self.current = choice


_tuner: ThreadTuner | None = None


def tuner() -> ThreadTuner | None:
    """The tuner :func:`set_threads` started, or None when the thread count is fixed."""
    return _tuner


def start_loop(device_type: str) -> ThreadTuner | None:
    """The tuner to step through a training loop on ``device_type`` (told that the loop
    starts), or None: no tuning, or not on the CPU."""
    if _tuner is None or device_type != "cpu":
        return None
    _tuner.new_loop()
    return _tuner


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads, a fixed count; returns the count.

    None (the CLI without ``--threads``): :func:`default_threads`, and unless
    ``OMP_NUM_THREADS`` fixes that or torchrun started several processes, a
    :class:`ThreadTuner` that follows the load from there.
    """
    global _tuner
    _torch_default()  # remember it before changing it
    if threads is not None:
        check_threads(threads)  # 1000 threads on 2 cores would take the machine down
    count = default_threads() if threads is None else threads
    _set_torch_threads(count)
    fixed = threads is not None or bool(os.environ.get("OMP_NUM_THREADS"))
    several = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    _tuner = (
        None
        if fixed or several or count == 1
        else ThreadTuner(candidates(count), load=cpu_load if cpu_load() else None)
    )
    return count


def stop_tuning() -> None:
    """Fix the thread count again at the one :func:`set_threads` chose (no-op if fixed)."""
    global _tuner
    if _tuner is not None:
        _set_torch_threads(_tuner.counts[0])
        _tuner = None


def slowdown_hint(rate: float, first_rate: float, threads: int) -> str | None:
    """A hint when training runs at under a third of its first epoch's images/s, else None."""
    if not first_rate > 0 or rate >= first_rate / 3:
        return None
    note = f"note: {rate:.0f} images/s, under a third of the first epoch's {first_rate:.0f}"
    if threads == 1:
        return f"{note}: is the machine busy with other work?"
    fewer = max(1, threads // 2)
    return (
        f"{note}: on a busy machine {threads} CPU threads wait on each other; "
        f"try --threads {fewer} (or OMP_NUM_THREADS={fewer})"
    )
