"""Which channels of a network live and die together, found by tracing it with torch.fx.

A channel can only be removed from a network if every layer that writes it and every
layer that reads it shrinks with it. :func:`trace_channels` follows one forward pass
symbolically and sorts all channels into **groups**:

* a conv or linear layer's output channels start a new group;
* BatchNorm, activations, pooling and dropout act per channel: their output channels are
  their input's, and each BatchNorm becomes a **member** of the groups it scales;
* an element-wise addition or multiplication (a residual connection) merges its operands'
  groups channel by channel: channel ``i`` of both sides is kept or removed together;
* a concatenation along the channel dimension lays its inputs' groups side by side
  (each keeps its offset), as in a DenseNet;
* a depthwise conv (``groups == in_channels == out_channels``) passes its input's group
  through: output channel ``i`` exists only while input channel ``i`` does. Other grouped
  convs fix their input and output channels (they are never pruned);
* flattening a ``C x H x W`` map into a linear layer repeats each channel ``H*W`` times
  among the linear layer's input features;
* a channel selection (:class:`~netslim.models.gather.ChannelGather`, the paper's
  ``channel_selection`` in its pruned ResNets and DenseNets) starts a new group of its
  output channels, which surgery removes from its index; the channels it reads are fixed
  (kept whole), as the paper's code keeps them, since one input channel may be selected by
  several such layers under other gammas.

Groups that reach the network's input or output, or that no BatchNorm scales, are fixed.
Anything else -- an op or module the engine does not know, a layer called twice, a
parameter read outside its module, control flow that depends on data -- raises
:class:`~netslim.errors.NetslimError` naming it: the engine never guesses.
"""

from __future__ import annotations

import operator
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from netslim.errors import NetslimError
from netslim.models.gather import ChannelGather

#: One stretch of a tensor's channel (or feature) dimension: ``(group id, repeat)``. Channel
#: ``c`` of the group covers ``repeat`` consecutive entries (``H*W`` after a flatten, else 1).
Segment = tuple[int, int]
Space = tuple[Segment, ...]

PER_CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample,
)  # fmt: skip
PER_CHANNEL_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
    torch.relu, torch.sigmoid, torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate,
}  # fmt: skip
PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to"}
ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.mul, operator.truediv,
               torch.add, torch.sub, torch.mul, "add", "add_", "sub", "mul", "mul_"}  # fmt: skip
NON_TENSOR_OPS = {getattr, operator.getitem, "size", "dim"}  # shapes, read by view(...) etc.
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class Group:
    """Channels that are kept or removed together.

    Attributes:
        size: number of channels.
        producers: the conv/linear layers whose output channels these are.
        members: ``(BatchNorm name, offset)`` of every BN that scales them: channel ``i``
            of the group is channel ``offset + i`` of that BN.
        fixed: why these channels may not be pruned, or None when they may.
        joined: whether an element-wise op (a residual addition) joined these channels
            to others.
    """

    size: int
    producers: list[str] = field(default_factory=list)
    members: list[tuple[str, int]] = field(default_factory=list)
    fixed: str | None = None
    joined: bool = False

    @property
    def label(self) -> str:
        """A readable name: its first BatchNorm (its first producer when it has none)."""
        if self.members:
            return self.members[0][0]
        return self.producers[0] if self.producers else "input"


@dataclass
class Layer:
    """A conv or linear layer, with the channel spaces it reads and writes."""

    kind: str  # "conv", "depthwise", "grouped" (never pruned) or "linear"
    inputs: Space
    outputs: Space
    pixels: int  # output positions per image (1 for a linear layer)
    kernel: int = 1  # kernel positions (kh * kw)
    groups: int = 1
    norm: str | None = None  # the BatchNorm that alone reads its output, if any


@dataclass
class ChannelGraph:
    """The result of :func:`trace_channels`: groups, and the layers and BNs that use them."""

    groups: dict[int, Group]
    layers: dict[str, Layer]
    norms: dict[str, Space]  # every BatchNorm, affine or not
    input_size: tuple[int, ...]
    gathers: dict[str, Space] = field(default_factory=dict)  # ChannelGather -> its outputs

    @property
    def prunable(self) -> dict[int, Group]:
        return {i: g for i, g in self.groups.items() if g.fixed is None}

    def residual_kept(self) -> ChannelGraph | None:
        """This graph with every group joined by an addition fixed, as the paper's code keeps
        the residual path at full width (for comparisons); None when nothing is joined."""
        if not any(g.joined for g in self.groups.values()):
            return None
        reason = "joined by a residual addition (kept, as the official code does)"
        groups = {i: replace(g, fixed=g.fixed or reason) if g.joined else g
                  for i, g in self.groups.items()}  # fmt: skip
        return replace(self, groups=groups)


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, with netslim's own layers (ChannelGather) kept as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ChannelGather) or super().is_leaf_module(m, qualname)


def _source_of(error: BaseException) -> str:
    """The innermost frame of the traceback outside torch: where the user's code failed."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if torch_dir not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {Path(f.filename).name}:{f.lineno}, in {f.name}: {f.line})"


class _Tracer:
    def __init__(self, model: nn.Module, input_size: tuple[int, ...]):
        self.model = model
        self.input_size = tuple(input_size)
        self.groups: dict[int, Group] = {}
        self.parent: dict[int, int] = {}
        self.layers: dict[str, Layer] = {}
        self.norms: dict[str, Space] = {}
        self.spaces: dict[fx.Node, Space | None] = {}
        self.gathers: dict[str, Space] = {}
        try:
            self.gm = fx.GraphModule(model, _LeafTracer().trace(model), type(model).__name__)
        except Exception as e:
            raise NetslimError(
                f"cannot trace {type(model).__name__} with torch.fx{_source_of(e)}: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. The pruning engine "
                "needs a forward() without control flow that depends on the input's values"
            ) from None
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        was_training = model.training
        self.gm.eval()
        try:
            with torch.no_grad():
                ShapeProp(self.gm).propagate(torch.zeros(input_size, device=device, dtype=dtype))
        except Exception as e:
            raise NetslimError(
                f"{type(model).__name__} does not run on an input of shape {tuple(input_size)}: "
                f"{str(e).splitlines()[0]}"
            ) from None
        finally:
            model.train(was_training)

    # -- groups -------------------------------------------------------------------------
    def new_group(self, size: int, producer: str | None = None, fixed: str | None = None) -> int:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.groups[gid] = Group(size, [producer] if producer else [], fixed=fixed)
        return gid

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        self.groups[a].joined = True
        if a == b:
            return
        ga, gb = self.groups[a], self.groups.pop(b)
        self.parent[b] = a
        ga.producers += gb.producers
        ga.members += gb.members
        ga.fixed = ga.fixed or gb.fixed

    def fix(self, gid: int, reason: str) -> None:
        group = self.groups[self.find(gid)]
        group.fixed = group.fixed or reason

    # -- tracing ------------------------------------------------------------------------
    def run(self) -> ChannelGraph:
        calls: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
                if calls[node.target] > 1:
                    raise NetslimError(
                        f"module {node.target} is called more than once in forward(); a layer "
                        "shared between places cannot be pruned for one of them alone"
                    )
            self.spaces[node] = self.visit(node)
        for name, layer in self.layers.items():  # a BN that alone reads a layer takes its shift
            node = next(
                n for n in self.gm.graph.nodes if n.op == "call_module" and n.target == name
            )
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module" and users[0].target in self.norms:
                layer.norm = users[0].target

        def resolve(space: Space) -> Space:
            return tuple((self.find(g), r) for g, r in space)

        for group in self.groups.values():
            if group.fixed is None and not group.members:
                group.fixed = "no BatchNorm scales these channels"
        for layer in self.layers.values():
            layer.inputs, layer.outputs = resolve(layer.inputs), resolve(layer.outputs)
        norms = {name: resolve(space) for name, space in self.norms.items()}
        gathers = {name: resolve(space) for name, space in self.gathers.items()}
        return ChannelGraph(dict(self.groups), self.layers, norms, self.input_size, gathers)

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def unsupported(self, node: fx.Node, what: str) -> NetslimError:
        return NetslimError(
            f"the pruning engine cannot prune through {what} (node {node.name!r} of "
            f"{type(self.model).__name__}.forward); it knows conv, linear, BatchNorm, "
            "activations, pooling, dropout, flatten, element-wise add/mul and channel concat"
        )

    def visit(self, node: fx.Node) -> Space | None:
        shape = self.shape(node)
        if node.op == "placeholder":
            return ((self.new_group(shape[1], fixed="the network's input"), 1),)
        if node.op == "output":
            for arg in node.all_input_nodes:
                for gid, _ in self.spaces.get(arg) or ():
                    self.fix(gid, "the network's output")
            return None
        if node.op == "get_attr":
            raise self.unsupported(node, f"parameter {node.target} read outside its module")
        tensor_args = [a for a in node.all_input_nodes if self.shape(a) is not None]
        if shape is None:  # an int, a torch.Size, ...: no channels to follow
            if node.target in NON_TENSOR_OPS:
                return None
            raise self.unsupported(node, f"{node.op} {node.target}")
        inputs = [self.spaces[a] for a in tensor_args]
        if node.op == "call_module":
            return self.visit_module(node, self.gm.get_submodule(node.target), inputs)
        return self.visit_op(node, node.target, tensor_args, inputs, shape)

    def visit_module(self, node: fx.Node, module: nn.Module, inputs: list[Space]) -> Space:
        name = node.target
        width = {nn.Conv2d: "in_channels", nn.Linear: "in_features"}.get(type(module))
        if width and inputs and self.width(inputs[0]) != getattr(module, width):
            raise self.unsupported(node, f"{name}: its input's channels could not be followed")
        if len(inputs) != 1:
            raise self.unsupported(
                node, f"module {name} ({type(module).__name__}) of {len(inputs)} inputs"
            )
        (space,) = inputs
        if isinstance(module, nn.Conv2d):
            pixels = self.shape(node)[2] * self.shape(node)[3]
            kernel, groups = module.kernel_size[0] * module.kernel_size[1], module.groups
            if groups == 1:
                out = ((self.new_group(module.out_channels, name), 1),)
                self.layers[name] = Layer("conv", space, out, pixels, kernel)
            elif groups == module.in_channels == module.out_channels:
                self.layers[name] = Layer("depthwise", space, space, pixels, kernel, groups)
                return space
            else:
                reason = f"grouped conv {name} (groups={module.groups}) is not pruned"
                for gid, _ in space:
                    self.fix(gid, reason)
                out = ((self.new_group(module.out_channels, name, fixed=reason), 1),)
                self.layers[name] = Layer("grouped", space, out, pixels, kernel, groups)
            return out
        if isinstance(module, nn.Linear):
            if len(self.shape(node)) != 2:
                raise self.unsupported(node, f"linear layer {name} on a >2-D tensor")
            out = ((self.new_group(module.out_features, name), 1),)
            self.layers[name] = Layer("linear", space, out, 1)
            return out
        if isinstance(module, NORM_TYPES):
            if any(r != 1 for _, r in space):
                raise self.unsupported(node, f"BatchNorm {name} on flattened features")
            self.norms[name] = space
            if module.affine:
                offset = 0
                for gid, _ in space:
                    group = self.groups[self.find(gid)]
                    group.members.append((name, offset))
                    offset += group.size
            return space
        if isinstance(module, PER_CHANNEL_MODULES):
            return space
        if isinstance(module, ChannelGather):
            for gid, _ in space:
                self.fix(gid, "read through a channel selection (the paper's layout)")
            self.gathers[name] = ((self.new_group(len(module.index), name), 1),)
            return self.gathers[name]
        if isinstance(module, nn.Flatten):
            return self.flatten(node, node.args[0])
        raise self.unsupported(node, f"module {name} ({type(module).__name__})")

    def visit_op(self, node, target, tensor_args, inputs: list[Space], shape) -> Space:
        if target in ELEMENTWISE:
            if len(inputs) == 1:  # with a scalar
                return inputs[0]
            if len(inputs) != 2:
                raise self.unsupported(node, f"{target} of {len(inputs)} tensors")
            (a, b), (sa, sb) = inputs, [self.shape(t) for t in tensor_args]
            if len(sa) > 1 and len(sb) > 1 and sa[1] == 1 != sb[1]:  # broadcast over channels
                return b
            if len(sa) > 1 and len(sb) > 1 and sb[1] == 1 != sa[1]:
                return a
            return self.join(node, a, b)
        if target in PER_CHANNEL_FUNCTIONS or target in PER_CHANNEL_METHODS:
            return inputs[0]
        if target in (torch.cat, torch.concat, "cat"):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim not in (1, 1 - len(shape)):
                raise self.unsupported(node, f"concatenation along dim {dim}")
            parts = node.args[0] if node.args else node.kwargs["tensors"]  # in order, repeats too
            return tuple(seg for part in parts for seg in self.spaces[part])
        if target in (torch.flatten, "flatten", "view", "reshape"):
            return self.flatten(node, tensor_args[0])
        if target in (torch.mean, "mean", torch.amax, "amax"):
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            ndim = len(self.shape(tensor_args[0]))
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if dims and all(d % ndim >= 2 for d in dims):
                return inputs[0]  # a spatial reduction keeps the channels
        raise self.unsupported(node, f"{node.op} {getattr(target, '__name__', target)}")

    def width(self, space: Space) -> int:
        """How many entries a channel space spans."""
        return sum(self.groups[self.find(g)].size * r for g, r in space)

    def join(self, node: fx.Node, a: Space, b: Space) -> Space:
        sizes_a = [(self.groups[self.find(g)].size, r) for g, r in a]
        sizes_b = [(self.groups[self.find(g)].size, r) for g, r in b]
        if sizes_a != sizes_b:
            raise self.unsupported(node, "an element-wise op whose operands' channels come from "
                                   "differently built concatenations")  # fmt: skip
        for (ga, _), (gb, _) in zip(a, b):
            self.union(ga, gb)
        return a

    def flatten(self, node: fx.Node, arg: fx.Node) -> Space:
        before, after = self.shape(arg), self.shape(node)
        if before == after:
            return self.spaces[arg]
        if len(after) != 2 or after[0] != before[0] or len(before) != 4:
            raise self.unsupported(node, f"reshape from {list(before)} to {list(after)}")
        pixels = before[2] * before[3]
        return tuple((g, r * pixels) for g, r in self.spaces[arg])


def trace_channels(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> ChannelGraph:
    """Trace ``model`` and sort its channels into groups (see the module docs).

    Args:
        model: the network; it is not modified.
        input_size: the shape of one input batch, used to learn the feature-map sizes.

    Raises:
        NetslimError: naming the module or op that cannot be traced or pruned through.
    """
    return _Tracer(model, input_size).run()
