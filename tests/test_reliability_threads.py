"""CPU threads that follow the load (issue 20, item 7: collapse under load).

On 2 cores a training epoch of vgg11-small fell from ~853 to ~156 images/s with 2 threads
when 2 busy processes ran beside it, against 579 to 378 with 1 thread. Without
``--threads`` netslim times a few steps at each candidate count now and then and keeps
the fastest. These tests drive :class:`netslim.threads.ThreadTuner` with a fake clock on
which a step takes a time that depends on the thread count, so nothing here depends on
how busy the test machine is; the rest checks who turns tuning on and off.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRAIN_CFG, tiny_config

from netslim.cli import commands as cli
from netslim.cli import main
from netslim.data import make_synthetic
from netslim.models import VGG
from netslim.runtime import threads
from netslim.runtime.threads import ThreadTuner
from netslim.train.loop import fit

QUIET = {"log": lambda s: None}
QUIET_MACHINE = {2: 1 / 853, 1: 1 / 579}  # seconds per image, measured on 2 cores
TWO_BUSY = {2: 1 / 156, 1: 1 / 378}  # the same with 2 busy processes beside training


@pytest.fixture(autouse=True)
def _restore_threads():
    """Each test leaves the thread count and tuning as it found them."""
    before, tuner = torch.get_num_threads(), threads._tuner
    yield
    threads._tuner = tuner
    torch.set_num_threads(before)


class FakeMachine:
    """A fake clock and thread pool: a step of n images takes ``n * per_image[count]``
    seconds, the first after a switch or at a loop's start ``settle`` times that."""

    def __init__(self, per_image: dict[int, float], settle: float = 5.0):
        self.per_image, self.settle = dict(per_image), settle
        self.count, self.now = max(per_image), 0.0
        self.switches: list[int] = []
        self.steps_at: dict[int, int] = {}
        self._cold = True

    def apply(self, count: int) -> None:
        self.count, self._cold = count, True
        self.switches.append(count)

    def tuner(self, **kw) -> ThreadTuner:
        return ThreadTuner(
            threads.candidates(self.count), apply=self.apply, clock=lambda: self.now, **kw
        )

    def load(self, others: float):
        """A fake cpu_load: other processes take ``others`` cores all the time."""
        return lambda: (others * self.now + 7.0, 7.0)  # this process's own share cancels out

    def loop(self, tuner: ThreadTuner, steps: int, images: int = 64, gap: float = 0.0) -> None:
        """One training loop of ``steps`` steps after ``gap`` seconds of other work."""
        self.now += gap
        self._cold = True
        tuner.new_loop()
        for _ in range(steps):
            seconds = images * self.per_image[self.count]
            self.now += seconds * (self.settle if self._cold else 1.0)
            self._cold = False
            self.steps_at[self.count] = self.steps_at.get(self.count, 0) + 1
            tuner.step(images)


def test_candidates_are_the_count_and_its_halvings_down_to_one():
    assert threads.candidates(2) == [2, 1]
    assert threads.candidates(8) == [8, 4, 2, 1]
    assert threads.candidates(6) == [6, 3, 1]
    assert threads.candidates(1) == [1]


def test_auto_threads_pick_one_thread_when_two_steal_the_cpu():
    """Under load the first probe, right after the warm-up step, moves to 1 thread and
    stays there: 4 steps ran at 2 threads (warm-up and 3 timed), all others at 1."""
    machine = FakeMachine(TWO_BUSY)
    tuner = machine.tuner()
    machine.loop(tuner, steps=32)
    assert machine.switches == [1] and tuner.current == 1 and machine.count == 1
    assert machine.steps_at == {2: 4, 1: 28}
    assert tuner.next_probe == pytest.approx(machine.now - 24 * 64 / 378 + 10)


def test_auto_threads_keep_all_cores_on_a_quiet_machine():
    """On a quiet machine the probe tries 1 thread and comes back to 2; 1 thread loses
    after 2 timed steps (over half of 3), so only 3 steps ran at 1 thread."""
    machine = FakeMachine(QUIET_MACHINE)
    tuner = machine.tuner()
    machine.loop(tuner, steps=32)
    assert machine.switches == [1, 2] and tuner.current == 2 and machine.count == 2
    assert machine.steps_at == {2: 29, 1: 3}


def test_auto_threads_never_probe_where_nothing_else_runs():
    """With the load readable and no other process on the CPUs, no probe runs at all: a
    quiet machine pays nothing (the wait still backs off, so the checks are rare too)."""
    machine = FakeMachine(QUIET_MACHINE)
    tuner = machine.tuner(load=machine.load(0.1))
    for _ in range(60):  # about 220 s of training and evaluation
        machine.loop(tuner, steps=32, gap=1.0)
    assert machine.switches == [] and machine.steps_at == {2: 1920}
    assert tuner.wait == 120.0  # checked at 0, 10, 30, 70 and 150 s


def test_auto_threads_start_at_the_free_cores_under_load_then_verify():
    """Two busy processes take one of the 2 cores: the first check (after the warm-up
    step) moves to 1 thread without a probe; 10 s later a probe confirms it."""
    machine = FakeMachine(TWO_BUSY)
    tuner = machine.tuner(load=machine.load(1.0))
    machine.loop(tuner, steps=32)
    assert machine.switches == [1] and machine.steps_at == {2: 1, 1: 31}
    for _ in range(6):
        machine.loop(tuner, steps=32)
    assert tuner.current == 1 and machine.switches[-1] == 1
    assert 2 in machine.switches[1:]  # the verifying probe timed 2 threads, and lost


def test_auto_threads_probe_when_the_load_leaves():
    """Back at 1 thread's count with the load gone, the next check probes and returns to 2."""
    machine = FakeMachine(TWO_BUSY)
    others = {"cores": 1.0}
    tuner = machine.tuner(load=lambda: (others["cores"] * machine.now, 0.0))
    machine.loop(tuner, steps=32)
    assert tuner.current == 1
    others["cores"], machine.per_image = 0.0, dict(QUIET_MACHINE)
    for _ in range(40):
        machine.loop(tuner, steps=32)
    assert tuner.current == 2 and machine.count == 2


def test_auto_threads_need_a_clear_margin_to_switch():
    """A count only 2% faster than the current one does not replace it (no flapping)."""
    machine = FakeMachine({2: 1.0e-3, 1: 0.98e-3})
    tuner = machine.tuner()
    machine.loop(tuner, steps=32)
    assert tuner.current == 2 and machine.switches == [1, 2]


def test_auto_threads_try_every_halving_and_keep_the_fastest():
    """On 8 cores all of 8, 4, 2 and 1 are timed; the fastest (here 2) is kept."""
    machine = FakeMachine({8: 4e-3, 4: 2e-3, 2: 1e-3, 1: 1.5e-3})
    tuner = machine.tuner()
    machine.loop(tuner, steps=40)
    assert machine.switches == [4, 2, 1, 2] and tuner.current == 2


def test_auto_threads_back_off_when_the_choice_holds():
    """While the count holds, the wait to the next probe doubles from 10 s up to 120 s;
    after a change it starts again at 10 s."""
    machine = FakeMachine(QUIET_MACHINE)
    tuner = machine.tuner()
    waits = []
    for _ in range(400):  # 5 s epochs of 64 steps, 1 s of evaluation between them
        last = tuner.next_probe
        machine.loop(tuner, steps=64, gap=1.0)
        if tuner.next_probe != last:
            waits.append(tuner.wait)
    assert waits[:7] == [10, 20, 40, 80, 120, 120, 120]
    assert len(waits) == pytest.approx(4 + (machine.now - 150) / 120, abs=2)
    assert machine.count == 2 and set(machine.switches) == {1, 2}
    machine.per_image = TWO_BUSY  # two busy processes start
    for _ in range(50):
        machine.loop(tuner, steps=64, gap=1.0)
        if tuner.current == 1:
            break
    assert machine.count == 1 and tuner.current == 1 and tuner.wait == 10


def test_auto_threads_come_back_to_all_cores_when_the_load_goes():
    """The probe 10 s after moving to 1 thread times 2 threads again, and keeps them once
    the busy processes have gone."""
    machine = FakeMachine(TWO_BUSY)
    tuner = machine.tuner()
    machine.loop(tuner, steps=32)
    assert tuner.current == 1
    machine.per_image = QUIET_MACHINE
    machine.loop(tuner, steps=256, gap=1.0)
    assert tuner.current == 2 and machine.count == 2 and machine.switches[:2] == [1, 2]


def test_auto_threads_never_time_a_step_across_loops():
    """Evaluation between epochs (a long gap) and a slow first step per loop never count:
    a quiet machine with 100 s gaps and 20-step epochs keeps 2 threads."""
    machine = FakeMachine(QUIET_MACHINE, settle=50.0)
    tuner = machine.tuner()
    for _ in range(30):
        machine.loop(tuner, steps=20, gap=100.0)
    assert tuner.current == 2 and machine.count == 2


def test_auto_threads_drop_a_probe_the_loop_end_cuts_short():
    """Epochs too short for a probe: the next loop goes back to the count the cut probe
    started at and waits longer, so short loops pay little for probes they cannot finish."""
    machine = FakeMachine(TWO_BUSY)
    tuner = machine.tuner()
    machine.loop(tuner, steps=5)  # warm-up, 3 timed at 2, then the settling step at 1
    assert tuner.probing and machine.count == 1
    machine.loop(tuner, steps=5)  # the next probe is 10 s away
    assert not tuner.probing and tuner.current == 2 and machine.count == 2
    assert machine.switches == [1, 2] and tuner.wait == 10


def test_fixed_threads_turn_tuning_off(monkeypatch):
    """set_threads(None) on a multi-core machine starts the tuner at the default count;
    set_threads(N) fixes the count and stops it."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "default_threads", lambda: 2)
    assert threads.set_threads(None) == 2 and torch.get_num_threads() == 2
    assert threads.tuner() is not None and threads.tuner().counts == [2, 1]
    assert threads.set_threads(1) == 1 and threads.tuner() is None
    threads.set_threads(None)
    threads.stop_tuning()
    assert threads.tuner() is None and torch.get_num_threads() == 2


def test_omp_num_threads_turns_tuning_off(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(threads, "default_threads", lambda: 2)
    assert threads.set_threads(None) == 2 and threads.tuner() is None


def test_one_core_or_torchrun_turns_tuning_off(monkeypatch):
    """Nothing to choose from on one core; under torchrun each process would time the
    others' waits at every all-reduce."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "default_threads", lambda: 1)
    threads.set_threads(None)
    assert threads.tuner() is None
    monkeypatch.setattr(threads, "default_threads", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    threads.set_threads(None)
    assert threads.tuner() is None


def test_cli_without_threads_tunes_and_with_threads_1_does_not(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "default_threads", lambda: 2)
    seen = []  # the tuner while the command runs
    monkeypatch.setitem(cli.COMMANDS, "prune", lambda args: seen.append(threads.tuner()))
    prune = ["prune", str(tmp_path / "missing.pth"), "--ratio", "0.5", "--out", str(tmp_path / "p")]
    before = torch.get_num_threads()
    try:
        assert main(prune) == 0
        assert seen[-1] is not None  # on for the command ...
        assert (
            threads.tuner() is None
        )  # ... and off after it: later code in this process is not tuned
        assert main([*prune, "--threads", "1"]) == 0
        assert seen[-1] is None and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()


class CountingTuner(ThreadTuner):
    """A tuner that counts what the training loop tells it and never switches."""

    def __init__(self):
        super().__init__([2, 1], apply=lambda count: None, clock=lambda: 0.0)
        self.loops, self.images = 0, 0

    def new_loop(self) -> None:
        self.loops += 1

    def step(self, images: int) -> None:
        self.images += images


def test_library_fit_does_not_tune_unless_asked(tmp_path, monkeypatch):
    """fit() alone never changes the thread count; with a tuner started (set_threads(None)
    does that) it tells the tuner of every epoch and every training step on the CPU."""
    data = make_synthetic(n_train=128, n_test=64, seed=0)
    threads.set_threads(threads.default_threads())  # what a library user has: a fixed count
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    torch.manual_seed(0)
    fit(tiny_config(epochs=2), data, VGG(TRAIN_CFG), tmp_path / "a", **QUIET)
    assert calls == [] and threads.tuner() is None
    counting = CountingTuner()
    monkeypatch.setattr(threads, "_tuner", counting)
    torch.manual_seed(0)
    fit(tiny_config(epochs=2), data, VGG(TRAIN_CFG), tmp_path / "b", **QUIET)
    assert counting.loops == 2 and counting.images == 2 * 128
    assert threads.start_loop("cuda") is None and threads.start_loop("mps") is None


def test_no_threads_hint_while_threads_follow_the_load(tmp_path, monkeypatch):
    """The hint to lower --threads is for a fixed count; a tuner already does that."""
    import time

    import netslim.train.loop as train_module

    real = train_module.train_epoch
    seconds = []

    def slow_second_epoch(*args, **kwargs):
        t0 = time.perf_counter()
        result = real(*args, **kwargs)
        seconds.append(time.perf_counter() - t0)
        if len(seconds) == 2:
            time.sleep(8 * seconds[0])
        return result

    monkeypatch.setattr(train_module, "train_epoch", slow_second_epoch)
    monkeypatch.setattr(threads, "_tuner", CountingTuner())
    lines = []
    torch.manual_seed(0)
    fit(
        tiny_config(epochs=3),
        make_synthetic(n_train=64, n_test=64),
        VGG(TRAIN_CFG),
        tmp_path,
        log=lines.append,
    )
    assert len(lines) == 3 and not any(line.startswith("note:") for line in lines)
