"""Export a network to a file that runs without netslim, and check that it does.

Three formats, picked by the file's suffix or by name:

* ``onnx`` (``.onnx``): for onnxruntime, TensorRT, OpenVINO and the rest. Written by
  PyTorch's TorchScript-based ONNX exporter (``torch.onnx.export(..., dynamo=False)``):
  on netslim's networks it gives the same graphs as the torch.export-based one, offline,
  in 2-5 s instead of 20-130 s per network on a 2-core CPU. Input ``images``
  (N x 3 x H x W, N free), output ``logits``.
* ``pt2`` (``.pt2``): a ``torch.export`` program, loaded by ``torch.export.load(path)``
  and run by ``.module()(images)``; the batch dimension is free.
* ``official`` (``.pth.tar``): the paper's own ``{'cfg', 'state_dict'}`` checkpoint, which
  its ``main.py --refine`` and model classes read (:func:`netslim.checkpoint.save_official`;
  BatchNorm is kept, as the paper's models have it). Checked by reading it back.

The network is exported in eval mode in fp32 on the CPU, with every BatchNorm folded into
the layer before it where there is one (:func:`netslim.engine.fold.fold_bn`). The file is made in
memory, **checked** -- loaded by its own runtime and compared with the PyTorch network on
random batches of 1 and 7 images -- and only then written (atomically), so a path holds
a checked file or nothing new.
"""

from __future__ import annotations

import copy
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from netslim.engine.fold import fold_bn
from netslim.engine.stats import nonfinite_tensors
from netslim.errors import NetslimError
from netslim.files import atomic_write
from netslim.limits import check_image_size
from netslim.models.external import for_deployment

DEFAULT_OPSET = 18  # onnxruntime >= 1.14 runs it; every op netslim's networks use is in it
OPSETS = range(9, 21)  # what the TorchScript-based exporter writes
TOLERANCE = 1e-4  # largest accepted relative difference, fp32
CHECK_BATCHES = (1, 7)
EXTRA_HINT = 'install the optional dependencies: pip install "netslim[export]"'

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Format:
    """How to write one file format and how to run what was written.

    Attributes:
        suffix: the file suffix that selects this format.
        write: ``(model, example_images, opset) -> file contents``.
        load: ``file contents -> function from images to logits``, for the check.
        foldable: whether the format takes a network with BatchNorm folded away (a
            checkpoint layout that must keep its BatchNorms says False).
    """

    suffix: str
    write: Callable[[nn.Module, torch.Tensor, int], bytes]
    load: Callable[[bytes], Runner]
    foldable: bool = True


@dataclass
class ExportResult:
    """What :func:`export` wrote: the path, format, ONNX opset and the checked difference."""

    path: Path
    format: str
    opset: int | None
    folded: bool
    max_rel_diff: float


def _import_onnxruntime():
    try:
        import onnx  # noqa: F401  (the exporter writes through it)
        import onnxruntime
    except ImportError as e:
        raise NetslimError(f"ONNX export needs onnx and onnxruntime ({e}); {EXTRA_HINT}") from None
    return onnxruntime


def _onnx_write(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    _import_onnxruntime()
    if opset not in OPSETS:
        raise NetslimError(
            f"ONNX opset must be from {OPSETS[0]} to {OPSETS[-1]} (default {DEFAULT_OPSET}), got {opset}"
        )
    with torch.no_grad():
        count = len(output_tensors(model(example)))
    # one output is "logits" (a classifier); several (a YOLO segmenter's boxes and masks) are
    # output0, output1, ... as Ultralytics' own export names them
    names = ["logits"] if count == 1 else [f"output{i}" for i in range(count)]
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=names,
                          dynamic_axes={name: {0: "batch"} for name in ["images", *names]})  # fmt: skip
    return buffer.getvalue()


def output_tensors(output) -> list[torch.Tensor]:
    """The tensors of a network's output, in order: a tensor, or nested tuples, lists, dicts."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    return []


def onnx_session(contents: bytes | str | Path, threads: int | None = None):
    """An onnxruntime CPU session on an ONNX file (its path or contents)."""
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source = str(contents) if isinstance(contents, Path) else contents
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _onnx_load(contents: bytes) -> Runner:
    session = onnx_session(contents)
    return lambda x: [torch.from_numpy(a) for a in session.run(None, {"images": x.numpy()})]


def _pt2_write(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _pt2_load(contents: bytes) -> Runner:
    module = torch.export.load(io.BytesIO(contents)).module()
    return lambda x: module(x)


def _official_write(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    from netslim.official import official_checkpoint  # says why a network does not fit

    buffer = io.BytesIO()
    torch.save(official_checkpoint(model), buffer)
    return buffer.getvalue()


def _official_load(contents: bytes) -> Runner:
    from netslim.checkpoint import model_from_checkpoint

    checkpoint = torch.load(io.BytesIO(contents), map_location="cpu", weights_only=True)
    module = model_from_checkpoint(checkpoint, "the written file").eval()
    return lambda x: module(x)


FORMATS: dict[str, Format] = {
    "onnx": Format(".onnx", _onnx_write, _onnx_load),
    "pt2": Format(".pt2", _pt2_write, _pt2_load),
    "official": Format(".pth.tar", _official_write, _official_load, foldable=False),
}


def pick_format(path: str | Path, format: str | None = None) -> str:
    """The format named by ``format``, else the one ``path``'s suffix selects."""
    if format is not None:
        if format not in FORMATS:
            raise NetslimError(
                f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}"
            )
        return format
    for name, spec in FORMATS.items():
        if str(path).lower().endswith(spec.suffix):
            return name
    suffixes = ", ".join(f"{spec.suffix} ({name})" for name, spec in FORMATS.items())
    raise NetslimError(
        f"cannot tell the export format of {path} from its suffix; name the file with one of "
        f"{suffixes} or pass --format"
    )


def _check_writable(path: Path) -> None:
    """Fail before the (slow) export when ``path`` cannot be written."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # atomic_write creates the missing folders below it
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise NetslimError(f"cannot write {path}: {parent} is not a writable folder")


@torch.no_grad()
def max_relative_difference(run: Runner, model: nn.Module, image_size: int,
                            batches: tuple[int, ...] = CHECK_BATCHES, seed: int = 0) -> float:  # fmt: skip
    """``max |run(x) - model(x)| / max |model(x)|`` over random batches of the given sizes.

    A network with several outputs (a segmenter's boxes and masks) is compared output by output.
    """
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batches:
        x = torch.randn(batch, 3, image_size, image_size, generator=generator)
        expected, got = output_tensors(model(x)), output_tensors(run(x))
        if [t.shape for t in got] != [t.shape for t in expected] or not expected:
            return float("inf")
        for want, have in zip(expected, got):
            scale = want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)
            diff = ((have - want).abs().max() / scale).item()
            # NaN compares false with everything, so max() would drop it: a NaN is a failure
            worst = diff if not math.isfinite(diff) else max(worst, diff)
            if not math.isfinite(worst):
                return float("inf")
    return worst


def export(
    model: nn.Module,
    path: str | Path,
    format: str | None = None,
    *,
    fold: bool = True,
    opset: int = DEFAULT_OPSET,
    image_size: int = 32,
    tolerance: float = TOLERANCE,
) -> ExportResult:
    """Write ``model`` to ``path`` as a file that runs without netslim, after checking it.

    Args:
        model: any network netslim builds or loads, pruned or not (left unchanged).
        path: the file to write; its suffix picks the format unless ``format`` is given.
        format: one of :data:`FORMATS` (``"onnx"``, ``"pt2"``, ``"official"``).
        fold: fold each BatchNorm into the conv or linear layer before it.
        opset: the ONNX opset to write (ONNX only).
        image_size: height and width of the input images.
        tolerance: the largest relative difference from the PyTorch network accepted.

    Raises:
        NetslimError: unknown format, unwritable path, an image size out of bounds, a
            network holding NaN or Inf, missing onnx/onnxruntime, a failed export, or a file
            whose outputs differ from the network's by more than ``tolerance`` or are not
            finite (nothing is written then).

    Example::

        >>> netslim.export(netslim.load("pruned.pth"), "pruned.onnx")
    """
    path = Path(path)
    name = pick_format(path, format)
    spec = FORMATS[name]
    fold = fold and spec.foldable
    check_image_size(image_size)
    bad = nonfinite_tensors(model)
    if bad:
        raise NetslimError(
            f"the network holds NaN or Inf in {len(bad)} of its tensors (e.g. {bad[0]}): its "
            f"outputs mean nothing, so it is not exported; export an earlier checkpoint"
        )
    _check_writable(path)
    reference = for_deployment(copy.deepcopy(model).float().cpu().eval())
    deployed = fold_bn(reference, (1, 3, image_size, image_size)) if fold else reference
    example = torch.randn(2, 3, image_size, image_size)  # batch 2: the exporters keep N free
    try:
        contents = spec.write(deployed, example, opset)
    except NetslimError:
        raise
    except Exception as e:  # the exporters fail in many ways; say which step and why
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise NetslimError(f"{name} export of {type(model).__name__} failed: {detail}") from None
    diff = max_relative_difference(spec.load(contents), reference, image_size)
    if not diff <= tolerance:
        raise NetslimError(
            f"the exported {name} file differs from the PyTorch network by {diff:.3g} "
            f"(relative, more than {tolerance:g}); nothing written to {path}"
        )
    try:
        atomic_write(path, lambda f: f.write(contents))
    except OSError as e:
        raise NetslimError(f"cannot write {path}: {e.strerror or e}") from None
    return ExportResult(path, name, opset if name == "onnx" else None, fold, diff)
