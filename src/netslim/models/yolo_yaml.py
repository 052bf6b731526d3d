"""Ultralytics YOLO networks built from model YAMLs that may come from a file.

Ultralytics builds a network from its model YAML (``ultralytics.nn.tasks.parse_model``)
as it finds it: the ``activation`` string goes to ``eval``, each layer's module is looked
up among *every* name of Ultralytics' ``tasks`` module (its functions too, such as
``torch_safe_load``, which unpickles another file with the full unpickler), a string
argument may name any local variable of the builder, and widths and repeats are what
the YAML says. A YAML stored in a checkpoint (netslim's ``.pth``, an Ultralytics
``.pt``) is its author's choice, so :func:`build_ultralytics` builds only a YAML that
:func:`check_yaml` passed:

* every layer is a ``torch.nn`` module (``nn.Upsample``) or one of Ultralytics' own layer
  classes (``ultralytics.nn.modules``); ``TorchVision``, which imports a torchvision
  network and fetches its pretrained weights, is refused;
* the activation is ``nn.NAME(literal arguments)`` of a torch activation;
* a string argument is a literal, a plain word (``"nearest"``), or one of the names
  Ultralytics' own YAMLs use (``nc``, ``kpt_shape``);
* at most :data:`MAX_LAYERS` layers of at most :data:`MAX_REPEATS` repeats, numbers
  within sane bounds;

and the network it describes is first built on PyTorch's meta device, which holds no
memory, and refused above :data:`MAX_PARAMS` parameters or a quarter of the machine's
memory, and when the layers a file's weights describe are not its own or wider than it
(:func:`build_ultralytics`, ``counts``). Only then is it built for real. Ultralytics' own
restricted mode (``ULTRALYTICS_SAFE_LOAD``, which builds without ``eval``) is on too
(:func:`offline_ultralytics`).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import logging
import os
from typing import Any

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.limits import check_memory

MAX_LAYERS = 512  # entries of backbone + head (Ultralytics' own YAMLs: at most 43)
MAX_REPEATS = 64  # a layer's repeats after the depth multiple (Ultralytics' own: at most 18)
MAX_MULTIPLE = 4.0  # depth and width multiples (Ultralytics' own: at most 1.33 and 1.5)
MAX_CHANNELS = 8192  # any channel count, max_channels, classes (Ultralytics' own: 2048)
MAX_INPUT_CHANNELS = 16  # image channels (3, or 1 for grey images)
# 4x the largest network Ultralytics ships (about 70M parameters, 280 MB in fp32)
MAX_PARAMS = 300_000_000
MAX_STRING = 64  # a string argument's length (literal_eval of a long one can recurse deeply)
# names of parse_model's own variables that Ultralytics' YAMLs use as arguments
YAML_NAMES = frozenset({"nc", "kpt_shape"})
REFUSED_LAYERS = {"TorchVision": "it imports a torchvision network and fetches its weights"}
# Heads that only Ultralytics' other model classes build and feed (with what they need).
_TEXT = "needs text embeddings from a CLIP text model"
UNBUILT_HEADS = {
    "RTDETRDecoder": "is an RT-DETR decoder, built by Ultralytics' RTDETRDetectionModel",
    "WorldDetect": f"{_TEXT} (Ultralytics' WorldModel)",
    "YOLOEDetect": f"{_TEXT} (Ultralytics' YOLOEModel)",
    "YOLOESegment": f"{_TEXT} (Ultralytics' YOLOESegModel)",
    "YOLOESegment26": f"{_TEXT} (Ultralytics' YOLOESegModel)",
}


def offline_ultralytics() -> None:
    """Before Ultralytics is imported: no downloads (weights, fonts, data sets), no online
    checks and no pip installs, and Ultralytics' restricted loading (``ULTRALYTICS_SAFE_LOAD``:
    weights-only unpickling, model YAMLs built without ``eval``), unless the user's
    environment says otherwise (YOLO_OFFLINE, YOLO_AUTOINSTALL, ULTRALYTICS_SAFE_LOAD). Its
    import otherwise probes the network, which a machine without internet answers only by
    timing out."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("ULTRALYTICS_SAFE_LOAD", "1")


def _tasks() -> Any:
    offline_ultralytics()
    try:
        from ultralytics.nn import tasks
    except ImportError as e:
        raise NetslimError(
            f"this network needs the package ultralytics ({e}); install it with: "
            "pip install 'netslim[yolo]'"
        ) from None
    return tasks


def _number(value: Any, low: float, high: float) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and low <= value <= high  # NaN fails
    )


def _layer_class(name: Any, tasks: Any) -> str | None:
    """Why ``name`` may not name a layer (None: it may)."""
    if not isinstance(name, str):
        return f"a layer named by {type(name).__name__}, not a name"
    if name in REFUSED_LAYERS:
        return f"the layer {name} ({REFUSED_LAYERS[name]})"
    if name.startswith("nn."):
        found, home = getattr(nn, name[3:], None), "torch.nn"
    else:
        found, home = vars(tasks).get(name), "ultralytics.nn.modules"
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        return f"{name!r}, which is not a layer class"
    if not found.__module__.startswith(home):
        return f"{name!r}, which is not a layer of {home}"
    return None


def _activation(text: Any) -> str | None:
    """Why ``text`` may not be a YAML's activation (None: it may): only ``nn.NAME(...)`` or
    ``torch.nn.NAME(...)`` of a torch activation class, with literal arguments."""
    if text is None:
        return None
    try:
        call = ast.parse(str(text).strip(), mode="eval").body
    except SyntaxError:
        call = None
    if isinstance(call, ast.Call):
        path, node = [], call.func
        while isinstance(node, ast.Attribute):
            path.append(node.attr)
            node = node.value
        path.append(getattr(node, "id", ""))
        found = getattr(nn, path[0], None) if path[1:] in (["nn"], ["nn", "torch"]) else None
        values = [*call.args, *(k.value for k in call.keywords)]
        if (
            all(isinstance(v, ast.Constant) for v in values)
            and all(k.arg for k in call.keywords)  # no **kwargs
            and isinstance(found, type)
            and found.__module__ == "torch.nn.modules.activation"
        ):
            return None
    return (
        f"the activation {str(text)[:80]!r} (netslim takes nn.NAME(numbers) of a torch activation)"
    )


def _argument(value: Any, builder_names: frozenset[str], depth: int = 0) -> str | None:
    """Why ``value`` may not be a layer's argument (None: it may)."""
    if value is None or isinstance(value, bool) or _number(value, -MAX_CHANNELS, MAX_CHANNELS):
        return None
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            return f"an argument string of {len(value)} characters"
        if value in builder_names and value not in YAML_NAMES:
            return f"the argument {value!r}, a variable of Ultralytics' model builder"
        return None
    if isinstance(value, (list, tuple)) and len(value) <= MAX_LAYERS and depth < 3:
        return next((w for v in value if (w := _argument(v, builder_names, depth + 1))), None)
    return f"the argument {str(value)[:40]!r}"


def check_yaml(cfg: Any, source: str = "the model YAML") -> dict[str, Any]:
    """A copy of the model YAML ``cfg`` (the dict Ultralytics' YAML files hold), once it
    is known to build only Ultralytics' and torch's layers, evaluate nothing and stay
    within the bounds of the module docs; NetslimError naming the first thing that is not."""
    tasks = _tasks()
    if not isinstance(cfg, dict) or not all(
        isinstance(cfg.get(k), list) for k in ("backbone", "head")
    ):
        raise NetslimError(
            f"{source} is not an Ultralytics model YAML (no backbone and head lists)"
        )
    layers = cfg["backbone"] + cfg["head"]
    scales = cfg.get("scales") or {}
    if not isinstance(scales, dict):
        scales = {"?": scales}
    # [depth, width, max_channels] per scale; the one Ultralytics builds sets the repeats
    multiples = [cfg.get("depth_multiple", 1.0), cfg.get("width_multiple", 1.0), MAX_CHANNELS]
    used = scales.get(cfg.get("scale"), next(iter(scales.values()), multiples))
    checks = [
        (1 <= len(layers) <= MAX_LAYERS, f"{len(layers)} layers (at most {MAX_LAYERS})"),
        *(
            (
                isinstance(s, list)
                and len(s) == 3
                and _number(s[0], 0, MAX_MULTIPLE)
                and _number(s[1], 0, MAX_MULTIPLE)
                and _number(s[2], 1, MAX_CHANNELS),
                f"the scale {str(s)[:60]} (depth and width multiples at most {MAX_MULTIPLE}, "
                f"max_channels at most {MAX_CHANNELS})",
            )
            for s in [multiples, *scales.values()]
        ),
        (cfg.get("nc") is None or _number(cfg["nc"], 1, MAX_CHANNELS), f"nc {cfg.get('nc')!r}"),
        (
            _number(cfg.get("channels", 3), 1, MAX_INPUT_CHANNELS),
            f"channels {cfg.get('channels')!r}",
        ),
        (_number(cfg.get("reg_max", 16), 1, 64), f"reg_max {cfg.get('reg_max')!r}"),
    ]
    why = next((text for ok, text in checks if not ok), None)
    depth = used[0] if why is None else 1.0
    why = why or _activation(cfg.get("activation"))
    builder_names = frozenset(tasks.parse_model.__code__.co_varnames)
    for i, layer in enumerate(layers if why is None else []):
        if not (isinstance(layer, (list, tuple)) and len(layer) == 4):
            why = f"layer {i}, which is not [from, repeats, module, args]"
            break
        source_layers, repeats, module, args = layer
        sources = source_layers if isinstance(source_layers, list) else [source_layers]
        if not all(isinstance(f, int) and -i - 1 <= f < i + 1 for f in sources):
            why = f"layer {i} reading from {str(source_layers)[:40]}, which are not earlier layers"
        elif not _number(repeats, 1, MAX_REPEATS) or repeats * max(depth, 1) > MAX_REPEATS:
            why = f"layer {i} repeated {repeats!r} times (at most {MAX_REPEATS})"
        elif not isinstance(args, list):
            why = f"layer {i}'s arguments {str(args)[:40]!r}, which are not a list"
        else:
            why = _layer_class(module, tasks) or _argument(args, builder_names)
            why = why and f"layer {i}: {why}"
        if why:
            break
    if why:
        raise NetslimError(
            f"{source} asks for {why}; netslim builds only YAMLs made of Ultralytics' and "
            "torch's layers, within bounds, and evaluates nothing in them"
        )
    return copy.deepcopy(cfg)


def _widths(module: nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    """The (in, out) widths of every conv and linear layer, the width of every BatchNorm."""
    found: dict[str, tuple[int, ...]] = {}
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, nn.Conv2d):
            found[name] = (m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            found[name] = (m.in_features, m.out_features)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            found[name] = (m.num_features,)
    return found


def _sized_on_meta(config: dict[str, Any], counts: dict[str, Any] | None, source: str) -> None:
    """Build the layers ``config`` describes on the meta device (no memory) and refuse them
    when they are too large, or when the stored ``counts`` name other layers or wider ones."""
    tasks = _tasks()
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
        layers, _ = tasks.parse_model(
            copy.deepcopy(config), ch=config.get("channels", 3), verbose=False
        )
    params = sum(p.numel() for p in layers.parameters())
    if params > MAX_PARAMS:
        raise NetslimError(
            f"{source} describes a network of {params:,} parameters, more than netslim builds "
            f"({MAX_PARAMS:,}, 4x the largest YOLO Ultralytics ships); the file may have been "
            "edited to exhaust memory"
        )
    check_memory(4 * params, f"{source}'s network", "this file cannot be read on this machine")
    if counts is None:
        return
    built = _widths(layers, "model")
    stored = {name: tuple(c[:2] if len(c) > 1 else c) for name, c in counts.items()}
    odd = sorted(set(stored) ^ set(built))
    wider = [n for n in stored if n in built and any(s > b for s, b in zip(stored[n], built[n]))]
    if odd or wider:
        which = (
            f"other layers than its YAML builds ({', '.join(odd[:3])})"
            if odd
            else f"layers wider than its YAML builds ({', '.join(wider[:3])})"
        )
        raise NetslimError(
            f"{source}: the weights describe {which}; the file is damaged or was edited"
        )


def checked_yaml(
    cfg: str | dict,
    num_classes: int | None = None,
    *,
    counts: dict[str, Any] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """The model YAML a name (``"yolov8n.yaml"``, one Ultralytics ships, or a YAML file) or a
    dict holds, with ``num_classes`` classes (None: the YAML's), once :func:`check_yaml`
    passed it and its network was sized on the meta device (see the module docs). ``counts``,
    the channel counts of the weights that will be loaded into it (a pruned network's),
    must name the layers the YAML builds and be no wider. NetslimError, in one line, for
    anything refused or that Ultralytics cannot read or build."""
    tasks = _tasks()
    source = source or (cfg if isinstance(cfg, str) else "the stored model YAML")
    with _quiet(source):
        config = check_yaml(tasks.yaml_model_load(cfg) if isinstance(cfg, str) else cfg, source)
        if num_classes is not None:
            config["nc"] = num_classes
        _sized_on_meta(config, counts, source)
    return config


@contextlib.contextmanager
def _quiet(source: str):
    """Ultralytics' log lines off the screen ("Overriding model.yaml nc=80 with nc=5" is no
    news), its failures as one NetslimError naming ``source``."""
    quiet = logging.getLogger("ultralytics")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    except NetslimError:
        raise
    except Exception as e:  # an unknown YAML name, a malformed dict: Ultralytics' own words
        detail = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise NetslimError(f"cannot build the Ultralytics model {source}: {detail}") from None
    finally:
        quiet.setLevel(level)


def build_ultralytics(
    cfg: str | dict,
    num_classes: int | None = None,
    *,
    counts: dict[str, Any] | None = None,
    source: str | None = None,
) -> nn.Module:
    """The Ultralytics model :func:`checked_yaml` of the same arguments describes, with fresh
    weights: ``DetectionModel``, ``SegmentationModel``, ... as the YAML's task says."""
    tasks = _tasks()
    source = source or (cfg if isinstance(cfg, str) else "the stored model YAML")
    config = checked_yaml(cfg, num_classes, counts=counts, source=source)
    classes = {
        "detect": tasks.DetectionModel,
        "segment": tasks.SegmentationModel,
        "classify": tasks.ClassificationModel,
        "pose": tasks.PoseModel,
        "obb": tasks.OBBModel,
    }
    with _quiet(source):
        task = tasks.guess_model_task(config)
    head = str(config["head"][-1][2]) if config["head"] else ""
    if head in UNBUILT_HEADS or task not in classes:
        what = (
            f"its head {head} {UNBUILT_HEADS[head]}"
            if head in UNBUILT_HEADS
            else (f"its task is {task!r}")
        )
        raise NetslimError(
            f"cannot build the Ultralytics model {source}: {what}; netslim builds the "
            f"{', '.join(classes)} YOLOs"
        )
    with _quiet(source):
        model = classes[task]
        return model(cfg=config, ch=config.get("channels", 3), nc=num_classes, verbose=False)
