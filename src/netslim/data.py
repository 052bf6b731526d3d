"""Datasets by name: CIFAR-10/100 from the official files, built-in synthetic shapes, and
your own images (:mod:`netslim.imagefolder`), each as one :class:`~netslim.batches.Dataset`.

A dataset is a single uint8 tensor ``[N, 3, 32, 32]`` that lives on the device the model
trains on; :mod:`netslim.batches` makes its augmented, normalised batches (re-exported
here, with :class:`Dataset`).

Four datasets are available (see :data:`DATASETS`):

* ``"synthetic"``: generated in well under a second, no files needed.  Ten shape and
  texture classes drawn with random colours, so a CNN must look at shape, not colour.
* ``"cifar10"`` / ``"cifar100"``: read from the official "python version" pickles,
  downloaded on first use if allowed. The pickles are read by an unpickler that builds
  only what those files hold (dicts, lists, strings, numbers, numpy arrays), so a
  tampered file cannot run code.
* ``"imagefolder"``: your own images in ``train/<class>/`` and ``val/<class>/`` folders,
  resized to 32x32 (see :mod:`netslim.imagefolder` for other sizes and for streaming).
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from netslim.batches import Dataset, augment, eval_batches, normalize, num_batches, train_batches
from netslim.config import DATASETS
from netslim.errors import NetslimError
from netslim.limits import check_memory

DEFAULT_ROOT = Path("data")  # where CIFAR lives when no root is given (git-ignored)
SYNTHETIC_TRAIN_SIZE = 10000
SYNTHETIC_TEST_SIZE = 2000

__all__ = ["DATASETS", "Dataset", "augment", "eval_batches", "load_dataset", "make_synthetic",
           "normalize", "num_batches", "train_batches"]  # fmt: skip


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    seed: int = 0,
    download: bool = True,
    train_size: int | None = None,
    test_size: int | None = None,
) -> Dataset:
    """Load a dataset by name, on the CPU (move it with :meth:`Dataset.to`).

    Args:
        name: one of :data:`DATASETS`.
        root: folder holding (or receiving) the CIFAR folders; default ``./data``.
            For ``"imagefolder"`` the folder holding ``train/`` and ``val/``.
            Ignored for ``"synthetic"``.
        seed: seed of the synthetic data; ignored for CIFAR.
        download: fetch a missing CIFAR archive from the official site.
        train_size, test_size: keep only the first n images of each split, for quick
            experiments.  For ``"synthetic"`` they set how many images are generated
            (default 10000 and 2000); generation is block-wise, so this is still the
            first n images of any larger synthetic set with the same seed.
    """
    if name not in DATASETS:
        raise NetslimError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    for what, size in (("--train-size", train_size), ("--test-size", test_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise NetslimError(f"{what} must be a positive whole number, got {size!r}")

    if name == "imagefolder":
        from netslim.imagefolder import load_imagefolder  # imports Pillow; others need not

        if root is None:
            raise NetslimError("the imagefolder dataset needs a root folder (--data-root DIR)")
        return load_imagefolder(root, train_size=train_size, test_size=test_size)
    if name == "synthetic":
        return make_synthetic(
            n_train=SYNTHETIC_TRAIN_SIZE if train_size is None else train_size,
            n_test=SYNTHETIC_TEST_SIZE if test_size is None else test_size,
            seed=seed,
        )

    data = _load_cifar(_CIFAR[name], DEFAULT_ROOT if root is None else Path(root), download)
    return replace(
        data,
        train_images=_first(data.train_images, train_size, "--train-size", name),
        train_labels=_first(data.train_labels, train_size, "--train-size", name),
        test_images=_first(data.test_images, test_size, "--test-size", name),
        test_labels=_first(data.test_labels, test_size, "--test-size", name),
    )


def _first(x: torch.Tensor, n: int | None, what: str, name: str) -> torch.Tensor:
    if n is None:
        return x
    if n > len(x):
        raise NetslimError(
            f"{what} {n} but {name} has only {len(x)} such images; pass at most {len(x)}"
        )
    return x[:n]


# --------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------


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
_CIFAR: dict[str, _CifarInfo] = {
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


def _load_cifar(info: _CifarInfo, root: Path, download: bool) -> Dataset:
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
_CIFAR_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})  # fmt: skip


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


# --------------------------------------------------------------------------------------
# Synthetic shapes
# --------------------------------------------------------------------------------------

_BLOCK = 1000  # images per independently seeded block; see make_synthetic
_PATTERNS = 10  # how many distinct classes _masks can draw
_SHAPE_KEYS = ("cx", "cy", "size", "width", "period", "phase", "sign")  # what _masks reads


def make_synthetic(
    n_train: int = SYNTHETIC_TRAIN_SIZE,
    n_test: int = SYNTHETIC_TEST_SIZE,
    seed: int = 0,
    num_classes: int = 10,
) -> Dataset:
    """Generate a small CIFAR-like dataset of shapes and textures, deterministically.

    Each class is a pattern (stripes, checkerboard, ring, cross, ...; see :func:`_masks`)
    at a random position and size, painted in a random foreground colour on a random
    background colour, plus pixel noise.  Colours are independent of the class, so the
    mean colour of an image says nothing about its label: a model must learn shapes.

    Labels cycle ``0, 1, ..., num_classes - 1, 0, 1, ...`` so classes are balanced.
    Images are generated in blocks of 1000, each from its own generator seeded by
    ``(seed, split, block)``, so the first n images do not depend on how many are made.
    """
    # Named by the flags that set them: the command line is where most of them come from.
    for flag, value, least in (("--train-size", n_train, 1), ("--test-size", n_test, 1),
                               ("--seed", seed, 0)):  # fmt: skip
        if value < least:
            raise NetslimError(f"{flag} must be >= {least} for the synthetic data, got {value}")
    if not 2 <= num_classes <= _PATTERNS:
        raise NetslimError(f"the synthetic data has 2 to {_PATTERNS} classes, not {num_classes}")
    # painting works on a whole split at once, in a few float32 tensors of its size
    for flag, n in (("--train-size", n_train), ("--test-size", n_test)):
        check_memory(3 * 4 * 3 * 32 * 32 * n, f"painting {n:,} synthetic images", f"lower {flag}")
    # These memory-bound ops gain nothing from threads, and on a busy CPU every threaded op
    # waits for a descheduled thread: one thread was 5x faster on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_images, train_labels = _synthetic_split(n_train, seed, 0, num_classes)
        test_images, test_labels = _synthetic_split(n_test, seed, 1, num_classes)
    finally:
        torch.set_num_threads(threads)
    # Normalisation statistics from the first 2000 training images: plenty for three
    # numbers, and cheaper than a pass over everything.
    std, mean = torch.std_mean(train_images[:2000].float() / 255, dim=(0, 2, 3))
    return Dataset(
        name="synthetic",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=num_classes,
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
    )


def _synthetic_split(
    n: int, seed: int, split: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = []
    for block in range(num_batches(n, _BLOCK)):
        block_seed = np.random.SeedSequence([seed, split, block]).generate_state(1)[0]
        blocks.append(_draw_parameters(_BLOCK, torch.Generator().manual_seed(int(block_seed))))
    # Always draw whole blocks, then cut: image i's random numbers never depend on n.
    params = {key: torch.cat([b[key] for b in blocks])[:n] for key in blocks[0]}
    labels = torch.arange(n) % num_classes
    # Paint the whole split at once: few large tensor ops are much faster than many small
    # ones, especially on a busy CPU.
    return _paint(labels, params), labels


def _draw_parameters(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """All random numbers of n images, drawn for every image whatever its class."""

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    return {
        "cx": uniform(10.0, 22.0, 1, 1),  # centre of the shape, in pixels
        "cy": uniform(10.0, 22.0, 1, 1),
        "size": uniform(5.5, 11.0, 1, 1),  # half-width or radius
        "width": uniform(1.5, 3.0, 1, 1),  # line width of rings, crosses, outlines
        "period": uniform(5.0, 8.0, 1, 1),  # of stripes, checks and dots
        "phase": uniform(0.0, 1.0, 1, 1),
        "sign": torch.where(uniform(0.0, 1.0, 1, 1) < 0.5, -1.0, 1.0),  # which diagonal
        "foreground": uniform(0.0, 1.0, 3, 1, 1),
        "background": uniform(0.0, 1.0, 3, 1, 1),
        "noise_level": uniform(0.03, 0.18, 1, 1, 1),
        "noise": torch.randn(n, 3, 32, 32, generator=generator),
    }


def _paint(labels: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Paint one image per label from its parameters: uint8 [n, 3, 32, 32]."""
    foreground, background = p["foreground"], p["background"]
    # Too little contrast would make a shape invisible: shift such backgrounds by half the
    # colour range, which keeps both colours uniform and independent of the class.
    low_contrast = (foreground - background).abs().amax(dim=1, keepdim=True) < 0.3
    background = torch.where(low_contrast, (background + 0.5) % 1.0, background)

    mask = torch.empty(len(labels), 32, 32)
    for c in labels.unique().tolist():
        rows = labels == c
        mask[rows] = _masks(c, {key: p[key][rows] for key in _SHAPE_KEYS})
    images = torch.lerp(background, foreground, mask.unsqueeze(1))
    images.addcmul_(p["noise_level"], p["noise"])
    return images.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def _masks(label: int, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Foreground coverage in [0, 1], shape [k, 32, 32], for k images of class ``label``.

    Every pattern is mapped to itself by a horizontal flip (our augmentation), so no two
    classes are mirror images of each other.
    """
    grid = torch.arange(32, dtype=torch.float32) + 0.5
    x = grid.view(1, 1, 32) - p["cx"]  # coordinates relative to the shape's centre
    y = grid.view(1, 32, 1) - p["cy"]
    size, width, period = p["size"], p["width"], p["period"]

    # Helpers are functions so that each class computes only what it needs.
    def radius() -> torch.Tensor:
        return torch.hypot(x, y)

    def window() -> torch.Tensor:  # the square patch the textures fill
        return _inside(torch.maximum(x.abs(), y.abs()) - size)

    def stripes(t: torch.Tensor) -> torch.Tensor:  # smooth stripes across direction t
        return 0.5 + 0.5 * torch.sin(2 * math.pi * (t / period + p["phase"])).mul(3).clamp(-1, 1)

    def cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bar_u = _inside(torch.maximum(u.abs() - width, v.abs() - size))
        bar_v = _inside(torch.maximum(v.abs() - width, u.abs() - size))
        return torch.maximum(bar_u, bar_v)

    if label == 0:  # horizontal stripes
        return window() * stripes(y)
    if label == 1:  # vertical stripes
        return window() * stripes(x)
    if label == 2:  # diagonal stripes, either diagonal (the flip swaps them)
        return window() * stripes((x + p["sign"] * y) / math.sqrt(2))
    if label == 3:  # checkerboard
        return window() * (stripes(x) - stripes(y)).abs()
    if label == 4:  # ring
        return _inside((radius() - size).abs() - width / 2)
    if label == 5:  # filled disc
        return _inside(radius() - size)
    if label == 6:  # upright cross "+"
        return cross(x, y)
    if label == 7:  # diagonal cross "x"
        return cross((x + y) / math.sqrt(2), (x - y) / math.sqrt(2))
    if label == 8:  # square outline
        return _inside((torch.maximum(x.abs(), y.abs()) - size).abs() - width / 2)
    # label 9: a lattice of round dots
    dx = torch.remainder(x / period + p["phase"], 1.0) - 0.5
    dy = torch.remainder(y / period + p["phase"], 1.0) - 0.5
    return window() * _inside(period * (dx**2 + dy**2).sqrt() - period / 4)


def _inside(distance: torch.Tensor) -> torch.Tensor:
    """Pixel coverage from a signed distance to a shape's edge (negative inside), with a
    one-pixel soft edge so small shapes are not jagged."""
    return (0.5 - distance).clamp(0.0, 1.0)
