"""CIFAR-10 and CIFAR-100 from the official "python version" files.

Downloaded on first use if allowed (md5-checked, unpacked under temporary names and
renamed at the end), and read by an unpickler that builds only what those files hold
(dicts, lists, strings, numbers, numpy arrays), so a tampered file cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from netslim.data.batches import Dataset
from netslim.errors import NetslimError


@dataclass(frozen=True)
class _CifarInfo:
    """Where a CIFAR variant comes from and what its folder must contain."""

    name: str
    title: str
    url: str
    md5: str
    folder: str  # the folder the archive unpacks to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Mean/std are the fixed constants of the network-slimming paper's code, so that runs
# match it (they are not exactly this data's statistics; the std is a per-pixel one).
# Tests patch url/md5 in this table to exercise the download path offline.
CIFAR: dict[str, _CifarInfo] = {
    "cifar10": _CifarInfo(
        name="cifar10",
        title="CIFAR-10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
    ),
    "cifar100": _CifarInfo(
        name="cifar100",
        title="CIFAR-100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def load_cifar(info: _CifarInfo, root: Path, download: bool) -> Dataset:
    folder = root / info.folder
    if not folder.is_dir():
        if not download:
            raise NetslimError(
                _missing_message(
                    info, root, "downloading is off (--no-download, or download=False)"
                )
            )
        _download_and_extract(info, root)

    train = [_read_cifar_file(folder / f, info) for f in info.train_files]
    test = [_read_cifar_file(folder / f, info) for f in info.test_files]
    return Dataset(
        name=info.name,
        train_images=torch.cat([images for images, _ in train]),
        train_labels=torch.cat([labels for _, labels in train]),
        test_images=torch.cat([images for images, _ in test]),
        test_labels=torch.cat([labels for _, labels in test]),
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
    )


def _missing_message(info: _CifarInfo, root: Path, reason: str) -> str:
    files = ", ".join(info.train_files + info.test_files)
    return (
        f"{info.title} not found and {reason}. Expected the folder {root / info.folder} "
        f"containing {files}. Get the archive from {info.url} (md5 {info.md5}) and extract "
        f"it by hand inside {root} (it unpacks to {info.folder}/), or run again with "
        f"internet access and downloading on."
    )


# The globals an official CIFAR pickle names: numpy's array reconstruction (numpy.core
# before numpy 2, numpy._core since; _frombuffer for protocol 5), and how Python 3 spells
# bytes in a protocol-2 pickle. Dicts, lists, str, bytes and ints need none.
_CIFAR_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside :data:`_CIFAR_GLOBALS` (its text: module.name)."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the official CIFAR files hold: a pickle can call
    any function it names, so every other name is refused before it is imported."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        with warnings.catch_warnings():  # numpy 2 warns that numpy.core was renamed
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _read_cifar_file(path: Path, info: _CifarInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one official pickle into uint8 images [N, 3, 32, 32] and int64 labels [N]."""
    fix = f"delete the folder {path.parent} and run again to download it afresh"
    if not path.is_file():
        raise NetslimError(f"{info.title} file {path} is missing; {fix}")
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
        # The official files were pickled by Python 2 and have str keys; accept bytes too.
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[info.label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError(f"unexpected shapes {data.shape} and {labels.shape}")
    except _RefusedGlobal as e:
        raise NetslimError(
            f"{info.title} file {path} refers to {e}, which no {info.title} file holds; refused "
            f"to read it (unpickling it could run code); {fix}"
        ) from None
    except Exception as e:  # truncated pickles raise all sorts of errors
        raise NetslimError(f"{info.title} file {path} is truncated or corrupt ({e}); {fix}") from e
    bad = labels[(labels < 0) | (labels >= info.num_classes)]
    if len(bad):
        raise NetslimError(
            f"{info.title} file {path} has label {bad[0]}, outside 0..{info.num_classes - 1} "
            f"({len(bad)} such labels); {fix}"
        )
    # Rows are channel-major RGB (1024 red, 1024 green, 1024 blue), i.e. already CHW.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def _download_and_extract(info: _CifarInfo, root: Path) -> None:
    """Fetch the archive into ``root``, check its md5 and unpack it to ``root/info.folder``.

    Everything is written under temporary names in ``root`` and renamed at the end, so an
    interrupted or failed run leaves nothing half-written behind.
    """
    root.mkdir(parents=True, exist_ok=True)
    fd, archive_name = tempfile.mkstemp(dir=root, prefix=f".{info.name}-", suffix=".tar.gz")
    archive = Path(archive_name)
    unpack_dir = Path(tempfile.mkdtemp(dir=root, prefix=f".{info.name}-"))
    try:
        print(f"downloading {info.title} from {info.url} to {root} ...", file=sys.stderr)
        md5 = hashlib.md5()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(info.url, timeout=60) as r:
                while chunk := r.read(1 << 20):
                    md5.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as e:
            raise NetslimError(_missing_message(info, root, f"the download failed ({e})")) from e
        if md5.hexdigest() != info.md5:
            raise NetslimError(
                f"the downloaded {info.title} archive from {info.url} has md5 {md5.hexdigest()}, "
                f"expected {info.md5}; it was deleted. Run again, or download it by hand and "
                f"extract it inside {root}."
            )
        _safe_extract(archive, unpack_dir)
        if not (unpack_dir / info.folder).is_dir():
            raise NetslimError(f"the {info.title} archive from {info.url} has no {info.folder}/")
        os.replace(unpack_dir / info.folder, root / info.folder)
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(unpack_dir, ignore_errors=True)


def _safe_extract(archive: Path, dest: Path) -> None:
    """Unpack regular files and folders only, refusing any member that would land outside
    ``dest`` (absolute paths, ``..``) and links or devices, which could point anywhere."""
    dest = dest.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            target = (dest / member.name).resolve()
            if target != dest and dest not in target.parents:
                raise NetslimError(f"refusing to extract {archive}: member {member.name!r} escapes")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
            else:
                raise NetslimError(
                    f"refusing to extract {archive}: {member.name!r} is a link or device file"
                )
