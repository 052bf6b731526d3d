"""Reading Ultralytics ``.pt`` files without running their code, and writing them.

An Ultralytics checkpoint is a pickle of whole modules (``DetectionModel`` and every layer
in it). Unpickling can call any function the file names, and even a weights-only
unpickler that allows Ultralytics' classes lets the file *call* them: a file can build
``DetectionModel(cfg)`` with a ``cfg`` whose activation Ultralytics' builder evaluates.
:func:`read_checkpoint` therefore builds nothing the file names:

1. the classes the file names are read from the archive without unpickling
   (``torch.serialization.get_unsafe_globals_in_checkpoint``); any name that is not a
   layer of ``torch.nn`` or Ultralytics (or one of the few plain-data classes Ultralytics
   pickles) is refused, naming it;
2. torch's weights-only unpickler reads the file with each of those names bound to a
   :class:`Pickled` record: an object that only keeps the attributes pickled with it.
   A file that *calls* a class (rather than restoring an object's attributes, which is
   how a module is pickled) is refused;
3. :func:`read_model` rebuilds the network from the model YAML the record holds, checked
   by :func:`netslim.models.yolo_yaml.check_yaml` and sized before it is built, resized to
   the channel counts of the weights (a pruned network keeps its widths) and loaded with
   them; every layer must be of the class the file says.

``trust_pickle=True`` (the CLI's ``--trust-pickle``) reads the file with the full
unpickler instead, as Ultralytics itself does, and says so: only for a file whose author
you trust.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pickle
import sys
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from torch import nn

from netslim.checkpoint import _check_archive, load, model_from_checkpoint, own_safe_globals
from netslim.errors import NetslimError
from netslim.files import atomic_write

# Where the classes of a model's layers live (names outside are not layers)
LAYER_HOMES = ("torch.nn.modules.", "ultralytics.nn.")
# Plain-data classes Ultralytics pickles beside its layers: records too, never called
DATA_CLASSES = (
    "ultralytics.utils.IterableSimpleNamespace",
    "ultralytics.utils.loss.",
    "ultralytics.utils.tal.",
    "ultralytics.nn.distill_model.FeatureHook",  # distillation's forward hooks (a dict, an index)
)
# Old names Ultralytics' own loader maps to current ones (its torch_safe_load)
ALIASES = {
    "ultralytics.nn.modules.block.Silence": "torch.nn.modules.linear.Identity",
    "ultralytics.nn.tasks.YOLOv10DetectionModel": "ultralytics.nn.tasks.DetectionModel",
    "ultralytics.yolo.utils.IterableSimpleNamespace": "ultralytics.utils.IterableSimpleNamespace",
}


class Pickled:
    """An object of a class a file names, read as the attributes pickled with it: nothing
    of the class runs. ``cls`` is the class it names (``None`` for plain-data classes)."""

    name = ""
    cls: type | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Pickled:
        if args or kwargs:  # a call with arguments, not an object's attributes restored
            raise pickle.UnpicklingError(f"the file calls {cls.name}(...)")
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # a pickle restores attributes with __setstate__; __init__ is never meant to run

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots), as pickle passes it
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(
                f"the file restores a {self.name} from a {type(state).__name__}"
            )
        self.__dict__.update(state)


def _record_class(name: str, cls: type | None) -> type:
    return type(name.rpartition(".")[2], (Pickled,), {"name": name, "cls": cls})


def _attribute(owner: Any, name: str) -> Any:
    """``getattr`` as Ultralytics' files use it (a layer's ``forward`` kept as an attribute):
    on a record only, giving a record of the attribute."""
    if isinstance(owner, Pickled) or (isinstance(owner, type) and issubclass(owner, Pickled)):
        return _record_class(f"{owner.name}.{name}", None)()
    raise pickle.UnpicklingError(f"the file calls getattr on a {type(owner).__name__}")


def _scalar(dtype: Any, data: bytes) -> Any:
    """A numpy scalar from its dtype and bytes (numpy's own pickle of one)."""
    if not isinstance(dtype, np.dtype) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("the file builds a numpy scalar from other objects")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


# Functions and data classes a file may use, bound to harmless stand-ins
DATA = {
    "builtins.getattr": _attribute,
    "numpy.dtype": np.dtype,
    "numpy.core.multiarray.scalar": _scalar,
    "numpy._core.multiarray.scalar": _scalar,
    "pathlib.PosixPath": PurePosixPath,
    "pathlib.WindowsPath": PureWindowsPath,
    "pathlib._local.PosixPath": PurePosixPath,
    "pathlib._local.WindowsPath": PureWindowsPath,
}


def _layer(name: str) -> type | None:
    """The layer class ``name`` names, among modules already imported (nothing is imported
    that Ultralytics' and torch's own import did not), or None."""
    module, _, attr = name.rpartition(".")
    found = getattr(sys.modules.get(module), attr, None)
    if isinstance(found, type) and issubclass(found, nn.Module) and found.__module__ == module:
        return found
    return None


def _bindings(path: Path, names: list[str]) -> list[tuple[Any, str]]:
    """What each global the file names is bound to while unpickling; NetslimError for a
    name outside the layers and plain data an Ultralytics checkpoint holds."""
    importlib.import_module("ultralytics.nn.tasks")  # its layer modules, all of them
    importlib.import_module("ultralytics.utils.loss")
    with contextlib.suppress(ImportError):  # the distillation wrapper (Ultralytics >= 8.4)
        importlib.import_module("ultralytics.nn.distill_model")
    bound = []
    for name in names:
        current = ALIASES.get(name, name)
        if name.startswith("numpy.dtypes."):  # numpy's dtype classes (numpy >= 1.25)
            bound.append((getattr(np.dtypes, name.rpartition(".")[2]), name))
        elif current in DATA:
            bound.append((DATA[current], name))
        elif current.startswith(LAYER_HOMES) and _layer(current) is not None:
            bound.append((_record_class(current, _layer(current)), name))
        elif current.startswith(DATA_CLASSES):
            bound.append((_record_class(current, None), name))
        else:
            raise NetslimError(
                f"{path} names {name}, which is not a layer of torch or Ultralytics; netslim "
                "refused to unpickle it, since that could run the file's code. If you trust "
                "the file and its author, pass --trust-pickle (Python: trust_pickle=True)"
            )
    return bound


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Any]:
    """The dict an Ultralytics ``.pt`` file holds, read without running code (see the
    module docs): its modules as :class:`Pickled` records. With ``trust_pickle``, read by
    the full unpickler, real modules and all (a warning says so). NetslimError, in one
    line, for a damaged file or one that names or calls other code."""
    path = Path(path)
    if not path.is_file():
        raise NetslimError(f"{path} does not exist (or is not a file)")
    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"
    if zipped:
        _check_archive(path)
    try:
        if trust_pickle:
            warnings.warn(
                f"trusting {path}: reading it with the full unpickler, which runs any code "
                "the file names (--trust-pickle)",
                stacklevel=2,
            )
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        else:
            if not zipped:
                raise NetslimError(
                    f"{path} is not a zip archive as torch.save writes; netslim reads only those"
                )
            with own_safe_globals():
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
                torch.serialization.add_safe_globals(_bindings(path, names))
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        inner = str(e.__context__ or e).strip().splitlines()
        said = next((line for line in inner if "the file " in line), "")
        named = said or next(
            (line for line in inner if "GLOBAL" in line), inner[0] if inner else ""
        )
        raise NetslimError(
            f"{path}: {named.strip()[:160]}; netslim refused to unpickle it, since that would "
            "run the file's code. If you trust the file and its author, pass --trust-pickle "
            "(Python: trust_pickle=True)"
        ) from None
    except NetslimError:
        raise
    except Exception as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise NetslimError(
            f"{path} is not an Ultralytics checkpoint, or it is damaged: {detail}"
        ) from None
    kinds = (nn.Module,) if trust_pickle else (Pickled,)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint_network(checkpoint), kinds):
        raise NetslimError(
            f"{path} is not an Ultralytics checkpoint: it holds no model ('ema' or 'model'); "
            "a netslim checkpoint (.pth) is read by netslim.load"
        )
    return checkpoint


def _modules(record: Pickled, path: Path, prefix: str = "") -> dict[str, Pickled]:
    """Every record of a module tree by its name in the tree, the root as ``""``."""
    found, stack = {}, [(prefix, record)]
    while stack:  # not recursive: a file may nest deeper than Python's recursion limit
        name, node = stack.pop()
        if not isinstance(node, Pickled) or node.cls is None:
            raise NetslimError(
                f"{path}: its module {name or 'model'} is a {type(node).__name__}, not a layer"
            )
        found[name] = node
        children = node.__dict__.get("_modules") or {}
        if not isinstance(children, dict):
            raise NetslimError(f"{path}: the module {name or 'model'} holds no table of layers")
        stack += [
            (f"{name}.{k}" if name else str(k), v) for k, v in children.items() if v is not None
        ]
    return found


def _weights(
    records: dict[str, Pickled], path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The state_dict and the channel counts (as :func:`netslim.engine.surgery.channel_counts`
    gives them) of a module tree of records."""
    state, counts = {}, {}
    for name, record in records.items():
        attrs = record.__dict__
        transient = attrs.get("_non_persistent_buffers_set") or set()
        held = [
            *(attrs.get("_parameters") or {}).items(),
            *((k, v) for k, v in (attrs.get("_buffers") or {}).items() if k not in transient),
        ]
        for key, value in held:
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise NetslimError(
                    f"{path}: {name}.{key} is a {type(value).__name__}, not a tensor"
                )
            state[f"{name}.{key}" if name else key] = value
        cls = record.cls
        params = attrs.get("_parameters") or {}
        if issubclass(cls, nn.Conv2d):
            counts[name] = [
                attrs.get("in_channels"),
                attrs.get("out_channels"),
                attrs.get("groups"),
                int(params.get("bias") is not None),
            ]
        elif issubclass(cls, nn.Linear):
            counts[name] = [
                attrs.get("in_features"),
                attrs.get("out_features"),
                int(params.get("bias") is not None),
            ]
        elif issubclass(cls, nn.modules.batchnorm._BatchNorm):
            counts[name] = [attrs.get("num_features")]
    return state, counts


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is made of strings, numbers, None and containers of them only."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)) and depth < 4:
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 4:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def model_of(record: Pickled, path: str | Path) -> nn.Module:
    """The network a :class:`Pickled` model record describes, rebuilt from its model YAML
    (checked and sized first) and its weights, in fp32 and eval mode."""
    path = Path(path)
    cfg = record.__dict__.get("yaml")
    if not isinstance(cfg, dict):
        raise NetslimError(
            f"{path} holds a {record.name.rpartition('.')[2]} without the model YAML netslim "
            "rebuilds a YOLO from; if you trust the file, pass --trust-pickle"
        )
    records = _modules(record, path)
    state, counts = _weights(records, path)
    checkpoint = {
        "state_dict": state,
        "channels": counts,
        "netslim": {"arch": arch_of(record), "yaml": cfg, "num_classes": cfg.get("nc")},
    }
    model = model_from_checkpoint(checkpoint, str(path))
    built = dict(model.named_modules(remove_duplicate=False))
    odd = next(
        (
            n
            for n in set(built) | set(records)
            if n not in built or n not in records or type(built[n]) is not records[n].cls
        ),
        None,
    )
    if odd is not None:
        said = records[odd].name if odd in records else "no layer"
        made = type(built[odd]).__name__ if odd in built else "no layer"
        raise NetslimError(
            f"{path}: its layer {odd or 'model'} is {said} where its model YAML builds {made} "
            "(a fused or edited network); netslim rebuilds a YOLO from its YAML, so it cannot read "
            "this file; if you trust it, pass --trust-pickle"
        )
    for attr in ("names", "args"):  # the class names, the training settings: plain data only
        value = record.__dict__.get(attr)
        if _plain(value):
            setattr(model, attr, value)
    return model.float().eval()


def module_weights(record: Pickled, path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict of a :class:`Pickled` module record (e.g. the projector Ultralytics'
    distillation trains beside the student), read without building anything it names."""
    return _weights(_modules(record, Path(path)), Path(path))[0]


def checkpoint_network(checkpoint: dict[str, Any]) -> Any:
    """The network an Ultralytics checkpoint holds: its EMA, which Ultralytics validates and
    resumes from, or its model where it has no EMA (None: neither)."""
    return checkpoint.get("ema") or checkpoint.get("model")


def read_model(path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """The model of an Ultralytics ``.pt`` file (its EMA when it has one) in fp32, eval mode,
    rebuilt without running the file's code (see the module docs)."""
    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
    model = checkpoint_network(checkpoint)
    return model.float().eval() if trust_pickle else model_of(model, path)


def write_model(
    model: nn.Module, path: str | Path, train_args: dict[str, Any] | None = None
) -> None:
    """Write ``model`` as Ultralytics writes a trained model, so that ``ultralytics.YOLO(path)``
    loads it (fp32: a pruned network's small channels lose nothing to fp16); atomically."""
    import copy
    from datetime import datetime

    import ultralytics

    checkpoint = {
        "epoch": -1,
        "best_fitness": None,
        "model": None,
        "ema": copy.deepcopy(model).float().eval(),
        "updates": None,
        "optimizer": None,
        "train_args": dict(train_args or {}),
        "date": datetime.now().astimezone().isoformat(),
        "version": ultralytics.__version__,
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def missing_weights(path: Path) -> str:
    """One line for a YOLO's weights that are not on disk: netslim never downloads them
    (Ultralytics' downloads are off; no internet is assumed), so say how to bring them."""
    what = "is a folder, not a file" if path.is_dir() else "does not exist"
    releases = "Ultralytics' releases (github.com/ultralytics/assets/releases)"
    if path.stem.lower().startswith("yolo") and path.suffix == ".pt":  # a release's name
        bring = (
            f"download {path.name} from {releases} on a machine with internet and pass its "
            f"path, or start from fresh weights with its YAML ({path.stem}.yaml)"
        )
    else:
        bring = (
            "bring the file to this machine and pass its path (Ultralytics' own weights, such "
            "as yolov8n.pt, come from github.com/ultralytics/assets/releases), or start from "
            "fresh weights with a model YAML (yolov8n.yaml)"
        )
    return (
        f"{path} {what}: netslim never downloads weights (it assumes no internet, and "
        f"Ultralytics' downloads are off); {bring}"
    )


def read_yolo(path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """A YOLO from an Ultralytics ``.pt`` (read without running code) or a netslim ``.pth``."""
    path = Path(path)
    if not path.is_file():
        raise NetslimError(missing_weights(path))
    if path.suffix == ".pt":
        return read_model(path, trust_pickle=trust_pickle)
    model = load(path)
    if not type(model).__module__.startswith("ultralytics."):
        raise NetslimError(
            f"{path} holds a {type(model).__name__}, not an Ultralytics YOLO; prune it with "
            "netslim prune (the classifier flow)"
        )
    return model


def arch_of(model: nn.Module | Pickled) -> str:
    """The spec a YOLO is saved under (its own YAML is stored beside it)."""
    cfg = (model.__dict__ if isinstance(model, Pickled) else vars(model)).get("yaml") or {}
    return f"ultralytics:{Path(str(cfg.get('yaml_file', 'model.yaml'))).name}"
