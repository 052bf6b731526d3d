"""Reliability of runs, read as a list: each hostile case and the behaviour promised.

Covers issue 10, items 2-4, 6-8, 10 and 12: exact official pruning, the lr schedule of
short runs, resume over foreign checkpoints, best.pth never lost, one writer per run
folder, divergence, everyday mistakes (bad paths, read-only folders, a full disk, bad
numbers, a closed pipe, leftovers of killed writes) and CPU threads.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TRAIN_CFG, tiny_config

import netslim
import netslim.slim as slim_module
import netslim.train.loop as train_module
from netslim.cli import main
from netslim.config import TrainConfig
from netslim.data import make_synthetic
from netslim.errors import NetslimError
from netslim.models import VGG
from netslim.recipes import lr_at
from netslim.runtime import threads
from netslim.runtime.device import pick_precision
from netslim.train import runlock
from netslim.train.loop import fit
from netslim.train.runfolder import read_metrics, run_files

QUIET = {"log": lambda s: None}
DATA = ["--dataset", "synthetic", "--train-size", "128", "--test-size", "64", "--device", "cpu"]
TRAIN = ["train", "--arch", "vgg11-small", *DATA, "--batch-size", "64", "--precision", "fp32"]


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_train=128, n_test=64, seed=0)


def _config(**kw) -> TrainConfig:
    return tiny_config(**{"lam": 1e-3, "epochs": 2, **kw})


def _fit(data, out, **kw):
    torch.manual_seed(0)
    resume = kw.pop("resume", False)
    return fit(_config(**kw), data, VGG(TRAIN_CFG), out, resume=resume, **QUIET)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert err.startswith("netslim: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def _no_temp_files(folder) -> bool:
    return not list(folder.rglob(".*.tmp"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A sparsity-trained tiny VGG's run folder (2 epochs)."""
    out = tmp_path_factory.mktemp("trained")
    _fit(data, out)
    return out


# --------------------------------------------------------------------------------------
# 2. Exact official mode
# --------------------------------------------------------------------------------------


def test_no_compensate_with_dataset_saves_exactly_the_official_network(trained, tmp_path, capsys):
    """prune --no-compensate --dataset saves the very network prune --no-compensate
    (pure surgery) saves, while its report still measures all three accuracies."""
    ckpt = trained / "last.pth"
    measured, plain, default = tmp_path / "m.pth", tmp_path / "p.pth", tmp_path / "d.pth"
    code, out, _ = run(
        capsys,
        "prune",
        ckpt,
        "--ratio",
        "0.5",
        "--no-compensate",
        *DATA,
        "--recalibrate",
        "2",
        "--out",
        measured,
    )
    assert code == 0 and "saved the pruned network (official masking)" in out
    assert run(capsys, "prune", ckpt, "--ratio", "0.5", "--no-compensate", "--out", plain)[0] == 0
    assert (
        run(capsys, "prune", ckpt, "--ratio", "0.5", *DATA, "--recalibrate", "2", "--out", default)[
            0
        ]
        == 0
    )
    a, b, c = (torch.load(p, weights_only=True) for p in (measured, plain, default))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    # ... and it is not what the default (compensated, recalibrated) mode saves
    assert any(not torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in a["state_dict"])
    report = a["netslim"]["prune"]
    assert report["saved"] == "official masking" and not report["compensated"]
    assert None not in (report["acc_masked"], report["acc_compensated"], report["acc_recalibrated"])
    # the saved network scores what the report gives for official masking
    data = netslim.load_dataset("synthetic", train_size=128, test_size=64)
    dtype = pick_precision("auto", torch.device("cpu"))  # as prune measures
    saved_acc = netslim.evaluate(netslim.load(measured), data, dtype=dtype)[1]
    assert saved_acc == pytest.approx(report["acc_masked"])


# --------------------------------------------------------------------------------------
# 3. The lr schedule
# --------------------------------------------------------------------------------------


def _papers_schedule(epochs: int, lr: float = 0.1) -> list[float]:
    """The paper's main.py: ``if epoch in [epochs*0.5, epochs*0.75]: lr *= 0.1``."""
    rates = []
    for epoch in range(epochs):
        if epoch in [epochs * 0.5, epochs * 0.75]:
            lr *= 0.1
        rates.append(lr)
    return rates


def test_schedule_never_decays_before_the_first_epoch_has_run():
    """Epoch 0 runs at the base lr for every run length."""
    assert all(lr_at(0, 0.1, epochs) == 0.1 for epochs in range(1, 400))


@pytest.mark.parametrize("epochs", [1, 2, 3, 160])
def test_schedule_equals_the_papers_code_except_where_it_never_decays(epochs):
    """Same lr as the paper's code each epoch, except from a milestone that is not a whole
    number (3 epochs: 1.5, 2.25), where the paper's code never decays and netslim decays
    at the next epoch."""
    ours = [lr_at(e, 0.1, epochs) for e in range(epochs)]
    paper = _papers_schedule(epochs)
    float_rule = [0.1 * 0.1 ** ((e >= epochs * 0.5) + (e >= epochs * 0.75)) for e in range(epochs)]
    assert ours == pytest.approx(float_rule)
    fractional = [m for m in (epochs * 0.5, epochs * 0.75) if m != int(m)]
    for e in range(epochs):
        if not any(e >= m for m in fractional):
            assert ours[e] == pytest.approx(paper[e]), e
    expected = {1: [0.1], 2: [0.1, 0.01], 3: [0.1, 0.1, 0.01]}
    if epochs in expected:
        assert ours == pytest.approx(expected[epochs])
    if epochs == 160:
        assert ours == pytest.approx(paper)


def test_one_epoch_run_trains_at_the_base_lr(tmp_path, data):
    """netslim train --epochs 1 trains its only epoch at --lr, as the paper's code does."""
    history = _fit(data, tmp_path, epochs=1)
    assert history[0]["lr"] == 0.1


# --------------------------------------------------------------------------------------
# 4. Resume over a foreign checkpoint
# --------------------------------------------------------------------------------------


def test_resume_over_a_papers_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    """train --resume over a last.pth of the paper's main.py: one line, exit 2."""
    model = netslim.build_model("vgg11-small")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    paper = {
        "epoch": 3,
        "state_dict": model.state_dict(),
        "best_prec1": 0.5,
        "optimizer": opt.state_dict(),
    }
    (tmp_path / "run").mkdir()
    torch.save(paper, tmp_path / "run" / "last.pth")
    code, _, err = run(capsys, *TRAIN, "--epochs", "4", "--out", tmp_path / "run", "--resume")
    _one_line_error(code, err, "not written by netslim", "netslim finetune")


# --------------------------------------------------------------------------------------
# 6. best.pth is never lost
# --------------------------------------------------------------------------------------


def _rising_accuracy(monkeypatch, start: float = 10.0):
    """Make every evaluation score higher than the one before: each epoch is a new best."""
    scores = iter(range(1000))
    monkeypatch.setattr(
        train_module, "evaluate", lambda *a, **k: (1.0, start + 10.0 * next(scores))
    )


def test_kill_between_best_and_last_never_leaves_last_claiming_a_missing_best(
    tmp_path, data, monkeypatch
):
    """A kill after an epoch's first checkpoint write leaves a best.pth at least as good as
    the one last.pth records; --resume then finishes with both files."""
    _rising_accuracy(monkeypatch)
    real_save = train_module.save_checkpoint
    writes = []

    def killed_at_second_epochs_second_write(checkpoint, path):
        writes.append((checkpoint["epoch"], path.name))
        if len(writes) == 4:  # epoch 2: best.pth written, then the kill
            raise KeyboardInterrupt
        real_save(checkpoint, path)

    monkeypatch.setattr(train_module, "save_checkpoint", killed_at_second_epochs_second_write)
    with pytest.raises(KeyboardInterrupt):
        _fit(data, tmp_path, epochs=3)
    assert writes[:2] == [(1, "best.pth"), (1, "last.pth")]  # best first
    last = torch.load(tmp_path / "last.pth", weights_only=True)
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["netslim"]["history"][-1]["test_acc"] >= 100 * last["best_prec1"]
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    history = _fit(data, tmp_path, epochs=3, resume=True)
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["epoch"] == 3 and len(history) == 3
    assert run_files(tmp_path).startswith(f"checkpoints in {tmp_path}/ (last.pth, best.pth)")


def test_run_at_zero_accuracy_still_writes_best(tmp_path, data, monkeypatch):
    """With 0% test accuracy every epoch (e.g. --test-size 1), best.pth is the first epoch."""
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: (2.3, 0.0))
    _fit(data, tmp_path, epochs=2)
    assert torch.load(tmp_path / "best.pth", weights_only=True)["epoch"] == 1


def test_test_size_one_run_announces_only_files_it_wrote(tmp_path, capsys):
    """train --test-size 1: the closing line names best.pth, and best.pth exists."""
    argv = [
        "train",
        "--arch",
        "vgg11-small",
        "--dataset",
        "synthetic",
        "--train-size",
        "128",
        "--test-size",
        "1",
        "--device",
        "cpu",
        "--batch-size",
        "64",
    ]
    code, out, _ = run(capsys, *argv, "--epochs", "1", "--out", tmp_path / "r")
    assert code == 0
    assert "(last.pth, best.pth)" in out and (tmp_path / "r" / "best.pth").is_file()


def test_resume_recreates_a_deleted_best_when_the_last_epoch_was_best(tmp_path, data, monkeypatch):
    """best.pth deleted after a run whose last epoch was its best: --resume writes it again."""
    _rising_accuracy(monkeypatch)
    _fit(data, tmp_path, epochs=2)
    expected = torch.load(tmp_path / "last.pth", weights_only=True)
    (tmp_path / "best.pth").unlink()
    _fit(data, tmp_path, epochs=2, resume=True)
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["epoch"] == 2
    assert all(torch.equal(best["state_dict"][k], v) for k, v in expected["state_dict"].items())


def test_resume_of_a_finished_run_rewrites_a_deleted_metrics_file(trained, tmp_path, capsys):
    """--resume of a finished run whose metrics.jsonl was deleted writes it again from the
    checkpoint, so the closing line's claim holds."""
    run_dir = tmp_path / "run"
    code, _, _ = run(capsys, *TRAIN, "--epochs", "1", "--out", run_dir)
    assert code == 0
    logged = read_metrics(run_dir)
    (run_dir / "metrics.jsonl").unlink()
    code, out, _ = run(capsys, *TRAIN, "--epochs", "1", "--out", run_dir, "--resume")
    assert code == 0 and f"metrics in {run_dir / 'metrics.jsonl'}" in out
    assert read_metrics(run_dir) == logged


# --------------------------------------------------------------------------------------
# 7. One writer per run folder
# --------------------------------------------------------------------------------------


def test_second_writer_to_same_out_is_refused(tmp_path, data, capsys):
    """While a run holds --out, another run into it fails at once, naming the holder."""
    with runlock.hold(tmp_path):
        with pytest.raises(
            NetslimError, match=rf"in use by another netslim run: pid {os.getpid()} on host"
        ):
            _fit(data, tmp_path)
        code, _, err = run(capsys, *TRAIN, "--epochs", "1", "--out", tmp_path)
        _one_line_error(code, err, f"pid {os.getpid()}", "since", "choose another --out")
    assert not (tmp_path / "last.pth").exists()
    _fit(data, tmp_path, epochs=1)  # free again once the holder has ended
    assert not (tmp_path / runlock.LOCK_NAME).exists()


LOCK_AND_WAIT = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "h", "started": time.time()}).encode())
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_lock_of_a_killed_run_is_taken_over(tmp_path, data):
    """A run killed with -9 leaves its lock file; the next run takes the folder over."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_AND_WAIT, str(tmp_path / runlock.LOCK_NAME)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(NetslimError, match=f"pid {holder.pid}"):
        _fit(data, tmp_path, epochs=1)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert runlock.read_holder(tmp_path)["pid"] == holder.pid  # the dead run's file is there
    _fit(data, tmp_path, epochs=1)
    assert (tmp_path / "last.pth").exists()


# --------------------------------------------------------------------------------------
# 8. Divergence
# --------------------------------------------------------------------------------------


def _all_finite(path) -> bool:
    state = torch.load(path, weights_only=True)["state_dict"]
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_lr_1e6_stops_with_one_line_saying_what_to_lower(tmp_path, capsys):
    """train --lr 1e6: exit 2, 'diverged', 'Lower --lr'; no non-finite checkpoint is kept."""
    code, _, err = run(capsys, *TRAIN, "--epochs", "2", "--lr", "1e6", "--out", tmp_path / "r")
    _one_line_error(code, err, "diverged", "Lower --lr (now 1e+06)")
    for name in ("last.pth", "best.pth"):
        assert not (tmp_path / "r" / name).exists() or _all_finite(tmp_path / "r" / name)


def test_one_step_epochs_with_nonfinite_weights_stop(tmp_path, data):
    """One step per epoch at a huge lr: the step's own loss is finite, the weights after it
    are not; the run stops in that epoch and saves nothing of it."""
    one_batch = make_synthetic(n_train=64, n_test=64, seed=0)
    with pytest.raises(NetslimError, match=r"diverged in epoch 1: .*(NaN/Inf|loss nan|loss inf)"):
        _fit(one_batch, tmp_path, lr=1e6, epochs=2)
    assert not (tmp_path / "last.pth").exists()


def test_nan_test_loss_stops_the_run(tmp_path, data, monkeypatch):
    """A NaN test loss (finite weights and train loss) stops the run before saving."""
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: (float("nan"), 10.0))
    with pytest.raises(NetslimError, match="diverged in epoch 1: test loss nan"):
        _fit(data, tmp_path)
    assert not (tmp_path / "last.pth").exists() and not (tmp_path / "best.pth").exists()


def test_prune_refuses_nonfinite_gamma(tmp_path, capsys):
    """prune of a network with a NaN gamma: one line, exit 2, nothing written."""
    model = netslim.build_model("vgg11-small")
    with torch.no_grad():
        model.feature[1].weight[0] = float("nan")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "nan.pth")
    code, _, err = run(
        capsys, "prune", tmp_path / "nan.pth", "--ratio", "0.5", "--out", tmp_path / "p.pth"
    )
    _one_line_error(code, err, "NaN or Inf", "feature.1.weight", "earlier checkpoint")
    assert not (tmp_path / "p.pth").exists()


# --------------------------------------------------------------------------------------
# 10. Everyday mistakes
# --------------------------------------------------------------------------------------


def test_train_out_that_is_a_file_is_refused(tmp_path, capsys):
    """train --out FILE: one line; the file is untouched."""
    (tmp_path / "f").write_text("mine")
    code, _, err = run(capsys, *TRAIN, "--out", tmp_path / "f")
    _one_line_error(code, err, "is a file")
    assert (tmp_path / "f").read_text() == "mine"


def test_train_out_under_a_file_is_refused(tmp_path, capsys):
    """train --out FILE/run (a folder that can never be made): one line."""
    (tmp_path / "f").write_text("mine")
    code, _, err = run(capsys, *TRAIN, "--out", tmp_path / "f" / "run")
    _one_line_error(code, err, "which is a file")


def test_prune_out_that_is_a_folder_is_refused_before_the_work(
    trained, tmp_path, capsys, monkeypatch
):
    """prune --out FOLDER fails before pruning anything."""
    # the CLI imports prune_model from netslim.slim when the command runs
    monkeypatch.setattr(slim_module, "prune_model", lambda *a, **k: pytest.fail("pruned first"))
    code, _, err = run(capsys, "prune", trained / "last.pth", "--ratio", "0.5", "--out", tmp_path)
    _one_line_error(code, err, "is a folder")


def test_prune_out_equal_to_its_input_needs_force(trained, tmp_path, capsys):
    """prune x.pth --out x.pth refuses to replace the trained checkpoint unless --force."""
    ckpt = tmp_path / "x.pth"
    ckpt.write_bytes((trained / "last.pth").read_bytes())
    before = ckpt.read_bytes()
    code, _, err = run(capsys, "prune", ckpt, "--ratio", "0.5", "--out", ckpt)
    _one_line_error(code, err, "--force")
    assert ckpt.read_bytes() == before
    code, _, _ = run(capsys, "prune", ckpt, "--ratio", "0.5", "--out", ckpt, "--force")
    assert code == 0 and torch.load(ckpt, weights_only=True)["netslim"]["kind"] == "pruned"


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)`` makes the system refuse to create, rename or mkdir anything
    inside ``folder`` (EROFS), as a read-only mount does; chmod cannot, tests run as root."""

    def make(folder):
        folder = os.path.abspath(folder)
        inside = lambda p: os.path.abspath(os.fspath(p)).startswith(folder + os.sep)  # noqa: E731
        refuse = OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_open, real_mkdir, real_replace = os.open, os.mkdir, os.replace

        def ro_open(path, flags, *a, **k):
            if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and inside(path):
                raise refuse
            return real_open(path, flags, *a, **k)

        def ro_mkdir(path, *a, **k):
            if inside(path) or os.path.abspath(os.fspath(path)) == folder:
                raise refuse
            return real_mkdir(path, *a, **k)

        def ro_replace(src, dst, *a, **k):
            if inside(dst):
                raise refuse
            return real_replace(src, dst, *a, **k)

        monkeypatch.setattr(os, "open", ro_open)
        monkeypatch.setattr(os, "mkdir", ro_mkdir)
        monkeypatch.setattr(os, "replace", ro_replace)

    return make


@pytest.mark.parametrize("command", ["train", "resume", "prune", "lab"])
def test_read_only_out_gives_one_line(command, trained, tmp_path, capsys, read_only):
    """A read-only --out (train, --resume, prune, lab): one line naming it, exit 2."""
    out = tmp_path / "ro"
    argv = {
        "train": [*TRAIN, "--epochs", "1", "--out", out / "run"],
        "resume": [*TRAIN, "--epochs", "2", "--out", out / "run", "--resume"],
        "prune": ["prune", trained / "last.pth", "--ratio", "0.5", "--out", out / "p.pth"],
        "lab": [
            "lab",
            "--arch",
            "vgg11-small",
            *DATA,
            "--epochs",
            "1",
            "--finetune-epochs",
            "1",
            "--out",
            out / "lab",
        ],
    }[command]
    if command == "resume":
        assert run(capsys, *TRAIN, "--epochs", "1", "--out", out / "run")[0] == 0
        before = sorted(p.name for p in (out / "run").iterdir())
    else:
        out.mkdir()
    read_only(out)
    code, _, err = run(capsys, *argv)
    _one_line_error(code, err, "cannot write", "read-only")
    if command == "resume":
        assert sorted(p.name for p in (out / "run").iterdir()) == before
    else:
        assert list(out.iterdir()) == []


class _FullDisk(io.RawIOBase):
    """A file on a disk with ``room`` bytes left in all (shared by every file opened)."""

    room = 0

    def __init__(self, f):
        self.f = f

    def writable(self):
        return True

    def write(self, b):
        if len(b) > _FullDisk.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FullDisk.room -= len(b)
        return self.f.write(b)

    def flush(self):
        if not self.f.closed:
            self.f.flush()

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()
        super().close()


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(room)``: writes through netslim.files fail with ENOSPC after ``room`` bytes."""
    real_fdopen = os.fdopen

    def fill(room):
        _FullDisk.room = room
        monkeypatch.setattr(
            os,
            "fdopen",
            lambda fd, mode="r", *a, **k: (
                _FullDisk(real_fdopen(fd, mode, *a, **k))
                if "w" in mode
                else real_fdopen(fd, mode, *a, **k)
            ),
        )

    return fill


def test_full_disk_after_an_epoch_gives_one_line_and_no_partial_files(tmp_path, capsys, full_disk):
    """train, disk full when the first checkpoint is written: one line, no .tmp, no .pth."""
    full_disk(4096)  # config.json fits, a checkpoint does not
    code, _, err = run(capsys, *TRAIN, "--epochs", "2", "--out", tmp_path / "r")
    _one_line_error(code, err, "cannot write", "No space left on device", "free some space")
    assert (tmp_path / "r" / "config.json").exists()
    assert not list((tmp_path / "r").glob("*.pth")) and _no_temp_files(tmp_path)


def test_full_disk_during_prune_gives_one_line(trained, tmp_path, capsys, full_disk):
    """prune onto a full disk: one line, no pruned file, no .tmp."""
    full_disk(1000)
    code, _, err = run(
        capsys, "prune", trained / "last.pth", "--ratio", "0.5", "--out", tmp_path / "p.pth"
    )
    _one_line_error(code, err, "No space left on device")
    assert not (tmp_path / "p.pth").exists() and _no_temp_files(tmp_path)


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--momentum", "-5", "--momentum must be in [0, 1)"),
        ("--momentum", "1", "--momentum"),
        ("--weight-decay", "-1e-4", "--weight-decay must be >= 0"),
        ("--lr", "0", "--lr must be > 0"),
        ("--lr", "nan", "--lr"),
        ("--lr", "inf", "--lr"),
        ("--epochs", "0", "--epochs"),
        ("--batch-size", "0", "--batch-size must be at least 1"),
        ("--threads", "0", "--threads must be at least 1"),
    ],
)
def test_numbers_out_of_range_are_refused_in_one_line(flag, value, words, tmp_path, capsys):
    """--momentum -5 and other impossible numbers: one line naming the flag, no folder."""
    code, _, err = run(capsys, *TRAIN, f"{flag}={value}", "--out", tmp_path / "r")
    _one_line_error(code, err, words)
    assert not (tmp_path / "r").exists()


class _ClosedPipe(io.StringIO):
    def write(self, s):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def test_closed_stdout_ends_quietly_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    """netslim train ... | head -0: no traceback, no message; the folder stays resumable."""
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    code = main([str(a) for a in (*TRAIN, "--epochs", "2", "--out", tmp_path / "r")])
    monkeypatch.undo()
    assert code == 141 and capsys.readouterr().err == ""
    assert torch.load(tmp_path / "r" / "last.pth", weights_only=True)["epoch"] == 1
    code, out, _ = run(capsys, *TRAIN, "--epochs", "2", "--out", tmp_path / "r", "--resume")
    assert code == 0 and "epoch   2/2" in out


def test_leftover_temp_files_are_cleaned_at_the_start_of_a_run(tmp_path, data):
    """.NAME.XXXXXXXX.tmp files of killed atomic writes go when a run starts in the folder;
    other files stay."""
    leftovers = [tmp_path / ".last.pth.k2x_9abc.tmp", tmp_path / ".metrics.jsonl.zz01yy23.tmp"]
    keep = [tmp_path / "notes.tmp", tmp_path / ".mine.tmp"]
    for path in leftovers + keep:
        path.write_text("x")
    _fit(data, tmp_path, epochs=1)
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in keep)


# --------------------------------------------------------------------------------------
# 12. CPU threads
# --------------------------------------------------------------------------------------


def test_threads_option_sets_the_thread_count(tmp_path, capsys):
    """--threads N makes PyTorch compute with N threads."""
    before = torch.get_num_threads()
    try:
        code, _, _ = run(
            capsys,
            "prune",
            "--threads",
            "1",
            tmp_path / "missing.pth",
            "--ratio",
            "0.5",
            "--out",
            tmp_path / "p.pth",
        )
        assert code == 2 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_default_threads_split_the_cores_among_torchrun_processes(monkeypatch):
    """Without --threads or OMP_NUM_THREADS: at most the usable cores, shared by torchrun's
    local processes, never 0; OMP_NUM_THREADS, when set, is kept."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = threads.default_threads()
    assert 1 <= alone <= len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.default_threads() == max(1, alone // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4096")
    assert threads.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == threads._torch_default()


def test_collapsing_throughput_prints_a_threads_hint(tmp_path, monkeypatch):
    """An epoch at under a third of the first epoch's images/s logs one hint naming
    --threads and OMP_NUM_THREADS."""
    real = train_module.train_epoch
    first = []

    def slow_second_epoch(*args, **kwargs):
        t0 = time.perf_counter()
        result = real(*args, **kwargs)
        first.append(time.perf_counter() - t0)
        if len(first) == 2:
            time.sleep(8 * first[0])
        return result

    monkeypatch.setattr(train_module, "train_epoch", slow_second_epoch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    lines = []
    torch.manual_seed(0)
    fit(
        _config(epochs=3),
        make_synthetic(n_train=64, n_test=64),
        VGG(TRAIN_CFG),
        tmp_path,
        log=lines.append,
    )
    hints = [line for line in lines if line.startswith("note:")]
    assert len(hints) == 1 and lines.index(hints[0]) == 2  # after epoch 2's line, once
    assert "--threads 2" in hints[0] and "OMP_NUM_THREADS=2" in hints[0]
    assert threads.slowdown_hint(100.0, 200.0, 2) is None


@pytest.mark.slow
def test_under_torchrun_rank_0_holds_the_lock_and_names_the_holder(tmp_path):
    """A 2-process torchrun run into a folder another run holds: rank 0 stops with the
    one-line error naming the holder, and torchrun ends the run."""
    from test_distributed import TRAIN as DDP_TRAIN
    from test_distributed import torchrun

    with runlock.hold(tmp_path / "run"):
        done = torchrun(
            tmp_path / "dump",
            *DDP_TRAIN,
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
            timeout=180,
        )
    assert done.returncode != 0
    assert (
        f"error (rank 0): {tmp_path / 'run'} is in use by another netslim run: pid {os.getpid()}"
        in done.stderr
    )
    assert "error (rank 1)" not in done.stderr
    assert not (tmp_path / "run").exists()
