"""An Ultralytics ``data.yaml`` and the files it lists, checked before Ultralytics reads them.

Ultralytics skips, with a warning, each image it cannot read and each label file it finds
wrong, then trains on what is left (a class out of range, a NaN: those images simply vanish
from training), or ends in "No valid images found" when nothing is left. netslim refuses
such a data set in one line instead, naming the first bad file, what is wrong in it, and how
many images are bad (an image is bad when it, or its label file, is).

What is checked, for the ``train`` and ``val`` splits, found as Ultralytics finds them
(its ``path`` rule, folders searched recursively, ``.txt`` lists of images, each image's
label file at ``.../labels/NAME.txt`` beside ``.../images/NAME.jpg``):

* **every label file**, every line: numbers, finite; a whole class from 0 to the number of
  ``names`` minus 1; ``class x y w h`` (a box), ``class x1 y1 x2 y2 ...`` (a polygon, three
  points or more) or, with ``kpt_shape``, a box and its keypoints; normalised coordinates
  from 0 to 1 (with Ultralytics' own 1% of slack); boxes and polygons of positive width and
  height; boxes and polygons not mixed in one file; the line layout the model's task needs;
* **every image**: opened by PIL (a format Ultralytics reads, at least 10 pixels a side,
  under PIL's decompression-bomb limit) and verified (PNG: every chunk's CRC); a JPEG that
  does not end with its end marker is decoded in full.

An image without a label file is a background image, as for Ultralytics, but a split none
of whose images has one is refused. On the 2,000 + 500-image CIFAR detection set (128 px
JPEGs) the whole check takes 0.25 to 0.5 s on 2 busy CPUs, 0.1 to 0.2 ms an image
(``bench/yolo_data_check.py``).
"""

from __future__ import annotations

import glob
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from ultralytics.data.utils import (
    IMG_FORMATS,
    img2label_paths,
)
from ultralytics.utils import DATASETS_DIR, patches

from netslim.errors import NetslimError

# PIL's own Image.open. Ultralytics replaces it with one that, on a file PIL does not
# recognise, logs a warning and installs (or imports) pi-heif before trying again: a file
# that is no image at all would print Ultralytics' warning before netslim's one line.
PIL_OPEN = getattr(patches, "_image_open", Image.open)
HEIF = ("heic", "heif")  # these only through Ultralytics' opener (pi-heif reads them)

SLACK = 0.01  # Ultralytics accepts normalised coordinates from -0.01 to 1.01 (rounding)
MIN_SIDE = 10  # Ultralytics skips images under 10 pixels a side
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Layout:
    """What a label line must hold: the number of classes, the keypoints (``kpt_shape``:
    points per object, 2 or 3 values each) and the model's task (None: any layout)."""

    classes: int
    keypoints: tuple[int, int] | None = None
    task: str | None = None


def check_data(data: Path, task: str | None = None) -> None:
    """Refuse, in one line, a ``data.yaml`` that does not exist, lists no images, or whose
    images or label files Ultralytics would skip (see the module docs). ``task`` is the
    model's (``"detect"``, ``"segment"``, ...; None: any label layout; ``"classify"``: no
    label files)."""
    data = Path(data)
    spec = read_spec(data)
    layout = Layout(class_count(spec, data), keypoint_shape(spec, data), task)
    if task == "pose" and layout.keypoints is None:
        raise NetslimError(f"--data {data}: a pose model needs kpt_shape: [points, 2 or 3]")
    bad, first, total = 0, "", 0
    for split in SPLITS:
        images = split_images(spec, data, split)
        labels = [None] * len(images) if task == "classify" else label_files(images, data, split)
        for image, label in zip(images, labels):
            problem = image_problem(image) or (label and label_problem(label, layout))
            if problem:
                bad, first = bad + 1, first or problem
        total += len(images)
    if bad:
        raise NetslimError(
            f"--data {data}: {bad} of its {total} images {'is' if bad == 1 else 'are'} bad (the "
            "image or its label file); "
            f"the first: {first}; fix or remove them"
        )


def read_spec(data: Path) -> dict[str, Any]:
    """The ``data.yaml``'s contents, with ``train`` and ``val`` entries."""
    if not data.is_file():
        raise NetslimError(f"--data {data} does not exist; give an Ultralytics data.yaml")
    import yaml  # Ultralytics depends on PyYAML

    try:
        spec = yaml.safe_load(data.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise NetslimError(f"--data {data} is not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(spec, dict) and "val" not in spec and "validation" in spec:
        spec["val"] = spec["validation"]  # Ultralytics' other name for it
    if not isinstance(spec, dict) or "train" not in spec or "val" not in spec:
        raise NetslimError(
            f"--data {data} needs 'train' and 'val' entries (Ultralytics' data.yaml)"
        )
    for key in SPLITS:
        entry = spec[key]
        if not (
            isinstance(entry, str)
            or (isinstance(entry, list) and entry and all(isinstance(e, str) for e in entry))
        ):
            raise NetslimError(
                f"--data {data}: its {key} entry must be a path or a list of paths, got {entry!r}"
            )
    if spec.get("path") is not None and not isinstance(spec["path"], str):
        raise NetslimError(f"--data {data}: its path entry must be a folder, got {spec['path']!r}")
    return spec


def class_count(spec: dict[str, Any], data: Path) -> int:
    """The number of classes ``names`` (or ``nc``) declares, as Ultralytics reads it."""
    names, nc = spec.get("names"), spec.get("nc")
    if names is None and nc is None:
        raise NetslimError(f"--data {data} names no classes; add names: [cat, dog, ...] (or nc: N)")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
        raise NetslimError(f"--data {data}: nc must be a whole number of classes >= 1, got {nc!r}")
    if names is None:
        return nc
    if not isinstance(names, (list, dict)) or not names:
        raise NetslimError(
            f"--data {data}: names must be a list or a dict 0: name, 1: name, ..., got {names!r}"
        )
    if isinstance(names, dict) and sorted(map(str, names)) != sorted(map(str, range(len(names)))):
        raise NetslimError(
            f"--data {data}: the keys of names must be the classes 0 to {len(names) - 1}, "
            f"got {', '.join(map(str, names))}"
        )
    if nc is not None and nc != len(names):
        raise NetslimError(f"--data {data}: nc is {nc} but names lists {len(names)} classes")
    return len(names)


def keypoint_shape(spec: dict[str, Any], data: Path) -> tuple[int, int] | None:
    """``kpt_shape`` (points per object, 2 or 3 values each), or None."""
    shape = spec.get("kpt_shape")
    if shape is None:
        return None
    valid = (
        isinstance(shape, list)
        and len(shape) == 2
        and all(type(v) is int for v in shape)
        and shape[0] >= 1
        and shape[1] in (2, 3)
    )
    if not valid:
        raise NetslimError(
            f"--data {data}: kpt_shape must be [points, 2 or 3], e.g. [17, 3], got {shape!r}"
        )
    return shape[0], shape[1]


def split_images(spec: dict[str, Any], data: Path, split: str) -> list[str]:
    """The images of ``split``, found where and as Ultralytics finds them."""
    images: list[str] = []
    paths = split_paths(spec, data, split)
    for path in paths:
        if path.is_dir():
            found = glob.glob(str(Path(glob.escape(path)) / "**" / "*.*"), recursive=True)
        elif path.is_file():  # a list of images; "./x.jpg" is relative to the list
            lines = path.read_text(encoding="utf-8-sig", errors="replace").strip().splitlines()
            parent = str(path.parent) + os.sep
            found = [x.replace("./", parent, 1) if x.startswith("./") else x for x in lines]
        else:
            raise NetslimError(
                f"--data {data}: its {split} split {path} does not exist; fix the data.yaml's "
                f"{split} (and path) entries"
            )
        images += [f for f in found if f.rpartition(".")[2].lower() in IMG_FORMATS]
    if not images:
        raise NetslimError(
            f"--data {data}: its {split} split ({', '.join(map(str, paths))}) holds no images"
        )
    return sorted(images)


def split_paths(spec: dict[str, Any], data: Path, split: str) -> list[Path]:
    """The folders or lists ``split`` names, resolved by Ultralytics' rule: under ``path``
    (the data.yaml's folder if none; a relative one from the current folder if it exists
    there, else from Ultralytics' datasets_dir)."""
    root = Path(spec.get("path") or data.resolve().parent)
    if not root.exists() and not root.is_absolute():
        root = (DATASETS_DIR / root).resolve()
    entry = spec[split]
    if isinstance(entry, list):
        return [(root / e).resolve() for e in entry]
    path = (root / entry).resolve()
    if not path.exists() and entry.startswith("../"):  # Ultralytics retries without "../"
        path = (root / entry[3:]).resolve()
    return [path]


def label_files(images: list[str], data: Path, split: str) -> list[str]:
    """Each image's label file, as Ultralytics names it; NetslimError when none of them
    exists (Ultralytics would train on background only, or validate against nothing)."""
    labels = img2label_paths(images)
    if not any(os.path.isfile(label) for label in labels):
        raise NetslimError(
            f"--data {data}: none of the {len(images)} images of its {split} split has a label "
            f"file (Ultralytics reads {images[0]}'s from {labels[0]})"
        )
    return labels


# -- images ---------------------------------------------------------------------------------


def image_problem(path: str) -> str | None:
    """What makes ``path`` an image Ultralytics would skip, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opener = Image.open if path.rpartition(".")[2].lower() in HEIF else PIL_OPEN
            with opener(path) as image:
                image.verify()  # the file's structure (PNG: every chunk's CRC), no decoding
                kind, (width, height) = image.format or "", image.size
    except FileNotFoundError:
        return f"{path} does not exist"
    except Image.UnidentifiedImageError:
        return f"{path} is not an image (PIL recognises no image format in it)"
    except Exception as e:  # PIL raises many kinds for a damaged file
        return f"{path} is a damaged image ({_first_line(e)})"
    if kind.lower() not in IMG_FORMATS | {"jpeg2000"}:
        return f"{path} is a {kind} file, which Ultralytics does not read"
    if min(width, height) < MIN_SIDE:
        return (
            f"{path} is {width}x{height} pixels; Ultralytics skips images under {MIN_SIDE} a side"
        )
    if width * height > Image.MAX_IMAGE_PIXELS:
        return (
            f"{path} is {width}x{height} pixels, over PIL's decompression-bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS:,}; resize it"
        )
    if kind == "JPEG" and not _ends_jpeg(path):
        return _decode_problem(path)
    return None


def _ends_jpeg(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read() == b"\xff\xd9"


def _decode_problem(path: str) -> str | None:
    """A JPEG without its end marker: fine if it decodes in full (bytes after the end),
    bad if truncated."""
    try:
        with PIL_OPEN(path) as image:
            image.load()
    except Exception as e:
        return f"{path} is a damaged JPEG that does not decode ({_first_line(e)})"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# -- labels ---------------------------------------------------------------------------------


def label_problem(path: str, layout: Layout) -> str | None:
    """What makes the label file ``path`` one Ultralytics would skip (or misread), or None;
    a missing file is a background image."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        return f"{path} cannot be read as text ({_first_line(e)})"
    kinds: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        values = line.split()
        if not values:
            continue
        problem, kind = line_problem(values, layout)
        if not problem and {kind, *kinds} >= {"box", "polygon"}:  # Ultralytics refuses the file
            others = "polygons" if kind == "box" else "boxes"
            problem = f"a {kind} in a file of {others}; use one kind per file"
        if problem:
            return f"{path} line {number}: {problem}"
        kinds.add(kind)
    return None


def line_problem(values: list[str], layout: Layout) -> tuple[str | None, str]:
    """What is wrong in one label line (None if nothing), and its kind: box, polygon, pose."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return f"{next(v for v in values if not _is_float(v))!r} is not a number", ""
    if not all(math.isfinite(x) for x in numbers):
        return "a NaN or infinite value", ""
    cls = numbers[0]
    if not cls.is_integer() or not 0 <= cls < layout.classes:
        return (
            f"class {values[0]} is not one of the {layout.classes} classes the data.yaml "
            f"names (0 to {layout.classes - 1})"
        ), ""
    kind = line_kind(len(numbers), layout)
    if kind is None:
        return f"{len(numbers)} values, but {expected_layout(layout)}", ""
    coordinates = numbers[1:5] if kind != "polygon" else numbers[1:]
    if kind == "pose":  # the keypoints' x and y too (not their visibility)
        points, size = layout.keypoints
        coordinates += [v for i, v in enumerate(numbers[5:]) if i % size < 2]
    if not all(-SLACK <= v <= 1 + SLACK for v in coordinates):
        return "a coordinate outside the image (normalised coordinates are from 0 to 1)", kind
    width, height = _extent(numbers[1:], kind)
    if width <= 0 or height <= 0:
        return f"a {'polygon' if kind == 'polygon' else 'box'} of zero or negative size", kind
    return None, kind


def line_kind(count: int, layout: Layout) -> str | None:
    """``box``, ``polygon`` or ``pose`` for a line of ``count`` values, None if the layout
    (and the model's task) allows none of them."""
    pose = 5 + layout.keypoints[0] * layout.keypoints[1] if layout.keypoints else None
    if layout.task == "pose":
        return "pose" if count == pose else None
    if layout.task == "obb":
        return "polygon" if count == 9 else None
    if count == pose:
        return "pose"
    if count == 5 and layout.task != "segment":
        return "box"
    if count >= 7 and count % 2 == 1:
        return "polygon"
    return None


def expected_layout(layout: Layout) -> str:
    """The label lines ``layout`` takes, in words."""
    box, polygon = "class x y w h", "class x1 y1 x2 y2 x3 y3 ... (a polygon)"
    if layout.task == "pose" and layout.keypoints:
        points, size = layout.keypoints
        return f"a pose line is class x y w h and {points} keypoints of {size} values"
    if layout.task == "obb":
        return "an oriented box is class x1 y1 x2 y2 x3 y3 x4 y4"
    if layout.task == "segment":
        return f"a segment model's line is {polygon}"
    return f"a line is {box} or {polygon}"


def _extent(values: list[float], kind: str) -> tuple[float, float]:
    """Width and height of a box, or of a polygon's bounding box."""
    if kind != "polygon":
        return values[2], values[3]
    xs, ys = values[0::2], values[1::2]
    return max(xs) - min(xs), max(ys) - min(ys)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
