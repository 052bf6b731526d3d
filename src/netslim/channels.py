"""Which channels of a network live and die together, found by tracing it with torch.fx.

A channel can only be removed from a network if every layer that writes it and every
layer that reads it shrinks with it. :func:`trace_channels` runs one forward pass through
the traced graph and gives every entry of every tensor a **unit**: the channels that are
kept or removed as one. It follows the units by replaying each op on a tensor of unit ids:

* a conv or linear layer's output channels are new units, one per channel (one **group**);
* a grouped conv (depthwise included) ties each of its convolution groups, inputs and
  outputs, into one unit: a whole convolution group is kept or removed;
* BatchNorm, activations, pooling, dropout and other per-channel functions keep their
  input's units; each BatchNorm channel becomes a **member** (a scorer) of its unit;
* an element-wise addition or multiplication (a residual, a squeeze-excitation gate) ties
  its operands' units entry by entry;
* reshapes, slices, splits, concatenations and permutations (a channel shuffle) move
  units around exactly as they move the values;
* a channel selection (:class:`~netslim.models.gather.ChannelGather`, the paper's
  ``channel_selection`` in its pruned ResNets and DenseNets) writes new units, which
  surgery removes from its index; the channels it reads are fixed (kept whole), as the
  paper's code keeps them, since one input channel may be selected by several such layers
  under other gammas.

It also follows what a removed channel holds in the reference network (pruned gamma and
beta set to 0): zero after a BatchNorm, a constant after a function with ``f(0) != 0``,
live values where no BatchNorm scales it. Removing a channel is exact only where every
layer reading it sees zero, or a constant it can fold into its bias; so a unit that a
layer reads live (``bn(conv_a(x)) + conv_b(x)``), or reads as a nonzero constant through
zero padding, is **fixed** (kept). Anything the engine cannot follow -- an unknown module
or op, a layer called twice, a parameter read outside its module -- fixes the units it
touches, and the graph lists why (``fixed_reasons``); only a forward pass that cannot be
traced at all is an error. The engine never guesses.
"""

from __future__ import annotations

import math
import operator
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from netslim.errors import NetslimError
from netslim.models.gather import ChannelGather

# What a removed channel holds in the reference network, per tensor entry, two ways: with
# gamma and beta zeroed (the official masking) and with gamma alone zeroed (compensation).
ZERO, CONST, LIVE = 0, 1, 2

PER_CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.Mish, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout,
    nn.Dropout2d, nn.AlphaDropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)  # fmt: skip
PER_CHANNEL_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs,
    torch.clamp, torch.neg, F.sigmoid, F.tanh, F.dropout, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, F.pad, operator.neg,
}  # fmt: skip
PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "abs", "clamp",
                       "clamp_", "clamp_min", "clamp_max", "neg", "pow", "sqrt"}  # fmt: skip
#: per-channel functions known by name (their libraries are optional, never imported here)
PER_CHANNEL_NAMES = {"stochastic_depth", "drop_path"}
#: Activation modules of other libraries (timm's), known by class name.
ACTIVATION_NAMES = {"Swish", "SiLU", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid",
                    "HardMish", "GELU", "GELUTanh", "QuickGELU", "ReLU", "ReLU6"}  # fmt: skip
SPATIAL_REDUCTIONS = {torch.mean, torch.amax, torch.sum, "mean", "amax", "sum"}
ADD_LIKE = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
            torch.maximum, torch.minimum, "add", "add_", "sub", "sub_"}  # fmt: skip
MUL_LIKE = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
DIV_LIKE = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
#: Ops that only move entries around, replayed on the unit codes. Those that keep whole
#: dims (a permutation, a concatenation) stay right however many channels go; the others
#: cut or regroup a dim by sizes fixed in forward() (``x[:, :16]``, ``split``, a channel
#: shuffle's ``view``), so they are exact only where the channels they cut are kept.
WHOLE_DIMS = {torch.permute, torch.transpose, torch.movedim, torch.t, torch.cat, torch.concat,
              torch.stack, torch.flip, "permute", "transpose", "movedim", "t", "flip", "expand",
              "expand_as", "repeat"}  # fmt: skip
REARRANGE = WHOLE_DIMS | {
    operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.split,
    torch.chunk, torch.narrow, torch.unbind, torch.channel_shuffle, F.pixel_shuffle,
    F.pixel_unshuffle, "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "split",
    "chunk", "narrow", "unbind", "view_as", "reshape_as",
}  # fmt: skip
#: New tensors shaped like another, whose values do not come from it (drop path's mask).
CREATES = {"new_empty", "new_zeros", "new_ones", "new_full", torch.zeros_like, torch.ones_like,
           torch.empty_like, torch.rand_like, torch.randn_like, torch.full_like, "bernoulli_",
           "bernoulli", torch.bernoulli}  # fmt: skip
SAME_VALUES = {"contiguous", "clone", "detach", "float", "half", "bfloat16", "double", "to",
               "type", "type_as", "cpu", "cuda", "requires_grad_"}  # fmt: skip
SIZE_READS = {"size", "dim", "ndimension", "numel", "shape", "ndim", "dtype", "device",
              "is_cuda", "is_contiguous", torch.numel, getattr, len}  # fmt: skip
REARRANGE_MODULES = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle,
                     nn.PixelUnshuffle)  # fmt: skip
LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)


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
    """A conv or linear layer, with the units of the channels it reads and writes."""

    kind: str  # "conv" (groups = 1), "grouped" (whole convolution groups go) or "linear"
    inputs: torch.Tensor  # unit id of each input channel (feature)
    outputs: torch.Tensor  # unit id of each output channel
    pixels: int  # output positions per image (1 for a linear layer on flat features)
    kernel: int = 1  # kernel positions (kh * kw)
    groups: int = 1
    norm: str | None = None  # the BatchNorm that alone reads its output, if any
    inference: bool = True  # False for a layer only training runs (an auxiliary head)


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


def _source_of(error: BaseException) -> str:
    """The innermost frame of the traceback outside torch: where the user's code failed."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if torch_dir not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {Path(f.filename).name}:{f.lineno}, in {f.name}: {f.line})"


class _LayerTracer(fx.Tracer):
    """torch.fx's tracer, keeping every conv, linear and BatchNorm (subclasses too) and
    netslim's channel selections whole."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*LAYER_TYPES, ChannelGather)) or super().is_leaf_module(m, qualname)


def _is_tensorish(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(_is_tensorish(v) for v in value)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _along(codes: torch.Tensor, dim: int) -> torch.Tensor | None:
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


def _keeps_channels(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Whether a slice or reshape leaves the channels whole: the units vary along one dim
    before, and after it along one dim in the same order (a crop, a squeeze), or along the
    flattened features with the channels major (``flatten(1)`` before a linear layer)."""
    varying = [d for d in range(before.dim()) if bool((before != before.narrow(d, 0, 1)).any())]
    if not varying:
        return True
    if len(varying) > 1:
        return False
    line = _along(before, varying[0])
    for d in range(after.dim()):
        out = _along(after, d)
        if out is not None and torch.equal(out, line):
            return True
    out = _along(after, -1) if after.dim() else None
    if out is None or len(out) % len(line) or varying[0] == before.dim() - 1:
        return False
    return torch.equal(out, line.repeat_interleave(len(out) // len(line)))


def _spread(line: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    """Codes along ``dim`` expanded to a tensor of ``shape``."""
    view = [1] * len(shape)
    view[dim % len(shape)] = -1
    return line.view(view).expand(shape)


def _code(units: torch.Tensor, off: Any, on: Any) -> torch.Tensor:
    return units * 16 + torch.as_tensor(off) * 4 + torch.as_tensor(on)


def _decode(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return codes // 16, (codes // 4) % 4, codes % 4


def _per_channel_state(state: torch.Tensor, at_zero: torch.Tensor, at_one: torch.Tensor):
    """The state of each channel after a per-channel function ``f``, given per channel
    whether ``f(0)`` is nonzero or varies and whether ``f(1)`` varies over the map."""
    zero_to = torch.where(at_zero == 0, ZERO, torch.where(at_zero == 1, CONST, LIVE))
    const_to = torch.where(at_one, LIVE, CONST)
    return torch.where(state == ZERO, zero_to, torch.where(state == CONST, const_to, LIVE))


class _Interpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, model: nn.Module):
        super().__init__(gm, garbage_collect_values=False)
        self.model = model
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
        self.codes: dict[fx.Node, Any] = {}
        self.calls: dict[str, int] = {}
        self.inference: set[str] = set()  # the modules inference mode calls
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    # -- units --------------------------------------------------------------------------
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
        for t in _tensors(codes):
            self.fix(_decode(t)[0], reason)

    # -- where ----------------------------------------------------------------------------
    def where(self, node: fx.Node) -> str:
        """The user's module and source line of a node."""
        stack = node.meta.get("nn_module_stack") or {}
        path = ""
        if stack:
            last = list(stack.values())[-1]
            path = last[0] if isinstance(last, tuple) else str(last)
        if node.op == "call_module":
            path = node.target
        return f"in {path or type(self.model).__name__}{self.line(node)}"

    def line(self, node: fx.Node) -> str:
        """`` (file.py:line)`` of the user's code that made a node ('' when unknown)."""
        torch_dir = str(Path(torch.__file__).parent)
        for line in reversed((node.meta.get("stack_trace") or "").splitlines()):
            parts = line.strip().split(", ")
            if parts[0].startswith('File "') and torch_dir not in parts[0] and len(parts) > 1:
                return f" ({Path(parts[0][6:-1]).name}:{parts[1].replace('line ', '')})"
        return ""

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.submodule(node)).__name__}"
        target = node.target
        return getattr(target, "__name__", str(target))

    def submodule(self, node: fx.Node) -> nn.Module:
        return self.module.get_submodule(node.target)

    # -- running ------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.codes[n] = self.visit(n, value)
        return value

    def real(self, node: Any) -> Any:
        return self.env[node] if isinstance(node, fx.Node) else node

    def substitute(self, node: fx.Node, replace_with: Callable[[fx.Node], Any]):
        args = fx.node.map_arg(node.args, replace_with)
        kwargs = fx.node.map_arg(node.kwargs, replace_with)
        return args, kwargs

    def call(self, node: fx.Node, args, kwargs) -> Any:
        if node.op == "call_module":
            return self.submodule(node)(*args, **kwargs)
        if node.op == "call_method":
            self_arg, *rest = args
            return getattr(self_arg, node.target)(*rest, **kwargs)
        return node.target(*args, **kwargs)

    def visit(self, node: fx.Node, value: Any) -> Any:
        if node.op == "placeholder":
            if not isinstance(value, torch.Tensor):
                return None
            return self.fresh(value, "the network's input")
        if node.op == "output":
            self.fix_all([self.codes.get(a) for a in node.all_input_nodes], "the network's output")
            return None
        if node.op == "get_attr":
            if not _is_tensorish(value):
                return None
            return self.fresh(value, f"tensor {node.target} read outside its module")
        inputs = [a for a in node.all_input_nodes if _is_tensorish(self.env[a])]
        if not _is_tensorish(value):
            return self.visit_value(node, inputs)
        if node.op == "call_module":
            return self.visit_module(node, self.submodule(node), value)
        target = node.target
        if target in SAME_VALUES:
            return self.codes[node.args[0]]
        if target in CREATES:
            return self.fresh(value, f"a tensor made by {self.describe(node)} {self.where(node)}")
        if target in REARRANGE:
            return self.rearrange(node, value)
        if target in ADD_LIKE or target in MUL_LIKE or target in DIV_LIKE:
            if len(inputs) == 2:
                return self.elementwise(node, value, *inputs)
            return self.per_channel(node, value)
        if (
            target in PER_CHANNEL_FUNCTIONS
            or target in PER_CHANNEL_METHODS
            or getattr(target, "__name__", None) in PER_CHANNEL_NAMES
        ):
            return self.per_channel(node, value)
        if target in SPATIAL_REDUCTIONS and self.spatial_reduction(node):
            return self.per_channel(node, value)
        return self.opaque(node, value, f"{node.op} {self.describe(node)}")

    def fresh(self, value: Any, reason: str) -> Any:
        """New fixed units for a tensor whose channels the engine cannot follow."""
        if isinstance(value, (tuple, list)):
            return tuple(self.fresh(v, reason) for v in value)
        if not isinstance(value, torch.Tensor):
            return None
        if value.dim() >= 2:
            units = self.new_units(value.shape[1], fixed=reason)
            return _spread(_code(units, LIVE, LIVE), 1, value.shape)
        return _code(self.new_units(1, fixed=reason), LIVE, LIVE).expand(value.shape)

    def opaque(self, node: fx.Node, value: Any, what: str) -> Any:
        """An op the engine cannot follow: fix what it reads, and its outputs are new."""
        reason = f"{what} {self.where(node)}"
        self.fix_all([self.codes.get(a) for a in node.all_input_nodes], reason)
        return self.fresh(value, reason)

    def visit_value(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        """A Python value: a size (fine) or a tensor's values read as numbers (fixed)."""
        target = node.target
        if inputs and target not in SIZE_READS and target is not torch._assert:
            reason = f"values read as Python numbers by {self.describe(node)} {self.where(node)}"
            self.fix_all([self.codes[a] for a in inputs], reason)
        return None

    def spatial_reduction(self, node: fx.Node) -> bool:
        source = node.args[0]
        ndim = self.env[source].dim()
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        return bool(dims) and ndim >= 3 and all(d % ndim >= 2 for d in dims)

    # -- kinds of op --------------------------------------------------------------------
    def rearrange(self, node: fx.Node, value: Any) -> Any:
        """An op that only moves entries around: replayed on the unit codes."""

        def codes_of(a: fx.Node) -> Any:
            if not _is_tensorish(self.env[a]):
                return self.env[a]
            codes = self.codes[a]  # expanded views cannot always be viewed: materialise them
            return codes.contiguous() if isinstance(codes, torch.Tensor) else codes

        if node.target is operator.getitem and isinstance(self.env[node.args[0]], torch.Tensor):
            if any(_is_tensorish(self.env[a]) for a in node.all_input_nodes[1:]):
                return self.opaque(node, value, "indexing with a tensor")
        args, kwargs = self.substitute(node, codes_of)
        try:
            result = self.call(node, args, kwargs)
        except Exception:  # an op that cannot run on integer codes
            return self.opaque(node, value, f"{node.op} {self.describe(node)}")
        source = node.args[0]
        if node.target in WHOLE_DIMS or not isinstance(self.env.get(source), torch.Tensor):
            return result
        units = _decode(self.codes[source])[0]
        if not all(_keeps_channels(units, _decode(piece)[0]) for piece in _tensors(result)):
            self.fix(units, f"{node.op} {self.describe(node)} {self.where(node)} cuts or regroups "
                     "channels by sizes fixed in forward()")  # fmt: skip
        return result

    def per_channel(self, node: fx.Node, value: Any) -> Any:
        """A function acting on each channel alone; ``f(0)`` decides what a removed
        channel holds after it."""
        source = next(a for a in node.all_input_nodes if _is_tensorish(self.env[a]))
        real = self.env[source]
        line = _along(self.codes[source], 1) if real.dim() >= 2 else None
        if line is None or not isinstance(value, torch.Tensor) or value.dim() < 2:
            return self.opaque(node, value, f"{node.op} {self.describe(node)}")
        if value.shape[1] != real.shape[1]:
            return self.opaque(
                node, value, f"{node.op} {self.describe(node)} changing the channels"
            )

        def at(fill: float) -> torch.Tensor:
            probe = torch.full_like(real, fill)
            args, kwargs = self.substitute(node, lambda a: probe if a is source else self.env[a])
            return self.call(node, args, kwargs)

        return self.after_function(line, at, value.shape)

    def after_function(self, line: torch.Tensor, at: Callable, shape: torch.Size) -> torch.Tensor:
        """The codes after a per-channel function, probed at 0 and 1 (``at(fill)``): a removed
        channel stays zero when ``f(0) == 0``, becomes a constant when ``f(0)`` is one, and
        varies when the function pads a constant map with zeros (an average pool, say)."""
        with torch.no_grad():
            zero, one = at(0.0).float().cpu(), at(1.0).float().cpu()
        flat0 = zero.transpose(0, 1).reshape(zero.shape[1], -1)
        flat1 = one.transpose(0, 1).reshape(one.shape[1], -1)
        varies0 = (flat0 != flat0[:, :1]).any(dim=1)
        at_zero = torch.where(varies0, 2, (flat0[:, 0] != 0).long())
        at_one = (flat1 != flat1[:, :1]).any(dim=1)
        units, off, on = _decode(line)
        off = _per_channel_state(off, at_zero, at_one)
        on = _per_channel_state(on, at_zero, at_one)
        return _spread(_code(units, off, on), 1, shape)

    def elementwise(self, node: fx.Node, value: torch.Tensor, a: fx.Node, b: fx.Node) -> Any:
        """``a + b``, ``a * b``, ...: ties the operands' units entry by entry."""
        sa, sb = self.env[a].shape, self.env[b].shape
        ca, cb = torch.broadcast_tensors(self.codes[a], self.codes[b])
        ca, cb = ca.expand(value.shape), cb.expand(value.shape)
        ua, off_a, on_a = _decode(ca)
        ub, off_b, on_b = _decode(cb)

        def modulates(short: torch.Size, other: torch.Tensor) -> bool:
            """Broadcast along a dim where the other operand's units vary."""
            pad = [1] * (len(value.shape) - len(short)) + list(short)
            return any(pad[d] == 1 < value.shape[d] and bool((other != other.narrow(d, 0, 1)).any())
                       for d in range(len(pad)))  # fmt: skip

        mod_a, mod_b = modulates(sa, ub), modulates(sb, ua)
        reason = f"{self.describe(node)} broadcast over channels {self.where(node)}"
        if mod_a and mod_b:
            return self.opaque(node, value, reason)
        if mod_a or mod_b:
            self.fix(ua if mod_a else ub, reason)
        else:
            n = len(self.parent)  # each pair of units once, as one key
            for key in torch.unique(ua.flatten() * n + ub.flatten()).tolist():
                x, y = divmod(key, n)
                if x != y:
                    self.union(x, y)
                self.joined.update((x, y))
        units = ub if mod_a else ua

        def combine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            worst = torch.maximum(x, y)
            if node.target in MUL_LIKE:
                return torch.where((x == ZERO) | (y == ZERO), ZERO, worst)
            if node.target in DIV_LIKE:
                return torch.where(y == ZERO, LIVE, torch.where(x == ZERO, ZERO, worst))
            return worst

        return _code(units, combine(off_a, off_b), combine(on_a, on_b))

    def visit_module(self, node: fx.Node, module: nn.Module, value: Any) -> Any:
        name = node.target
        holds_weights = next(module.parameters(recurse=True), None) is not None
        if holds_weights and self.calls[name] > 1:
            return self.opaque(
                node, value, f"{type(module).__name__} called more than once in forward()"
            )
        if len([a for a in node.all_input_nodes if _is_tensorish(self.env[a])]) != 1:
            return self.opaque(node, value, f"module {type(module).__name__} of several inputs")
        if isinstance(module, ChannelGather):
            return self.gather(node, module, value)
        if isinstance(module, nn.Conv2d):
            return self.conv(node, module, value)
        if isinstance(module, nn.Linear):
            return self.linear(node, module, value)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self.batchnorm(node, module, value)
        if isinstance(module, PER_CHANNEL_MODULES) or type(module).__name__ in ACTIVATION_NAMES:
            return self.per_channel(node, value)
        if isinstance(module, REARRANGE_MODULES):
            return self.rearrange(node, value)
        return self.opaque(node, value, f"module {type(module).__name__}")

    def gather(self, node: fx.Node, m: ChannelGather, value: torch.Tensor) -> Any:
        """A channel selection: what it reads is kept, its outputs are new units."""
        name, (source,) = node.target, node.all_input_nodes
        if self.calls[name] > 1:
            return self.opaque(node, value, f"channel selection {name} called more than once")
        read = torch.unique(_decode(self.codes[source])[0])
        self.fix(read, f"read through the channel selection {name} (the paper's layout)")
        self.selected.update(read.tolist())
        self.gathers[name] = self.new_units(len(m.index), producer=name)
        return _spread(_code(self.gathers[name], LIVE, LIVE), 1, value.shape)

    def read(self, node: fx.Node, codes: torch.Tensor, dim: int, padded: bool) -> torch.Tensor:
        """The units a layer reads along ``dim``, fixing those it may not lose."""
        line = _along(codes, dim)
        if line is None:
            self.fix(_decode(codes)[0], f"{node.target} reads channels mixed with positions")
            return _decode(codes.movedim(dim, -1).reshape(-1, codes.shape[dim])[0])[0]
        units, off, on = _decode(line)
        at = f"{node.target}{self.line(node)}"
        self.fix(units[off == LIVE], f"read by {at} where no BatchNorm scales them")
        if padded:
            self.fix(units[off == CONST], f"a nonzero f(0) after a BatchNorm, read by {at} "
                     "through zero padding")  # fmt: skip
        self.uncompensable.update(units[on == LIVE].tolist())
        return units

    def conv(self, node: fx.Node, m: nn.Conv2d, value: torch.Tensor) -> Any:
        name, (source,) = node.target, node.all_input_nodes
        codes = self.codes[source]
        if type(m).forward is not nn.Conv2d.forward and type(m).__name__ != "Conv2dSame":
            return self.opaque(node, value, f"module {type(m).__name__} (its own forward)")
        padded = (any(p != 0 for p in m.padding) or m.padding == "same"
                  or type(m).__name__ == "Conv2dSame") and m.padding_mode == "zeros"  # fmt: skip
        padded = padded and math.prod(m.kernel_size) > 1
        pixels, kernel = value.shape[2] * value.shape[3], math.prod(m.kernel_size)
        if m.groups == 1:
            inputs = self.read(node, codes, 1, padded)
            outputs = self.new_units(m.out_channels, producer=name)
            self.layers[name] = Layer("conv", inputs, outputs, pixels, kernel)
            return _spread(_code(outputs, LIVE, LIVE), 1, value.shape)
        # grouped: each convolution group (its inputs and outputs) is one unit
        line = _along(codes, 1)
        if line is None:
            self.fix(_decode(codes)[0], f"{name} reads channels mixed with positions")
            line = codes[(0, slice(None)) + (0,) * (codes.dim() - 2)]
        units, off, on = _decode(line)
        per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
        blocks = units.view(m.groups, per_in)
        for row in blocks.tolist():
            for u in row[1:]:
                self.union(row[0], u)
        head = blocks[:, 0]
        for u in head.tolist():
            self.producer.setdefault(self.find(u), name)
        bias = m.bias is not None

        def after(state: torch.Tensor) -> torch.Tensor:
            state = state.view(m.groups, per_in).amax(dim=1)
            state = torch.where((state == CONST) & padded, LIVE, state)
            return torch.where((state == ZERO) & bias, CONST, state)

        outputs = head.repeat_interleave(per_out)
        self.layers[name] = Layer("grouped", units, outputs, pixels, kernel, m.groups)
        out = _code(outputs, after(off).repeat_interleave(per_out),
                    after(on).repeat_interleave(per_out))  # fmt: skip
        return _spread(out, 1, value.shape)

    def linear(self, node: fx.Node, m: nn.Linear, value: torch.Tensor) -> Any:
        name, (source,) = node.target, node.all_input_nodes
        if type(m).forward is not nn.Linear.forward and type(m).__module__.split(".")[0] != "timm":
            return self.opaque(node, value, f"module {type(m).__name__} (its own forward)")
        inputs = self.read(node, self.codes[source], -1, padded=False)
        outputs = self.new_units(m.out_features, producer=name)
        pixels = value.numel() // (value.shape[0] * m.out_features) if value.dim() > 2 else 1
        self.layers[name] = Layer("linear", inputs, outputs, pixels)
        return _spread(_code(outputs, LIVE, LIVE), -1, value.shape)

    def batchnorm(self, node: fx.Node, m: nn.Module, value: torch.Tensor) -> Any:
        name, (source,) = node.target, node.all_input_nodes
        plain = type(m).forward is nn.modules.batchnorm._BatchNorm.forward or type(
            m
        ).__module__.startswith("torch.")
        extra = None
        if not plain:  # timm's BatchNormAct2d: BatchNorm, then its own drop and act
            drop, act = getattr(m, "drop", None), getattr(m, "act", None)
            known = all(
                isinstance(x, PER_CHANNEL_MODULES) or type(x).__name__ in ACTIVATION_NAMES
                for x in (drop, act)
            )
            if not known:
                return self.opaque(node, value, f"module {type(m).__name__} (its own forward)")
            extra = nn.Sequential(drop, act)
        line = _along(self.codes[source], 1)
        if line is None or value.dim() < 2:
            return self.opaque(node, value, f"BatchNorm {name} on features mixed with positions")
        units, off, on = _decode(line)
        self.norms[name] = units
        if m.affine:
            for u in set(units.tolist()):
                self.members.setdefault(u, []).append(name)
            off, on = torch.full_like(off, ZERO), torch.full_like(on, CONST)
        else:  # (x - mean) / std: a removed channel holds a constant
            off = torch.where(off == ZERO, CONST, off)
            on = torch.where(on == ZERO, CONST, on)
        if source.op == "call_module" and source.target in self.layers and len(source.users) == 1:
            self.layers[source.target].norm = name
        line = _code(units, off, on)
        if extra is None:
            return _spread(line, 1, value.shape)
        return self.after_function(
            line, lambda fill: extra(torch.full_like(value, fill)), value.shape
        )

    # -- the result -----------------------------------------------------------------------
    def result(self, input_size: tuple[int, ...]) -> ChannelGraph:
        n = len(self.parent)
        roots = torch.tensor([self.find(u) for u in range(n)], dtype=torch.long)
        ids, compact = torch.unique(roots, return_inverse=True)
        count = len(ids)
        members: dict[int, list[str]] = {}
        for u, names in self.members.items():
            bucket = members.setdefault(int(compact[u]), [])
            bucket.extend(x for x in names if x not in bucket)
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
            name: replace(layer, inputs=compact[layer.inputs], outputs=compact[layer.outputs],
                          inference=name in self.inference)
            for name, layer in self.layers.items()
        }  # fmt: skip
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
        for i, (g, units) in enumerate(by_group.items()):
            names: list[str] = []
            for c in units:
                names.extend(x for x in members.get(c, []) if x not in names)
            order = list(self.norms)
            names.sort(key=order.index)
            unit_ids = torch.tensor(units, dtype=torch.long)
            all_fixed = bool(fixed[unit_ids].all())
            groups[i] = Group(unit_ids, producers.get(g, []), names,
                              reasons[units[0]] if all_fixed else None,
                              bool(joined[unit_ids].any()))  # fmt: skip
        notable = []
        selected = {int(compact[u]) for u in self.selected}  # scaled by BNs after a selection
        for c, reason in reasons.items():
            if (c in members or c in selected) and reason not in notable:
                notable.append(reason)
        return ChannelGraph(groups, layers, norms, fixed, joined, compensable, notable,
                            tuple(input_size), type(self.model).__name__, gathers)  # fmt: skip


def trace_channels(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> ChannelGraph:
    """Trace ``model`` and sort its channels into units and groups (see the module docs).

    Args:
        model: the network; it is not modified.
        input_size: the shape of one input batch, ``(N, C, H, W)`` (or ``(C, H, W)``).

    Raises:
        NetslimError: when the forward pass cannot be traced, or does not run on that input.
    """
    input_size = tuple(input_size)
    if len(input_size) == 3:
        input_size = (1, *input_size)
    was_training = model.training
    try:
        # The graph of training mode holds what only training runs (an auxiliary classifier
        # reading pruned channels); the layers of inference mode are those MACs count.
        model.eval()
        inference = _LayerTracer().trace(model)
        model.train()
        try:
            graph = _LayerTracer().trace(model)
        except Exception:  # forward() traces in inference mode only: follow that
            graph = inference
        model.eval()  # the trace then runs with BatchNorm's running statistics, no dropout
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        called = {n.target for n in inference.nodes if n.op == "call_module"}
        for candidate in dict.fromkeys([graph, inference]):  # training's graph, if it runs
            interpreter = _Interpreter(fx.GraphModule(model, candidate), model)
            interpreter.inference = called
            rng_devices = [device] if device.type == "cuda" else []
            try:
                with torch.no_grad(), torch.random.fork_rng(rng_devices):
                    interpreter.run(torch.zeros(input_size, device=device, dtype=dtype))
                break
            except NetslimError:
                raise
            except Exception as e:
                if candidate is inference:
                    raise NetslimError(
                        f"{type(model).__name__} does not run on an input of shape "
                        f"{input_size}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                    ) from None
    except NetslimError:
        raise
    except Exception as e:
        raise NetslimError(
            f"cannot trace {type(model).__name__} with torch.fx{_source_of(e)}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. The pruning engine "
            "needs a forward() without control flow that depends on the input's values"
        ) from None
    finally:
        model.train(was_training)
    return interpreter.result(input_size)
