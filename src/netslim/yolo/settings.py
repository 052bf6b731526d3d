"""Ultralytics' ``KEY=VALUE`` training settings and the device, checked before its trainer starts.

``netslim yolo train|finetune|lab`` pass Ultralytics' own settings through to its trainer.
Each is checked here first, so that a bad one ends in one line naming it, never in
Ultralytics' traceback nor in a run that silently does something else:

* **keys netslim owns** (:data:`FLAG_KEYS`, :data:`OWNED`): those its flags set (``epochs=``
  repeats ``--epochs``), those that place the run's files (``project``, ``name``,
  ``save_dir``, ``exist_ok``: the run folder is ``--out``), and those netslim must control
  (``model``, ``data``, ``mode``, ``task``, ``cfg``, and ``pretrained``/``distill_model``,
  which Ultralytics would read with its full unpickler, running the file's code);
* **unknown keys**, with the closest known ones (Ultralytics' ``default.yaml`` lists them);
* **values by type and range**, from Ultralytics' own key tables (``CFG_BOOL_KEYS``,
  ``CFG_FRACTION_KEYS``, ...), then its own ``check_cfg``; sizes (``imgsz``, ``batch``,
  ``workers``, ``multi_scale``'s largest size) within :mod:`netslim.limits`' bounds;
* **the device**: one this machine has (:func:`check_device`).

One function per rule; :func:`parse_settings` (the command line) and :func:`check_settings`
(:func:`netslim.yolo.train.train`, the lab) call them.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable

import torch
from ultralytics.cfg import (
    CFG_BOOL_KEYS,
    CFG_FLOAT_KEYS,
    CFG_FRACTION_KEYS,
    CFG_INT_KEYS,
    CFG_INT_MIN,
    DEFAULT_CFG_DICT,
    check_cfg,
    smart_value,
)

from netslim.errors import NetslimError
from netslim.limits import (
    MAX_IMAGE_SIZE,
    check_batch_memory,
    check_count,
    check_image_size,
    cpu_count,
)

# The Ultralytics keys a netslim flag sets, and that flag.
FLAG_KEYS = {
    "model": "--model",
    "data": "--data",
    "epochs": "--epochs",
    "imgsz": "--image-size",
    "batch": "--batch-size",
    "device": "--device",
    "resume": "--resume",
}
RUN_FOLDER = "the run folder is --out"
# The other keys netslim sets or must keep from Ultralytics, and why.
OWNED = {
    "project": RUN_FOLDER,
    "name": RUN_FOLDER,
    "save_dir": RUN_FOLDER,
    "exist_ok": "netslim writes the run into --out itself (exist_ok=False would move it to OUT2)",
    "mode": "netslim runs Ultralytics' trainer, in its train mode",
    "task": "the task is the model's own (netslim reads it from the network)",
    "cfg": "the trainer netslim runs reads no cfg file; give each setting as KEY=VALUE",
    "pretrained": "Ultralytics would read that file with its full unpickler, which runs the "
    "file's code; give a trained .pt as --model (read without running code)",
    "distill_model": "Ultralytics would read the teacher with its full unpickler, which runs "
    "the file's code; name it with --teacher PATH (netslim reads it safely and Ultralytics' "
    "distillation trains with it)",
}
# The API takes these as settings (train(batch=16, device="cpu")); the command line as flags.
API_KEYS = ("batch", "device")
EXTRA_KEYS = ("augmentations",)  # Ultralytics' one key outside default.yaml (Albumentations)
# Ultralytics' choices for its string settings (its trainer's optimizer list, default.yaml)
CHOICES = {
    "optimizer": ("SGD", "MuSGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop", "auto"),
    "split": ("val", "test", "train"),
    "copy_paste_mode": ("flip", "mixup"),
    "auto_augment": ("randaugment", "autoaugment", "augmix"),
    "cache": (True, False, "ram", "disk"),
}
INT_MIN = {**CFG_INT_MIN, "close_mosaic": 0, "workers": 0}  # netslim's floors beside Ultralytics'


# -- the command line: KEY=VALUE as Ultralytics values it ---------------------------------


def parse_settings(pairs: list[str], step: str = "train") -> dict[str, Any]:
    """``KEY=VALUE`` settings of ``netslim yolo STEP`` as Ultralytics' command line values them
    (``lr0=0.01`` a float, ``amp=False`` a bool); NetslimError for a key given twice, without a
    value, or that netslim owns (:func:`check_not_owned`)."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if not text.strip():
            raise NetslimError(f"{pair}: {key} has no value; write {key}=VALUE")
        if key in settings:
            raise NetslimError(f"{key}= is given twice; keep one")
        settings[key] = smart_value(text.strip())
        check_not_owned(key, text.strip(), step)
    return settings


def check_not_owned(key: str, text: str, step: str = "train") -> None:
    """NetslimError for a key that repeats a netslim flag or that netslim controls, naming
    the flag to use instead (``epochs=3 repeats --epochs: use --epochs 3``)."""
    if key in OWNED:
        raise NetslimError(f"{key}={text}: {OWNED[key]}")
    if key not in FLAG_KEYS:
        return
    if key == "model" and step == "finetune":
        raise NetslimError(f"model={text}: the network to fine-tune is the CHECKPOINT argument")
    if key == "resume":
        how = "run the same command again" if step == "lab" else "add --resume"
        raise NetslimError(f"resume={text} repeats --resume: to continue the run in --out, {how}")
    flag = FLAG_KEYS[key]
    check = FLAG_CHECKS.get(key)
    try:
        if check is not None:
            check(smart_value(text), flag)
    except NetslimError as e:
        raise NetslimError(f"{key}={text} repeats {flag}: use {flag} instead ({e})") from None
    raise NetslimError(f"{key}={text} repeats {flag}: use {flag} {text}")


# -- the Python API (and the lab): every setting the trainer gets ---------------------------


def check_settings(settings: dict[str, Any], *, epochs: int, imgsz: int) -> None:
    """NetslimError, in one line, for any setting Ultralytics' trainer would refuse with a
    traceback or follow somewhere else: ``settings`` are :func:`netslim.yolo.train.train`'s
    overrides (``batch``, ``device``, ``lr0``, ...); ``epochs`` and ``imgsz`` its own."""
    for key in settings:
        if key in OWNED or (key in FLAG_KEYS and key not in API_KEYS):
            raise NetslimError(f"{key}= in the settings: {OWNED.get(key) or _set_by(key)}")
        check_known(key, settings[key])
    check_epochs(epochs)
    check_image_size(imgsz)
    check_batch(settings.get("batch", DEFAULT_CFG_DICT["batch"]), imgsz)
    check_device(settings.get("device"), "device=" if "device" in settings else "--device")
    for key, value in settings.items():
        if key not in API_KEYS:
            check_value(key, value)
    batch = settings.get("batch", DEFAULT_CFG_DICT["batch"])
    check_largest_image(imgsz, settings.get("multi_scale", 0.0), batch)
    _check_with_ultralytics({**settings, "epochs": epochs, "imgsz": imgsz})


def _set_by(key: str) -> str:
    return f"netslim sets it ({FLAG_KEYS[key]})"


def check_known(key: str, value: Any = "") -> None:
    """NetslimError for a key Ultralytics does not have, naming the closest ones it has."""
    if key in DEFAULT_CFG_DICT or key in EXTRA_KEYS:
        return
    close = difflib.get_close_matches(key, list(DEFAULT_CFG_DICT), n=3)
    hint = f"the closest are {', '.join(close)}" if close else "see `yolo cfg` for its settings"
    raise NetslimError(f"{key}={value}: Ultralytics has no setting {key!r}; {hint}")


def check_epochs(epochs: object, flag: str = "--epochs") -> int:
    """Epochs (``--epochs``, ``--finetune-epochs``): a whole number, at least 1."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise NetslimError(f"{flag} must be a whole number of epochs, at least 1, got {epochs!r}")
    return epochs


def check_batch(batch: object, imgsz: int, flag: str = "--batch-size") -> int:
    """Images per batch: at least 1, and a float32 batch of ``imgsz`` images that fits in
    memory (:func:`netslim.limits.check_batch_memory`). Ultralytics' AutoBatch (``-1``) and
    GPU-memory fractions are not offered: netslim sizes the batch."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise NetslimError(f"{flag} must be a whole number of images, at least 1, got {batch!r}")
    check_batch_memory(batch, imgsz, flag)
    return batch


def check_largest_image(imgsz: int, multi_scale: object, batch: object) -> None:
    """``multi_scale`` trains at up to ``imgsz * (1 + multi_scale)``: within the image-size
    bound, and a batch of it within memory."""
    if not _number(multi_scale) or not 0 < multi_scale <= 1:
        return  # none, or a bad value check_value names
    largest = math.ceil(imgsz * (1 + multi_scale))
    if largest > MAX_IMAGE_SIZE:
        raise NetslimError(
            f"multi_scale={multi_scale} trains at up to {largest} pixels (--image-size {imgsz} "
            f"times {1 + multi_scale:g}), more than {MAX_IMAGE_SIZE}; lower --image-size or multi_scale"
        )
    if isinstance(batch, int):
        check_batch_memory(batch, largest, "--batch-size")


def check_workers(workers: int, flag: str = "workers") -> int:
    """Data-loading processes: 0 (load in the trainer's process) up to the CPUs this process
    may use."""
    return workers and check_count(workers, flag, cpu_count(), "the CPUs this process may use")


def check_value(key: str, value: Any) -> None:
    """NetslimError unless ``value`` has the type and range Ultralytics' key tables give
    ``key`` (NaN and infinities refused too), and netslim's bounds on sizes."""
    default = DEFAULT_CFG_DICT.get(key)
    if value is None:
        if default is not None and (key in _TYPED or key in CHOICES):
            raise NetslimError(f"{key}=None: {key} needs a value ({_expected(key)})")
        return
    if key in CHOICES:
        _check_choice(key, value)
    elif key in CFG_BOOL_KEYS:
        if not isinstance(value, bool):
            raise NetslimError(f"{key}={value}: {_expected(key)}")
    elif key in CFG_INT_KEYS:
        _check_int(key, value)
    elif key in CFG_FRACTION_KEYS and key != "fraction":  # fraction: counts too (check_cfg)
        if not _number(value) or not 0 <= value <= 1:
            raise NetslimError(f"{key}={value}: {_expected(key)}")
    elif key in CFG_FLOAT_KEYS:
        if not _number(value) or value < 0:
            raise NetslimError(f"{key}={value}: {_expected(key)}")
    elif key == "freeze":
        _check_freeze(value)


_TYPED = CFG_BOOL_KEYS | CFG_INT_KEYS | CFG_FRACTION_KEYS | CFG_FLOAT_KEYS


def _expected(key: str) -> str:
    """What ``key`` takes, in words, with Ultralytics' default."""
    default = DEFAULT_CFG_DICT.get(key)
    if key in CHOICES:
        what = "one of " + ", ".join(map(str, CHOICES[key]))
    elif key in CFG_BOOL_KEYS:
        what = "True or False"
    elif key in CFG_INT_KEYS:
        what = f"a whole number >= {INT_MIN[key]}" if key in INT_MIN else "a whole number"
    elif key in CFG_FRACTION_KEYS:
        what = "a number from 0 to 1"
    else:
        what = "a number >= 0"
    return f"{key} takes {what}" + (
        f" (Ultralytics' default: {default})" if default is not None else ""
    )


def _number(value: object) -> bool:
    """A finite int or float (not a bool; an int of any size: math.isfinite would overflow)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _check_choice(key: str, value: Any) -> None:
    choices = CHOICES[key]
    folded = value.lower() if isinstance(value, str) else value
    if folded not in [c.lower() if isinstance(c, str) else c for c in choices]:
        raise NetslimError(f"{key}={value}: {_expected(key)}")


def _check_int(key: str, value: Any) -> None:
    whole = _number(value) and (isinstance(value, int) or value.is_integer())  # 1e2 is 100
    if not whole or int(value) < INT_MIN.get(key, -math.inf):
        raise NetslimError(f"{key}={value}: {_expected(key)}")
    if key == "workers":
        check_workers(int(value))


def _check_freeze(value: Any) -> None:
    """``freeze``: the first N layers (N >= 0) or a list of layer indices or names."""
    if isinstance(value, list) and all(isinstance(v, (int, str)) for v in value):
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return
    raise NetslimError(
        f"freeze={value}: freeze takes a number of layers >= 0 or a list of layer indices, e.g. [0, 1]"
    )


def _check_with_ultralytics(settings: dict[str, Any]) -> None:
    """Ultralytics' own check_cfg, for the rules its tables do not hold (scale, amp, compile,
    quantize, fraction), its message in one line."""
    try:
        check_cfg(dict(settings), hard=True)
    except (TypeError, ValueError) as e:
        raise NetslimError(" ".join(str(e).split())) from None


# -- the device ------------------------------------------------------------------------------


def available_devices() -> list[str]:
    """The devices this machine has, by the names --device takes."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        found.append("mps")
    return found


def check_device(device: Any, flag: str = "--device") -> str | None:
    """``device`` (netslim's auto, cpu, cuda, cuda:N, mps, or Ultralytics' N and N,M for DDP)
    as Ultralytics names it, None to let it choose; NetslimError for one this machine does
    not have, naming those it has."""
    text = ",".join(map(str, device)) if isinstance(device, (list, tuple)) else str(device)
    name = "" if device is None else text.strip().lower().replace(" ", "")
    if name in ("", "auto"):
        return None
    if name == "cpu":
        return name
    if name in ("mps", "mps:0"):
        if "mps" in available_devices():
            return "mps"
        raise _missing(flag, text, "no Apple MPS device (Apple silicon Macs have one)")
    if name.startswith(("npu", "xpu")):  # Ascend and Intel GPUs: Ultralytics checks the indices
        backend = getattr(torch, name[:3], None)
        if backend is not None and backend.is_available():
            return name
        raise _missing(flag, text, f"no {name[:3].upper()} device")
    return _cuda(name, flag, text)


def _cuda(name: str, flag: str, text: str) -> str:
    """CUDA GPUs: ``cuda``, ``cuda:N``, ``N``, ``N,M`` (``-1``: an idle one, Ultralytics picks)."""
    name = name.replace("cuda:", "")
    indices = ["0"] if name == "cuda" else name.split(",")
    if not all(i.isdigit() or i == "-1" for i in indices):
        raise NetslimError(
            f"{_named(flag, text)}: not a device; use auto, cpu, cuda, cuda:N, N,M (GPUs, for "
            "DDP) or mps"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise _missing(flag, text, "no CUDA GPU")
    beyond = [i for i in indices if i != "-1" and int(i) >= count]
    if beyond:
        raise _missing(flag, text, f"no CUDA GPU {beyond[0]}")
    return ",".join(str(int(i)) for i in indices)


def _named(flag: str, text: str) -> str:
    """``--device cuda`` or ``device=cuda``, as the user wrote it."""
    return f"{flag}{text}" if flag.endswith("=") else f"{flag} {text}"


def _missing(flag: str, text: str, what: str) -> NetslimError:
    return NetslimError(
        f"{_named(flag, text)}: this machine has {what}; its devices: "
        f"{', '.join(available_devices())} (or auto)"
    )


# How a value given as KEY=VALUE is checked against the flag it repeats.
FLAG_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "epochs": check_epochs,
    "imgsz": check_image_size,
    "batch": lambda value, flag: check_batch(value, 0, flag),  # the memory needs --image-size
    "device": check_device,
}
