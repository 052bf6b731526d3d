"""Reading Ultralytics ``.pt`` files without running their code, and writing them.

An Ultralytics checkpoint is a pickle of whole modules (``DetectionModel`` and every layer in
it), and unpickling can call any function the file names: loading a ``.pt`` from elsewhere
with plain ``torch.load`` trusts it as much as running a script from its author.
:func:`read_model` reads it with torch's weights-only unpickler instead, allowing only the
classes an Ultralytics model is built of (Ultralytics' and ``torch.nn``'s modules, plain
containers): nothing else can be constructed or called, so nothing runs. A file naming
anything outside that list is refused, naming what it asked for; ``trust_pickle=True``
(the CLI's ``--trust-pickle``) reads it with the full unpickler, as Ultralytics itself does.
"""

from __future__ import annotations

import functools
import inspect
import io
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netslim.checkpoint import _check_archive, load
from netslim.errors import NetslimError
from netslim.files import atomic_write


@functools.cache
def allowed_classes() -> tuple[type, ...]:
    """The classes an Ultralytics checkpoint may hold: every ``nn.Module`` subclass of
    ``torch.nn``, ``ultralytics.nn.modules`` and ``ultralytics.nn.tasks``, and Ultralytics'
    ``IterableSimpleNamespace``."""
    import ultralytics.nn.modules
    import ultralytics.nn.tasks  # noqa: F401  (its model classes: DetectionModel, ...)

    found: set[type] = set()
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "")
        if not name.startswith(
            ("torch.nn.modules", "ultralytics.nn.modules", "ultralytics.nn.tasks")
        ):
            continue
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, nn.Module) and obj.__module__.startswith(
                ("torch.nn.modules", "ultralytics.nn")
            ):
                found.add(obj)
    # and the one other class Ultralytics pickles: the attribute bag of a model's ``args``
    # in a checkpoint written mid-training (a SimpleNamespace: it sets attributes, no more)
    from ultralytics.utils import IterableSimpleNamespace

    found.add(IterableSimpleNamespace)
    return tuple(sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}"))


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Any]:
    """The dict an Ultralytics ``.pt`` file holds, read without running code (see the
    module docs); NetslimError, in one line, for a damaged file or one that names other
    code."""
    from netslim.models.external import offline_ultralytics

    path = Path(path)
    if not path.is_file():
        raise NetslimError(f"{path} does not exist (or is not a file)")
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            _check_archive(path)
    offline_ultralytics()
    try:
        if trust_pickle:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(list(allowed_classes())):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        inner = str(e.__context__ or e).strip().splitlines()
        named = next(
            (line for line in inner if "GLOBAL" in line or "global" in line),
            inner[0] if inner else "",
        )
        raise NetslimError(
            f"{path} names code outside Ultralytics' and torch's layers ({named.strip()[:160]}); "
            "netslim refused to unpickle it, since that would run the file's code. If you trust "
            "the file and its author, pass --trust-pickle (Python: trust_pickle=True)"
        ) from None
    except NetslimError:
        raise
    except Exception as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise NetslimError(
            f"{path} is not an Ultralytics checkpoint, or it is damaged: {detail}"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(
        checkpoint.get("ema") or checkpoint.get("model"), nn.Module
    ):
        raise NetslimError(
            f"{path} is not an Ultralytics checkpoint: it holds no model ('ema' or 'model'); "
            "a netslim checkpoint (.pth) is read by netslim.load"
        )
    return checkpoint


def read_model(path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """The model of an Ultralytics ``.pt`` file (its EMA when it has one) in fp32, eval mode."""
    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
    model = checkpoint.get("ema") or checkpoint["model"]
    return model.float().eval()


def write_model(
    model: nn.Module, path: str | Path, train_args: dict[str, Any] | None = None
) -> None:
    """Write ``model`` as Ultralytics writes a trained model, so that ``ultralytics.YOLO(path)``
    loads it (fp32: a pruned network's small channels lose nothing to fp16); atomically."""
    import copy
    from datetime import datetime

    import ultralytics

    checkpoint = {
        "epoch": -1, "best_fitness": None, "model": None, "ema": copy.deepcopy(model).float().eval(),
        "updates": None, "optimizer": None, "train_args": dict(train_args or {}),
        "date": datetime.now().astimezone().isoformat(), "version": ultralytics.__version__,
    }  # fmt: skip
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def read_yolo(path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """A YOLO from an Ultralytics ``.pt`` (read without running code) or a netslim ``.pth``."""
    path = Path(path)
    if path.suffix == ".pt":
        return read_model(path, trust_pickle=trust_pickle)
    model = load(path)
    if not type(model).__module__.startswith("ultralytics."):
        raise NetslimError(
            f"{path} holds a {type(model).__name__}, not an Ultralytics YOLO; prune it with "
            "netslim prune (the classifier flow)"
        )
    return model


def arch_of(model: nn.Module) -> str:
    """The spec a YOLO is saved under (its own YAML is stored beside it)."""
    name = Path(str((getattr(model, "yaml", None) or {}).get("yaml_file", "model.yaml"))).name
    return f"ultralytics:{name}"
