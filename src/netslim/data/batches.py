"""A dataset as one uint8 tensor on its device, and its batches: normalised, and augmented
with batched tensor ops.

There is no DataLoader and no per-sample PIL transform: each batch is gathered by index,
padded, cropped and flipped with batched tensor ops, then normalised to float32.  This is
the approach of Keller Jordan's airbench loader, and on a GPU it makes data loading
essentially free. :mod:`netslim.data` and :mod:`netslim.data.imagefolder` make the datasets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from netslim.errors import NetslimError
from netslim.runtime import distributed


class ImageData(Protocol):
    """What training, evaluation, pruning and recalibration need of a data set, in memory
    (:class:`Dataset`) or streamed from disk (:class:`netslim.data.imagefolder.ImageFolderStream`):
    nobody asks which it is."""

    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_labels: torch.Tensor
    test_labels: torch.Tensor

    @property
    def device(self) -> torch.device: ...

    @property
    def image_size(self) -> int: ...

    def to(self, device: torch.device | str) -> ImageData: ...

    def train_batches(
        self, batch_size: int, generator: torch.Generator, *, shard: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of augmented, normalised training batches in the order ``generator``
        draws; with ``shard``, this process's share of each under torchrun."""

    def eval_batches(
        self, batch_size: int, *, split: str = "test"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The ``"test"`` or ``"train"`` split in order, normalised, not augmented."""

    def test_shard(self, start: int, stop: int) -> ImageData:
        """The same data with only test images ``start:stop`` (one process's block)."""


@dataclass
class Dataset:
    """A train and a test split, each one uint8 image tensor plus int64 labels.

    Images are ``[N, 3, 32, 32]`` uint8 in NCHW layout; ``mean`` and ``std`` are per-channel
    statistics on the 0..1 scale, used by :func:`normalize`.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def device(self) -> torch.device:
        """The device the images live on (and batches are made on)."""
        return self.train_images.device

    @property
    def image_size(self) -> int:
        """The images' side in pixels (they are square)."""
        return int(self.train_images.shape[-1])

    def to(self, device: torch.device | str) -> Dataset:
        """Return a copy with all four tensors moved to ``device``."""
        return replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
        )

    def train_batches(
        self, batch_size: int, generator: torch.Generator, *, shard: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch (:func:`train_batches`); with ``shard``, this process's slice of each
        batch (:func:`netslim.runtime.distributed.shard_batches`)."""
        batches = train_batches(self, batch_size, generator)
        return distributed.shard_batches(batches) if shard else batches

    def eval_batches(
        self, batch_size: int, *, split: str = "test"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A split in order (:func:`eval_batches`)."""
        return eval_batches(self, batch_size, split=split)

    def test_shard(self, start: int, stop: int) -> Dataset:
        """A copy with only test images ``start:stop``."""
        return replace(
            self, test_images=self.test_images[start:stop], test_labels=self.test_labels[start:stop]
        )


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float32 ``(x / 255 - mean) / std`` per channel, same device.

    ``mean`` and ``std`` may already be float32 tensors on the images' device, which saves
    a host-to-device copy per batch (the batch iterators below do that).
    """
    mean = _channel_tensor(mean, images.device)
    std = _channel_tensor(std, images.device)
    return (images.float() / 255 - mean) / std


def _channel_tensor(values: Sequence[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    # as_tensor returns a tensor that is already right as it is, without copying.
    return torch.as_tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def augment(
    images: torch.Tensor, generator: torch.Generator, *, start: int = 0, total: int | None = None
) -> torch.Tensor:
    """Random-crop-with-padding and horizontal flip, the standard CIFAR augmentation.

    Each image is zero-padded by 4 pixels on every side (black, as torchvision's ``Pad(4)``
    does before normalisation), cropped back to 32x32 at a random offset, and mirrored
    with probability 0.5; ``[B, 3, 32, 32]`` uint8 in, same shape and dtype out.

    Random numbers come from ``generator``, which must live on the images' device (a CUDA
    generator for CUDA images).  They are drawn in this order, one per image each: the
    column offset ``torch.randint(0, 9)``, the row offset ``torch.randint(0, 9)``, then
    ``torch.rand() < 0.5`` for the flip.

    ``images`` may also be rows ``start:start + B`` of a batch of ``total`` images (one
    process's share of a global batch, see :mod:`netslim.runtime.distributed`): the random numbers
    are then drawn for all ``total`` images and the rows' own are used, so the share is
    augmented exactly as within the whole batch.
    """
    _check_generator(generator, images.device)
    device = images.device
    batch, channels, height, width = images.shape
    total = batch if total is None else total
    rows_of_batch = slice(start, start + batch)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    left = torch.randint(0, 9, (total,), generator=generator, device=device)[rows_of_batch]
    top = torch.randint(0, 9, (total,), generator=generator, device=device)[rows_of_batch]
    flip = (torch.rand(total, generator=generator, device=device) < 0.5)[rows_of_batch]

    # Crop and flip in one gather: image b takes padded rows top[b] + i and columns
    # left[b] + j, with j running backwards when the image is flipped.
    i = torch.arange(height, device=device)
    j = torch.arange(width, device=device)
    rows = top[:, None] + i  # [B, 32]
    cols = left[:, None] + torch.where(flip[:, None], width - 1 - j, j)  # [B, 32]
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    c = torch.arange(channels, device=device).view(1, -1, 1, 1)
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def train_batches(
    data: Dataset,
    batch_size: int,
    generator: torch.Generator,
    *,
    augment_images: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch over the training split in a random order drawn from ``generator``.

    Yields ``(images, labels)``: normalised float32 ``[B, 3, 32, 32]`` (augmented if
    ``augment_images``) and int64 ``[B]``, on the data's device.  ``generator`` must live
    on that device too; the same generator state gives the same epoch.
    """
    _check_batch_size(batch_size)
    images, labels = data.train_images, data.train_labels
    _check_generator(generator, images.device)
    mean, std = _channel_tensor(data.mean, images.device), _channel_tensor(data.std, images.device)
    n = len(images)
    order = torch.randperm(n, generator=generator, device=images.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        batch = images[index]
        if augment_images:
            batch = augment(batch, generator)
        yield normalize(batch, mean, std), labels[index]


def eval_batches(
    data: Dataset, batch_size: int, *, split: str = "test"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The ``"test"`` or ``"train"`` split in order, normalised, without augmentation."""
    _check_batch_size(batch_size)
    if split == "test":
        images, labels = data.test_images, data.test_labels
    elif split == "train":
        images, labels = data.train_images, data.train_labels
    else:
        raise NetslimError(f"unknown split {split!r}; choose 'test' or 'train'")
    mean, std = _channel_tensor(data.mean, images.device), _channel_tensor(data.std, images.device)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        yield normalize(batch, mean, std), labels[start : start + batch_size]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches one epoch over ``n`` samples yields."""
    _check_batch_size(batch_size)
    return n // batch_size if drop_last else -(-n // batch_size)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise NetslimError(f"batch size must be a positive whole number, got {batch_size!r}")


def _check_generator(generator: torch.Generator, device: torch.device) -> None:
    # torch's own error for a mismatch is cryptic; say how to fix it.
    if generator.device.type != device.type:
        raise NetslimError(
            f"the random generator is on {generator.device} but the data is on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )
