"""Hostile and careless inputs (issue 10, items 5, 9 and 11): one test per input, each
named for the behaviour netslim promises. Every file here is tiny and generated."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import netslim
from netslim.cli import main
from netslim.config import ARCHS
from netslim.data import load_dataset
from netslim.data.imagefolder import decode_image
from netslim.errors import NetslimError
from netslim.models import _BUILDERS

SRC = Path(netslim.__file__).resolve().parents[1]
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def run(capsys, *argv: str) -> tuple[int, str]:
    """Run the command; return its exit status and what it wrote to stderr."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def write_cifar10(root: Path, protocol: int = 2, labels: list[int] | None = None) -> np.ndarray:
    """CIFAR-10 in the official layout, two images per file; returns the training pixels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train = []
    for name in CIFAR10_FILES:
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        batch = {
            "batch_label": name,
            "labels": labels or [3, 7],
            "data": data,
            "filenames": [b"a.png", b"b.png"],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        train += [data] if name != "test_batch" else []
    return np.concatenate(train)


class WritesMarker:
    """Unpickled by plain pickle, this runs code: it creates the file ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


# --------------------------------------------------------------------------------------
# Item 5: CIFAR files are data, never code
# --------------------------------------------------------------------------------------


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    """A data_batch_1 whose unpickling runs code is refused, naming the file and the global."""
    write_cifar10(tmp_path)
    poisoned, marker = tmp_path / "cifar-10-batches-py" / "data_batch_1", tmp_path / "ran"
    batch = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "x": WritesMarker(marker)}
    poisoned.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(NetslimError) as error:
        load_dataset("cifar10", tmp_path, download=False)
    # protocol 2 spells the module of exec as Python 2 did: __builtin__
    assert str(poisoned) in str(error.value) and "__builtin__.exec" in str(error.value)
    assert "\n" not in str(error.value)
    assert not marker.exists()
    with open(poisoned, "rb") as f:  # the file is really poisoned: plain pickle runs it
        pickle.load(f, encoding="latin1")
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_of_every_protocol_and_numpy_1_names_still_load(tmp_path, protocol):
    """The official layout loads whatever pickle protocol and numpy module names it uses."""
    train = write_cifar10(tmp_path, protocol=protocol)
    if protocol == 2:  # the official files name numpy.core (numpy 1), not numpy._core
        for name in CIFAR10_FILES:
            path = tmp_path / "cifar-10-batches-py" / name
            path.write_bytes(path.read_bytes().replace(b"numpy._core.", b"numpy.core."))
    data = load_dataset("cifar10", tmp_path, download=False)
    assert torch.equal(data.train_images.reshape(-1, 3072), torch.from_numpy(train))
    assert data.train_labels.tolist() == [3, 7] * 5


# --------------------------------------------------------------------------------------
# Item 9: data that would be silently wrong
# --------------------------------------------------------------------------------------


def test_cifar_label_out_of_range_is_refused_at_load(tmp_path):
    """A label 99 in a 10-class CIFAR file is a one-line error when the data loads."""
    write_cifar10(tmp_path, labels=[3, 99])
    with pytest.raises(NetslimError, match=r"data_batch_1 has label 99, outside 0\.\.9"):
        load_dataset("cifar10", tmp_path, download=False)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grey_image_is_scaled_to_8bit_not_clipped(tmp_path, suffix):
    """16-bit grey images (Pillow's I;16) decode as value * 255 / 65535, not white."""
    wide = np.random.default_rng(0).integers(0, 65536, (16, 16)).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / f"grey{suffix}")
    assert Image.open(tmp_path / f"grey{suffix}").mode == "I;16"
    decoded = decode_image(str(tmp_path / f"grey{suffix}"), 16, resize="stretch")
    expected = torch.from_numpy(np.round(wide / 65535 * 255).astype(np.uint8))
    assert all(torch.equal(decoded[c], expected) for c in range(3))


def test_prune_and_finetune_refuse_a_dataset_with_other_classes(tmp_path, capsys):
    """A 10-class network with a 2-class image folder: prune and finetune give the same line."""
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            pixels = np.full((32, 32, 3), 50 if name == "a" else 200, np.uint8)
            Image.fromarray(pixels).save(tmp_path / split / name / "0.png")
    ckpt = tmp_path / "m.pth"
    torch.save({"state_dict": netslim.build_model("vgg11-small").state_dict()}, ckpt)
    data = ["--dataset", "imagefolder", "--data-root", tmp_path, "--device", "cpu"]
    code, prune_err = run(
        capsys, "prune", ckpt, "--ratio", "0.5", "--out", tmp_path / "p.pth", *data
    )
    assert code == 2 and "10 outputs but dataset imagefolder has 2 classes" in prune_err
    assert not (tmp_path / "p.pth").exists()
    code, finetune_err = run(capsys, "finetune", ckpt, "--out", tmp_path / "ft", *data)
    assert code == 2 and finetune_err == prune_err


# --------------------------------------------------------------------------------------
# Item 11: the command line
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--lam", "-1e-4"], "--lam must be >= 0"),
        (["train", "--lam", "-5"], "--lam must be >= 0"),
        (["lab", "--lams", "0", "-1e-4"], "--lams must all be >= 0"),
    ],
)
def test_negative_numbers_reach_the_range_check(tmp_path, capsys, argv, message):
    """A negative number after a flag is read as a value and refused by its range check."""
    code, err = run(capsys, *argv, "--dataset", "synthetic", "--out", tmp_path / "r")
    assert code == 2 and message in err and "expected one argument" not in err


@pytest.mark.parametrize(
    "argv, message, internal",
    [
        (
            ["prune", "{ckpt}", "--ratio", "0.5", "--min-keep", "-1", "--out", "{tmp}/p.pth"],
            "--min-keep must be",
            "min_keep",
        ),
        (
            ["train", "--dataset", "synthetic", "--train-size", "0", "--out", "{tmp}/r"],
            "--train-size must be",
            "train_size",
        ),
        (
            ["train", "--dataset", "synthetic", "--test-size", "-3", "--out", "{tmp}/r"],
            "--test-size must be",
            "test_size",
        ),
        (
            ["train", "--dataset", "synthetic", "--seed", "-1", "--out", "{tmp}/r"],
            "--seed must be >= 0",
            "make_synthetic",
        ),
    ],
)
def test_messages_name_the_flag_not_the_parameter(tmp_path, capsys, argv, message, internal):
    """Errors for a flag's bad value name the flag (--min-keep), not netslim's internals."""
    ckpt = tmp_path / "m.pth"
    torch.save({"state_dict": netslim.build_model("vgg11-small").state_dict()}, ckpt)
    code, err = run(capsys, *[a.format(tmp=tmp_path, ckpt=ckpt) for a in argv])
    assert code == 2 and message in err and internal not in err


def not_a_checkpoint(kind: str, path: Path) -> None:
    rng = np.random.default_rng(0)
    if kind == "text":
        path.write_text("epoch 3, accuracy 91%\n")
    elif kind == "random bytes":
        path.write_bytes(rng.bytes(4096))
    elif kind == "random pickle-like bytes":  # passes the first-byte check, fails in torch.load
        path.write_bytes(b"\x80" + rng.bytes(4096))
    elif kind == "code":
        torch.save({"state_dict": {}, "x": WritesMarker(path.with_suffix(".ran"))}, path)


@pytest.mark.parametrize("kind", ["text", "random bytes", "random pickle-like bytes", "code"])
def test_a_file_not_written_by_torch_save_is_one_clear_line(tmp_path, capsys, kind):
    """Text, random bytes or code given as a checkpoint: one line, no advice to load unsafely."""
    path = tmp_path / "x.pth"
    not_a_checkpoint(kind, path)
    code, err = run(capsys, "info", path)
    assert code == 2 and err.startswith(f"netslim: error: {path} is not a checkpoint written by")
    assert err.count("\n") == 1 and "weights_only" not in err and "101" not in err
    assert not path.with_suffix(".ran").exists()


def imported_modules(*argv: str) -> set[str]:
    """The modules ``python -m netslim ARGV`` imports, from ``-X importtime``'s list."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "netslim", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [
        line.split("|") for line in done.stderr.splitlines() if line.startswith("import time:")
    ]
    return {parts[-1].strip() for parts in lines if len(parts) == 3}


def test_help_and_version_do_not_import_torch():
    """`netslim --help`, `netslim COMMAND --help` and `netslim --version` never import torch."""
    for argv in (["--help"], ["train", "--help"], ["lab", "--help"], ["--version"]):
        modules = imported_modules(*argv)
        assert "netslim.cli.parser" in modules  # the list is real: it holds what was imported
        assert not {m for m in modules if m.split(".")[0] in ("torch", "numpy")}, argv


def test_version_prints_the_package_version():
    """`netslim --version` prints `netslim <version>` and exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "netslim", "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert done.returncode == 0 and done.stdout.strip() == f"netslim {netslim.__version__}"


def test_parser_architectures_are_the_buildable_ones():
    """The --arch names the parser offers are exactly the networks build_model builds."""
    assert ARCHS == tuple(_BUILDERS)


def test_lazy_package_still_gives_every_public_name_and_module():
    """`import netslim` stays instant yet netslim.load, netslim.fit, netslim.train... all work."""
    from netslim.checkpoint import load
    from netslim.train.loop import fit

    assert all(getattr(netslim, name) is not None for name in netslim.__all__)
    assert netslim.load is load and netslim.fit is fit and netslim.train.fit is fit
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        netslim.nothing  # noqa: B018
