"""Progress lines of the lab and the demo: which stage of how many, where in it, time left."""

from __future__ import annotations

import re
import time

import pytest

import netslim.runtime.distributed as distributed
from netslim.config import LabConfig
from netslim.lab.experiment import REPORT_SECONDS, lab_stages, run_lab
from netslim.lab.progress import LabProgress, Stage, duration

# One progress line: [lab 3/9 train λ=1e-3: epoch 2/4, batch 40/80] 1m12s elapsed, ~1m50s left
LINE = re.compile(
    r"\[lab (?P<index>\d+)/(?P<count>\d+) (?P<stage>[^:\]]+)(?:: (?P<detail>[^\]]+))?\] "
    r"(?P<elapsed>\S+) elapsed, (?:~(?P<left>\S+) left|time left not known yet)$"
)
# A lab of the demo's shape (three λ, two ratios) that runs in seconds: 2 batches an epoch.
SMALL_LAB = LabConfig(
    arch="vgg5-small",
    dataset="synthetic",
    train_size=128,
    test_size=64,
    epochs=2,
    finetune_epochs=1,
    lams=[0.0, 1e-3, 5e-3],
    prune_lam=5e-3,
    sweep=[0.3, 0.7],
    recalibrate=1,
    precision="fp32",
    device="cpu",
)
STAGES = [
    "train λ=0",
    "train λ=1e-3",
    "train λ=5e-3",
    "prune ratio 0.5",
    "prune ratio 0.9",
    "sweep",
    "fine-tune ratio 0.5",
    "fine-tune ratio 0.9",
    "report",
]


def seconds(text: str) -> int:
    """The seconds a duration() text stands for: 45s, 1m12s, 2h03m."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert parts and text, text
    h, m, s = (int(p or 0) for p in parts.groups())
    return 3600 * h + 60 * m + s


class SteadyProgress(LabProgress):
    """Progress on a machine of constant speed, 100 units of work a second, with a line at
    every event: its clock reads the work done, so the lines do not depend on timing."""

    def __init__(self, stages: list[Stage], log, **kwargs) -> None:
        super().__init__(stages, log, **{**kwargs, "every": 0.0, "clock": lambda: 0.0})
        self.clock = lambda: self.units_done() / 100


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def small_lab_lines(tmp_path_factory) -> list[str]:
    """Every line SMALL_LAB prints (about 4 s on 2 quiet cores)."""
    lines: list[str] = []
    run_lab(
        SMALL_LAB,
        tmp_path_factory.mktemp("progress") / "lab",
        log=lines.append,
        progress=SteadyProgress,
    )
    return lines


def progress_lines(lines: list[str]) -> list[re.Match]:
    return [m for m in map(LINE.match, lines) if m]


def test_the_lab_names_each_of_its_nine_stages_in_order(small_lab_lines):
    found = progress_lines(small_lab_lines)
    names = list(dict.fromkeys((int(m["index"]), m["stage"]) for m in found))
    assert names == list(enumerate(STAGES, start=1))
    assert {m["count"] for m in found} == {"9"}


def test_training_lines_count_every_epoch_and_batch(small_lab_lines):
    found = progress_lines(small_lab_lines)
    for stage, epochs in [("train λ=1e-3", 2), ("fine-tune ratio 0.9", 1)]:
        details = [m["detail"] for m in found if m["stage"] == stage and m["detail"]]
        # 128 images in batches of 64: 2 batches an epoch
        assert details == [
            f"epoch {e}/{epochs}, batch {b}/2" for e in range(1, epochs + 1) for b in (1, 2)
        ]


def test_sweep_lines_count_its_ratios(small_lab_lines):
    details = [m["detail"] for m in progress_lines(small_lab_lines) if m["stage"] == "sweep"]
    # 0.3 and 0.7 of --sweep, and the lab's ratios 0.5 and 0.9
    assert [d for d in details if d] == [
        "ratio 1/4 (0.3)",
        "ratio 2/4 (0.5)",
        "ratio 3/4 (0.7)",
        "ratio 4/4 (0.9)",
    ]


def test_time_left_is_shown_from_the_first_batch_and_falls_to_the_report(small_lab_lines):
    found = progress_lines(small_lab_lines)
    first_work = next(i for i, m in enumerate(found) if m["detail"])
    assert all(m["left"] is None for m in found[:first_work])  # nothing measured yet
    left = [seconds(m["left"]) for m in found[first_work:]]
    assert all(m["left"] is not None for m in found[first_work:])
    assert all(a >= b for a, b in zip(left, left[1:])), left
    # the lab's work at 100 units a second, then the report's fixed guess
    total = sum(stage.units for stage in lab_stages(SMALL_LAB, 128, 64)) / 100
    assert left[0] > total - 10 and left[-1] == REPORT_SECONDS < left[0]


def test_the_lab_ends_with_where_its_time_went(small_lab_lines):
    last = small_lab_lines[-1]
    assert last.startswith("lab took ")
    assert all(f"{name} " in last for name in STAGES)


def test_lines_come_at_most_once_per_interval():
    clock, lines = ManualClock(), []
    progress = LabProgress(
        [Stage("train", 100.0)], lines.append, every=10, clock=clock, heartbeat=False
    )
    with progress.stage(0):
        for t in range(1, 36):  # an event every second for 35 seconds
            clock.now = t
            progress.update(t / 100, f"step {t}")
    assert [line.split("]")[0] for line in lines] == [
        "[lab 1/1 train: step 10",
        "[lab 1/1 train: step 20",
        "[lab 1/1 train: step 30",
    ]


def test_a_silent_stretch_still_gets_a_line_from_the_background_thread():
    lines: list[str] = []
    progress = LabProgress([Stage("sweep", 100.0)], lines.append, every=0.05)
    with progress.running(), progress.stage(0):
        deadline = time.monotonic() + 10
        while len(lines) < 2 and time.monotonic() < deadline:  # no event comes
            time.sleep(0.01)
    assert len(lines) >= 2 and all(line.startswith("[lab 1/1 sweep]") for line in lines)


def test_only_the_main_process_prints_progress(monkeypatch):
    monkeypatch.setattr(distributed, "is_main", lambda: False)  # a torchrun rank other than 0
    lines: list[str] = []
    progress = LabProgress([Stage("train", 100.0)], lines.append, every=0)
    with progress.running(), progress.stage(0, "== training"):
        progress.train_hook()(1, 1, 1, 1)
        progress.log("epoch 1/1")
    assert lines == []


def test_stages_an_earlier_run_did_count_neither_as_done_nor_as_left():
    clock = ManualClock()
    progress = LabProgress(
        [Stage("a", 100.0), Stage("b", 100.0)], lambda line: None, clock=clock, heartbeat=False
    )
    with progress.stage(0):
        progress.skip()  # done already
    with progress.stage(1):
        clock.now = 10.0
        progress.update(0.5, "")  # 50 units in 10 s: the other 50 take 10 s more
        assert progress.seconds_left() == pytest.approx(10.0)


def test_epochs_a_resumed_training_skips_are_not_counted_as_work():
    clock = ManualClock()
    progress = LabProgress([Stage("train", 400.0)], lambda line: None, clock=clock, heartbeat=False)
    with progress.stage(0):
        hook = progress.train_hook()
        hook(3, 4, 1, 1)  # resumed after 2 of 4 epochs: this run's first batch ends epoch 3
        clock.now = 5.0
        # 100 units of this run in 5 s; the 100 of epoch 4 take 5 s more
        assert progress.seconds_left() == pytest.approx(5.0)


def test_a_kind_of_stage_is_timed_at_its_own_rate_once_it_has_run():
    clock = ManualClock()
    stages = [
        Stage("train", 100.0, kind="train"),
        Stage("fine-tune", 100.0, kind="fine-tune"),
        Stage("fine-tune 2", 100.0, kind="fine-tune"),
    ]
    progress = LabProgress(stages, lambda line: None, clock=clock, heartbeat=False)
    with progress.stage(0):
        clock.now = 10.0  # training: 10 units a second
    with progress.stage(1):
        # before any fine-tuning was measured, the rate of all the work so far
        assert progress.seconds_left() == pytest.approx(20.0)
        clock.now = 30.0
        progress.update(0.5, "")  # fine-tuning: 2.5 units a second, four times slower
        assert progress.seconds_left() == pytest.approx(20.0 + 40.0)


def test_durations_read_as_seconds_minutes_and_hours():
    assert [duration(s) for s in (0.4, 45, 72, 3599, 7380)] == [
        "0s",
        "45s",
        "1m12s",
        "59m59s",
        "2h03m",
    ]
