"""The channel graph the pruning engine works on: units, groups and the layers that read them.

A **unit** is a set of channels kept or removed as one; a **group** the units of layers
whose outputs are tied together (by a residual, say). While a forward pass is replayed
(:mod:`netslim.engine.ops`), every entry of every tensor carries a *code*: its unit, and
what a removed channel holds there in the reference network, two ways (with gamma and
beta zeroed, the official masking; with gamma alone zeroed, compensation): ``ZERO``,
``CONST`` or ``LIVE``. :class:`Units` keeps the union-find of units and what was learnt
about them, and builds the :class:`ChannelGraph` that planning and surgery read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

# What a removed channel holds in the reference network, per tensor entry, two ways: with
# gamma and beta zeroed (the official masking) and with gamma alone zeroed (compensation).
ZERO, CONST, LIVE = 0, 1, 2


@dataclass
class Group:
    """The units of the layers whose outputs are tied together (by a residual, say).

    Attributes:
        units: the unit ids of the group.
        producers: the conv/linear layers that write them.
        members: the BatchNorms that scale some of them, in trace order.
        fixed: why these channels may not be pruned, when none of them may; else None.
        joined: whether an element-wise op (a residual addition) tied them to others.
    """

    units: torch.Tensor
    producers: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    fixed: str | None = None
    joined: bool = False

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def label(self) -> str:
        """A readable name: its first BatchNorm (its first producer when it has none)."""
        if self.members:
            return self.members[0]
        return self.producers[0] if self.producers else "input"


@dataclass
class Layer:
    """A conv or linear layer (or one of your own the rules say how to slice), with the units
    of the channels it reads and writes."""

    kind: str  # "conv" (groups = 1), "grouped" (whole convolution groups go), "linear", "custom"
    inputs: torch.Tensor  # unit id of each input channel (feature)
    outputs: torch.Tensor  # unit id of each output channel
    pixels: int  # output positions per image (1 for a linear layer on flat features)
    kernel: int = 1  # kernel positions (kh * kw)
    groups: int = 1
    norm: str | None = None  # the BatchNorm that alone reads its output, if any
    inference: bool = True  # False for a layer only training runs (an auxiliary head)
    out_dim: int = 1  # the dim of its output holding its channels (-1 for a linear layer)


@dataclass
class ChannelGraph:
    """The result of :func:`trace_channels`.

    Attributes:
        groups: group id -> :class:`Group`.
        layers: conv/linear name -> :class:`Layer`.
        norms: BatchNorm name -> the unit of each of its channels (affine or not).
        fixed: per unit, True where it may not be pruned.
        joined: per unit, True where an element-wise op tied channels of several tensors.
        compensable: per unit, True where the constant a removed channel leaves (gamma 0,
            beta kept) reaches every reader as a constant, so compensation can fold it.
        fixed_reasons: why BatchNorm-scaled channels were fixed (op, module, source line).
        input_size: the input shape the graph was traced at.
        gathers: channel selection name -> the unit of each of its output channels.
        ties: sets of channel pieces (the unit of each channel) that must keep as many
            channels each: the pieces of a ``chunk`` (:meth:`~netslim.engine.ops.Replay.chunk_tie`).
        value_reads: where the forward pass read values of tensors computed from the
            input as Python numbers: on other inputs it may take another path.
        untraced_macs: MACs of the conv and linear calls inference makes that are not among
            ``layers`` (a conv only inference calls, as YOLO's DFL; one called twice): their
            channels are not pruned, so the pruned network makes them too.
        rules: the :class:`~netslim.engine.rules.Rules` it was traced with, which surgery and
            the checks after it follow too (None: the default rules).
    """

    groups: dict[int, Group]
    layers: dict[str, Layer]
    norms: dict[str, torch.Tensor]
    fixed: torch.Tensor
    joined: torch.Tensor
    compensable: torch.Tensor
    fixed_reasons: list[str]
    input_size: tuple[int, ...]
    model_name: str = "the model"
    gathers: dict[str, torch.Tensor] = field(default_factory=dict)
    ties: list[list[torch.Tensor]] = field(default_factory=list)
    value_reads: list[str] = field(default_factory=list)
    untraced_macs: int = 0
    rules: Any = field(default=None, repr=False, compare=False)

    @property
    def num_units(self) -> int:
        return len(self.fixed)

    @property
    def prunable(self) -> dict[int, Group]:
        """The groups with at least one unit that may be pruned."""
        return {i: g for i, g in self.groups.items() if not bool(self.fixed[g.units].all())}

    def residual_kept(self) -> ChannelGraph | None:
        """This graph with every unit joined by an element-wise op fixed, as the paper's code
        keeps the residual path at full width (for comparisons); None when nothing is joined."""
        if not bool((self.joined & ~self.fixed).any()):
            return None
        return replace(self, fixed=self.fixed | self.joined)


def layer_macs(module: nn.Module, output: Any) -> int:
    """Multiply-accumulates of one call of a conv or linear layer that gave ``output`` (0 for
    any other module): a conv costs ``out_elements * in_channels/groups * kh * kw``, a linear
    ``out_elements * in_features``."""
    if not isinstance(output, torch.Tensor):
        return 0
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def is_tensorish(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(is_tensorish(v) for v in value)


def tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    return []


def along(codes: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The codes along ``dim`` when they are the same at every other index, else None."""
    if codes.dim() == 0:
        return None
    dim = dim % codes.dim()
    index = [0] * codes.dim()
    index[dim] = slice(None)
    line = codes[tuple(index)]
    shape = [1] * codes.dim()
    shape[dim] = -1
    return line if bool((codes == line.view(shape)).all()) else None


def keeps_channels(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Whether a slice or reshape leaves the channels whole: the units vary along one dim
    before, and after it along one dim in the same order (a crop, a squeeze), or along the
    flattened features with the channels major (``flatten(1)`` before a linear layer)."""
    varying = [d for d in range(before.dim()) if bool((before != before.narrow(d, 0, 1)).any())]
    if not varying:
        return True
    if len(varying) > 1:
        return False
    line = along(before, varying[0])
    for d in range(after.dim()):
        out = along(after, d)
        if out is not None and torch.equal(out, line):
            return True
    out = along(after, -1) if after.dim() else None
    if out is None or len(out) % len(line) or varying[0] == before.dim() - 1:
        return False
    return torch.equal(out, line.repeat_interleave(len(out) // len(line)))


def spread(line: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    """Codes along ``dim`` expanded to a tensor of ``shape``."""
    view = [1] * len(shape)
    view[dim % len(shape)] = -1
    return line.view(view).expand(shape)


def code(units: torch.Tensor, off: Any, on: Any) -> torch.Tensor:
    return units * 16 + torch.as_tensor(off) * 4 + torch.as_tensor(on)


def decode(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return codes // 16, (codes // 4) % 4, codes % 4


def per_channel_state(state: torch.Tensor, at_zero: torch.Tensor, at_one: torch.Tensor):
    """The state of each channel after a per-channel function ``f``, given per channel
    whether ``f(0)`` is nonzero or varies and whether ``f(1)`` varies over the map."""
    zero_to = torch.where(at_zero == 0, ZERO, torch.where(at_zero == 1, CONST, LIVE))
    const_to = torch.where(at_one, LIVE, CONST)
    return torch.where(state == ZERO, zero_to, torch.where(state == CONST, const_to, LIVE))


class Units:
    """The units met so far (a union-find), and what the replay learnt about them: why some
    are fixed, which an element-wise op joined, which BatchNorms scale them, which layers
    write and read them. :meth:`result` turns it into the :class:`ChannelGraph`."""

    def __init__(self, model_name: str = "the model") -> None:
        self.model_name = model_name
        self.parent: list[int] = []  # units, with union-find
        self.reasons: dict[int, str] = {}  # unit -> why it is fixed
        self.joined: set[int] = set()
        self.uncompensable: set[int] = set()
        self.members: dict[int, list[str]] = {}
        self.producer: dict[int, str] = {}  # unit -> the layer writing it
        self.layers: dict[str, Layer] = {}
        self.norms: dict[str, torch.Tensor] = {}
        self.gathers: dict[str, torch.Tensor] = {}
        self.selected: set[int] = set()  # units a channel selection reads (its BNs follow it)
        self.inference: set[str] = set()  # the modules inference mode calls
        self.ties: list[list[torch.Tensor]] = []  # pieces keeping as many channels each

    def new_units(self, n: int, producer: str | None = None, fixed: str | None = None):
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        units = torch.arange(start, start + n)
        for u in range(start, start + n):
            if producer:
                self.producer[u] = producer
            if fixed:
                self.reasons[u] = fixed
        return units

    def find(self, u: int) -> int:
        root = u
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[u] != root:
            self.parent[u], u = root, self.parent[u]
        return root

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a

    def fix(self, units: torch.Tensor, reason: str) -> None:
        for u in torch.unique(units).tolist():
            self.reasons.setdefault(u, reason)

    def fix_all(self, codes: Any, reason: str) -> None:
        for t in tensors(codes):
            self.fix(decode(t)[0], reason)

    def result(self, input_size: tuple[int, ...]) -> ChannelGraph:
        n = len(self.parent)
        roots = torch.tensor([self.find(u) for u in range(n)], dtype=torch.long)
        ids, compact = torch.unique(roots, return_inverse=True)
        count = len(ids)
        # (dicts as ordered sets: a list's `in` made a residual stream's many BNs quadratic)
        members: dict[int, dict[str, None]] = {}
        for u, names in self.members.items():
            members.setdefault(int(compact[u]), {}).update(dict.fromkeys(names))
        fixed = torch.zeros(count, dtype=torch.bool)
        reasons: dict[int, str] = {}
        for u, reason in self.reasons.items():
            c = int(compact[u])
            fixed[c] = True
            reasons.setdefault(c, reason)
        for c in range(count):
            if c not in members and not fixed[c]:
                fixed[c] = True
                reasons[c] = "no BatchNorm scales these channels"
        joined = torch.zeros(count, dtype=torch.bool)
        joined[compact[torch.tensor(sorted(self.joined), dtype=torch.long)]] = True
        compensable = torch.ones(count, dtype=torch.bool)
        compensable[compact[torch.tensor(sorted(self.uncompensable), dtype=torch.long)]] = False
        layers = {
            name: replace(
                layer,
                inputs=compact[layer.inputs],
                outputs=compact[layer.outputs],
                inference=name in self.inference,
            )
            for name, layer in self.layers.items()
        }
        norms = {name: compact[units] for name, units in self.norms.items()}
        gathers = {name: compact[units] for name, units in self.gathers.items()}
        writers = {**{name: layer.outputs for name, layer in layers.items()}, **gathers}
        # groups: the units written by one layer, and those tied to them
        group_of = list(range(count))

        def gfind(c: int) -> int:
            while group_of[c] != c:
                group_of[c] = group_of[group_of[c]]
                c = group_of[c]
            return c

        for outputs in writers.values():
            first = int(outputs[0]) if len(outputs) else None
            for c in torch.unique(outputs).tolist():
                a, b = gfind(first), gfind(c)
                if a != b:
                    group_of[b] = a
        by_group: dict[int, list[int]] = {}
        for c in range(count):
            by_group.setdefault(gfind(c), []).append(c)
        producers: dict[int, list[str]] = {}
        for name, outputs in writers.items():
            for g in {gfind(c) for c in torch.unique(outputs).tolist()}:
                producers.setdefault(g, []).append(name)
        groups = {}
        order = {name: i for i, name in enumerate(self.norms)}  # trace order of the BatchNorms
        for i, (g, units) in enumerate(by_group.items()):
            scaling: dict[str, None] = {}
            for c in units:
                scaling.update(members.get(c, {}))
            names = sorted(scaling, key=order.__getitem__)
            unit_ids = torch.tensor(units, dtype=torch.long)
            all_fixed = bool(fixed[unit_ids].all())
            groups[i] = Group(
                unit_ids,
                producers.get(g, []),
                names,
                reasons[units[0]] if all_fixed else None,
                bool(joined[unit_ids].any()),
            )
        selected = {int(compact[u]) for u in self.selected}  # scaled by BNs after a selection
        notable = list(
            dict.fromkeys(reason for c, reason in reasons.items() if c in members or c in selected)
        )
        ties = [[compact[piece] for piece in tie] for tie in self.ties]
        return ChannelGraph(
            groups,
            layers,
            norms,
            fixed,
            joined,
            compensable,
            notable,
            tuple(input_size),
            self.model_name,
            gathers,
            ties,
        )
