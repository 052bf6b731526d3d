"""What each op does to channels: the engine's core rules, extended by a :class:`~.rules.Rules`.

While a forward pass is replayed (:mod:`netslim.engine.trace` records it, one :class:`Call`
per op), :class:`Replay` gives every tensor entry a code (:mod:`netslim.engine.graph`) and, per op:

* a conv or linear layer's output channels are new units, one per channel (one group);
* a grouped conv (depthwise included) ties each of its convolution groups, inputs and
  outputs, into one unit: a whole convolution group is kept or removed;
* BatchNorm, activations, pooling, dropout and other per-channel functions keep their
  input's units; each BatchNorm channel becomes a member (a scorer) of its unit;
* an element-wise addition or multiplication (a residual, a squeeze-excitation gate) ties
  its operands' units entry by entry;
* reshapes, slices, splits, concatenations and permutations (a channel shuffle) move
  units around exactly as they move the values;
* a channel selection (one the rules name, as the paper's ``ChannelGather``) writes new
  units, which surgery removes from its index; the channels it reads are fixed;
* a layer of your own that the rules say how to slice (:meth:`~.rules.Rules.register_layer`)
  is a conv: new output units, reading its input units;
* a module the engine records whole but does not know (a ``torch.nn`` module outside its
  tables, the activation inside timm's ``BatchNormAct2d``) that holds no tensors is probed
  (:func:`probe_per_channel`): it is per-channel when every subset of the channels, passed
  alone, gives that subset of its outputs. Never by its class's name.
* anything else -- an unknown module or op, a layer called twice, a parameter read outside
  its module -- fixes the units it touches, with the reason. The engine never guesses.

It also follows what a removed channel holds in the reference network (pruned gamma and
beta set to 0): zero after a BatchNorm, a constant after a function with ``f(0) != 0``,
live values where no BatchNorm scales it. A unit that a layer reads live, or reads as a
nonzero constant through zero padding, is fixed.

Your own layers, in rules scoped to one call (:mod:`netslim.engine.rules`)::

    from netslim import engine

    class MySwish(nn.Module):              # any activation acting on each channel alone
        def forward(self, x):
            return x * torch.special.expit(x)   # an op the engine does not know

    rules = engine.default_rules().copy()
    rules.register_per_channel(MySwish)    # or a function, or a tensor method's name
    rules.register_opaque(MyFancyNorm)     # mixes channels: keep what it reads and writes
    graph = engine.trace_channels(model, rules=rules)

A per-channel module or function must map each channel to itself (no mixing across
channels); the engine still probes it at 0 and 1 to learn what a removed channel becomes.
An opaque one keeps every channel it touches.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netslim.engine.graph import (
    CONST,
    LIVE,
    ZERO,
    Layer,
    Units,
    along,
    code,
    decode,
    is_tensorish,
    keeps_channels,
    per_channel_state,
    spread,
    tensors,
)
from netslim.engine.rules import LayerSpec, Rules, default_rules
from netslim.engine.rules import register_opaque as register_opaque
from netslim.engine.rules import register_per_channel as register_per_channel
from netslim.engine.rules import unregister as unregister

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
               "type", "type_as", "cpu", "cuda", "requires_grad_", "data"}  # fmt: skip
#: What a tensor is, not what it holds: reading these is no dependence on its values.
SIZE_READS = {"size", "dim", "ndimension", "numel", "shape", "ndim", "dtype", "device",
              "is_cuda", "is_contiguous", torch.numel, getattr, len, "__len__", "requires_grad",
              "is_leaf", "grad_fn", "layout", "is_floating_point", "is_complex", "element_size",
              "get_device", "stride", "storage_offset", "nbytes", "itemsize", "is_sparse",
              "is_quantized", "is_meta", "names", "is_mps"}  # fmt: skip
#: ``chunk(n)``: equal pieces, which stay equal when every piece keeps as many channels.
CHUNKS = {"chunk", torch.chunk}
REARRANGE_MODULES = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle,
                     nn.PixelUnshuffle)  # fmt: skip
LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
#: The submodules a BatchNorm subclass with a forward of its own is taken to run after the
#: BatchNorm, where the rules name none (timm's layout), if running it shows so (norm_then).
NORM_EXTRAS = ("drop", "act")


# -- the core's own rules -----------------------------------------------------------


def per_channel_module(module: Any, rules: Rules | None = None) -> bool:
    """Whether ``module`` acts on each channel alone: a known ``torch.nn`` one, or a class
    ``rules`` (default: :func:`~.rules.default_rules`) registered per-channel."""
    rules = rules or default_rules()
    return isinstance(module, PER_CHANNEL_MODULES) or rules.is_per_channel_module(module)


def per_channel_function(target: Any, rules: Rules | None = None) -> bool:
    """Whether a function or method (by name) acts on each channel alone."""
    known = hashable(target) and (target in PER_CHANNEL_FUNCTIONS or target in PER_CHANNEL_METHODS)
    return known or (rules or default_rules()).is_per_channel_function(target)


def probe_per_channel(module: nn.Module, like: torch.Tensor) -> bool:
    """Whether ``module``, which holds no parameters or buffers, acts on each channel (dim 1)
    alone, found by running it: on a random input shaped like ``like``, every subset of the
    channels whose indices share a bit (and its complement), passed alone, must give that
    subset of the whole input's outputs (a channel read by another's output, or a count of
    channels used, changes them); the outputs must keep the batch and the channels, and two
    runs agree. Anything else, an error included, is False: the channels are then kept."""
    if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
        return False
    if like.dim() < 2 or not like.is_floating_point() or like.numel() == 0:
        return False
    n = like.shape[1]
    x = torch.randn(like.shape, generator=torch.Generator().manual_seed(0))
    x = x.to(like.device, like.dtype)
    try:
        with torch.no_grad():
            whole = module(x.clone())
            if not isinstance(whole, torch.Tensor) or tuple(whole.shape[:2]) != tuple(
                like.shape[:2]
            ):
                return False
            if not _close(module(x.clone()), whole):
                return False
            channels = torch.arange(n)
            for bit in range(max(1, (n - 1).bit_length())):
                member = (channels >> bit) & 1 == 1
                for subset in (member, ~member):
                    idx = subset.nonzero().flatten().to(x.device)
                    if len(idx) and not _close(
                        module(x.index_select(1, idx)), whole.index_select(1, idx)
                    ):
                        return False
    except Exception:  # it does not even run on fewer channels: not per-channel
        return False
    return True


def _close(a: Any, b: torch.Tensor) -> bool:
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return False
    a, b = a.double(), b.double()
    finite = torch.nan_to_num(b, posinf=0.0, neginf=0.0)
    scale = 1.0 + float(finite.abs().max()) if b.numel() else 1.0
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6 * scale, equal_nan=True)


def hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


# -- one op of the forward pass -----------------------------------------------------------


@dataclass
class Call:
    """One op of the forward pass, as a tracer recorded it for :class:`Replay`.

    Values are referred to by *keys* (the tracer makes one per value of the pass): the
    tensors among ``args``/``kwargs`` appear as their keys, and ``Replay.env[key]`` is the
    real value, ``Replay.codes[key]`` its codes.

    Attributes:
        op: ``"call_module"``, ``"call_function"``, ``"call_method"``, ``"placeholder"``
            (the input), ``"get_attr"`` (a tensor read outside its module), ``"constant"``
            (a tensor no op of the pass made) or ``"output"``.
        target: the module's name, the function, or the method's name.
        args, kwargs: the arguments, with keys in place of traced values.
        inputs: the keys among them, in order, each once.
        module: the module called (``call_module`` only).
        calls: how often that module is called in the whole forward pass.
        describe: the op's name for messages.
        rerun: calls the op again with every key ``k`` replaced by ``replace(k)``.
        locate: ``(where, line)``, found only when a message needs them: ``where`` is
            ``"in <module> (file.py:line)"``, the user's module and source line, ``line``
            the ``" (file.py:line)"`` alone (``""`` when unknown).
    """

    op: str
    target: Any
    args: tuple
    kwargs: dict
    inputs: list[Any]
    rerun: Callable[[Callable[[Any], Any]], Any]
    module: nn.Module | None = None
    calls: int = 1
    describe: str = ""
    locate: Callable[[], tuple[str, str]] = lambda: ("", "")  # (where, line), asked lazily

    @functools.cached_property
    def _place(self) -> tuple[str, str]:
        return self.locate()

    @property
    def where(self) -> str:
        return self._place[0]

    @property
    def line(self) -> str:
        return self._place[1]


class Replay:
    """Replays a forward pass on unit codes, one :class:`Call` at a time (see the module
    docs): ``env`` holds the real values, ``codes`` their codes, ``units`` what was learnt."""

    def __init__(self, model_name: str = "the model", rules: Rules | None = None) -> None:
        self.rules = rules or default_rules()
        self.units = Units(model_name)
        self.env: dict[Any, Any] = {}
        self.codes: dict[Any, Any] = {}
        self.readers: dict[Any, int] = {}  # key -> how many ops read it
        self.writers: dict[Any, str] = {}  # key -> the conv/linear layer that wrote it
        self.norm_inputs: dict[str, Any] = {}  # BatchNorm -> the key it reads

    def step(self, key: Any, call: Call, value: Any) -> None:
        """Record ``call``'s result ``value`` under ``key`` and its codes."""
        for k in call.inputs:
            self.readers[k] = self.readers.get(k, 0) + 1
        self.env[key] = value
        self.codes[key] = self.visit(call, value)
        if call.op == "call_module" and call.target in self.units.layers:
            self.writers[key] = call.target

    def finish(self, input_size: tuple[int, ...]):
        """The :class:`~netslim.engine.graph.ChannelGraph` of what was replayed."""
        for name, source in self.norm_inputs.items():  # a BatchNorm alone reading a layer
            layer = self.writers.get(source)
            if layer is not None and self.readers.get(source) == 1:
                self.units.layers[layer].norm = name
        return self.units.result(input_size)

    def visit(self, call: Call, value: Any) -> Any:
        """The codes of ``call``'s result (see the module docs)."""
        if call.op == "placeholder":
            if not isinstance(value, torch.Tensor):
                return None
            return self.fresh(value, "the network's input")
        if call.op == "output":
            self.units.fix_all([self.codes.get(a) for a in call.inputs], "the network's output")
            return None
        if call.op == "get_attr":
            if not is_tensorish(value):
                return None
            return self.fresh(value, f"tensor {call.target} read outside its module")
        if call.op == "constant":  # not made by an op of the pass (a cached attribute)
            return self.fresh(value, f"a tensor made outside the traced ops {call.where}")
        inputs = [a for a in call.inputs if is_tensorish(self.env[a])]
        if not is_tensorish(value):
            return self.visit_value(call, inputs)
        if any(t.numel() == 0 for t in tensors([value, *(self.env[a] for a in inputs)])):
            return self.opaque(call, value, f"{call.op} {call.describe} of an empty tensor")
        if call.op == "call_module":
            return self.visit_module(call, call.module, value)
        target = call.target
        if self.rules.is_opaque_function(target):
            return self.opaque(call, value, f"{call.op} {call.describe} (registered opaque)")
        if target in SAME_VALUES:
            return self.codes[call.args[0]]
        if target in CREATES:
            return self.fresh(value, f"a tensor made by {call.describe} {call.where}")
        if target in REARRANGE:
            return self.rearrange(call, value)
        if target in ADD_LIKE or target in MUL_LIKE or target in DIV_LIKE:
            if len(inputs) == 2:
                return self.elementwise(call, value, *inputs)
            return self.per_channel(call, value)
        if per_channel_function(target, self.rules):
            return self.per_channel(call, value)
        if target in SPATIAL_REDUCTIONS and self.spatial_reduction(call):
            return self.per_channel(call, value)
        return self.opaque(call, value, f"{call.op} {call.describe}")

    def fresh(self, value: Any, reason: str) -> Any:
        """New fixed units for a tensor whose channels the engine cannot follow."""
        if isinstance(value, (tuple, list)):
            return tuple(self.fresh(v, reason) for v in value)
        if not isinstance(value, torch.Tensor):
            return None
        if value.dim() >= 2:
            units = self.units.new_units(value.shape[1], fixed=reason)
            return spread(code(units, LIVE, LIVE), 1, value.shape)
        one = code(self.units.new_units(1, fixed=reason), LIVE, LIVE)
        return one.reshape([1] * value.dim()).expand(value.shape)

    def opaque(self, call: Call, value: Any, what: str) -> Any:
        """An op the engine cannot follow: fix what it reads, and its outputs are new."""
        reason = f"{what} {call.where}"
        self.units.fix_all([self.codes.get(a) for a in call.inputs], reason)
        return self.fresh(value, reason)

    def visit_value(self, call: Call, inputs: list[Any]) -> None:
        """A Python value: a size (fine) or a tensor's values read as numbers (fixed)."""
        target = call.target
        if inputs and target not in SIZE_READS and target is not torch._assert:
            reason = f"values read as Python numbers by {call.describe} {call.where}"
            self.units.fix_all([self.codes[a] for a in inputs], reason)
        return None

    def spatial_reduction(self, call: Call) -> bool:
        source = call.args[0]
        ndim = self.env[source].dim()
        dims = call.kwargs.get("dim", call.args[1] if len(call.args) > 1 else None)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        return bool(dims) and ndim >= 3 and all(d % ndim >= 2 for d in dims)

    # -- kinds of op --------------------------------------------------------------------
    def rearrange(self, call: Call, value: Any) -> Any:
        """An op that only moves entries around: replayed on the unit codes."""

        def codes_of(a: Any) -> Any:
            if not is_tensorish(self.env[a]):
                return self.env[a]
            codes = self.codes[a]  # expanded views cannot always be viewed: materialise them
            return codes.contiguous() if isinstance(codes, torch.Tensor) else codes

        if call.target is operator.getitem and isinstance(self.env[call.args[0]], torch.Tensor):
            if any(is_tensorish(self.env[a]) for a in call.inputs[1:]):
                return self.opaque(call, value, "indexing with a tensor")
        try:
            result = call.rerun(codes_of)
        except Exception:  # an op that cannot run on integer codes
            return self.opaque(call, value, f"{call.op} {call.describe}")
        source = call.args[0]
        if call.target in WHOLE_DIMS or not isinstance(self.env.get(source), torch.Tensor):
            return result
        units = decode(self.codes[source])[0]
        if call.target in CHUNKS and self.chunk_tie(call, units, result):
            return result
        if not all(keeps_channels(units, decode(piece)[0]) for piece in tensors(result)):
            self.units.fix(
                units,
                f"{call.op} {call.describe} {call.where} cuts or regroups "
                "channels by sizes fixed in forward()",
            )
        return result

    def chunk_tie(self, call: Call, units: torch.Tensor, pieces: Any) -> bool:
        """``chunk(n)`` of the channels into equal pieces (YOLO's C2f): each piece keeps its
        own channels, and every piece as many as the others (a tie), since ``chunk`` of the
        pruned tensor cuts it into equal pieces again. False where that does not hold (not
        the channel dim, unequal pieces, a unit spanning channels): then the pieces are cut
        by sizes fixed in forward()."""
        dim = call.kwargs.get("dim", call.args[2] if len(call.args) > 2 else 0)
        line = along(units, 1) if units.dim() >= 2 else None
        if not isinstance(dim, int) or units.dim() < 2 or dim % units.dim() != 1 or line is None:
            return False
        sizes = [piece.shape[1] for piece in tensors(pieces)]
        if len(sizes) < 2 or len(set(sizes)) != 1 or len(torch.unique(line)) != len(line):
            return False
        self.units.ties.append(list(line.split(sizes)))
        return True

    def per_channel(self, call: Call, value: Any) -> Any:
        """A function acting on each channel alone; ``f(0)`` decides what a removed
        channel holds after it."""
        source = next(a for a in call.inputs if is_tensorish(self.env[a]))
        real = self.env[source]
        line = along(self.codes[source], 1) if real.dim() >= 2 else None
        if line is None or not isinstance(value, torch.Tensor) or value.dim() < 2:
            return self.opaque(call, value, f"{call.op} {call.describe}")
        if value.shape[1] != real.shape[1]:
            return self.opaque(call, value, f"{call.op} {call.describe} changing the channels")

        def at(fill: float) -> torch.Tensor:
            probe = torch.full_like(real, fill)
            return call.rerun(lambda a: probe if a is source else self.env[a])

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
        units, off, on = decode(line)
        off = per_channel_state(off, at_zero, at_one)
        on = per_channel_state(on, at_zero, at_one)
        return spread(code(units, off, on), 1, shape)

    def elementwise(self, call: Call, value: torch.Tensor, a: Any, b: Any) -> Any:
        """``a + b``, ``a * b``, ...: ties the operands' units entry by entry."""
        sa, sb = self.env[a].shape, self.env[b].shape
        ca, cb = torch.broadcast_tensors(self.codes[a], self.codes[b])
        ca, cb = ca.expand(value.shape), cb.expand(value.shape)
        ua, off_a, on_a = decode(ca)
        ub, off_b, on_b = decode(cb)

        def modulates(short: torch.Size, other: torch.Tensor) -> bool:
            """Broadcast along a dim where the other operand's units vary."""
            pad = [1] * (len(value.shape) - len(short)) + list(short)
            return any(
                pad[d] == 1 < value.shape[d] and bool((other != other.narrow(d, 0, 1)).any())
                for d in range(len(pad))
            )

        mod_a, mod_b = modulates(sa, ub), modulates(sb, ua)
        reason = f"{call.describe} broadcast over channels {call.where}"
        if mod_a and mod_b:
            return self.opaque(call, value, reason)
        if mod_a or mod_b:
            self.units.fix(ua if mod_a else ub, reason)
        else:
            n = len(self.units.parent)  # each pair of units once, as one key
            for key in torch.unique(ua.flatten() * n + ub.flatten()).tolist():
                x, y = divmod(key, n)
                if x != y:
                    self.units.union(x, y)
                self.units.joined.update((x, y))
        units = ub if mod_a else ua

        def combine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            worst = torch.maximum(x, y)
            if call.target in MUL_LIKE:
                return torch.where((x == ZERO) | (y == ZERO), ZERO, worst)
            if call.target in DIV_LIKE:
                return torch.where(y == ZERO, LIVE, torch.where(x == ZERO, ZERO, worst))
            return worst

        return code(units, combine(off_a, off_b), combine(on_a, on_b))

    def visit_module(self, call: Call, module: nn.Module, value: Any) -> Any:
        holds_weights = next(module.parameters(recurse=True), None) is not None
        if holds_weights and call.calls > 1:
            return self.opaque(
                call, value, f"{type(module).__name__} called more than once in forward()"
            )
        if len([a for a in call.inputs if is_tensorish(self.env[a])]) != 1:
            return self.opaque(call, value, f"module {type(module).__name__} of several inputs")
        rules = self.rules
        if rules.is_opaque_module(module):
            return self.opaque(call, value, f"module {type(module).__name__} (registered opaque)")
        index = rules.selection_index(module)
        if index is not None:
            return self.gather(call, module, value, index)
        spec = rules.layer_spec(module)
        if spec is not None:
            return self.custom(call, module, spec, value)
        if isinstance(module, nn.Conv2d):
            return self.conv(call, module, value)
        if isinstance(module, nn.Linear):
            return self.linear(call, module, value)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self.batchnorm(call, module, value)
        if per_channel_module(module, rules):
            return self.per_channel(call, value)
        if isinstance(module, REARRANGE_MODULES):
            return self.rearrange(call, value)
        source = next(a for a in call.inputs if is_tensorish(self.env[a]))
        if isinstance(self.env[source], torch.Tensor) and probe_per_channel(
            module, self.env[source]
        ):
            return self.per_channel(call, value)
        return self.opaque(call, value, f"module {type(module).__name__}")

    def acts_per_channel(self, module: Any, like: torch.Tensor) -> bool:
        """Whether a submodule run inside a layer recorded whole acts on each channel alone:
        registered or known so, or found so by probing (:func:`probe_per_channel`)."""
        if not isinstance(module, nn.Module) or self.rules.is_opaque_module(module):
            return False
        return per_channel_module(module, self.rules) or probe_per_channel(module, like)

    def gather(self, call: Call, m: nn.Module, value: torch.Tensor, index: str) -> Any:
        """A channel selection: what it reads is kept, its outputs are new units."""
        name, (source,) = call.target, call.inputs
        if call.calls > 1:
            return self.opaque(call, value, f"channel selection {name} called more than once")
        read = torch.unique(decode(self.codes[source])[0])
        self.units.fix(read, f"read through the channel selection {name} (the paper's layout)")
        self.units.selected.update(read.tolist())
        count = len(getattr(m, index))
        self.units.gathers[name] = self.units.new_units(count, producer=name)
        return spread(code(self.units.gathers[name], LIVE, LIVE), 1, value.shape)

    def custom(self, call: Call, m: nn.Module, spec: LayerSpec, value: Any) -> Any:
        """A layer of your own that the rules say how to slice: a conv of its kind. A removed
        input channel must hold zero where it reads it (there is no bias to fold a constant
        into), and its slicing is checked once against its forward (:func:`slices_exactly`)."""
        name, (source,) = call.target, call.inputs
        real, kind = self.env[source], type(m).__name__
        n_in, n_out = spec.counts(m) or (-1, -1)
        if not (
            isinstance(real, torch.Tensor)
            and isinstance(value, torch.Tensor)
            and real.dim() >= 2
            and value.dim() >= 2
            and real.shape[spec.in_dim] == n_in
            and value.shape[spec.out_dim] == n_out
        ):
            return self.opaque(
                call,
                value,
                f"module {kind} (registered layer whose channels "
                "are not where in_dim and out_dim say)",
            )
        if not slices_exactly(m, spec, real):
            return self.opaque(
                call,
                value,
                f"module {kind} (registered layer whose sliced copy computes otherwise)",
            )
        codes = self.codes[source]
        line = along(codes, spec.in_dim)
        if line is None:
            self.units.fix(decode(codes)[0], f"{name} reads channels mixed with positions")
            inputs = decode(codes.movedim(spec.in_dim, -1).reshape(-1, n_in)[0])[0]
        else:
            inputs, off, on = decode(line)
            self.units.fix(
                inputs[off != ZERO],
                f"read by {name}{call.line} (a registered "
                "layer) where a removed channel is not zero",
            )
            self.units.uncompensable.update(inputs[on != ZERO].tolist())
        outputs = self.units.new_units(n_out, producer=name)
        self.units.layers[name] = Layer("custom", inputs, outputs, 0, out_dim=spec.out_dim)
        return spread(code(outputs, LIVE, LIVE), spec.out_dim, value.shape)

    def read(self, call: Call, codes: torch.Tensor, dim: int, padded: bool) -> torch.Tensor:
        """The units a layer reads along ``dim``, fixing those it may not lose."""
        line = along(codes, dim)
        if line is None:
            self.units.fix(decode(codes)[0], f"{call.target} reads channels mixed with positions")
            return decode(codes.movedim(dim, -1).reshape(-1, codes.shape[dim])[0])[0]
        units, off, on = decode(line)
        at = f"{call.target}{call.line}"
        self.units.fix(units[off == LIVE], f"read by {at} where no BatchNorm scales them")
        if padded:
            self.units.fix(
                units[off == CONST],
                f"a nonzero f(0) after a BatchNorm, read by {at} through zero padding",
            )
        self.units.uncompensable.update(units[on == LIVE].tolist())
        return units

    def conv(self, call: Call, m: nn.Conv2d, value: torch.Tensor) -> Any:
        name, (source,) = call.target, call.inputs
        codes = self.codes[source]
        same = self.rules.conv_padding(m)  # a conv subclass the rules trust, or None
        if type(m).forward is not nn.Conv2d.forward and same is None:
            return self.opaque(call, value, f"module {type(m).__name__} (its own forward)")
        padded = (
            any(p != 0 for p in m.padding) or m.padding == "same" or bool(same)
        ) and m.padding_mode == "zeros"
        padded = padded and math.prod(m.kernel_size) > 1
        pixels, kernel = value.shape[2] * value.shape[3], math.prod(m.kernel_size)
        if m.groups == 1:
            inputs = self.read(call, codes, 1, padded)
            outputs = self.units.new_units(m.out_channels, producer=name)
            self.units.layers[name] = Layer("conv", inputs, outputs, pixels, kernel)
            return spread(code(outputs, LIVE, LIVE), 1, value.shape)
        # grouped: each convolution group (its inputs and outputs) is one unit
        line = along(codes, 1)
        if line is None:
            self.units.fix(decode(codes)[0], f"{name} reads channels mixed with positions")
            line = codes[(0, slice(None)) + (0,) * (codes.dim() - 2)]
        units, off, on = decode(line)
        per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
        blocks = units.view(m.groups, per_in)
        for row in blocks.tolist():
            for u in row[1:]:
                self.units.union(row[0], u)
        head = blocks[:, 0]
        for u in head.tolist():
            self.units.producer.setdefault(self.units.find(u), name)
        bias = m.bias is not None

        def after(state: torch.Tensor) -> torch.Tensor:
            state = state.view(m.groups, per_in).amax(dim=1)
            state = torch.where((state == CONST) & padded, LIVE, state)
            return torch.where((state == ZERO) & bias, CONST, state)

        outputs = head.repeat_interleave(per_out)
        self.units.layers[name] = Layer("grouped", units, outputs, pixels, kernel, m.groups)
        out = code(
            outputs, after(off).repeat_interleave(per_out), after(on).repeat_interleave(per_out)
        )
        return spread(out, 1, value.shape)

    def linear(self, call: Call, m: nn.Linear, value: torch.Tensor) -> Any:
        name, (source,) = call.target, call.inputs
        if type(m).forward is not nn.Linear.forward and not self.rules.is_plain_linear(m):
            return self.opaque(call, value, f"module {type(m).__name__} (its own forward)")
        inputs = self.read(call, self.codes[source], -1, padded=False)
        outputs = self.units.new_units(m.out_features, producer=name)
        pixels = value.numel() // (value.shape[0] * m.out_features) if value.dim() > 2 else 1
        self.units.layers[name] = Layer("linear", inputs, outputs, pixels, out_dim=-1)
        return spread(code(outputs, LIVE, LIVE), -1, value.shape)

    def batchnorm(self, call: Call, m: nn.Module, value: torch.Tensor) -> Any:
        name, (source,) = call.target, call.inputs
        plain = type(m).forward is nn.modules.batchnorm._BatchNorm.forward or type(
            m
        ).__module__.startswith("torch.")
        extra = None
        if not plain:  # as timm's BatchNormAct2d: the BatchNorm, then submodules of its own
            names = self.rules.norm_extras(m) or NORM_EXTRAS
            then = [getattr(m, n, None) for n in names]
            if not (
                all(self.acts_per_channel(x, value) for x in then)
                and norm_then(m, then, self.env[source])
            ):
                return self.opaque(call, value, f"module {type(m).__name__} (its own forward)")
            extra = nn.Sequential(*then)
        line = along(self.codes[source], 1)
        if line is None or value.dim() < 2:
            return self.opaque(call, value, f"BatchNorm {name} on features mixed with positions")
        units, off, on = decode(line)
        self.units.norms[name] = units
        if m.affine:
            for u in set(units.tolist()):
                self.units.members.setdefault(u, []).append(name)
            off, on = torch.full_like(off, ZERO), torch.full_like(on, CONST)
        else:  # (x - mean) / std: a removed channel holds a constant
            off = torch.where(off == ZERO, CONST, off)
            on = torch.where(on == ZERO, CONST, on)
        self.norm_inputs[name] = source  # its layer's norm, if nothing else reads it (finish())
        line = code(units, off, on)
        if extra is None:
            return spread(line, 1, value.shape)
        return self.after_function(
            line, lambda fill: extra(torch.full_like(value, fill)), value.shape
        )


def slices_exactly(m: nn.Module, spec: LayerSpec, real: torch.Tensor) -> bool:
    """Whether a copy of layer ``m`` sliced as ``spec`` says, one input and one output channel
    removed, computes on a random input shaped like ``real`` without that input channel what
    ``m`` computes with it zeroed, on the outputs kept: a check that the registration
    matches the layer's forward."""
    n_in, n_out = spec.counts(m)  # (custom() checked that they fit)
    g = torch.Generator().manual_seed(0)
    drop_in, drop_out = n_in // 2 if n_in > 1 else None, n_out // 2 if n_out > 1 else None
    kept_in = torch.tensor([i for i in range(n_in) if i != drop_in], dtype=torch.long)
    kept_out = torch.tensor([o for o in range(n_out) if o != drop_out], dtype=torch.long)
    x = torch.randn(real.shape, generator=g).to(real.device, real.dtype)
    if drop_in is not None:
        x.index_fill_(spec.in_dim, torch.tensor([drop_in], device=x.device), 0.0)
    try:
        sliced = copy.deepcopy(m)
        spec.resize(sliced, len(kept_in), len(kept_out))
        spec.copy(m, sliced, kept_in, kept_out)
        with torch.no_grad():
            whole = m(x).index_select(spec.out_dim, kept_out.to(real.device))
            part = sliced(x.index_select(spec.in_dim, kept_in.to(real.device)))
    except Exception:  # the registration does not fit the layer
        return False
    return _close(part, whole)


def norm_then(m: nn.Module, then: list[nn.Module], like: torch.Tensor) -> bool:
    """Whether BatchNorm subclass ``m``'s own forward computes its BatchNorm followed by the
    modules ``then`` (as it runs now, in eval mode), on a random input shaped like ``like``."""
    x = torch.randn(like.shape, generator=torch.Generator().manual_seed(0))
    x = x.to(like.device, like.dtype)
    batch = m.training or m.running_mean is None
    try:
        with torch.no_grad():
            expected = F.batch_norm(
                x.clone(), m.running_mean, m.running_var, m.weight, m.bias, batch, 0.0, m.eps
            )
            for module in then:
                expected = module(expected)
            got = m(x.clone())
    except Exception:
        return False
    return _close(got, expected)
