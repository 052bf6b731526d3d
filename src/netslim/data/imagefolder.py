"""Your own images: a ``train/<class>/*.jpg``, ``val/<class>/*.jpg`` folder, in memory or streamed.

Every image is decoded with Pillow, converted to RGB and brought to ``image_size`` squared
pixels by one of :data:`RESIZE_POLICIES`:

* ``"crop"`` (default): scale the shorter side to ``image_size``, then cut the centre square;
* ``"stretch"``: scale both sides to ``image_size``, ignoring the aspect ratio.

Class names are the ``train`` subfolders, sorted; label ``i`` is the ``i``-th name. The
validation folder may be called ``val`` or ``test`` and is the test split.

There are two ways to feed the images to training (see :func:`open_imagefolder`):

* **in memory** (:func:`load_imagefolder`): all images are decoded once into the uint8
  :class:`~netslim.data.batches.Dataset` that the built-in datasets use, and training runs from the
  device as fast as for CIFAR;
* **streaming** (:class:`ImageFolderStream`): for datasets that do not fit, each batch is
  decoded by DataLoader worker processes and only this process's share of it is read (see
  :mod:`netslim.runtime.distributed`).

The two give the same batches for the same seed: a stream draws the epoch's permutation
from the same generator as :func:`netslim.data.batches.train_batches`, and applies the same batched
:func:`netslim.data.batches.augment` to each decoded batch, in the main process, in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

from netslim import limits
from netslim.config import LOADERS, RESIZE_POLICIES
from netslim.data.batches import Dataset, augment, normalize
from netslim.errors import NetslimError
from netslim.runtime import distributed

if TYPE_CHECKING:
    import PIL.Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
STATS_IMAGES = 500  # how many training images the mean and std are measured on


@dataclass(frozen=True)
class Listing:
    """The image files of a folder and their labels, in a fixed order."""

    classes: list[str]
    train_files: list[str]
    train_labels: list[int]
    test_files: list[str]
    test_labels: list[int]


def scan_imagefolder(
    root: str | Path, train_size: int | None = None, test_size: int | None = None
) -> Listing:
    """List ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``), sorted.

    ``train_size`` and ``test_size`` keep that many images of a split, evenly spaced
    through the sorted list, so that every class keeps its share.
    """
    root = Path(root)
    layout = f"expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"
    train_dir = root / "train"
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise NetslimError(f"{root} is not an image folder: {layout}")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise NetslimError(
            f"{train_dir} has {len(classes)} class folders, need at least 2; {layout}"
        )
    unknown = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and d.name not in classes)
    if unknown:
        raise NetslimError(
            f"{test_dir} has classes that {train_dir} lacks: {', '.join(unknown)}; "
            "every validation class needs training images"
        )
    train_files, train_labels = _list_split(train_dir, classes, require_all=True)
    test_files, test_labels = _list_split(test_dir, classes, require_all=False)
    if not test_files:
        raise NetslimError(f"{test_dir} holds no images; {layout}")
    train = _evenly_spaced(train_files, train_labels, train_size, "--train-size", train_dir)
    test = _evenly_spaced(test_files, test_labels, test_size, "--test-size", test_dir)
    return Listing(classes, *train, *test)


def _list_split(
    split_dir: Path, classes: list[str], require_all: bool
) -> tuple[list[str], list[int]]:
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = split_dir / name
        found = (
            sorted(
                str(p)
                for p in folder.glob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            if folder.is_dir()
            else []
        )
        if require_all and not found:
            raise NetslimError(
                f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                "add some or remove the folder"
            )
        files += found
        labels += [label] * len(found)
    return files, labels


def _evenly_spaced(
    files: list[str], labels: list[int], n: int | None, what: str, where: Path
) -> tuple[list[str], list[int]]:
    if n is None:
        return files, labels
    if n > len(files):
        raise NetslimError(f"{what} {n} but {where} has only {len(files)} images")
    keep = _spaced(len(files), n)
    return [files[i] for i in keep], [labels[i] for i in keep]


def _spaced(n: int, k: int) -> list[int]:
    """``k`` indices evenly spaced through ``range(n)``."""
    return [i * n // k for i in range(k)]


def _chunks(n: int, size: int) -> list[list[int]]:
    """``range(n)`` in consecutive index lists of ``size`` (the last may be shorter)."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def decode_image(path: str, image_size: int, resize: str = "crop") -> torch.Tensor:
    """One image file as uint8 ``[3, image_size, image_size]``, resized by ``resize``."""
    from PIL import Image  # Pillow comes with matplotlib; imported only when images are read

    try:
        with Image.open(path) as image:
            image = _to_rgb(image)
            width, height = image.size
            if resize == "stretch":
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            else:  # crop: shorter side to image_size, then the centre square
                scale = image_size / min(width, height)
                w = max(image_size, round(width * scale))
                h = max(image_size, round(height * scale))
                image = image.resize((w, h), Image.Resampling.BILINEAR)
                left, top = (w - image_size) // 2, (h - image_size) // 2
                image = image.crop((left, top, left + image_size, top + image_size))
            pixels = np.asarray(image, dtype=np.uint8)
    except Image.DecompressionBombError as e:  # a header declaring billions of pixels
        raise NetslimError(
            f"image {path} declares more pixels than Pillow decodes safely ({e}); it may be "
            "a decompression bomb: shrink it or remove it"
        ) from None
    except Exception as e:  # Pillow's errors for missing, truncated or odd files, or a
        # plugin's (Ultralytics, once imported, patches Image.open to try more formats)
        raise NetslimError(f"cannot read image {path} ({e}); fix or remove the file") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """``image`` as 8-bit RGB; ``convert("RGB")`` alone would clip wide grey values to white
    and float ones to black. Grey images wider than 8 bits are scaled to 0..255 from the
    range of their bit depth: 16 bits (Pillow's modes ``I;16*``, and ``I`` for a 16-bit PNG
    or TIFF) from 0..65535, 32-bit integers (mode ``I``) from 0..2**31 - 1, negative values
    to 0. Float images (mode ``F``) are read as 0..1 when every value lies there, else as
    0..255; any other range (or NaN) is refused, since no scale can be told from it."""
    from PIL import Image

    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        top = 65535 if mode != "I" or _bits_per_sample(image) == 16 else 2**31 - 1
        wide = np.asarray(image).astype(np.float64) * (255 / top)
        image = Image.fromarray(np.clip(np.rint(wide), 0, 255).astype(np.uint8))
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(values).all() and low >= 0 and high <= 255):
            raise ValueError(
                f"float pixels from {low:g} to {high:g}, neither 0..1 nor 0..255; save it as "
                "8 or 16-bit integers"
            )
        scale = 255.0 if high <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _bits_per_sample(image: PIL.Image.Image) -> int | None:
    """What a file says of its bit depth: a PNG's mode ``I`` is 16-bit, a TIFF's tag 258."""
    if image.format == "PNG":
        return 16
    tags = getattr(image, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    return int(bits[0] if isinstance(bits, tuple) else bits) if bits else None


class _DecodedImages(torch.utils.data.Dataset):
    """Files decoded on demand: what DataLoader workers run."""

    def __init__(self, files: list[str], labels: torch.Tensor, image_size: int, resize: str):
        self.files, self.labels = files, labels
        self.image_size, self.resize = image_size, resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_image(self.files[i], self.image_size, self.resize), self.labels[i]


def _decoded_batches(
    images: _DecodedImages, batches: list[list[int]], workers: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 images and labels of each index list in ``batches``, decoded by ``workers``."""
    loader = DataLoader(
        images, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda"
    )
    try:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    except NetslimError as e:  # from a worker: keep the message, drop the worker's traceback
        raise NetslimError(str(e).strip().splitlines()[-1].split("NetslimError: ")[-1]) from None


def _decode_all(
    files: list[str], labels: list[int] | torch.Tensor, image_size: int, resize: str, workers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``files`` decoded into one uint8 tensor on the CPU, with their labels."""
    images = _DecodedImages(files, torch.as_tensor(labels), image_size, resize)
    batches = _decoded_batches(images, _chunks(len(files), 256), workers, torch.device("cpu"))
    x, y = zip(*batches)
    return torch.cat(x), torch.cat(y)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    std, mean = torch.std_mean(images.float() / 255, dim=(0, 2, 3))
    flat = [c for c, value in zip("RGB", std.tolist()) if not value >= 1 / 255]
    if flat:  # normalising by it would blow every pixel up (by infinity for a 0)
        raise NetslimError(
            f"the {len(images)} training images measured vary by less than one grey level in "
            f"channel {', '.join(flat)} (pixel std {min(std.tolist()):.2g}): they are blank "
            "or constant, and normalising by that std would divide by (nearly) zero; check "
            "the images under train/"
        )
    return tuple(mean.tolist()), tuple(std.tolist())


def _stats_rows(n: int) -> list[int]:
    """The training images (evenly spaced) that mean and std are measured on."""
    return _spaced(n, min(n, STATS_IMAGES))


def _check_options(image_size: int, resize: str, workers: int | None) -> int:
    """Raise NetslimError for a bad option; return the number of workers to use."""
    limits.check_image_size(image_size)
    if resize not in RESIZE_POLICIES:
        raise NetslimError(f"--resize must be one of {', '.join(RESIZE_POLICIES)}, got {resize!r}")
    if workers is not None and workers < 0:
        raise NetslimError(f"--workers must be >= 0 (0: decode in this process), got {workers}")
    if workers:
        limits.check_count(
            workers, "--workers", limits.cpu_count(), "the CPUs this process may use"
        )
    return default_workers() if workers is None else workers


def default_workers() -> int:
    """DataLoader workers per process: the CPUs shared among this machine's processes, at most 8."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // local))


def load_imagefolder(
    root: str | Path,
    *,
    image_size: int = 32,
    resize: str = "crop",
    train_size: int | None = None,
    test_size: int | None = None,
    workers: int | None = None,
) -> Dataset:
    """Decode a whole image folder into an in-memory uint8 :class:`~netslim.data.batches.Dataset`."""
    workers = _check_options(image_size, resize, workers)
    return _load(scan_imagefolder(root, train_size, test_size), image_size, resize, workers)


def _load(listing: Listing, image_size: int, resize: str, workers: int) -> Dataset:
    train_images, train_labels = _decode_all(
        listing.train_files, listing.train_labels, image_size, resize, workers
    )
    test_images, test_labels = _decode_all(
        listing.test_files, listing.test_labels, image_size, resize, workers
    )
    mean, std = _channel_stats(train_images[_stats_rows(len(train_images))])
    return Dataset(
        name="imagefolder",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=len(listing.classes),
        mean=mean,
        std=std,
    )


@dataclass
class ImageFolderStream:
    """An image folder read batch by batch from disk, for datasets larger than memory.

    It offers what training needs of a :class:`~netslim.data.batches.Dataset` (``name``,
    ``num_classes``, ``mean``, ``std``, the labels, ``device``, ``to``) plus its own
    :meth:`train_batches` and :meth:`eval_batches`.
    """

    name: str
    train_files: list[str]
    train_labels: torch.Tensor
    test_files: list[str]
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    resize: str
    workers: int
    device: torch.device

    def to(self, device: torch.device | str) -> ImageFolderStream:
        """The same stream, with batches delivered on ``device``."""
        return replace(self, device=torch.device(device))

    def test_shard(self, start: int, stop: int) -> ImageFolderStream:
        """The stream with only test images ``start:stop``."""
        return replace(
            self, test_files=self.test_files[start:stop], test_labels=self.test_labels[start:stop]
        )

    def train_batches(
        self, batch_size: int, generator: torch.Generator, *, shard: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's augmented batches, decoded from disk: with ``shard``, only this
        process's share of each (as :meth:`netslim.data.batches.Dataset.train_batches` gives
        it in memory, the images of the other shares never read), else whole batches."""
        n = len(self.train_files)
        order = torch.randperm(n, generator=generator, device=generator.device).cpu()
        world = distributed.world_size() if shard else 1
        shares = []  # (this process's indices, its first row in the batch, the batch's size)
        for first in range(0, n, batch_size):
            batch = order[first : first + batch_size]
            if world > 1 and len(batch) < world:
                continue  # as shard_batches: a process with no images could not run BatchNorm
            start, stop = distributed.shard_range(len(batch)) if shard else (0, len(batch))
            shares.append((batch[start:stop].tolist(), start, len(batch)))
        images = _DecodedImages(self.train_files, self.train_labels, self.image_size, self.resize)
        batches = _decoded_batches(images, [s[0] for s in shares], self.workers, self.device)
        for (_, start, total), (x, y) in zip(shares, batches):
            x = augment(x, generator, start=start, total=total)
            yield normalize(x, self.mean, self.std), y

    def eval_batches(
        self, batch_size: int, *, split: str = "test"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A split in order, normalised, without augmentation (as :func:`netslim.data.batches.eval_batches`)."""
        if split not in ("test", "train"):
            raise NetslimError(f"unknown split {split!r}; choose 'test' or 'train'")
        files = self.test_files if split == "test" else self.train_files
        labels = self.test_labels if split == "test" else self.train_labels
        images = _DecodedImages(files, labels, self.image_size, self.resize)
        chunks = _chunks(len(files), batch_size)
        for x, y in _decoded_batches(images, chunks, self.workers, self.device):
            yield normalize(x, self.mean, self.std), y


def stream_imagefolder(
    root: str | Path,
    *,
    image_size: int = 32,
    resize: str = "crop",
    train_size: int | None = None,
    test_size: int | None = None,
    workers: int | None = None,
) -> ImageFolderStream:
    """Open an image folder for streaming; only the mean and std images are decoded now."""
    workers = _check_options(image_size, resize, workers)
    return _stream(scan_imagefolder(root, train_size, test_size), image_size, resize, workers)


def _stream(listing: Listing, image_size: int, resize: str, workers: int) -> ImageFolderStream:
    labels = torch.tensor(listing.train_labels)
    rows = _stats_rows(len(listing.train_files))
    sample, _ = _decode_all(
        [listing.train_files[i] for i in rows], labels[rows], image_size, resize, workers
    )
    mean, std = _channel_stats(sample)
    return ImageFolderStream(
        name="imagefolder",
        train_files=listing.train_files,
        train_labels=labels,
        test_files=listing.test_files,
        test_labels=torch.tensor(listing.test_labels),
        num_classes=len(listing.classes),
        mean=mean,
        std=std,
        image_size=image_size,
        resize=resize,
        workers=workers,
        device=torch.device("cpu"),
    )


def fits_in_memory(n_images: int, image_size: int, device: torch.device) -> bool:
    """Whether ``n_images`` decoded uint8 images take at most a quarter of the memory they
    would live in: the machine's RAM, shared by the processes torchrun starts on it (each
    holds a copy), and the GPU's memory for a CUDA device."""
    need = n_images * 3 * image_size * image_size
    budgets = []
    if hasattr(os, "sysconf"):
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budgets.append(ram // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device.type == "cuda":
        budgets.append(torch.cuda.get_device_properties(device).total_memory)
    return all(need <= budget // 4 for budget in budgets)


def open_imagefolder(
    root: str | Path,
    *,
    image_size: int = 32,
    resize: str = "crop",
    loader: str = "auto",
    train_size: int | None = None,
    test_size: int | None = None,
    workers: int | None = None,
    device: torch.device | str = "cpu",
) -> Dataset | ImageFolderStream:
    """An image folder in memory or as a stream: ``loader`` is ``"memory"``, ``"stream"``
    or ``"auto"`` (in memory when :func:`fits_in_memory`)."""
    if loader not in LOADERS:
        raise NetslimError(f"--loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    workers = _check_options(image_size, resize, workers)
    listing = scan_imagefolder(root, train_size, test_size)  # listed once, whichever way
    if loader == "auto":
        n = len(listing.train_files) + len(listing.test_files)
        loader = "memory" if fits_in_memory(n, image_size, torch.device(device)) else "stream"
    if loader == "memory":
        return _load(listing, image_size, resize, workers).to(device)
    return _stream(listing, image_size, resize, workers).to(device)


def check_image_size(model: torch.nn.Module, image_size: int) -> None:
    """Raise NetslimError if ``model`` cannot classify ``image_size`` squared images.

    The CIFAR VGGs, for one, pool 32x32 inputs down to one vector and take no other size.
    One forward of a blank image on the model's device finds out.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    except RuntimeError as e:
        detail = str(e).splitlines()[0][:200]
        raise NetslimError(
            f"the network cannot take {image_size}x{image_size} images ({detail}); "
            "choose another --image-size (the CIFAR VGGs take 32)"
        ) from None
    finally:
        model.train(was_training)
