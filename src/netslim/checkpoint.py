"""Reading and writing checkpoints in the paper's format, plus netslim's metadata.

Training checkpoints are ``{'epoch', 'state_dict', 'best_prec1', 'optimizer'}`` like
the official main.py writes; pruned ones are ``{'cfg', 'state_dict'}`` like its
vggprune.py. netslim adds a ``'netslim'`` dict of metadata (architecture, how the file
was made) and ``'channels'``, the channel counts of every conv, linear and BatchNorm
layer (:func:`netslim.engine.surgery.channel_counts`): architecture name plus channel counts
rebuild any pruned network, and VGGs also carry the official ``'cfg'``. Everything is
plain tensors, lists, numbers and strings, so files load with
``torch.load(..., weights_only=True)`` and no pickled module is ever executed.

What a file can make netslim do when it is read:

* nothing runs: the unpickler builds tensors, containers, numbers and strings only;
* a damaged file is refused: every record of the zip archive ``torch.save`` writes is
  checked against its CRC-32 before anything is unpickled (one flipped bit is enough);
* it names the network to build: one of netslim's own, or a torchvision or timm model by
  its registry name (code you installed). A file naming *your own* module
  (``pkg.mod:build``) is refused unless the caller names that module (``trust=``, the
  CLI's ``--trust-module``) or passes the builder: importing a module runs its code;
* sizes come from the tensors it holds: every stored channel count must match the shape
  of the weights it describes, so a file cannot make netslim allocate more than it holds.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from netslim import official
from netslim.engine.sparsity import bn_sparsity, gamma_quantiles
from netslim.engine.stats import count_macs, count_params
from netslim.engine.surgery import resize_layers
from netslim.errors import NetslimError
from netslim.files import atomic_write
from netslim.limits import check_image_size
from netslim.models import (
    ARCHS,
    VGG,
    VGG_CFGS,
    CfgItem,
    ChannelGather,
    build_model,
    is_spec,
    num_outputs,
    validate_cfg,
)
from netslim.models.external import trusted_spec
from netslim.models.yolo_yaml import build_ultralytics


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (temp file, then rename)."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file as a dict with at least ``'state_dict'``, or raise NetslimError.

    Accepts netslim checkpoints, the official code's checkpoints (training and pruned,
    with or without a DataParallel ``module.`` prefix) and bare VGG state_dicts. The
    paper's ResNet-164 and DenseNet-40 files come back in netslim's form
    (:func:`netslim.official.to_netslim`).
    """
    path = Path(path)
    if not path.is_file():
        raise NetslimError(f"checkpoint {path} does not exist (or is not a file)")
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        obj = {"state_dict": obj}  # a bare state_dict
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise NetslimError(
            f"{path} is not a network checkpoint: expected a dict with a 'state_dict' entry "
            "(as netslim and the network-slimming code write)"
        )
    obj["state_dict"] = {re.sub(r"^module\.", "", k): v for k, v in obj["state_dict"].items()}
    return official.to_netslim(obj, str(path))


def _torch_load(path: Path) -> Any:
    """``torch.load`` of tensors and plain values only, its failures as one NetslimError."""
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; before PyTorch 1.6 it wrote a pickle (protocol 2)
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        what = (
            f"it starts with {head!r}, neither a zip archive nor a pickle"
            if head
            else "the file is empty"
        )
        raise NetslimError(f"{path} is not a checkpoint written by torch.save: {what}")
    if head.startswith(b"PK"):
        _check_archive(path)
    try:
        with warnings.catch_warnings():  # a pickle not from torch.save: refused just below
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            with own_safe_globals():  # tensors and plain values only
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # PyTorch's own text advises loading with weights_only=False, which runs the file's
        # code; the refusal's reason is the error it wraps.
        inner = str(e.__context__ or "").strip().rstrip(".")
        if "ultralytics." in inner or "ultralytics." in str(e):
            raise NetslimError(
                f"{path} is an Ultralytics checkpoint (pickled modules), not netslim's: use the "
                "YOLO commands (netslim yolo prune|finetune|val), which read it without running "
                "its code"
            ) from None
        reason = inner if inner and "weights_only" not in inner else "it holds other objects"
        raise NetslimError(
            f"{path} is not a checkpoint written by torch.save of tensors and plain values "
            f"({reason}); netslim never runs code from a file"
        ) from None
    except Exception as e:  # torch.load fails in many ways on a bad file; all mean "unreadable"
        lines = str(e).strip().splitlines()
        detail = lines[0].split(". ")[0][:200] if lines else type(e).__name__
        raise NetslimError(
            f"{path} is not a checkpoint written by torch.save, or it is truncated: {detail}"
        ) from None


@contextlib.contextmanager
def own_safe_globals() -> Iterator[None]:
    """Torch's weights-only unpickler with no allowed globals but those the body adds
    (``torch.serialization.add_safe_globals``), the list as it was restored after. The list
    is process-wide, and Ultralytics' restricted loading adds its real layer classes to it
    for good: left there, a file read afterwards could build them, and through them run
    code (and ``get_unsafe_globals_in_checkpoint`` would no longer name them)."""
    serialization = torch.serialization
    before = serialization.get_safe_globals()
    serialization.clear_safe_globals()
    try:
        yield
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(before)


def _check_archive(path: Path) -> None:
    """Refuse a zip archive any record of which fails its CRC-32 (torch.load does not check)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise NetslimError(
            f"{path} is not a checkpoint written by torch.save, or it is truncated: {e}"
        ) from None
    if bad is not None:
        raise NetslimError(
            f"{path} is damaged: its record {bad} fails its CRC-32 check (the file changed "
            "after it was written); copy or download it again"
        )


def cfg_from_state_dict(
    state_dict: dict[str, torch.Tensor], source: str = "checkpoint"
) -> list[CfgItem]:
    """Recover a VGG cfg from state_dict keys: a conv takes 3 slots of ``feature``, a pool 1."""
    convs = sorted(
        int(m.group(1))
        for k, v in state_dict.items()
        if (m := re.fullmatch(r"feature\.(\d+)\.weight", k)) and v.dim() == 4
    )
    if not convs or "classifier.weight" not in state_dict:
        raise NetslimError(
            f"{source} does not hold a VGG: no 'feature.<i>.weight' conv or 'classifier.weight' "
            "in its state_dict"
        )
    cfg: list[CfgItem] = []
    position = 0
    for index in convs:
        if index < position:
            raise NetslimError(f"{source}: unexpected layer layout at feature.{index}")
        cfg += ["M"] * (index - position)
        cfg.append(int(state_dict[f"feature.{index}.weight"].shape[0]))
        position = index + 3
    return cfg


def model_from_checkpoint(
    checkpoint: dict[str, Any],
    source: str = "checkpoint",
    builder: Callable[[], nn.Module] | None = None,
    *,
    trust: str | Iterable[str] | None = None,
) -> nn.Module:
    """Rebuild the network a checkpoint describes and load its weights, checking they agree.

    A checkpoint naming an architecture other than VGG (netslim's own, or a spec such as
    ``torchvision:resnet18``) is rebuilt from that architecture and its ``'channels'``; a
    VGG (or a file of the paper's code, which has no metadata) from the cfg its state_dict
    implies; the paper's ResNet-164 and DenseNet-40 as :mod:`netslim.official` reads them.
    ``builder``, a callable returning the unpruned network, replaces the stored
    architecture: that is how a checkpoint of your own module loads. A checkpoint whose
    spec names your own module (``pkg.mod:build``) is built from it only when ``trust``
    names that module (or a package above it): importing a module runs its code, and the
    file, not you, chose the name.
    """
    checkpoint = official.to_netslim(checkpoint, source)
    state_dict = checkpoint["state_dict"]
    meta = checkpoint.get("netslim") or {}
    arch = meta.get("arch")
    by_arch = bool(arch) and (is_spec(arch) or arch in ARCHS) and arch not in VGG_CFGS
    if builder is not None or by_arch:
        what = arch or "network its builder returns"
        channels = checkpoint.get("channels")
        if channels is not None:
            if not isinstance(channels, dict):
                raise NetslimError(f"{source}: its 'channels' entry is not a dict of layers")
            _check_counts(channels, state_dict, source)
        elif arch is not None:
            raise NetslimError(f"{source}: a {arch} checkpoint needs its 'channels' entry")
        if builder is not None:
            model = builder()
            if not isinstance(model, nn.Module):
                raise NetslimError(f"the builder returned a {type(model).__name__}, not a module")
        else:
            if is_spec(arch) and not trusted_spec(arch, trust):
                module = arch.partition(":")[0]
                raise NetslimError(
                    f"{source} was saved from the module {module} (--arch {arch}); building "
                    f"it would import and run that module, and netslim imports a module a file "
                    f"names only with your consent: add --trust-module {module} if you trust "
                    f"it (in Python: netslim.load(path, trust={module!r}), or netslim.load(path, "
                    "builder))"
                )
            classes = _num_classes(meta, state_dict, source)
            stored = meta.get("yaml")  # an Ultralytics model's own YAML: rebuilt as it was
            if arch.startswith("ultralytics:") and isinstance(stored, dict):
                # a YAML from the file: checked, and sized against its weights, before it is built
                model = build_ultralytics(
                    stored, classes, counts=channels, source=f"{source}'s stored model YAML"
                )
                # its class names and image size, where Ultralytics keeps them (export reads them)
                names = meta.get("names")
                if (
                    isinstance(names, dict)
                    and len(names) == classes
                    and all(
                        isinstance(k, int) and isinstance(v, str) and len(v) <= 200
                        for k, v in names.items()
                    )
                ):
                    model.names = dict(names)
                if meta.get("image_size") is not None:
                    model.args = {"imgsz": image_size_of({"netslim": meta}, source)}
            else:
                model = build_model(arch, classes)
        if channels is not None:
            model = resize_layers(model, channels, source)
        official.install_gathers(model, state_dict, source)  # the paper's channel selections
        _load_weights(model, state_dict, source, what)
        return model
    try:
        inferred = cfg_from_state_dict(state_dict, source)
    except NetslimError:
        if arch is None and "channels" in checkpoint:  # netslim's file, but not of a VGG
            raise NetslimError(
                f"{source} holds a network saved from your own module (no architecture is "
                "stored); load it with netslim.load(path, builder), where builder() returns "
                "the unpruned module"
            ) from None
        raise
    cfg = checkpoint.get("cfg")
    if cfg is not None:
        cfg = validate_cfg(list(cfg))
        if cfg != inferred:
            raise NetslimError(
                f"{source}: its cfg {cfg} does not match the layers in its state_dict "
                f"{inferred}; the file is inconsistent (was it edited or written by another tool?)"
            )
    model = VGG(
        inferred, num_classes=int(state_dict["classifier.weight"].shape[0]), init_weights=False
    )
    _load_weights(model, state_dict, source, f"VGG {inferred}")
    return model


def image_size_of(checkpoint: dict[str, Any], source: str = "checkpoint") -> int:
    """The square input size the checkpoint's network was trained or pruned at (else 32)."""
    meta = checkpoint.get("netslim") or {}
    size = meta.get("image_size") or (meta.get("config") or {}).get("image_size") or 32
    try:
        return check_image_size(size, "its recorded image size")
    except NetslimError as e:
        raise NetslimError(f"{source}: {e}; the file is damaged or was edited") from None


def _check_counts(counts: dict[str, Any], state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Refuse channel counts that do not match the stored weights' shapes (before anything
    is allocated from them: a file cannot ask for layers larger than the tensors it holds)."""
    for name, count in counts.items():
        weight = state_dict.get(f"{name}.weight")
        if weight is None:  # a BatchNorm without affine parameters
            weight = state_dict.get(f"{name}.running_mean")
        ok = isinstance(count, (list, tuple)) and all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in count
        )
        if ok and weight is None and len(count) == 1:
            continue  # a BatchNorm without parameters or statistics: nothing to allocate
        ok = ok and weight is not None
        if ok:
            shape = tuple(weight.shape)
            if len(count) == 4:  # conv: in, out, groups, bias
                n_in, n_out, groups = count[:3]
                ok = (
                    groups >= 1 and len(shape) >= 2 and shape[:2] == (n_out, n_in // max(groups, 1))
                )
                ok = ok and n_in % groups == 0
            elif len(count) == 3:  # linear: in, out, bias
                ok = shape == (count[1], count[0])
            elif len(count) == 1:  # BatchNorm
                ok = shape == (count[0],)
            else:
                ok = False
        if not ok:
            found = "no weights" if weight is None else f"weights of shape {list(weight.shape)}"
            raise NetslimError(
                f"{source}: the channel counts {count!r} of layer {name} do not match its "
                f"stored {found}; the file is damaged or was edited"
            )


def _num_classes(meta: dict[str, Any], state_dict: dict[str, torch.Tensor], source: str) -> int:
    """The classes to build the network with: the metadata's, else the last linear layer's.

    Bounded by the file's size: a classifier of N classes holds at least N weights.
    """
    stored = meta.get("num_classes")
    if not stored:
        return _classes(state_dict)
    held = sum(t.numel() for t in state_dict.values() if torch.is_tensor(t))
    if isinstance(stored, bool) or not isinstance(stored, int) or not 1 <= stored <= held:
        raise NetslimError(
            f"{source}: its recorded number of classes {stored!r} cannot be right for the "
            f"{held:,} weights it holds; the file is damaged or was edited"
        )
    return stored


def _classes(state_dict: dict[str, torch.Tensor]) -> int:
    weights = [v for k, v in state_dict.items() if k.endswith(".weight") and v.dim() == 2]
    if not weights:
        raise NetslimError("the checkpoint's state_dict holds no linear layer")
    return int(weights[-1].shape[0])


def _load_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, what: str
) -> None:
    # Checkpoints from torch < 0.4 lack BN's num_batches_tracked; everything else must match.
    if getattr(state_dict, "_metadata", None) is None:
        # Files hold plain dicts, without the per-module format versions a state_dict
        # carries; some modules need them (torchvision's MNASNet refuses to load without).
        state_dict = OrderedDict(state_dict)
        state_dict._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # a shape mismatch
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise NetslimError(f"{source}: state_dict does not fit the {what}: {detail}") from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise NetslimError(
            f"{source}: state_dict does not fit the {what}: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def arch_name(checkpoint: dict[str, Any], model: nn.Module) -> str:
    """The architecture a checkpoint was made from: from its metadata, else by its cfg."""
    meta = checkpoint.get("netslim") or {}
    if meta.get("arch"):
        return str(meta["arch"])
    for name, known in VGG_CFGS.items():
        if isinstance(model, VGG) and known == model.cfg:
            return name
    return "vgg"


def load(
    path: str | Path,
    builder: Callable[[], nn.Module] | None = None,
    *,
    trust: str | Iterable[str] | None = None,
) -> nn.Module:
    """Load any netslim or network-slimming checkpoint as a ready model (in eval mode).

    Pruned checkpoints are rebuilt from their architecture and channel counts, so one
    call serves every file::

        model = netslim.load("runs/resnet56/pruned-40.pth")

    A checkpoint of your own module (saved by :func:`netslim.save` without a spec) loads
    with ``builder``, a callable that returns the *unpruned* module; its layers are then
    resized to the stored channel counts::

        model = netslim.load("pruned.pth", lambda: torchvision.models.resnet18(num_classes=10))

    A checkpoint saved with ``arch="mypkg.models:build"`` names your module; it is imported
    only when ``trust`` names it (``trust="mypkg.models"``, or ``"mypkg"`` for the package),
    since importing a module runs its code.
    """
    return model_from_checkpoint(read_checkpoint(path), str(path), builder, trust=trust).eval()


def stored_gammas(checkpoint: dict[str, Any]) -> torch.Tensor:
    """All BatchNorm gammas a netslim checkpoint holds, flat, in layer order, read from its
    tensors without building the network (as :func:`netslim.engine.sparsity.bn_gammas` of it)."""
    state_dict = checkpoint["state_dict"]
    gammas = [
        state_dict[f"{name}.weight"].flatten().float()
        for name, count in (checkpoint.get("channels") or {}).items()
        if len(count) == 1 and f"{name}.weight" in state_dict
    ]
    return torch.cat(gammas) if gammas else torch.empty(0)


def describe(
    path: str | Path, *, sparsity_threshold: float = 0.01, trust: str | Iterable[str] | None = None
) -> dict[str, Any]:
    """What ``netslim info`` prints of a checkpoint, as a dict: architecture, kind, channels,
    classes, parameters, MACs at its image size, sparsity and |gamma| quantiles, the paper's
    channel selections, its epoch and best accuracy, and how it was pruned."""
    checkpoint = read_checkpoint(path)
    model = model_from_checkpoint(checkpoint, str(path), trust=trust)
    meta = checkpoint.get("netslim") or {}
    size = image_size_of(checkpoint, str(path))
    info = {
        "arch": arch_name(checkpoint, model),
        # files without a recorded kind: pruned if they hold a prune report
        "kind": meta.get("kind")
        or ("pruned" if "prune" in meta else "train" if "epoch" in checkpoint else "network"),
        "cfg": model.cfg if isinstance(model, VGG) else None,
        "conv_channels": [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)],
        "num_classes": num_outputs(model),
        "params": count_params(model),
        "macs": count_macs(model, (1, 3, size, size)),
        "image_size": size,
        "sparsity": bn_sparsity(model, sparsity_threshold),
        "sparsity_threshold": sparsity_threshold,
        "gamma_quantiles": gamma_quantiles(model),
        "channel_selections": sum(isinstance(m, ChannelGather) for m in model.modules()),
    }
    if "epoch" in checkpoint:
        info["epoch"] = checkpoint["epoch"]
    if "best_prec1" in checkpoint:
        info["best_test_acc"] = 100.0 * float(checkpoint["best_prec1"])
    if "prune" in meta:
        keys = (
            "ratio",
            "pruned_share",
            "acc_unpruned",
            "acc_masked",
            "acc_compensated",
            "acc_recalibrated",
        )
        info["prune"] = {k: meta["prune"][k] for k in keys if k in meta["prune"]}
    if meta.get("teacher"):  # the unpruned network fine-tuning distils from
        info["teacher"] = str(meta["teacher"])
    return info


def save_official(
    checkpoint_or_model: str | Path | dict[str, Any] | nn.Module, path: str | Path
) -> dict[str, Any]:
    """Write the paper's ``{'cfg', 'state_dict'}`` layout of a network to ``path`` (atomically).

    Args:
        checkpoint_or_model: a checkpoint file, a checkpoint dict or a model.
        path: the file to write; the paper's ``main.py --refine`` and its model classes
            (``vgg(cfg=...)``, ``resnet(depth=164, cfg=...)``, ``densenet(depth=40, cfg=...)``)
            read it.

    Returns the written dict. Raises NetslimError, saying why, for a network the paper's
    model cannot express (netslim's own resnet164 layout, a conv with a bias, ...).
    """
    model = checkpoint_or_model
    if isinstance(model, (str, Path)):
        model = model_from_checkpoint(read_checkpoint(model), str(model))
    elif isinstance(model, dict):
        model = model_from_checkpoint(model)
    written = official.official_checkpoint(model)
    save_checkpoint(written, path)
    return written
