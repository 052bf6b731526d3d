"""Your own images: scanning, resizing, in memory against streaming, training and pruning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from netslim import cli
from netslim.checkpoint import load
from netslim.data import Dataset, eval_batches, imagefolder, load_dataset, train_batches
from netslim.data.imagefolder import (
    ImageFolderStream,
    decode_image,
    load_imagefolder,
    open_imagefolder,
    stream_imagefolder,
)
from netslim.errors import NetslimError
from netslim.runtime import distributed

pytestmark = pytest.mark.slow  # not in make test-fast

CLASSES = ("cat", "dog", "emu")


def write_images(root: Path, split: str, per_class: int, seed: int) -> None:
    """Small images of random sizes, PNG and JPEG, each class a different mean colour."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(20, 60, size=2)
            pixels = rng.integers(0, 120, size=(h, w, 3)) + 60 * label
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}{suffix}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_images(root, "train", 12, seed=0)
    write_images(root, "val", 5, seed=1)
    return root


def test_load_gives_a_uint8_dataset_with_sorted_classes(folder):
    data = load_imagefolder(folder, image_size=16)
    assert data.train_images.shape == (36, 3, 16, 16) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (15, 3, 16, 16) and data.num_classes == 3
    assert data.train_labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    # classes differ in brightness, and decoding kept that
    means = [data.train_images[data.train_labels == c].float().mean() for c in range(3)]
    assert means[0] < means[1] < means[2]
    # train_size keeps images spread over all classes; the lab's load_dataset reads the folder
    small = load_dataset("imagefolder", folder, train_size=6, test_size=3)
    assert small.train_labels.tolist() == [0, 0, 1, 1, 2, 2] and small.train_images.shape[-1] == 32


def test_crop_keeps_the_centre_and_stretch_keeps_everything(tmp_path):
    bands = np.zeros((20, 60, 3), dtype=np.uint8)  # red | green | blue, side by side
    bands[:, :20, 0] = bands[:, 20:40, 1] = bands[:, 40:, 2] = 255
    Image.fromarray(bands).save(tmp_path / "bands.png")
    crop = decode_image(str(tmp_path / "bands.png"), 10, "crop")
    stretch = decode_image(str(tmp_path / "bands.png"), 12, "stretch")
    assert crop.shape == (3, 10, 10) and stretch.shape == (3, 12, 12)
    assert (crop[1] > 200).all() and (crop[0] < 50).all()  # only the green band
    assert (stretch[0, :, 0] > 200).all() and (stretch[2, :, -1] > 200).all()


def test_streaming_gives_the_same_batches_as_memory_for_the_same_seed(folder):
    memory = load_imagefolder(folder, image_size=16)
    stream = stream_imagefolder(folder, image_size=16, workers=2)
    assert stream.mean == memory.mean and stream.std == memory.std
    for epoch in range(2):
        a = list(train_batches(memory, 8, torch.Generator().manual_seed(epoch)))
        b = list(stream.train_batches(8, torch.Generator().manual_seed(epoch)))
        assert len(a) == len(b) == 5  # 36 images: four of 8 and one of 4
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a, b = list(eval_batches(memory, 4)), list(stream.eval_batches(4))
    assert len(a) == len(b) == 4
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_auto_loader_picks_memory_when_it_fits(folder, monkeypatch):
    assert isinstance(open_imagefolder(folder, image_size=16), Dataset)
    assert isinstance(open_imagefolder(folder, image_size=16, loader="stream"), ImageFolderStream)
    assert imagefolder.fits_in_memory(1000, 32, torch.device("cpu"))
    assert not imagefolder.fits_in_memory(10**12, 32, torch.device("cpu"))
    monkeypatch.setattr(imagefolder, "fits_in_memory", lambda *args: False)
    assert isinstance(open_imagefolder(folder, image_size=16), ImageFolderStream)


def test_bad_folders_and_files_are_clear_errors(folder, tmp_path):
    with pytest.raises(NetslimError, match="is not an image folder"):
        load_imagefolder(tmp_path)
    write_images(tmp_path, "train", 2, seed=0)
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    with pytest.raises(NetslimError, match="classes that .* lacks: zebra"):
        load_imagefolder(tmp_path)
    (tmp_path / "val" / "zebra").rmdir()
    write_images(tmp_path, "val", 1, seed=0)
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(NetslimError, match=r"cannot read image .*broken\.jpg") as err:
        load_imagefolder(tmp_path, workers=1)  # decoded in a worker process
    assert "Traceback" not in str(err.value)
    with pytest.raises(NetslimError, match="--image-size"):
        load_imagefolder(folder, image_size=0)
    with pytest.raises(NetslimError, match="--workers"):
        stream_imagefolder(folder, workers=-1)


def test_an_image_size_the_network_cannot_take_is_a_clear_error(folder, tmp_path, capsys):
    train = [
        "train",
        "--dataset",
        "imagefolder",
        "--data-root",
        str(folder),
        "--arch",
        "vgg11-small",
        "--image-size",
        "64",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(train) == 2
    assert "cannot take 64x64 images" in capsys.readouterr().err


def test_train_streamed_then_prune_on_the_command_line(folder, tmp_path, capsys):
    run = tmp_path / "run"
    train = [
        "train",
        "--dataset",
        "imagefolder",
        "--data-root",
        str(folder),
        "--arch",
        "vgg11-small",
        "--epochs",
        "2",
        "--batch-size",
        "12",
        "--lam",
        "1e-3",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--loader",
        "stream",
        "--workers",
        "1",
        "--out",
        str(run),
    ]
    assert cli.main(train) == 0, capsys.readouterr().err
    assert load(run / "last.pth").num_classes == 3
    pruned = tmp_path / "pruned.pth"
    prune = [
        "prune",
        str(run / "last.pth"),
        "--ratio",
        "0.3",
        "--out",
        str(pruned),
        "--dataset",
        "imagefolder",
        "--data-root",
        str(folder),
        "--recalibrate",
        "2",
    ]
    assert cli.main(prune) == 0, capsys.readouterr().err
    assert "recalibrated" in capsys.readouterr().out.lower()
    small = load(pruned)
    assert sum(c for c in small.cfg if c != "M") < sum(
        c for c in load(run / "last.pth").cfg if c != "M"
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_each_process_streams_its_share_of_the_in_memory_batches(folder, monkeypatch, rank):
    memory = load_imagefolder(folder, image_size=16)
    stream = stream_imagefolder(folder, image_size=16, workers=0)
    whole = list(train_batches(memory, 10, torch.Generator().manual_seed(5)))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    shares = list(stream.train_batches(10, torch.Generator().manual_seed(5)))
    assert len(shares) == len(whole) == 4  # 36 images: three of 10 and one of 6
    for (x, y), (xs, ys) in zip(whole, shares):
        half = len(y) // 2
        rows = slice(0, half) if rank == 0 else slice(half, len(y))
        assert torch.equal(xs, x[rows]) and torch.equal(ys, y[rows])
