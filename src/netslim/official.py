"""The paper's own ResNet-164 and DenseNet-40 checkpoints, read into netslim and written back.

The network-slimming code (Liu et al.) saves ``{'epoch', 'state_dict', 'best_prec1',
'optimizer'}`` from main.py and ``{'cfg', 'state_dict'}`` from resprune.py and
denseprune.py. Its ResNet and DenseNet hold a ``channel_selection`` after some
BatchNorms: an ``indexes`` vector of 0s and 1s, the layer after it reading only the
channels marked 1. :func:`to_netslim` turns such a file into netslim's checkpoint of
``resnet164`` or ``densenet40`` computing the same function:

* a selection's BatchNorm keeps only the selected channels, and the selection moves in
  front of it (a BatchNorm acts per channel, so that is the same);
* DenseNet: a channel that no later layer selects is removed outright (from the conv
  that writes it); a selection that then keeps every remaining channel disappears, and
  the others stay as :class:`~netslim.models.gather.ChannelGather` layers;
* ResNet: every block keeps its selection as a ChannelGather (the identity where the
  file selects everything): the paper's projection shortcut reads the raw block input,
  not the pre-activated one as netslim's own ``resnet164`` does, so a stream channel may
  not go with its gammas; the gathers keep the stream whole, exactly as the paper's code
  does. A ``resnet164`` that holds gathers is this layout (:func:`install_gathers`).

:func:`official_checkpoint` makes the paper's ``{'cfg', 'state_dict'}`` back out of a VGG, and
of these two networks where the paper's model can express them
(:func:`netslim.checkpoint.save_official` writes it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netslim.engine.surgery import ChannelCounts, channel_counts
from netslim.errors import NetslimError
from netslim.models import VGG, ChannelGather, DenseNet, PreActResNet, build_model
from netslim.models.resnet import PreActBottleneck

RESNET_BLOCKS = 18  # per stage: depth 164 = 9 * 18 + 2
DENSE_LAYERS, GROWTH = 12, 12  # per block: depth 40 = 3 * 12 + 4
BN_STATS = ("weight", "bias", "running_mean", "running_var")

StateDict = dict[str, torch.Tensor]


def recognise(state_dict: StateDict, source: str = "checkpoint") -> str | None:
    """``'resnet164'`` or ``'densenet40'`` for a state_dict of the paper's model, else None.

    Raises NetslimError for the paper's ResNet or DenseNet at another depth or growth rate.
    """
    if "layer1.0.conv3.weight" in state_dict and "layer1.0.bn1.weight" in state_dict:
        n = len({k.split(".")[1] for k in state_dict if k.startswith("layer1.")})
        if n != RESNET_BLOCKS:
            raise NetslimError(
                f"{source} holds the paper's ResNet of depth {9 * n + 2}; netslim reads its "
                "depth 164 (resnet164) only"
            )
        return "resnet164"
    if "dense1.0.conv1.weight" in state_dict:
        n = len({k.split(".")[1] for k in state_dict if k.startswith("dense1.")})
        growth = state_dict["dense1.0.conv1.weight"].shape[0]
        if (n, growth) != (DENSE_LAYERS, GROWTH):
            raise NetslimError(
                f"{source} holds the paper's DenseNet of depth {3 * n + 4}, growth {growth}; "
                "netslim reads its depth 40, growth 12 (densenet40) only"
            )
        return "densenet40"
    return None


def install_gathers(model: nn.Module, state_dict: StateDict, source: str = "checkpoint") -> None:
    """Put a ChannelGather in every ``select`` slot of ``model`` whose ``index`` the state_dict
    holds (sized by it); a ``resnet164`` holding them takes the paper's raw-input shortcut."""
    found = False
    for key, index in state_dict.items():
        if not (key == "select.index" or key.endswith(".select.index")):
            continue
        slot = key[: -len(".index")]
        parent, _, child = slot.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
        except AttributeError:
            owner = None
        if not isinstance(getattr(owner, child, None), (nn.Identity, ChannelGather)):
            raise NetslimError(f"{source}: {key} names no channel selection of the network")
        setattr(owner, child, ChannelGather(index))
        found = True
    if found and isinstance(model, PreActResNet):
        for block in model.modules():
            if isinstance(block, PreActBottleneck):
                block.raw_shortcut = True


def to_netslim(checkpoint: dict[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """A paper's ResNet-164 / DenseNet-40 checkpoint in netslim's form (see the module docs):
    ``{'netslim', 'channels', 'state_dict'}`` plus its ``epoch`` and ``best_prec1``. Any other
    checkpoint is returned unchanged."""
    state_dict = checkpoint["state_dict"]
    arch = None if "netslim" in checkpoint else recognise(state_dict, source)
    if arch is None:
        return checkpoint
    try:
        if "cfg" in checkpoint:
            _check_cfg(checkpoint["cfg"], state_dict, arch, source)
        if arch == "resnet164":
            state = _resnet_to_netslim(state_dict, source)
        else:
            state = _densenet_to_netslim(state_dict, source)
    except KeyError as e:
        raise NetslimError(f"{source}: an incomplete {arch} of the paper's code: no {e}") from None
    num_classes = int(state["fc.weight"].shape[0])
    model = build_model(arch, num_classes)
    install_gathers(model, state, source)
    kind = "train" if "epoch" in checkpoint else "pruned"
    converted = {
        "netslim": {
            "arch": arch,
            "num_classes": num_classes,
            "kind": kind,
            "source": "the network-slimming code",
        },
        "channels": _counts(model, state, source),
        "state_dict": state,
    }
    converted.update({k: checkpoint[k] for k in ("epoch", "best_prec1") if k in checkpoint})
    return converted


def _check_cfg(cfg: Any, state_dict: StateDict, arch: str, source: str) -> None:
    """Refuse a pruned file whose ``cfg`` disagrees with its weights, as the VGG path does.

    resprune.py and denseprune.py write one number per BatchNorm, in module order: the
    channels a ``channel_selection`` after it keeps (after a ``bn1`` and the final ``bn``),
    else the BatchNorm's own width.
    """
    implied = []
    for key in state_dict:
        if not key.endswith("running_mean"):
            continue
        bn = key[: -len("running_mean")].rstrip(".")
        parent, _, last = bn.rpartition(".")
        select = f"{parent}.select.indexes" if parent else "select.indexes"
        if last in ("bn1", "bn") and select in state_dict:
            implied.append(int(state_dict[select].sum()))
        else:
            implied.append(int(state_dict[f"{bn}.weight"].numel()))
    if not isinstance(cfg, (list, tuple)) or list(cfg) != implied:
        shown = list(cfg) if isinstance(cfg, (list, tuple)) else cfg
        where = next((i for i, (a, b) in enumerate(zip(shown, implied)) if a != b), None)
        detail = (
            f"entry {where} is {shown[where]}, the weights say {implied[where]}"
            if where is not None
            else f"it has {len(shown) if isinstance(shown, list) else 'no'} entries, the "
            f"weights imply {len(implied)}"
        )
        raise NetslimError(
            f"{source}: its cfg does not match the {arch} layers in its state_dict ({detail}); "
            "the file is inconsistent (was it edited or written by another tool?)"
        )


def _counts(model: nn.Module, state: StateDict, source: str) -> ChannelCounts:
    """The channel counts of ``model``'s layers that ``state``'s weights imply."""
    counts = {}
    for name, count in channel_counts(model).items():
        weight = state.get(f"{name}.weight")
        if weight is None:
            raise NetslimError(f"{source}: no weights for layer {name}")
        if len(count) == 1:  # BatchNorm
            counts[name] = [weight.shape[0]]
        else:  # conv: [in, out, groups, bias], linear: [in, out, bias]
            bias = int(f"{name}.bias" in state)
            groups = [1] if len(count) == 4 else []
            counts[name] = [weight.shape[1], weight.shape[0], *groups, bias]
    return counts


def _selection(
    state_dict: StateDict, key: str, width: int, reads: int, source: str
) -> torch.Tensor:
    """The channels a ``channel_selection`` keeps (all when the file has none), checked against
    the BN width before it and the layer after it."""
    flags = state_dict.get(key, torch.ones(width))
    index = flags.nonzero().flatten()
    if flags.numel() != width or len(index) != reads:
        raise NetslimError(
            f"{source}: {key} keeps {len(index)} of {flags.numel()} channels, but the "
            f"BatchNorm before it has {width} and the layer after it reads {reads}"
        )
    return index


def _copy_bn(src: StateDict, old: str, dst: StateDict, new: str, index=None) -> None:
    for stat in BN_STATS:
        value = src[f"{old}.{stat}"]
        dst[f"{new}.{stat}"] = value if index is None else value[index]
    if f"{old}.num_batches_tracked" in src:
        dst[f"{new}.num_batches_tracked"] = src[f"{old}.num_batches_tracked"]


def _resnet_to_netslim(sd: StateDict, source: str) -> StateDict:
    out = {"conv1.weight": sd["conv1.weight"]}
    for s in range(3):
        for b in range(RESNET_BLOCKS):
            p, q = f"layer{s + 1}.{b}.", f"layers.{s}.{b}."
            index = _selection(
                sd,
                p + "select.indexes",
                sd[p + "bn1.weight"].numel(),
                sd[p + "conv1.weight"].shape[1],
                source,
            )
            out[q + "select.index"] = index
            _copy_bn(sd, p + "bn1", out, q + "bn1", index)
            for i in (1, 2, 3):
                out[f"{q}conv{i}.weight"] = sd[f"{p}conv{i}.weight"]
            _copy_bn(sd, p + "bn2", out, q + "bn2")
            _copy_bn(sd, p + "bn3", out, q + "bn3")
            if b == 0:
                out[q + "shortcut.weight"] = sd[p + "downsample.0.weight"]
    index = _selection(
        sd, "select.indexes", sd["bn.weight"].numel(), sd["fc.weight"].shape[1], source
    )
    out["select.index"] = index
    _copy_bn(sd, "bn", out, "bn", index)
    out["fc.weight"], out["fc.bias"] = sd["fc.weight"], sd["fc.bias"]
    return out


def _dense_blocks() -> list[tuple[list[tuple[str, str]], tuple[str, str]]]:
    """Per dense block: (its layers, the layer reading its output), each as (paper module
    prefix, netslim module prefix); the last block's output is read by the final ``bn``."""
    blocks, j = [], 0
    for k in (1, 2, 3):
        layers = [(f"dense{k}.{i}.", f"features.{j + i}.") for i in range(DENSE_LAYERS)]
        j += DENSE_LAYERS
        end = (f"trans{k}.", f"features.{j}.") if k < 3 else ("", "")
        j += k < 3
        blocks.append((layers, end))
    return blocks


def _densenet_to_netslim(sd: StateDict, source: str) -> StateDict:
    out: StateDict = {}
    producer = ("conv1.weight", "conv1.weight")  # the conv that starts the block's stream
    for layers, end in _dense_blocks():
        producers = [producer] + [(p + "conv1.weight", q + "conv.weight") for p, q in layers]
        widths = [sd[key].shape[0] for key, _ in producers]
        readers = layers + [end]
        flags = []
        for i, (p, _) in enumerate(readers):
            reads = sd[p + "conv1.weight" if p else "fc.weight"].shape[1]
            index = _selection(sd, p + "select.indexes", sum(widths[: i + 1]), reads, source)
            flags.append(
                torch.zeros(sum(widths[: i + 1]), dtype=torch.bool).index_fill_(0, index, True)
            )
        alive = torch.zeros(sum(widths), dtype=torch.bool)  # selected by some later layer
        for f in flags:
            alive[: len(f)] |= f
        start = 0
        for (old, new), width in zip(producers, widths):  # channels nobody reads: removed
            out[new] = sd[old][alive[start : start + width]]
            start += width
        position = alive.cumsum(0) - 1  # of each kept channel in the smaller stream
        for (p, q), f in zip(readers, flags):
            index = f.nonzero().flatten()
            _copy_bn(sd, p + "bn1" if p else "bn", out, q + "bn" if q else "bn", index)
            if not bool(alive[: len(f)].eq(f).all()):  # still a subset: a gather stays
                out[q + "select.index"] = position[index]
        producer = (end[0] + "conv1.weight", end[1] + "conv.weight")
    out["fc.weight"], out["fc.bias"] = sd["fc.weight"], sd["fc.bias"]
    return out


# -- writing the paper's layout ---------------------------------------------------------


def official_checkpoint(model: nn.Module) -> dict[str, Any]:
    """``{'cfg', 'state_dict'}`` as the paper's vggprune.py, resprune.py or denseprune.py write
    it for ``model``, or NetslimError saying why the paper's model cannot express it."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            raise NetslimError(
                f"conv {name} has a bias (bias compensation adds one) and the paper's convs have "
                "none; prune with --no-compensate to write the paper's layout"
            )
    if isinstance(model, VGG):
        pools = model.cfg.count("M")
        if pools != 4:
            raise NetslimError(
                f"the paper's VGG has 4 max-pools before its 2x2 average pool, this one {pools}: "
                "the paper's model cannot express it"
            )
        return {"cfg": list(model.cfg), "state_dict": sd}
    if isinstance(model, PreActResNet) and len(model.layers[0]) == RESNET_BLOCKS:
        return _resnet_to_paper(model, sd)
    if isinstance(model, DenseNet) and len(model.features) == 3 * DENSE_LAYERS + 2:
        return _densenet_to_paper(model, sd)
    raise NetslimError(
        f"the paper's code has no model for a {type(model).__name__} of this depth; it writes "
        "VGG, the 164-layer pre-activation ResNet and DenseNet-40"
    )


def _flags(index: torch.Tensor, width: int) -> torch.Tensor:
    if len(index) > 1 and not bool((index[1:] > index[:-1]).all()):
        raise NetslimError("a channel selection out of order: the paper's keeps channels in order")
    return torch.zeros(width).index_fill_(0, index, 1.0)


def _full_bn(sd: StateDict, old: str, out: StateDict, new: str, index, width: int) -> None:
    """BatchNorm ``old`` spread over ``width`` channels at ``index`` as ``new`` (the rest:
    gamma = beta = 0, as the paper's pruning leaves them; unread after the selection)."""
    for stat in BN_STATS:
        full = torch.ones(width) if stat == "running_var" else torch.zeros(width)
        out[f"{new}.{stat}"] = full.index_copy_(0, index, sd[f"{old}.{stat}"])
    out[f"{new}.num_batches_tracked"] = sd[f"{old}.num_batches_tracked"]


def _bn(sd: StateDict, old: str, out: StateDict, new: str) -> None:
    for stat in (*BN_STATS, "num_batches_tracked"):
        out[f"{new}.{stat}"] = sd[f"{old}.{stat}"]


def _index(model: nn.Module, slot: str, width: int) -> torch.Tensor:
    select = model.get_submodule(slot)
    return select.index.cpu() if isinstance(select, ChannelGather) else torch.arange(width)


def _resnet_to_paper(model: PreActResNet, sd: StateDict) -> dict[str, Any]:
    blocks = [b for b in model.modules() if isinstance(b, PreActBottleneck)]
    if not all(b.raw_shortcut for b in blocks):
        raise NetslimError(
            "netslim's resnet164 feeds its projection shortcuts the pre-activated input, the "
            "paper's the raw input: the paper's model cannot express this network (only a "
            "resnet164 read from the paper's files can be written back)"
        )
    out: StateDict = {"conv1.weight": sd["conv1.weight"]}
    cfg: list[int] = []
    for s, stage in enumerate(model.layers):
        for b, block in enumerate(stage):
            p, q = f"layer{s + 1}.{b}.", f"layers.{s}.{b}."
            width = block.conv3.out_channels if b else block.shortcut.in_channels
            if block.conv3.out_channels != 4 * (16 << s):
                raise NetslimError(
                    f"its residual stream was pruned ({q}conv3): the paper's model keeps it whole"
                )
            index = _index(model, q + "select", width)
            _full_bn(sd, q + "bn1", out, p + "bn1", index, width)
            out[p + "select.indexes"] = _flags(index, width)
            out[p + "conv1.weight"] = sd[q + "conv1.weight"]
            _bn(sd, q + "bn2", out, p + "bn2")
            out[p + "conv2.weight"] = sd[q + "conv2.weight"]
            _bn(sd, q + "bn3", out, p + "bn3")
            out[p + "conv3.weight"] = sd[q + "conv3.weight"]
            if b == 0:
                out[p + "downsample.0.weight"] = sd[q + "shortcut.weight"]
            cfg += [len(index), block.conv1.out_channels, block.conv2.out_channels]
    width = model.layers[-1][-1].conv3.out_channels
    index = _index(model, "select", width)
    _full_bn(sd, "bn", out, "bn", index, width)
    out["select.indexes"] = _flags(index, width)
    out["fc.weight"], out["fc.bias"] = sd["fc.weight"], sd["fc.bias"]
    return {"cfg": cfg + [len(index)], "state_dict": out}


def _densenet_to_paper(model: DenseNet, sd: StateDict) -> dict[str, Any]:
    out: StateDict = {}
    cfg: list[int] = []
    stem = model.conv1.weight.detach().cpu()
    paper_width = 2 * GROWTH  # of the conv starting the stream: the stem, then a transition
    producer = ("conv1.weight", "conv1.weight", stem)
    for layers, end in _dense_blocks():
        # netslim's (smaller) stream -> positions in the paper's, each conv's channels first
        producers = [(*producer, paper_width)] + [
            (p + "conv1.weight", q + "conv.weight", sd[q + "conv.weight"], GROWTH)
            for p, q in layers
        ]
        positions, offset = [], 0
        for paper_key, key, weight, width in producers:  # unkept channels: zero weights
            if weight.shape[0] > width:
                raise NetslimError(f"{key} has more channels than the paper's model ({width})")
            padded = weight.new_zeros(width, *weight.shape[1:])
            out[paper_key] = padded.index_copy_(0, torch.arange(weight.shape[0]), weight)
            positions.append(torch.arange(weight.shape[0]) + offset)
            offset += width
        position = torch.cat(positions)
        for i, (p, q) in enumerate(layers + [end]):
            reads = sum(len(x) for x in positions[: i + 1])
            paper = offset if i == len(layers) else sum(w for *_, w in producers[: i + 1])
            index = position[_index(model, q + "select" if q else "select", reads)]
            _full_bn(sd, q + "bn" if q else "bn", out, p + "bn1" if p else "bn", index, paper)
            out[(p or "") + "select.indexes"] = _flags(index, paper)
            if i < len(layers):
                cfg.append(len(index))
        cfg.append(len(index))  # the transition's (or the classifier's) input
        if end[0]:
            conv = sd[end[1] + "conv.weight"]
            producer, paper_width = (end[0] + "conv1.weight", end[1] + "conv.weight", conv), offset
    out["fc.weight"], out["fc.bias"] = sd["fc.weight"], sd["fc.bias"]
    return {"cfg": cfg, "state_dict": _paper_order(out)}


def _paper_order(sd: StateDict) -> StateDict:
    """The paper model's key order (modules in definition order), for a familiar file."""

    def rank(key: str) -> tuple:
        head = key.split(".")[0]
        order = ["conv1", "dense1", "trans1", "dense2", "trans2", "dense3", "bn", "select", "fc"]
        parts = key.split(".")
        layer = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else -1
        sub = parts[-2] if len(parts) > 2 else ""
        return (
            order.index(head),
            layer,
            ["bn1", "select", "conv1"].index(sub) if sub in ("bn1", "select", "conv1") else 0,
        )

    return {k: sd[k] for k in sorted(sd, key=rank)}
