"""Export a network to a file that runs without netslim, and check that it does.

Three formats, picked by the file's suffix or by name:

* ``onnx`` (``.onnx``): for onnxruntime, TensorRT, OpenVINO and the rest. Written by
  PyTorch's TorchScript-based ONNX exporter (``torch.onnx.export(..., dynamo=False)``):
  on netslim's networks it gives the same graphs as the torch.export-based one, offline,
  in 2-5 s instead of 20-130 s per network on a 2-core CPU. Input ``images``
  (N x 3 x H x W, N free, H = W = the export's image size), output ``logits``.
* ``pt2`` (``.pt2``): a ``torch.export`` program, loaded by ``torch.export.load(path)``
  and run by ``.module()(images)``; the batch dimension is free.
* ``official`` (``.pth.tar``): the paper's own ``{'cfg', 'state_dict'}`` checkpoint, which
  its ``main.py --refine`` and model classes read (:func:`netslim.checkpoint.save_official`;
  BatchNorm is kept, as the paper's models have it). Checked by reading it back.

An Ultralytics model (a YOLO) is written by Ultralytics' own exporter instead
(:mod:`netslim.yolo.export`), in ONNX or any other format that exporter writes, with
Ultralytics' metadata (class names, stride, task, image size), so that ``YOLO(path)`` and
``yolo val`` run the file; it is checked the same way before it is written.

The network is exported in eval mode in fp32 on the CPU, with every BatchNorm folded into
the layer before it where there is one (:func:`netslim.engine.fold.fold_bn`). The file is made in
memory, **checked** -- loaded by its own runtime and compared with the PyTorch network on
differently distributed inputs (:func:`check_inputs`) -- and only then written (atomically),
so a path holds a checked file or nothing new.

An ONNX or ``.pt2`` file holds the operations the exporter saw the network run on one
example input. Where the forward pass reads tensor values (``if x.mean() > 0``, ``.item()``,
a boolean mask), another input may take another path, which the file does not hold. The
check therefore watches the PyTorch network for such reads while it runs the check inputs
(plain, shifted up and down, scaled up, zeros: inputs that take other branches), and
:func:`export` refuses the file when any of them gives other outputs, or writes it with a
warning naming where the forward pass read values when all of them agree.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import math
import os
import sys
import types
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from netslim.engine.fold import fold_bn
from netslim.engine.stats import nonfinite_tensors
from netslim.errors import NetslimError
from netslim.files import atomic_write
from netslim.limits import check_image_size
from netslim.models.external import for_deployment

DEFAULT_OPSET = 18  # onnxruntime >= 1.14 runs it; every op netslim's networks use is in it
OPSETS = range(9, 21)  # what the TorchScript-based exporter writes
TOLERANCE = 1e-4  # largest accepted relative difference, fp32
CHECKED_ON = "random normal batches of 1 and 7, normal + 3, normal - 3, normal x 10 and zeros"
CIFAR_IMAGE_SIZE = 32  # what netslim's own architectures are built for
ULTRALYTICS_IMAGE_SIZE = 640  # Ultralytics' own default imgsz, as `yolo export` takes it
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
        traced: whether the file holds the operations the network ran on one example
            input (ONNX, torch.export), so that a path that depends on values is fixed;
            False for weights that code rebuilds the network around.
    """

    suffix: str
    write: Callable[[nn.Module, torch.Tensor, int], bytes]
    load: Callable[[bytes], Runner]
    foldable: bool = True
    traced: bool = True


@dataclass
class ExportResult:
    """What :func:`export` wrote: the path, format, ONNX opset, the checked difference, the
    image size, the inputs it was checked on, where the forward pass read tensor values
    (empty when nowhere), and, for a YOLO written through Ultralytics' exporter, the
    metadata Ultralytics put in the file (``names``, ``stride``, ``task``, ``imgsz``, ...)."""

    path: Path
    format: str
    opset: int | None
    folded: bool
    max_rel_diff: float
    image_size: int
    checked_on: str
    value_reads: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


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
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in ["images", *names]},
        )
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


def onnx_session(contents: bytes | str | Path, threads: int | None = None, spinning: bool = True):
    """An onnxruntime CPU session on an ONNX file (its path or contents).

    ``spinning=False`` for sessions timed side by side: onnxruntime's threads spin for
    work after a run, and two sessions timed in turn then each wait on the other's
    spinning threads (yolov8n at 640 px on 2 cores: 62 ms alone, 100 ms in turn with
    another session; 78 ms alone or in turn without spinning; bench/RESULTS.md).
    """
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(contents) if isinstance(contents, Path) else contents
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _onnx_load(contents: bytes) -> Runner:
    session = onnx_session(contents)
    return lambda x: [torch.from_numpy(a) for a in session.run(None, {"images": x.numpy()})]


def _pt2_write(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    batch = torch.export.Dim("batch")
    # torch.export prints its graph and logs warnings to stderr when it fails; the failure
    # itself becomes one line (export)
    with contextlib.redirect_stderr(io.StringIO()):
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
    "official": Format(".pth.tar", _official_write, _official_load, foldable=False, traced=False),
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


def check_writable(path: Path) -> None:
    """Fail before the (slow) export when ``path`` cannot be written."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # atomic_write creates the missing folders below it
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise NetslimError(f"cannot write {path}: {parent} is not a writable folder")


def check_inputs(image_size: int, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """The inputs the check compares the file with the network on, as ``(name, images)``.

    Differently distributed, so that a forward pass whose path depends on the values
    (``if x.mean() > 0``) takes another path on some of them than on the export's example:
    random normal batches of 1 and 7 (the batch size is free), the normal shifted by +3
    and by -3, scaled by 10, and zeros (:data:`CHECKED_ON`).
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, image_size, image_size, generator=generator)

    return [
        ("random normal images", normal(1)),
        ("a random normal batch of 7", normal(7)),
        ("normal + 3 images", normal(1) + 3),
        ("normal - 3 images", normal(1) - 3),
        ("normal x 10 images", normal(1) * 10),
        ("zero images", torch.zeros(1, 3, image_size, image_size)),
    ]


def relative_difference(expected: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """``max |got - expected| / max |expected|``, output by output (a segmenter's boxes and
    masks each on its own scale); infinity when the outputs' shapes differ or a value is not
    finite."""
    if not expected or [t.shape for t in got] != [t.shape for t in expected]:
        return float("inf")
    worst = 0.0
    for want, have in zip(expected, got):
        scale = want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)
        diff = ((have - want).abs().max() / scale).item()
        # NaN compares false with everything, so max() would drop it: a NaN is a failure
        if not math.isfinite(diff):
            return float("inf")
        worst = max(worst, diff)
    return worst


# -- where a forward pass reads tensor values --------------------------------------------------

_TORCH_DIR = str(Path(torch.__file__).parent) + os.sep
# Tensor methods and functions that turn values into Python numbers: what follows may
# branch on them.
_NUMBER_READS = {
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__complex__",
    "__contains__",
    "item",
    "tolist",
    "numpy",
    "__array__",
    "equal",
    "allclose",
    "is_nonzero",
}
# Ops whose result's shape depends on the values: what follows may branch on the shape.
_VALUE_SHAPED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}


def _reads_values(func: Callable, args: tuple) -> bool:
    """Whether calling ``func`` on ``args`` (some computed from the input) reads their values
    into Python or into a shape: a number, a boolean mask, ``nonzero``, a custom op (NMS)."""
    name = getattr(func, "__name__", "")
    if name in _NUMBER_READS or name in _VALUE_SHAPED:
        return True
    if name == "__getitem__":
        return any(t.dtype == torch.bool for t in output_tensors(list(args[1:])))
    if isinstance(func, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        qualified = getattr(func, "_qualified_op_name", "") or f"{getattr(func, 'namespace', '')}::"
        return qualified.split("::")[0] not in ("aten", "prims")  # torchvision::nms, yours
    return False


class _ValueReads(TorchFunctionMode):
    """Watches the forward passes run inside it for reads of values computed from their
    input (:func:`_reads_values`), as ``"op in module (file:line)"`` -- the form of the
    pruning engine's ``value_reads`` (:mod:`netslim.engine.trace`), found without its channel
    bookkeeping, so that the check's own passes cost no more."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
        self.model_name = type(model).__name__
        # id -> weak reference of each tensor computed from the input (the reference tells
        # a live tensor from a new one that reuses a dead one's id)
        self.derived: dict[int, weakref.ref] = {}
        self.reads: dict[str, None] = {}  # ordered and without repeats

    def watch(self, value: Any) -> None:
        for t in output_tensors(value):
            self.derived[id(t)] = weakref.ref(t)

    def _computed_from_input(self, value: Any) -> bool:
        return any(
            (ref := self.derived.get(id(t))) is not None and ref() is t
            for t in output_tensors(value)
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        value = func(*args, **kwargs)
        if self._computed_from_input([list(args), kwargs]):
            if _reads_values(func, args):
                self.reads[self._where(func)] = None
            self.watch(value)
        return value

    def _where(self, func: Callable) -> str:
        """``op in module (file:line)`` of the innermost frame outside torch and this file."""
        op = getattr(func, "__name__", "") or str(func)
        frame = sys._getframe(1)
        while frame is not None and (
            frame.f_code.co_filename.startswith(_TORCH_DIR) or frame.f_code.co_filename == __file__
        ):
            frame = frame.f_back
        if frame is None:
            return f"{op} in {self.model_name}"
        module = self.names.get(id(frame.f_locals.get("self"))) or self.model_name
        return f"{op} in {module} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"


def _shown(reads: list[str]) -> str:
    return ", ".join(reads[:3]) + (", ..." if len(reads) > 3 else "")


# -- the image size -----------------------------------------------------------------------


def declared_image_size(model: nn.Module) -> int:
    """The image size ``model`` says it takes: an Ultralytics model's ``imgsz`` (from the
    training arguments it keeps in ``model.args``, else its YAML), else Ultralytics' default
    640; one of netslim's own (CIFAR) architectures 32. NetslimError for any other network,
    asking for ``image_size=``: a torchvision or timm network may have been trained at any size.
    """
    home = type(model).__module__
    if home.startswith("ultralytics."):
        for where in ("args", "yaml"):
            found = getattr(model, where, None)
            size = found.get("imgsz") if isinstance(found, dict) else getattr(found, "imgsz", None)
            if size is not None:
                return _square(size, f"the imgsz its model.{where} records")
        return ULTRALYTICS_IMAGE_SIZE
    if home.startswith("netslim.models."):
        return CIFAR_IMAGE_SIZE
    raise NetslimError(
        f"export needs image_size=: {type(model).__name__} does not say which image size it "
        "takes (only netslim's own architectures and Ultralytics models do); pass image_size=N, "
        "the height and width of the images it was trained on"
    )


def _square(size: object, what: str) -> int:
    """An ``imgsz`` as one side: a number, or ``[h, w]`` with ``h == w``."""
    if isinstance(size, (list, tuple)):
        if not (0 < len(size) <= 2 and all(isinstance(s, int) and s == size[0] for s in size)):
            raise NetslimError(
                f"{what} is {list(size)}, not one square size; export takes square images: "
                "pass image_size=N"
            )
        size = size[0]
    try:
        return check_image_size(size, what)
    except NetslimError as e:
        raise NetslimError(f"{e}; pass image_size=N") from None


# -- export --------------------------------------------------------------------------------


def error_detail(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


@torch.no_grad()
def run_watched(
    model: nn.Module, inputs: list[tuple[str, torch.Tensor]], image_size: int
) -> tuple[list[list[torch.Tensor]], list[str]]:
    """``model``'s outputs on each input, and where it read tensor values while computing them."""
    watcher = _ValueReads(model)
    outputs = []
    for name, x in inputs:
        watcher.watch(x)
        try:
            with watcher:
                outputs.append(output_tensors(model(x)))
        except Exception as e:
            raise NetslimError(
                f"{type(model).__name__} does not run on {name} of {image_size}x{image_size} "
                f"pixels ({error_detail(e)}); pass the image size it takes (--image-size, image_size=)"
            ) from None
    return outputs, list(watcher.reads)


def _write(
    spec: Format,
    name: str,
    model: nn.Module,
    image_size: int,
    opset: int,
    label: str,
    reads: list[str],
) -> bytes:
    """The file's contents, or NetslimError saying why the exporter failed."""
    # the exporters run this example once and keep what it did: batch 2, so that they keep N
    # free; seeded, so that the same network gives the same file
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    try:
        return spec.write(model, example, opset)
    except NetslimError:
        raise
    except Exception as e:  # the exporters fail in many ways; say which step and why
        if reads and "DataDependent" in type(e).__name__:  # torch.export met a value read
            raise NetslimError(
                f"{name} export of {label} failed: its forward pass reads tensor values "
                f"({_shown(reads)}), which torch.export cannot follow; keep them as tensors (for "
                "a branch, compute both sides and pick with torch.where or torch.cond)"
            ) from None
        raise NetslimError(f"{name} export of {label} failed: {error_detail(e)}") from None


def worst_difference(
    run: Runner,
    inputs: list[tuple[str, torch.Tensor]],
    expected: list[list[torch.Tensor]],
    path: Path,
    name: str,
) -> tuple[float, str]:
    """The largest relative difference of the written file from the network, and on which input."""
    worst, where = 0.0, inputs[0][0]
    for (label, x), want in zip(inputs, expected):
        try:
            got = output_tensors(run(x))
        except Exception as e:
            raise NetslimError(
                f"the exported {name} file does not run on {label} ({error_detail(e)}); nothing "
                f"written to {path}"
            ) from None
        diff = relative_difference(want, got)
        if not diff <= worst:
            worst, where = diff, label
    return worst, where


def _through_ultralytics(model: nn.Module, path: str | Path, format: str | None) -> bool:
    """Whether ``model`` is an Ultralytics model going to a format its exporter writes (all
    but netslim's own ``pt2`` and ``official``)."""
    if not type(model).__module__.startswith("ultralytics."):
        return False
    if format is not None:
        return format not in ("pt2", "official")
    return not str(path).lower().endswith((FORMATS["pt2"].suffix, FORMATS["official"].suffix))


def _ultralytics_export() -> Callable[..., ExportResult]:
    """:func:`netslim.yolo.export.export_yolo`, looked up by name on first use: the YOLO
    package sits a layer above this module and builds on it, so this module does not import
    it (tests/test_layers.py); the lookup only happens for an Ultralytics model, which
    needs Ultralytics and with it ``netslim[yolo]``."""
    try:
        module = importlib.import_module("netslim.yolo.export")
    except ImportError as e:
        raise NetslimError(
            f"exporting an Ultralytics model needs Ultralytics ({e}): pip install 'netslim[yolo]'"
        ) from None
    return module.export_yolo


def export(
    model: nn.Module,
    path: str | Path,
    format: str | None = None,
    *,
    fold: bool = True,
    opset: int = DEFAULT_OPSET,
    image_size: int | None = None,
    tolerance: float = TOLERANCE,
    dynamic: bool = False,
) -> ExportResult:
    """Write ``model`` to ``path`` as a file that runs without netslim, after checking it.

    The file is run by its own runtime on :func:`check_inputs` (random normal batches of 1
    and 7, the normal shifted by +3 and -3, scaled by 10, zeros) and compared with the
    PyTorch network, which is watched meanwhile for reads of tensor values (``if x.mean()
    > 0``, ``.item()``, a boolean mask, ``nonzero``, a custom op such as NMS). An ONNX or
    ``.pt2`` file holds the path one example input took; so when the forward pass reads
    values:

    * any check input on which the file gives other outputs refuses it (nothing is
      written; the error names where the forward pass read values), and so does
      torch.export's own refusal of such a read (``.pt2``), in one line;
    * when every check input agrees, the file is written and a warning (``warnings.warn``,
      printed by the CLI as ``netslim: warning: ...``) names where the forward pass read
      values: an input taking a path none of them took may still give other outputs.

    The ``official`` format holds weights only and takes no path; it is checked the same way,
    without the warning.

    Args:
        model: any network netslim builds or loads, pruned or not (left unchanged).
        path: the file to write; its suffix picks the format unless ``format`` is given.
        format: one of :data:`FORMATS` (``"onnx"``, ``"pt2"``, ``"official"``).
        fold: fold each BatchNorm into the conv or linear layer before it.
        opset: the ONNX opset to write (ONNX only).
        image_size: height and width of the input images, fixed in the file. None: the size
            the network says it takes (:func:`declared_image_size`: an Ultralytics model's
            ``imgsz``, else 640; netslim's own architectures 32); any other network must be
            given one.
        tolerance: the largest relative difference from the PyTorch network accepted.
        dynamic: a YOLO only: free batch, height and width (Ultralytics' ``dynamic=True``);
            netslim's own ONNX and ``.pt2`` files always have a free batch and a fixed size.

    Raises:
        NetslimError: unknown format, unwritable path, an image size out of bounds or not
            known, a network holding NaN or Inf or not running at that size, missing
            onnx/onnxruntime, a failed export, or a file whose outputs differ from the
            network's by more than ``tolerance`` on any check input or are not finite
            (nothing is written then).

    An Ultralytics model (a YOLO, from :func:`netslim.load` of its ``.pth`` or from a ``.pt``)
    is written by Ultralytics' own exporter instead, for every format but ``pt2`` and
    ``official`` (:func:`netslim.yolo.export.export_yolo`): the file carries Ultralytics'
    metadata, so that ``YOLO(path)`` and ``yolo val`` run it; ``format`` may then also be one
    of Ultralytics' (``openvino``, ``engine``, ``coreml``, ``litert``, ...), and the image size
    defaults to the one the model records (``model.args["imgsz"]``, set by :func:`netslim.load`
    from the checkpoint), else 640.

    Example::

        >>> netslim.export(netslim.load("pruned.pth"), "pruned.onnx")
    """
    if _through_ultralytics(model, path, format):
        settings = dict(image_size=image_size, opset=opset, fold=fold, dynamic=dynamic)
        return _ultralytics_export()(model, path, format, tolerance=tolerance, **settings)
    if dynamic:
        raise NetslimError(
            "a free image size (--dynamic, dynamic=True) is for a YOLO written through "
            "Ultralytics' exporter; netslim's own files have a free batch at a fixed size"
        )
    path = Path(path)
    name = pick_format(path, format)
    spec = FORMATS[name]
    fold = fold and spec.foldable
    image_size = declared_image_size(model) if image_size is None else image_size
    check_image_size(image_size)
    bad = nonfinite_tensors(model)
    if bad:
        raise NetslimError(
            f"the network holds NaN or Inf in {len(bad)} of its tensors (e.g. {bad[0]}): its "
            f"outputs mean nothing, so it is not exported; export an earlier checkpoint"
        )
    check_writable(path)
    label = type(model).__name__
    reference = for_deployment(copy.deepcopy(model).float().cpu().eval())
    inputs = check_inputs(image_size)
    expected, reads = run_watched(reference, inputs, image_size)
    reads = reads if spec.traced else []  # weights alone fix no path
    deployed = fold_bn(reference, (1, 3, image_size, image_size)) if fold else reference
    contents = _write(spec, name, deployed, image_size, opset, label, reads)
    diff, where = worst_difference(spec.load(contents), inputs, expected, path, name)
    if not diff <= tolerance:
        why = (
            f": {label}'s forward pass reads tensor values ({_shown(reads)}), and the file keeps "
            "what they were for its example input; keep them as tensors (for a branch, compute "
            "both sides and pick with torch.where), so that the file holds every path"
            if reads
            else ""
        )
        raise NetslimError(
            f"the exported {name} file differs from the PyTorch network by {diff:.3g} "
            f"(relative, more than {tolerance:g}) on {where}; nothing written to {path}{why}"
        )
    try:
        atomic_write(path, lambda f: f.write(contents))
    except OSError as e:
        raise NetslimError(f"cannot write {path}: {e.strerror or e}") from None
    if reads:
        warnings.warn(
            f"{label}'s forward pass reads tensor values ({_shown(reads)}): {path.name} gave "
            f"its outputs on every check input ({CHECKED_ON}), but it keeps what those values "
            "were for its example input, and an input that takes another path may give other "
            "outputs",
            stacklevel=2,
        )
    return ExportResult(
        path, name, opset if name == "onnx" else None, fold, diff, image_size, CHECKED_ON, reads
    )


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`export`: ``import netslim.export`` (or any ``from
    netslim.export import ...``) makes ``netslim.export`` this module rather than the function
    that ``netslim/__init__.py`` lists under that name, so ``netslim.export(model, path)``
    works either way."""

    def __call__(self, *args: Any, **kwargs: Any) -> ExportResult:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
