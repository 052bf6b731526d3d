"""Tests of netslim.data: CIFAR loading (on tiny generated folders, never the network),
the synthetic data, augmentation and batching."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from netslim.data import (
    DATASETS,
    Dataset,
    augment,
    eval_batches,
    load_dataset,
    make_synthetic,
    normalize,
    num_batches,
    train_batches,
)
from netslim.data import cifar as data_module
from netslim.errors import NetslimError

# --------------------------------------------------------------------------------------
# Tiny CIFAR folders in the official layout
# --------------------------------------------------------------------------------------


def write_batch(path: Path, data: np.ndarray, labels: list[int], label_key: str) -> None:
    with open(path, "wb") as f:
        pickle.dump({"data": data, label_key: labels, "batch_label": "test"}, f, protocol=2)


def make_cifar10(root: Path, per_file: int = 2) -> dict[str, np.ndarray]:
    """Write data_batch_1..5 and test_batch with random pixels; return what was written."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written: dict[str, list] = {
        "train_data": [],
        "train_labels": [],
        "test_data": [],
        "test_labels": [],
    }
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        split = "test" if name == "test_batch" else "train"
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_file).tolist()
        write_batch(folder / name, data, labels, "labels")
        written[f"{split}_data"].append(data)
        written[f"{split}_labels"].append(labels)
    return {k: np.concatenate(v) for k, v in written.items()}


def as_image(row: np.ndarray) -> np.ndarray:
    """A CIFAR row to [3, 32, 32] the slow way: 1024 red, 1024 green, 1024 blue, row-major."""
    image = np.zeros((3, 32, 32), dtype=np.uint8)
    for c in range(3):
        for h in range(32):
            for w in range(32):
                image[c, h, w] = row[c * 1024 + h * 32 + w]
    return image


def test_cifar10_loads_official_layout(tmp_path):
    written = make_cifar10(tmp_path)
    d = load_dataset("cifar10", tmp_path, download=False)

    assert d.name == "cifar10" and d.num_classes == 10
    assert d.train_images.shape == (10, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (2, 3, 32, 32) and d.test_images.dtype == torch.uint8
    assert d.train_labels.dtype == torch.int64 and d.test_labels.dtype == torch.int64
    assert d.train_labels.tolist() == written["train_labels"].tolist()
    assert d.test_labels.tolist() == written["test_labels"].tolist()
    assert np.array_equal(d.train_images[7].numpy(), as_image(written["train_data"][7]))
    assert np.array_equal(d.test_images[1].numpy(), as_image(written["test_data"][1]))
    assert np.array_equal(d.train_images.numpy().reshape(10, -1), written["train_data"])
    assert d.mean == (0.4914, 0.4822, 0.4465) and d.std == (0.2023, 0.1994, 0.2010)


def test_cifar100_loads_fine_labels_and_bytes_keys(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    splits = {}
    for name, n in (("train", 5), ("test", 3)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine, coarse = rng.integers(0, 100, n).tolist(), rng.integers(0, 20, n).tolist()
        with open(folder / name, "wb") as f:  # bytes keys, as a Python 3 writer might leave
            pickle.dump({b"data": data, b"fine_labels": fine, b"coarse_labels": coarse}, f)
        splits[name] = (data, fine)

    d = load_dataset("cifar100", tmp_path, download=False)

    assert d.num_classes == 100 and d.train_images.shape == (5, 3, 32, 32)
    assert d.train_labels.tolist() == splits["train"][1]
    assert d.test_labels.tolist() == splits["test"][1]
    assert np.array_equal(d.test_images[2].numpy(), as_image(splits["test"][0][2]))
    assert d.mean == (0.5071, 0.4865, 0.4409) and d.std == (0.2673, 0.2564, 0.2762)


def test_sizes_keep_the_first_images(tmp_path):
    make_cifar10(tmp_path)
    full = load_dataset("cifar10", tmp_path, download=False)
    small = load_dataset("cifar10", tmp_path, download=False, train_size=3, test_size=1)
    assert torch.equal(small.train_images, full.train_images[:3])
    assert torch.equal(small.train_labels, full.train_labels[:3])
    assert torch.equal(small.test_images, full.test_images[:1])
    with pytest.raises(NetslimError, match="--train-size 11"):
        load_dataset("cifar10", tmp_path, download=False, train_size=11)
    with pytest.raises(NetslimError, match="--test-size"):
        load_dataset("cifar10", tmp_path, download=False, test_size=0)


def test_missing_folder_without_download_says_what_to_put_where(tmp_path):
    with pytest.raises(NetslimError) as error:
        load_dataset("cifar10", tmp_path, download=False)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert "download=False" in message


def test_failed_download_explains_and_leaves_nothing(tmp_path, monkeypatch):
    info = dataclasses.replace(data_module.CIFAR["cifar100"], url=(tmp_path / "gone").as_uri())
    monkeypatch.setitem(data_module.CIFAR, "cifar100", info)
    root = tmp_path / "root"
    with pytest.raises(NetslimError, match="download failed") as error:
        load_dataset("cifar100", root)
    assert str(root / "cifar-100-python") in str(error.value)
    assert list(root.iterdir()) == []


def test_missing_batch_file_is_named(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(NetslimError, match="data_batch_4 is missing"):
        load_dataset("cifar10", tmp_path, download=False)


def test_truncated_batch_file_is_named(tmp_path):
    make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(NetslimError, match="data_batch_3 is truncated or corrupt"):
        load_dataset("cifar10", tmp_path, download=False)


def make_archive(source_root: Path, archive: Path, folder: str) -> str:
    """Pack ``source_root/folder`` as the official archive does; return its md5."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source_root / folder, arcname=folder)
    return hashlib.md5(archive.read_bytes()).hexdigest()


def patch_source(monkeypatch, archive: Path, md5: str) -> None:
    info = dataclasses.replace(data_module.CIFAR["cifar10"], url=archive.as_uri(), md5=md5)
    monkeypatch.setitem(data_module.CIFAR, "cifar10", info)


def test_download_extracts_a_verified_archive(tmp_path, monkeypatch):
    written = make_cifar10(tmp_path / "source")
    archive = tmp_path / "cifar-10-python.tar.gz"
    patch_source(
        monkeypatch, archive, make_archive(tmp_path / "source", archive, "cifar-10-batches-py")
    )
    root = tmp_path / "root"

    d = load_dataset("cifar10", root)

    assert np.array_equal(d.train_images.numpy().reshape(10, -1), written["train_data"])
    assert d.test_labels.tolist() == written["test_labels"].tolist()
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # no temp files left
    # Second time it reads the extracted folder, without downloading.
    archive.unlink()
    assert torch.equal(load_dataset("cifar10", root).train_images, d.train_images)


def test_download_with_wrong_md5_is_rejected_and_deleted(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "source")
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_archive(tmp_path / "source", archive, "cifar-10-batches-py")
    patch_source(monkeypatch, archive, "0" * 32)
    root = tmp_path / "root"
    with pytest.raises(NetslimError, match="md5"):
        load_dataset("cifar10", root)
    assert list(root.iterdir()) == []


def test_archive_member_escaping_root_is_refused(tmp_path, monkeypatch):
    evil = tmp_path / "evil.txt"
    evil.write_text("x")
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(evil, arcname="../../escaped.txt")
    patch_source(monkeypatch, archive, hashlib.md5(archive.read_bytes()).hexdigest())
    root = tmp_path / "a" / "root"
    with pytest.raises(NetslimError, match="escapes"):
        load_dataset("cifar10", root)
    assert not (tmp_path / "escaped.txt").exists()
    assert list(root.iterdir()) == []


def test_unknown_dataset_lists_choices():
    with pytest.raises(NetslimError) as error:
        load_dataset("imagenet")
    assert "imagenet" in str(error.value)
    assert all(name in str(error.value) for name in DATASETS)


# --------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic() -> Dataset:
    """The default synthetic set (generated once: it takes a fraction of a second)."""
    return load_dataset("synthetic", "ignored/root", seed=0)


def test_synthetic_shapes_and_balance(synthetic):
    d = synthetic
    assert d.name == "synthetic" and d.num_classes == 10
    assert d.train_images.shape == (10000, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (2000, 3, 32, 32) and d.test_labels.dtype == torch.int64
    assert d.train_labels.bincount().tolist() == [1000] * 10
    assert d.test_labels.bincount().tolist() == [200] * 10
    assert not torch.equal(d.train_images[:2000], d.test_images)  # the splits differ


def test_synthetic_is_deterministic_and_a_prefix_of_larger_sets(synthetic):
    # 1500 crosses the 1000-image block boundary inside the generator.
    small = make_synthetic(n_train=1500, n_test=10, seed=0)
    assert torch.equal(small.train_images, synthetic.train_images[:1500])
    assert torch.equal(small.train_labels, synthetic.train_labels[:1500])
    assert torch.equal(small.test_images, synthetic.test_images[:10])
    sized = load_dataset("synthetic", seed=0, train_size=1500, test_size=10)
    assert torch.equal(sized.train_images, small.train_images)

    other = make_synthetic(n_train=1500, n_test=10, seed=1)
    assert not torch.equal(other.train_images, small.train_images)
    assert not torch.equal(other.test_images, small.test_images)


def test_synthetic_normalisation_statistics(synthetic):
    pixels = synthetic.train_images[:2000].double() / 255  # documented: the first 2000
    assert np.allclose(synthetic.mean, pixels.mean(dim=(0, 2, 3)), atol=1e-5)
    assert np.allclose(synthetic.std, pixels.std(dim=(0, 2, 3)), atol=1e-5)


def test_synthetic_class_is_not_given_away_by_colour(synthetic):
    """A nearest-class-mean classifier on the mean RGB colour of each image is near chance."""
    train_colour = synthetic.train_images.float().mean(dim=(2, 3))
    test_colour = synthetic.test_images.float().mean(dim=(2, 3))
    class_means = torch.stack(
        [train_colour[synthetic.train_labels == c].mean(dim=0) for c in range(10)]
    )
    predicted = torch.cdist(test_colour, class_means).argmin(dim=1)
    accuracy = (predicted == synthetic.test_labels).float().mean().item()
    assert accuracy < 0.25


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(NetslimError, match="2 to 10 classes, not 11"):
        make_synthetic(n_train=10, n_test=10, num_classes=11)


# --------------------------------------------------------------------------------------
# Augmentation, normalisation, batches
# --------------------------------------------------------------------------------------


def pad_crop_flip(image: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    """One image the slow way: zero-pad by 4, crop 32x32 at (top, left), maybe mirror."""
    padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
    padded[:, 4:36, 4:36] = image
    crop = padded[:, top : top + 32, left : left + 32]
    return crop.flip(-1) if flip else crop


def test_augment_matches_a_per_image_reference(synthetic):
    images = synthetic.train_images[:64].clone()
    out = augment(images, torch.Generator().manual_seed(5))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(images, synthetic.train_images[:64])  # input left alone

    # Draw the same numbers in the order augment documents, then apply them one by one.
    generator = torch.Generator().manual_seed(5)
    left = torch.randint(0, 9, (64,), generator=generator)
    top = torch.randint(0, 9, (64,), generator=generator)
    flip = torch.rand(64, generator=generator) < 0.5
    for i in range(64):
        assert torch.equal(out[i], pad_crop_flip(images[i], top[i], left[i], bool(flip[i])))


def test_augment_is_random_per_image():
    # 64 copies of one image without zero pixels or symmetry; find which crop and flip
    # each copy got by trying all 162 of them.
    image = torch.arange(3 * 32 * 32).remainder(251).add(1).to(torch.uint8).view(3, 32, 32)
    out = augment(image.expand(64, 3, 32, 32), torch.Generator().manual_seed(0))
    candidates = {
        (top, left, flip): pad_crop_flip(image, top, left, flip)
        for top in range(9)
        for left in range(9)
        for flip in (False, True)
    }
    chosen = [next(k for k, c in candidates.items() if torch.equal(c, o)) for o in out]
    tops, lefts, flips = zip(*chosen)
    assert len(set(tops)) >= 5 and len(set(lefts)) >= 5
    assert 10 < sum(flips) < 54


def test_normalize_matches_manual_computation():
    images = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    out = normalize(images, mean, std)
    assert out.dtype == torch.float32 and out.shape == images.shape
    for b, c, h, w in [(0, 0, 0, 0), (1, 2, 3, 4), (0, 1, 2, 3), (1, 0, 3, 1)]:
        expected = (images[b, c, h, w].item() / 255 - mean[c]) / std[c]
        assert out[b, c, h, w].item() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(normalize(images, torch.tensor(mean), torch.tensor(std)), out)


def small_dataset(n_train: int = 23, n_test: int = 7) -> Dataset:
    """Random images whose labels are their indices, so batches show which samples they hold."""
    images = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(n_train + n_test)
    return Dataset(
        name="tiny",
        train_images=images[:n_train],
        train_labels=labels[:n_train],
        test_images=images[n_train:],
        test_labels=labels[n_train:],
        num_classes=n_train + n_test,
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
    )


def test_train_batches_cover_every_sample_once_and_reproduce():
    d = small_dataset()
    batches = list(train_batches(d, 5, torch.Generator().manual_seed(1), augment_images=False))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(23))
    assert seen.tolist() != list(range(23))  # shuffled
    for x, y in batches:  # images travel with their labels
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, normalize(d.train_images[y], d.mean, d.std))

    again = list(train_batches(d, 5, torch.Generator().manual_seed(1), augment_images=False))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = torch.cat([y for _, y in train_batches(d, 5, torch.Generator().manual_seed(2))])
    assert other.tolist() != seen.tolist()


def test_train_batches_augmented_and_drop_last():
    d = small_dataset()
    batches = list(train_batches(d, 5, torch.Generator().manual_seed(3), drop_last=True))
    assert len(batches) == num_batches(23, 5, drop_last=True) == 4
    assert all(x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 for x, _ in batches)
    again = list(train_batches(d, 5, torch.Generator().manual_seed(3), drop_last=True))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    plain = [normalize(d.train_images[y], d.mean, d.std) for _, y in batches]
    assert not all(torch.equal(x, p) for (x, _), p in zip(batches, plain))  # augmented


def test_eval_batches_in_order():
    d = small_dataset()
    batches = list(eval_batches(d, 3))
    assert [len(y) for _, y in batches] == [3, 3, 1]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(23, 30))
    assert torch.equal(torch.cat([x for x, _ in batches]), normalize(d.test_images, d.mean, d.std))
    train = torch.cat([y for _, y in eval_batches(d, 10, split="train")])
    assert train.tolist() == list(range(23))
    with pytest.raises(NetslimError, match="split"):
        list(eval_batches(d, 3, split="val"))


def test_num_batches():
    assert num_batches(10, 5) == 2 and num_batches(11, 5) == 3 and num_batches(11, 5, True) == 2
    assert num_batches(4, 5) == 1 and num_batches(4, 5, drop_last=True) == 0
    with pytest.raises(NetslimError, match="batch size"):
        num_batches(10, 0)


def test_dataset_to_returns_moved_copy():
    d = small_dataset()
    moved = d.to("cpu")
    assert moved is not d and moved.name == d.name and moved.mean == d.mean
    assert torch.equal(moved.train_images, d.train_images)
    assert moved.test_labels.device.type == "cpu"


def test_generator_on_another_device_is_explained():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8, device="meta")
    with pytest.raises(NetslimError, match="torch.Generator"):
        augment(images, torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_and_batches_on_cuda(synthetic):
    d = synthetic.to("cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    out = augment(d.train_images[:64], generator)
    assert out.device.type == "cuda"
    # Same offsets and flips as the generator drew, applied the slow way on the CPU.
    generator.manual_seed(0)
    n = 64
    left = torch.randint(0, 9, (n,), generator=generator, device="cuda").cpu()
    top = torch.randint(0, 9, (n,), generator=generator, device="cuda").cpu()
    flip = (torch.rand(n, generator=generator, device="cuda") < 0.5).cpu()
    for i in range(n):
        expected = pad_crop_flip(synthetic.train_images[i], top[i], left[i], bool(flip[i]))
        assert torch.equal(out[i].cpu(), expected)
    x, y = next(train_batches(d, 32, generator))
    assert x.device.type == "cuda" and y.device.type == "cuda"
    with pytest.raises(NetslimError, match="generator"):
        next(train_batches(d, 32, torch.Generator()))
