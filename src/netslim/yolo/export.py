"""Export a YOLO through Ultralytics' own exporter, so that the file carries Ultralytics'
metadata (class names, stride, task, image size) and ``YOLO(path)``, ``yolo val`` and
``yolo predict`` run it as they run their own exports -- checked by netslim first.

``netslim export`` and :func:`netslim.export` come here for an Ultralytics model (a ``.pt``,
or a netslim ``.pth`` of a YOLO): ONNX by default, or any format Ultralytics' exporter writes
(``openvino``, ``engine``, ``coreml``, ``litert``, ``torchscript``, ...) where its package
is installed. netslim itself only prepares the network and checks the result:

* the image size defaults to the one the checkpoint records (Ultralytics' ``imgsz`` in a
  ``.pt``'s training arguments or the model's ``args``, the size a netslim ``.pth`` was
  trained or pruned at), else Ultralytics' 640; never silently another;
* Ultralytics never installs anything here (its requirement checks are skipped for the
  export: a missing package is one line naming it) and downloads nothing;
* the file is written into a temporary folder beside the destination, run by its runtime
  (onnxruntime for ONNX; Ultralytics' ``AutoBackend`` for the others, where it can run them
  on this machine) on netslim's check inputs (:func:`netslim.export.check_inputs`), compared
  with the unfolded PyTorch network, and only then moved into place.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netslim.engine.stats import nonfinite_tensors
from netslim.errors import NetslimError
from netslim.export import (
    CHECKED_ON,
    DEFAULT_OPSET,
    OPSETS,
    TOLERANCE,
    ExportResult,
    check_inputs,
    check_writable,
    declared_image_size,
    error_detail,
    onnx_session,
    output_tensors,
    run_watched,
    worst_difference,
)
from netslim.limits import check_image_size
from netslim.models.external import for_deployment

# The packages Ultralytics' exporter imports for a format (what to install when it is missing).
NEEDS = {
    "onnx": "onnx onnxruntime",
    "openvino": "openvino",
    "engine": "tensorrt",
    "coreml": "coremltools",
    "litert": "ai-edge-litert",
    "saved_model": "tensorflow",
    "pb": "tensorflow",
    "paddle": "paddlepaddle x2paddle",
    "ncnn": "ncnn pnnx",
    "mnn": "MNN",
    "executorch": "executorch",
}
# Head attributes Ultralytics' exporter sets on its copy of the network: copied onto the
# unfolded network the file is compared with, so that both compute the same outputs.
HEAD_SETTINGS = ("export", "format", "dynamic", "max_det", "agnostic_nms", "xyxy")


def is_ultralytics(model: object) -> bool:
    """Whether ``model`` is an Ultralytics model (``DetectionModel``, ``SegmentationModel``, ...)."""
    return isinstance(model, nn.Module) and type(model).__module__.startswith("ultralytics.")


def formats() -> dict[str, str]:
    """Ultralytics' export formats, ``{argument: suffix}`` (``{"onnx": ".onnx", "openvino":
    "_openvino_model", ...}``), as its exporter lists them."""
    from ultralytics.engine.exporter import export_formats

    table = export_formats()
    return {a: s for a, s in zip(table["Argument"], table["Suffix"]) if a != "-"}


# Ultralytics' own aliases of its formats
ALIASES = {
    "tensorrt": "engine",
    "trt": "engine",
    "tflite": "litert",
    "tfjs": "litert",
    "mlpackage": "coreml",
    "mlprogram": "coreml",
    "apple": "coreml",
    "ios": "coreml",
}


def pick_format(path: str | Path, format: str | None = None) -> str:
    """The Ultralytics format ``format`` names, else the one ``path``'s name ends with."""
    known = formats()
    if format is not None:
        name = ALIASES.get(format.lower(), format.lower())
        if name not in known:
            raise NetslimError(
                f"unknown export format {format!r} for a YOLO; choose one of: onnx, pt2, or "
                f"Ultralytics' {', '.join(k for k in known if k != 'onnx')}"
            )
        return name
    text = str(path).lower().rstrip("/")
    for name, suffix in sorted(known.items(), key=lambda item: -len(item[1])):  # longest first
        if text.endswith(suffix.lower()):
            return name
    raise NetslimError(
        f"cannot tell the export format of {path} from its name; name it NAME.onnx (or .pt2), "
        f"or pass --format (Ultralytics' formats: {', '.join(known)})"
    )


def recorded_image_size(model: nn.Module) -> int | None:
    """The image size ``model``'s Ultralytics training arguments record (``model.args``), if any."""
    args = getattr(model, "args", None)
    size = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
    return None if size is None else declared_image_size(model)


def read_for_export(
    path: str | Path, *, trust_pickle: bool = False
) -> tuple[nn.Module, int | None]:
    """The model of an Ultralytics ``.pt`` (read without running its code) and the image size
    its training arguments record (None when they record none)."""
    from netslim.yolo.files import model_of, read_checkpoint

    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
    record = checkpoint.get("ema") or checkpoint["model"]
    model = record.float().eval() if trust_pickle else model_of(record, path)
    train_args = checkpoint.get("train_args")
    if isinstance(train_args, dict) and train_args.get("imgsz") is not None:
        model.args = {
            **(model.args if isinstance(getattr(model, "args", None), dict) else {}),
            "imgsz": train_args["imgsz"],
        }
    return model, recorded_image_size(model)


@contextlib.contextmanager
def _offline_exporter():
    """Ultralytics' exporter, quiet (netslim prints its own line), installing nothing: its
    requirement checks are skipped, so that a missing package fails its import (one line)."""
    logger = logging.getLogger("ultralytics")
    level, skip = logger.level, os.environ.get("ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS")
    logger.setLevel(logging.CRITICAL)
    os.environ["ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS"] = "1"
    try:
        yield
    finally:
        logger.setLevel(level)
        if skip is None:
            os.environ.pop("ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS", None)
        else:
            os.environ["ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS"] = skip


def _prepared(model: nn.Module, scratch: Path, stem: str) -> nn.Module:
    """A copy of ``model`` in fp32 eval mode with what Ultralytics' exporter reads of a
    model loaded by ``YOLO()``: its task, its training arguments as a dict, a file name."""
    from ultralytics.nn.tasks import guess_model_task

    work = copy.deepcopy(model).float().cpu().eval()
    if not isinstance(getattr(work, "task", None), str):
        work.task = guess_model_task(work)
    args = getattr(work, "args", None)
    args = dict(args) if isinstance(args, dict) else dict(vars(args)) if args is not None else {}
    work.args = {"data": "", **args}  # the exporter reads args["data"] for its description
    work.pt_path = str(scratch / f"{stem}.pt")  # the exporter writes beside this name
    return work


def _reference(model: nn.Module, exported: nn.Module) -> nn.Module:
    """``model`` unfolded, its head set as Ultralytics' exporter set the head of ``exported``
    (its fused copy): what the file must compute."""
    reference = for_deployment(copy.deepcopy(model).float().cpu().eval())
    mine = dict(reference.named_modules())
    for name, module in exported.named_modules():
        if name in mine and hasattr(module, "export"):
            for key in HEAD_SETTINGS:
                if hasattr(module, key):
                    setattr(mine[name], key, getattr(module, key))
    if hasattr(exported, "end2end") and hasattr(reference, "end2end"):
        reference.end2end = exported.end2end
    return reference


def _runner(produced: Path, fmt: str):
    """A function from images to the file's outputs, or the reason none runs here."""
    if fmt == "onnx":
        session = onnx_session(produced)
        shape = session.get_inputs()[0].shape
        batch = shape[0] if isinstance(shape[0], int) else None

        def run(x: torch.Tensor) -> list[torch.Tensor]:
            parts = [x] if batch is None else list(x.split(batch))
            outs = [session.run(None, {"images": p.numpy()}) for p in parts]
            return [torch.cat([torch.from_numpy(o[i]) for o in outs]) for i in range(len(outs[0]))]

        return run, None
    try:
        from ultralytics.nn.autobackend import AutoBackend

        with _offline_exporter():
            backend = AutoBackend(str(produced), device=torch.device("cpu"), verbose=False)
    except Exception as e:
        return None, f"Ultralytics cannot run {fmt} files on this machine ({error_detail(e)})"

    def run_backend(x: torch.Tensor) -> list[torch.Tensor]:  # one image at a time: fixed batch
        outs = [output_tensors(backend(p)) for p in x.split(1)]
        return [torch.cat([o[i] for o in outs]) for i in range(len(outs[0]))]

    return run_backend, None


def _place(produced: Path, path: Path) -> None:
    """Move what the exporter made (a file or a folder) to ``path``, replacing what is there
    only once the new one is complete."""
    if produced.is_dir():
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(produced, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        if path.is_dir():
            raise NetslimError(f"cannot write {path}: it is a folder")
        os.replace(produced, path)


def export_yolo(
    model: nn.Module,
    path: str | Path,
    format: str | None = None,
    *,
    image_size: int | None = None,
    opset: int | None = None,
    dynamic: bool = False,
    fold: bool = True,
    tolerance: float = TOLERANCE,
) -> ExportResult:
    """Write the Ultralytics model ``model`` (pruned or not; left unchanged) to ``path``
    through Ultralytics' exporter, after checking the file against the PyTorch network.

    Args:
        model: an Ultralytics model (``DetectionModel``, ``SegmentationModel``, ...).
        path: where the file (or, for folder formats such as OpenVINO, the folder) goes; its
            name must end as Ultralytics names the format (``.onnx``, ``_openvino_model``,
            ``.engine``, ...), which is how ``YOLO(path)`` recognises it.
        format: Ultralytics' format name (``onnx``, ``openvino``, ``engine``, ``coreml``,
            ``litert``, ``torchscript``, ...); None: from ``path``'s name.
        image_size: height and width fixed in the file; None: the size ``model`` records
            (``model.args["imgsz"]``, which :func:`netslim.load` and ``netslim export`` set
            from the checkpoint), else Ultralytics' 640. A multiple of the model's stride.
        opset: the ONNX opset (ONNX only); None: netslim's default (18).
        dynamic: free batch, height and width (Ultralytics' ``dynamic=True``); otherwise a
            batch of 1 at ``image_size``, as ``yolo export`` writes by default.
        fold: must stay True: Ultralytics' exporter always folds BatchNorm.
        tolerance: the largest relative difference from the PyTorch network accepted.

    Raises:
        NetslimError: in one line, for anything the export cannot do (see :func:`netslim.export`).
    """
    if not is_ultralytics(model):
        raise NetslimError(
            f"{type(model).__name__} is not an Ultralytics model; Ultralytics' formats are for "
            "YOLOs: write ONNX or .pt2 with netslim export"
        )
    if not fold:
        raise NetslimError(
            "Ultralytics' exporter always folds BatchNorm; drop --no-fold (fold=False)"
        )
    path = Path(path)
    fmt = pick_format(path, format)
    suffix = formats()[fmt]
    if not str(path).rstrip("/").lower().endswith(suffix.lower()):
        raise NetslimError(
            f"name the {fmt} export NAME{suffix} (got {path.name}): Ultralytics' YOLO() tells "
            "a file's format by that ending"
        )
    size = declared_image_size(model) if image_size is None else image_size
    check_image_size(size)
    stride = int(max(getattr(model, "stride", torch.tensor([32])).tolist() or [32]))
    if size % stride:
        low, high = max(stride, size // stride * stride), (size // stride + 1) * stride
        raise NetslimError(
            f"image size {size} is not a multiple of the network's stride {stride}; pass "
            f"{low} or {high} (--image-size, image_size=)"
        )
    if fmt == "onnx":
        from netslim.export import _import_onnxruntime

        _import_onnxruntime()
        opset = DEFAULT_OPSET if opset is None else opset
        if opset not in OPSETS:  # what PyTorch's TorchScript-based exporter, which it calls, writes
            raise NetslimError(
                f"ONNX opset must be from {OPSETS[0]} to {OPSETS[-1]} (default {DEFAULT_OPSET}), "
                f"got {opset}"
            )
    elif opset is not None and opset != DEFAULT_OPSET:
        raise NetslimError(f"--opset (opset=) is for ONNX only, not {fmt}")
    bad = nonfinite_tensors(model)
    if bad:
        raise NetslimError(
            f"the network holds NaN or Inf in {len(bad)} of its tensors (e.g. {bad[0]}): its "
            "outputs mean nothing, so it is not exported; export an earlier checkpoint"
        )
    check_writable(path)
    label = type(model).__name__
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".netslim-export-", dir=path.parent))
    try:
        return _export_in(model, path, fmt, scratch, size, opset, dynamic, tolerance, label)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _export_in(
    model: nn.Module,
    path: Path,
    fmt: str,
    scratch: Path,
    size: int,
    opset: int | None,
    dynamic: bool,
    tolerance: float,
    label: str,
) -> ExportResult:
    from ultralytics.engine.exporter import Exporter, export_formats

    table = export_formats()
    accepts = dict(zip(table["Argument"], table["Arguments"]))[fmt]
    settings: dict[str, Any] = {"format": fmt, "imgsz": size, "device": "cpu", "batch": 1}
    if "opset" in accepts and fmt == "onnx":
        settings["opset"] = opset
    if "simplify" in accepts:  # Ultralytics' default where onnxslim is here; never installed
        settings["simplify"] = importlib.util.find_spec("onnxslim") is not None
    if dynamic:
        if "dynamic" not in accepts:
            raise NetslimError(f"Ultralytics writes {fmt} files with a fixed input; drop --dynamic")
        settings["dynamic"] = True
    work = _prepared(model, scratch, path.name.removesuffix(formats()[fmt]) or "model")
    exporter = Exporter(overrides=settings)
    try:
        with _offline_exporter(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' deprecation notices (torch.jit, ...)
            produced = exporter(model=work)
    except ImportError as e:
        missing = getattr(e, "name", None) or error_detail(e)
        raise NetslimError(
            f"{fmt} export needs the package {missing}, which is not installed: pip install "
            f"{NEEDS.get(fmt, missing)} (netslim installs nothing itself)"
        ) from None
    except NetslimError:
        raise
    except Exception as e:  # Ultralytics' own words, in one line
        raise NetslimError(
            f"{fmt} export of {label} by Ultralytics' exporter failed: {error_detail(e)}"
        ) from None
    produced = Path(produced if isinstance(produced, (str, Path)) else produced[0])
    if not produced.exists():
        raise NetslimError(f"Ultralytics' exporter reported {produced}, which it did not write")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run, why_not = _runner(produced, fmt)
    diff, checked_on, reads = float("nan"), f"not checked: {why_not}", []
    if run is not None:
        reference = _reference(model, exporter.model)
        inputs = check_inputs(size)
        expected, reads = run_watched(reference, inputs, size)
        diff, where = worst_difference(run, inputs, expected, path, fmt)
        if not diff <= tolerance:
            raise NetslimError(
                f"the exported {fmt} file differs from the PyTorch network by {diff:.3g} "
                f"(relative, more than {tolerance:g}) on {where}; nothing written to {path}"
            )
        checked_on = CHECKED_ON
    metadata = dict(exporter.metadata)  # what Ultralytics wrote into the file
    try:
        _place(produced, path)
    except OSError as e:
        raise NetslimError(f"cannot write {path}: {e.strerror or e}") from None
    if reads:
        warnings.warn(
            f"{label}'s forward pass reads tensor values ({', '.join(reads[:3])}): {path.name} "
            f"gave its outputs on every check input ({CHECKED_ON}), but it keeps what those "
            "values were for its example input, and an input that takes another path may give "
            "other outputs",
            stacklevel=3,
        )
    return ExportResult(
        path, fmt, opset if fmt == "onnx" else None, True, diff, size, checked_on, reads, metadata
    )
