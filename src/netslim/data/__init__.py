"""Datasets by name: CIFAR-10/100 (:mod:`.cifar`), built-in synthetic shapes
(:mod:`.synthetic`) and your own images (:mod:`.imagefolder`), each offering the one data
interface training, evaluation and pruning use (:class:`~.batches.ImageData`).

An in-memory data set (:class:`~.batches.Dataset`) is a single uint8 tensor
``[N, 3, H, W]`` that lives on the device the model trains on; :mod:`.batches` makes its
augmented, normalised batches. An image folder larger than memory is streamed from disk
instead (:class:`~.imagefolder.ImageFolderStream`), with the same batches.

* ``"synthetic"``: generated in well under a second, no files needed;
* ``"cifar10"`` / ``"cifar100"``: the official "python version" pickles, downloaded on
  first use if allowed, read by an unpickler that cannot run code;
* ``"imagefolder"``: your own images in ``train/<class>/`` and ``val/<class>/`` folders.

:func:`load_dataset` loads one into memory on the CPU; :func:`open_dataset` is what the
command line uses: on a device, an image folder in memory or streamed, and under torchrun
one process downloading while the others wait.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from netslim.config import DATASETS
from netslim.data.batches import (
    Dataset,
    ImageData,
    augment,
    eval_batches,
    normalize,
    num_batches,
    train_batches,
)
from netslim.data.cifar import CIFAR, load_cifar
from netslim.data.imagefolder import load_imagefolder, open_imagefolder
from netslim.data.synthetic import SYNTHETIC_TEST_SIZE, SYNTHETIC_TRAIN_SIZE, make_synthetic
from netslim.errors import NetslimError
from netslim.runtime import distributed

DEFAULT_ROOT = Path("data")  # where CIFAR lives when no root is given (git-ignored)

__all__ = [
    "DATASETS",
    "Dataset",
    "ImageData",
    "augment",
    "eval_batches",
    "load_dataset",
    "make_synthetic",
    "normalize",
    "num_batches",
    "open_dataset",
    "train_batches",
]


def open_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    download: bool = True,
    train_size: int | None = None,
    test_size: int | None = None,
    image_size: int = 32,
    resize: str = "crop",
    loader: str = "memory",
    workers: int | None = None,
) -> ImageData:
    """The data set ``name`` ready for training on ``device``.

    An image folder is read at ``image_size`` by ``resize``, in memory or streamed as
    ``loader`` says (:func:`netslim.data.imagefolder.open_imagefolder`); the others load as
    :func:`load_dataset` loads them, the first torchrun process downloading CIFAR while the
    others wait, and move to ``device``.
    """
    if name == "imagefolder":
        if root is None:
            raise NetslimError("the imagefolder dataset needs a root folder (--data-root DIR)")
        return open_imagefolder(
            root,
            image_size=image_size,
            resize=resize,
            loader=loader,
            device=device,
            train_size=train_size,
            test_size=test_size,
            workers=workers,
        )
    with distributed.main_first():  # one process downloads, the others then read
        data = load_dataset(
            name, root, seed=seed, download=download, train_size=train_size, test_size=test_size
        )
    return data.to(device)


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
        if root is None:
            raise NetslimError("the imagefolder dataset needs a root folder (--data-root DIR)")
        return load_imagefolder(root, train_size=train_size, test_size=test_size)
    if name == "synthetic":
        return make_synthetic(
            n_train=SYNTHETIC_TRAIN_SIZE if train_size is None else train_size,
            n_test=SYNTHETIC_TEST_SIZE if test_size is None else test_size,
            seed=seed,
        )

    data = load_cifar(CIFAR[name], DEFAULT_ROOT if root is None else Path(root), download)
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
