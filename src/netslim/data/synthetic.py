"""Built-in synthetic data: CIFAR-like 32x32 shapes in random colours, generated in a second.

Ten shape and texture classes drawn with random colours, so a CNN must look at shape, not
colour; deterministic from the seed, block by block, so the first n images of a larger set
are those of a smaller one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from netslim.data.batches import Dataset, num_batches
from netslim.errors import NetslimError
from netslim.limits import check_memory

SYNTHETIC_TRAIN_SIZE = 10000
SYNTHETIC_TEST_SIZE = 2000


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
    for flag, value, least in (
        ("--train-size", n_train, 1),
        ("--test-size", n_test, 1),
        ("--seed", seed, 0),
    ):
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
