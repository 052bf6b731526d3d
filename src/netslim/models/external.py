"""Networks from torchvision, timm or your own code, named by a spec string.

``--arch`` (and :func:`netslim.build_model`) take, besides netslim's own names:

=============================== ==========================================================
``torchvision:NAME``            ``torchvision.models.get_model(NAME, num_classes=...)``, a
                                classification, detection or segmentation model (e.g.
                                ``torchvision:resnet18``, ``torchvision:retinanet_resnet50_fpn``)
``timm:NAME``                   ``timm.create_model(NAME, num_classes=...)``
``package.module:callable``     your own builder, imported and called as
                                ``callable(num_classes=...)``; it returns the unpruned
                                ``nn.Module``. The current folder is searched first, then
                                ``PYTHONPATH`` (as ``python -m`` does: you named it).
=============================== ==========================================================

Weights are always fresh (no download). The spec is stored in every checkpoint, so a
pruned network is rebuilt from it and its layers' channel counts. A checkpoint whose spec
names your own module is built only when the caller trusts that module
(:func:`trusted_spec`): importing it runs its code, and a downloaded file could name any
module. torchvision and timm specs are names in those libraries' registries, not
modules, and need no consent. torchvision and timm are imported only here, and only when
a spec names them (``pip install netslim[zoo]`` installs both).
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Iterable
from typing import Any, Callable

from torch import nn

from netslim.config import check_spec
from netslim.errors import NetslimError
from netslim.models.yolo_yaml import build_ultralytics, offline_ultralytics

# torchvision builds these with auxiliary classifiers by default, which makes a training
# forward return a tuple; netslim trains and prunes the main classifier only.
_TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


ZOO_SOURCES = ("torchvision", "timm", "ultralytics")  # model registries, not modules a file names


def trusted_spec(spec: str, trust: str | Iterable[str] | None) -> bool:
    """Whether building ``spec`` from a file is allowed: a torchvision or timm name always;
    your own ``pkg.mod:build`` only when ``trust`` names ``pkg.mod`` or a package above it
    (each entry a module name, or a spec whose module is taken)."""
    module = spec.partition(":")[0]
    if module in ZOO_SOURCES:
        return True
    names = [trust] if isinstance(trust, str) else list(trust or [])
    allowed = {name.partition(":")[0] for name in names}
    return any(module == name or module.startswith(name + ".") for name in allowed if name)


def resolve(spec: str) -> Callable[[int], nn.Module]:
    """Import what ``spec`` names and check it exists; returns ``builder(num_classes)``.

    Raises NetslimError naming the spec and the missing package or name.
    """
    check_spec(spec)
    source, _, name = spec.partition(":")
    if source == "torchvision":
        return _torchvision(spec, name)
    if source == "timm":
        return _timm(spec, name)
    if source == "ultralytics":
        return _ultralytics(spec, name)
    # Here the caller named the module: --arch, or a checkpoint's spec it trusts.
    builder = _user_builder(spec, source, name)
    return lambda num_classes: builder(num_classes=num_classes)


def build_external(spec: str, num_classes: int) -> nn.Module:
    """Build the network ``spec`` names with ``num_classes`` outputs and fresh weights."""
    builder = resolve(spec)
    try:
        model = builder(num_classes)
    except NetslimError:
        raise
    except Exception as e:  # the builder's own error (bad arguments, a bug): one line
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise NetslimError(
            f"--arch {spec}: building the model failed: {type(e).__name__}: {detail}"
        ) from None
    if not isinstance(model, nn.Module):
        raise NetslimError(
            f"--arch {spec} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _import_zoo(spec: str, package: str) -> Any:
    if package == "ultralytics":
        offline_ultralytics()
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise NetslimError(
            f"--arch {spec} needs the package {package}, which does not import ({e}); "
            "install it with: pip install 'netslim[zoo]'"
        ) from None


def _unknown(spec: str, kind: str, name: str, known: list[str], listing: str) -> NetslimError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return NetslimError(f"--arch {spec}: no {kind} model {name!r}; {hint}see {listing}")


def _torchvision(spec: str, name: str) -> Callable[[int], nn.Module]:
    torchvision = _import_zoo(spec, "torchvision")
    models = torchvision.models
    classify = models.list_models(module=models)
    dense = models.list_models(module=models.detection) + models.list_models(
        module=models.segmentation
    )  # detectors and segmenters: no pretrained backbone either
    if name not in classify + dense:
        raise _unknown(
            spec,
            "torchvision classification",
            name,
            classify + dense,
            "torchvision.models.list_models() (detection and segmentation names work too)",
        )
    kwargs = dict(_TORCHVISION_KWARGS.get(name, {}))
    if name in dense:
        kwargs["weights_backbone"] = None
    return lambda num_classes: models.get_model(
        name, weights=None, num_classes=num_classes, **kwargs
    )


def _ultralytics(spec: str, name: str) -> Callable[[int], nn.Module]:
    """An Ultralytics model from a model YAML shipped with Ultralytics (``yolov8n.yaml``,
    ``yolo11n-seg.yaml``), fresh weights: ``DetectionModel``, ``SegmentationModel``, ... as
    the YAML's task says."""
    _import_zoo(spec, "ultralytics")
    if not name.endswith((".yaml", ".yml")):
        raise NetslimError(
            f"--arch {spec}: name an Ultralytics model YAML, e.g. ultralytics:yolov8n.yaml "
            "(a .pt file is a trained model: see netslim's Ultralytics integration)"
        )
    return lambda num_classes: build_ultralytics(name, num_classes)


def _timm(spec: str, name: str) -> Callable[[int], nn.Module]:
    timm = _import_zoo(spec, "timm")
    if not timm.is_model(name):
        raise _unknown(spec, "timm", name, timm.list_models(), "timm.list_models()")
    return lambda num_classes: timm.create_model(name, pretrained=False, num_classes=num_classes)


def _user_builder(spec: str, module_name: str, attr: str) -> Callable[..., Any]:
    # Like `python -m`, look in the current folder first: `netslim` as a console script
    # does not have it on sys.path.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise NetslimError(
            f"--arch {spec}: cannot import {module_name} ({e}); put the folder that holds "
            "it in the current folder or on PYTHONPATH, or install its package"
        ) from None
    except Exception as e:  # the module's own code failed (a SyntaxError, a ValueError, ...)
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise NetslimError(
            f"--arch {spec}: importing {module_name} failed: {type(e).__name__}: {detail}; "
            "fix the module"
        ) from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise NetslimError(f"--arch {spec}: {module_name} has no callable named {attr!r}")
    return builder


def for_deployment(model: nn.Module) -> nn.Module:
    """``model`` (in place) returning what a deployed network returns: an Ultralytics
    model's head in export mode gives its decoded predictions alone, not with the raw
    maps and feature maps training needs."""
    for m in model.modules():
        if type(m).__module__.startswith("ultralytics.nn.modules.head") and hasattr(m, "export"):
            m.export = True
    return model
