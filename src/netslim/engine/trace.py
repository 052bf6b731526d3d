"""Tracing a network by running it: every op of the forward pass as it actually runs.

:func:`trace_channels` is the engine's entry point. It runs ``forward`` once on a real
example input and records every op it performs -- torch functions, tensor methods and
operators through a :class:`~torch.overrides.TorchFunctionMode`, layers through global
module hooks -- handing each to :class:`netslim.engine.ops.Replay`, which sorts the
channels into units and groups (:class:`netslim.engine.graph.ChannelGraph`). Because the
network really runs, any Python works: loops over lists of feature maps, branches on
shapes, ``*args``, generators, tuple, list and dict outputs, nested.

Layers are recorded whole, not looked into: every conv, linear and BatchNorm (subclasses
too), the modules the rules name (:class:`~netslim.engine.rules.Rules`: channel selections,
your own layers, registered activations), and the modules of ``torch.nn`` itself (an
activation, a pooling layer), as torch.fx would keep them.

What the trace cannot see is what the example input did not make the network do. A
forward pass that reads tensor *values* as Python numbers (``if x.sum() > 0``, ``.item()``,
a boolean mask) may take another path on other inputs: the channels whose values it read
are kept, and the graph lists where it read them (``value_reads``), so the prune report can
say that the pruned network is exact on the path traced.

Two more things the example input hides, which the tracer follows while it runs:

* **Channel counts read as sizes.** ``B, C, H, W = x.shape`` reads how many channels ``x``
  has; once ``x`` is pruned, ``C`` is smaller. The tracer hands such sizes out marked
  (:class:`_Extent`, an ``int``), follows them through integer arithmetic, and where one
  sizes an op (``y.view(B, C, H, W)``), checks that the op's result has a dim of exactly
  those channels; otherwise (``y``'s channels are not ``x``'s, as in YOLO26's attention)
  the channels counted are kept.
* **Numbers read from tensor values.** After the pass has read values of the input as
  numbers (``.item()``, ``.numpy()``, ``np.asarray``, ``float()``, ``.tolist()``), any op
  that computes values from a tensor and a Python or NumPy number may be using one of them:
  a removed channel's constant there would change with the input, so its channels are kept.
"""

from __future__ import annotations

import operator
import os
import sys
import traceback
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from netslim.engine.graph import ChannelGraph, along, decode, layer_macs, tensors
from netslim.engine.guard import check_nesting, check_not_compiled, recursion_error
from netslim.engine.ops import (
    ADD_LIKE,
    CREATES,
    DIV_LIKE,
    LAYER_TYPES,
    MUL_LIKE,
    REARRANGE,
    SAME_VALUES,
    SIZE_READS,
    Call,
    Replay,
    hashable,
)
from netslim.engine.rules import Rules, default_rules
from netslim.errors import NetslimError

_TORCH_DIR = str(Path(torch.__file__).parent) + os.sep  # a folder: not torchvision's
_ENGINE_DIR = str(Path(__file__).parent) + os.sep

# Tensor operators as the functions the rules know (``x + y`` -> operator.add); the
# reflected ones (``2 * x``) swap their operands back.
_OPERATORS = {
    "__add__": operator.add, "__iadd__": operator.iadd, "__radd__": operator.add,
    "__sub__": operator.sub, "__isub__": operator.isub, "__rsub__": operator.sub,
    "__mul__": operator.mul, "__imul__": operator.imul, "__rmul__": operator.mul,
    "__truediv__": operator.truediv, "__itruediv__": operator.itruediv,
    "__rtruediv__": operator.truediv, "__neg__": operator.neg, "__getitem__": operator.getitem,
}  # fmt: skip
_REFLECTED = {"__radd__", "__rsub__", "__rmul__", "__rtruediv__"}
# Reading a tensor's values as Python numbers: the path may depend on them.
_VALUE_READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy",
                "__iter__", "__array__", "__format__", "__repr__"}  # fmt: skip
# Value reads that hand the values out as numbers (``__bool__`` only picks a branch).
_NUMBER_READS = {"item", "tolist", "numpy", "__array__", "__float__", "__int__", "__index__"}
# Size reads whose result may count channels: marked as _Extent.
_SIZE_METHODS = {"shape", "size", "__len__"}
# Ops that may take a size as an argument and give a result of that size.
_SIZED = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand,
          torch.randn, "new_tensor"}  # fmt: skip
# Arithmetic, where an int argument is a number, not a dim.
_ARITHMETIC = ADD_LIKE | MUL_LIKE | DIV_LIKE | {"pow", torch.pow, "__pow__", "__rpow__"}
# Ops that only move, copy or measure values: a number among their arguments is no operand.
_NOT_COMPUTING = REARRANGE | SAME_VALUES | SIZE_READS | CREATES | _SIZED
# Ops whose result's shape depends on the values (a mask, the boxes NMS keeps).
_VALUE_SHAPED = {"nonzero", "masked_select", "unique", "argwhere", "nonzero_static",
                 torch.nonzero, torch.masked_select, torch.unique, torch.argwhere}  # fmt: skip


def _source_of(error: BaseException) -> str:
    """The innermost frame of the traceback outside torch and this engine: where the
    network's code failed."""
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if _TORCH_DIR not in f.filename and _ENGINE_DIR not in f.filename
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {Path(f.filename).name}:{f.lineno}, in {f.name}: {f.line})"


def is_layer(module: nn.Module, rules: Rules | None = None) -> bool:
    """Whether the engine records ``module`` as one op instead of looking into it."""
    if isinstance(module, LAYER_TYPES) or (rules or default_rules()).records_whole(module):
        return True
    home = type(module).__module__
    return home.startswith(("torch.nn.", "torch.ao.nn.")) and not isinstance(module, nn.Sequential)


class _Key:
    """Names one value of the forward pass for the replay (compared by identity)."""

    __slots__ = ()


# The tracer running now: marked sizes ask it to remember what they count.
_ACTIVE: list[_Tracer] = []


class _Extent(int):
    """A size the traced forward pass read from a tensor (``x.shape[1]``) that counts
    channels, or an integer computed from such sizes: an ``int`` in every way, which the
    running tracer recognises when an op takes it. Copies and pickles are plain ints."""

    __slots__ = ()

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return int, (int(self),)

    def __repr__(self) -> str:
        return int.__repr__(self)


def _derived(name: str) -> Callable:
    method = getattr(int, name)

    def derive(self: _Extent, *other: Any) -> Any:
        result = method(self, *other)
        if not _ACTIVE or type(result) is not int:  # noqa: E721 - a bool is no size
            return result
        return _ACTIVE[-1].extent(result, [self, *other], exact=False)

    derive.__name__ = name
    return derive


for _name in (
    "__add__",
    "__radd__",
    "__sub__",
    "__rsub__",
    "__mul__",
    "__rmul__",
    "__floordiv__",
    "__rfloordiv__",
    "__mod__",
    "__rmod__",
    "__neg__",
    "__abs__",
    "__pos__",
):
    setattr(_Extent, _name, _derived(_name))


def _user_line() -> tuple[str, int] | None:
    """The innermost frame of the running code outside torch and this engine."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if _TORCH_DIR not in name and _ENGINE_DIR not in name:
            return Path(name).name, frame.f_lineno
        frame = frame.f_back
    return None


def _classify(func: Callable) -> tuple[str, Any, bool]:
    """``(op, target, reflected)`` of a function the mode saw, as the rules name ops: a
    tensor method by its name, an operator as its ``operator`` function, a property read
    (``x.shape``) by the property's name, anything else as the function itself."""
    name = getattr(func, "__name__", "")
    owner = getattr(func, "__qualname__", "").split(".")[0]
    if name == "__get__":  # a property of the tensor, e.g. x.shape or x.T
        return "call_method", getattr(getattr(func, "__self__", None), "__name__", name), False
    if owner in ("Tensor", "TensorBase", "_TensorBase"):
        if name in _OPERATORS:
            return "call_function", _OPERATORS[name], name in _REFLECTED
        return "call_method", name, False
    return "call_function", func, False


class _Tracer(TorchFunctionMode):
    """Records the forward pass: ops through the torch-function mode, layers through the
    global module hooks; hands each to the replay."""

    def __init__(self, model: nn.Module, replay: Replay, calls: Counter):
        super().__init__()
        self.replay, self.calls = replay, calls
        self.rules = replay.rules
        self.names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.held = {
            id(t): n
            for n, t in [
                *model.named_parameters(remove_duplicate=False),
                *model.named_buffers(remove_duplicate=False),
            ]
        }
        self.keys: dict[int, _Key] = {}  # id of a tensor of the pass -> its key
        self.depends: set[_Key] = set()  # values computed from the input
        self.value_reads: list[str] = []  # where the pass read the input's values as numbers
        self.inside: nn.Module | None = None  # the layer running now (its ops are its own)
        self.paused = False  # the replay itself runs ops: not part of the pass
        self.stack: list[str] = []  # names of the modules running, outermost first
        # id of a marked size -> (it, the units it counts, whether it is a dim's length, where read)
        self.extents: dict[int, tuple[_Extent, torch.Tensor, bool, str]] = {}
        # (units counted, units of the result dims the op sized, why to keep them otherwise)
        self.sized: list[tuple[torch.Tensor, list[torch.Tensor], str]] = []
        self.number_read: str | None = None  # the first read of the input's values as numbers

    # -- values and keys -------------------------------------------------------------------
    def key_of(self, value: torch.Tensor) -> _Key:
        """The key of a tensor the ops read; a tensor the pass did not make (a parameter
        read outside its module, a constant) gets one as the fx tracer's get_attr."""
        key = self.keys.get(id(value))
        if key is None or self.replay.env.get(key) is not value:
            name = self.held.get(id(value))
            op, what = ("get_attr", name) if name else ("constant", "a tensor made outside the ops")
            line = _user_line()
            key = self.register(
                value,
                Call(op, what, (), {}, [], rerun=lambda r: value, locate=lambda: self.where(line)),
            )
        return key

    def keyed(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.key_of(obj)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.keyed(o) for o in obj) if not _namedtuple(obj) else obj
        if isinstance(obj, dict):
            return {k: self.keyed(v) for k, v in obj.items()}
        return obj

    def real(self, obj: Any, replace: Callable[[_Key], Any]) -> Any:
        if isinstance(obj, _Key):
            return replace(obj)
        if isinstance(obj, (list, tuple)) and not _namedtuple(obj):
            return type(obj)(self.real(o, replace) for o in obj)
        if isinstance(obj, dict):
            return {k: self.real(v, replace) for k, v in obj.items()}
        return obj

    def register(self, value: Any, call: Call) -> _Key:
        """Replay ``call`` (whose result is ``value``) under a new key; a tuple or list of
        tensors also gives each of its tensors a key of its own, with its part of the codes."""
        key = _Key()
        self.paused = True
        try:
            self.replay.step(key, call, value)
        finally:
            self.paused = False
        if call.op == "placeholder" or any(k in self.depends for k in call.inputs):
            self.depends.add(key)
        self._name(value, self.replay.codes.get(key), key in self.depends, key)
        return key

    def _name(self, value: Any, codes: Any, depends: bool, key: _Key) -> None:
        if isinstance(value, torch.Tensor):
            self.keys[id(value)] = key
        elif isinstance(value, (list, tuple)):
            parts = codes if isinstance(codes, (list, tuple)) else [None] * len(value)
            for part, part_codes in zip(value, parts):
                if isinstance(part, torch.Tensor) and part_codes is not None:
                    sub = _Key()
                    self.replay.env[sub], self.replay.codes[sub] = part, part_codes
                    self.keys[id(part)] = sub
                    if depends:
                        self.depends.add(sub)

    def where(self, line: tuple[str, int] | None) -> tuple[str, str]:
        at = f" ({line[0]}:{line[1]})" if line else ""
        path = self.stack[-1] if self.stack else ""
        return f"in {path or self.replay.units.model_name}{at}", at

    # -- recording ---------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        value = func(*args, **kwargs)
        if self.paused or self.inside is not None:
            return value
        op, target, reflected = _classify(func)
        ordered = (args[1], args[0], *args[2:]) if reflected and len(args) >= 2 else args
        keyed_args, keyed_kwargs = self.keyed(tuple(ordered)), self.keyed(kwargs)
        inputs = list(dict.fromkeys(k for k in _flat(keyed_args, keyed_kwargs)))
        if any(k in self.depends for k in inputs) and _reads_values(func, op, target, args):
            read = f"{getattr(func, '__name__', target)} {self.where(_user_line())[0]}"
            self.value_reads.append(read)
            if op == "call_method" and target in _NUMBER_READS and self.number_read is None:
                self.number_read = read
        line = _user_line()

        def rerun(replace: Callable[[_Key], Any], a=keyed_args, k=keyed_kwargs) -> Any:
            real_args = self.real(a, replace)
            if reflected and len(real_args) >= 2:
                real_args = (real_args[1], real_args[0], *real_args[2:])
            return func(*real_args, **self.real(k, replace))

        call = Call(
            op,
            target,
            keyed_args,
            keyed_kwargs,
            inputs,
            rerun,
            describe=target
            if isinstance(target, str)
            else getattr(target, "__name__", str(target)),
            locate=lambda: self.where(line),
        )
        key = self.register(value, call)
        numbers = _numbers(args, kwargs)
        marked = [n for n in numbers if isinstance(n, _Extent) and self.marked(n)]
        if marked:
            self.sizing(key, call, marked)
        if self.number_read and _uses_read_numbers(target, numbers):
            self.replay.units.fix_all(
                self.replay.codes.get(key),
                f"{call.describe} {call.where} computes with a number that may come from "
                f"tensor values ({self.number_read}): on other inputs it is another number",
            )
        if op == "call_method" and target in _SIZE_METHODS and inputs:
            return self.measured(value, inputs[0], target, args[1:], kwargs)
        return value

    # -- sizes that count channels -----------------------------------------------------------
    def extent(self, value: int, sources: list[Any], exact: bool) -> int:
        """``value`` marked as counting the channels that the marked ``sources`` count (a
        plain int where none is marked)."""
        found = [self.extents[id(x)] for x in sources if isinstance(x, _Extent) and self.marked(x)]
        if not found:
            return value
        marked = _Extent(value)
        self.extents[id(marked)] = (marked, torch.cat([f[1] for f in found]), exact, found[0][3])
        return marked

    def marked(self, size: _Extent) -> bool:
        entry = self.extents.get(id(size))
        return entry is not None and entry[0] is size

    def measured(self, value: Any, source: _Key, target: str, args: tuple, kwargs: dict) -> Any:
        """A size read (``x.shape``, ``x.size(d)``, ``len(x)``) with every length that counts
        channels marked: a dim along which the units of ``x`` differ."""
        codes = self.replay.codes.get(source)
        if not isinstance(codes, torch.Tensor) or codes.numel() == 0:  # empty: counts nothing
            return value
        where = f"{target.strip('_')} {self.where(_user_line())[0]}"

        def mark(dim: int, length: Any) -> Any:
            line = along(codes, dim) if type(length) is int else None  # noqa: E721
            if line is None:
                return length
            units = decode(line)[0]
            if len(torch.unique(units)) < 2:
                return length
            marked = _Extent(length)
            self.extents[id(marked)] = (marked, units, True, where)
            return marked

        if isinstance(value, torch.Size):
            return torch.Size([mark(d, n) for d, n in enumerate(value)])
        if isinstance(value, int):
            dim = kwargs.get("dim", args[0] if args else 0)
            return mark(dim % codes.dim(), value) if isinstance(dim, int) else value
        return value

    def sizing(self, key: _Key, call: Call, marked: list[_Extent]) -> None:
        """An op takes sizes that count channels: it stays right only where each sizes a dim
        of its result holding exactly the channels counted (``x.view(B, C, -1)`` of ``x``
        itself); which units those are is settled at the end (:meth:`settle`)."""
        codes = self.replay.codes.get(key)
        target = call.target
        shaping = hashable(target) and (
            target in REARRANGE or target in CREATES or target in _SIZED
        )
        for size in marked:
            _, units, exact, read = self.extents[id(size)]
            dims = []
            if exact and shaping:
                for t in tensors(codes):
                    for d in range(t.dim() if t.numel() else 0):
                        line = along(t, d) if t.shape[d] == int(size) else None
                        if line is not None:
                            dims.append(decode(line)[0])
            reason = (
                f"{call.describe} {call.where} is sized by a channel count ({read}) "
                "that pruning would change"
            )
            self.sized.append((units, dims, reason))

    def settle(self) -> None:
        """Keep the channels whose count sizes an op other than as the length of the same
        channels (now that every tie between units is known)."""
        find = self.replay.units.find
        for units, dims, reason in self.sized:
            roots = [find(u) for u in units.tolist()]
            same = any(
                len(d) == len(roots) and [find(u) for u in d.tolist()] == roots for d in dims
            )
            if not same:
                self.replay.units.fix(units, reason)

    def before(self, module: nn.Module, args: tuple) -> None:
        if self.paused or self.inside is not None:
            return
        name = self.names.get(id(module), "")
        self.stack.append(name)
        if is_layer(module, self.rules):
            self.inside = module

    def after(self, module: nn.Module, args: tuple, kwargs: dict, value: Any) -> None:
        if self.paused or (self.inside is not None and self.inside is not module):
            return
        name = self.stack.pop() if self.stack else ""
        if self.inside is not module:
            return  # a container: its ops were recorded one by one
        self.inside = None
        keyed_args, keyed_kwargs = self.keyed(tuple(args)), self.keyed(dict(kwargs))
        line = _user_line()
        call = Call(
            "call_module",
            name,
            keyed_args,
            keyed_kwargs,
            list(dict.fromkeys(_flat(keyed_args, keyed_kwargs))),
            rerun=lambda replace, a=keyed_args, k=keyed_kwargs: module(
                *self.real(a, replace), **self.real(k, replace)
            ),
            module=module,
            calls=self.calls[id(module)],
            describe=type(module).__name__,
            locate=lambda: (f"in {name}{self.where(line)[1]}", self.where(line)[1]),
        )
        self.register(value, call)


def _reads_values(func: Callable, op: str, target: Any, args: tuple) -> bool:
    """Whether the path after this op may depend on tensor values: a value read as a
    Python number, an op whose result's shape depends on values (a mask, NMS: custom
    ``torch.ops`` included), indexing with a tensor."""
    if (
        (op == "call_method" and target in _VALUE_READS)
        or hashable(target)
        and target in _VALUE_SHAPED
    ):
        return True
    if isinstance(func, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return True
    return target is operator.getitem and any(
        isinstance(a, torch.Tensor) for a in tensors(args[1:])
    )


def _numbers(*objs: Any) -> list[Any]:
    """The numbers among an op's arguments (inside tuples, lists, dicts and slices): Python
    numbers, NumPy scalars and arrays; not tensors, not bools."""
    found: list[Any] = []
    for obj in objs:
        if isinstance(obj, (list, tuple)):
            found += _numbers(*obj)
        elif isinstance(obj, dict):
            found += _numbers(*obj.values())
        elif isinstance(obj, slice):
            found += _numbers(obj.start, obj.stop, obj.step)
        elif isinstance(obj, (int, float, complex, np.generic, np.ndarray)) and not isinstance(
            obj, (bool, np.bool_)
        ):
            found.append(obj)
    return found


def _uses_read_numbers(target: Any, numbers: list[Any]) -> bool:
    """Whether an op computes values with a number that may have been read from tensor
    values: a float or NumPy value (an int only as an operand of arithmetic, where it is not
    a dim or a size) passed to an op that is no move, copy or size read."""
    if not hashable(target) or target in _NOT_COMPUTING or target in _VALUE_READS:
        return False
    arithmetic = target in _ARITHMETIC
    return any(
        not isinstance(n, int) or (arithmetic and not isinstance(n, _Extent)) for n in numbers
    )


def _namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _flat(*objs: Any) -> list[_Key]:
    found: list[_Key] = []
    for obj in objs:
        if isinstance(obj, _Key):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            found += _flat(*obj)
        elif isinstance(obj, dict):
            found += _flat(*obj.values())
    return found


def _run_counting(
    model: nn.Module, inputs: tuple, macs: Counter | None = None, rules: Rules | None = None
) -> Counter:
    """Run ``model`` on ``inputs`` and count the calls of each layer (by id); with ``macs``,
    also add up there the MACs of every conv and linear layer (by id), as count_macs does."""
    calls: Counter = Counter()
    depth = []
    rules = rules or default_rules()

    def before(module, args):
        if not depth and is_layer(module, rules):
            calls[id(module)] += 1
            depth.append(module)
        elif depth:
            depth.append(module)

    def after(module, args, value):
        if depth:
            depth.pop()
        if macs is not None:
            macs[id(module)] += layer_macs(module, value)

    with ExitStack() as stack:
        stack.enter_context(_global_hooks(before, after))
        model(*inputs)
    return calls


class _global_hooks:
    """Module hooks on every module, for the duration of a ``with`` (``after`` gets the
    call's keyword arguments too with ``with_kwargs``)."""

    def __init__(self, before: Callable, after: Callable, with_kwargs: bool = False):
        self.before, self.after, self.with_kwargs = before, after, with_kwargs

    def __enter__(self):
        hooks = torch.nn.modules.module
        self.handles = [
            hooks.register_module_forward_pre_hook(self.before),
            hooks.register_module_forward_hook(self.after, with_kwargs=self.with_kwargs),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def _modes(model: nn.Module, training: bool, rules: Rules | None = None) -> dict[nn.Module, bool]:
    """Set ``model`` up for a trace and return every module's mode to restore: with
    ``training``, the containers in training mode (their Python takes the training path,
    an auxiliary head included) and the layers in eval mode (BatchNorm's running statistics,
    no dropout); else everything in eval mode."""
    before = {m: m.training for m in model.modules()}
    model.train(training)
    for m in model.modules():
        if is_layer(m, rules):
            m.eval()
    return before


def trace_channels(
    model: nn.Module,
    input_size: tuple[int, ...] = (1, 3, 32, 32),
    *,
    inputs: tuple | None = None,
    rules: Rules | None = None,
) -> ChannelGraph:
    """Trace ``model`` by running it and sort its channels into units and groups.

    The forward pass runs twice more: once in eval mode, to learn which layers inference
    uses (those the MACs count), and once to count each layer's calls. The traced pass runs
    with the containers in training mode and every layer in eval mode, so that a layer only
    training uses (an auxiliary head reading pruned channels) is seen; a network that cannot
    run so (a torchvision detector wants targets in training) is traced in eval mode.

    Args:
        model: the network; it is not modified (its modes are restored).
        input_size: the shape of one input batch, ``(N, C, H, W)`` (or ``(C, H, W)``); the
            example input is zeros of it.
        inputs: the arguments to call ``model`` with instead, e.g. ``([image],)``; by default
            ``rules.model_inputs`` of the zeros (a list of images for a torchvision detector).
        rules: what the engine knows beyond ``torch.nn`` (:class:`~netslim.engine.rules.Rules`;
            None: :func:`~netslim.engine.rules.default_rules`); the graph keeps them.

    Raises:
        NetslimError: when the forward pass does not run on that input.
    """
    check_nesting(model)  # before anything walks the modules recursively
    check_not_compiled(model)
    input_size = tuple(input_size)
    if len(input_size) == 3:
        input_size = (1, *input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    rules = rules or default_rules()
    if inputs is None:
        inputs = rules.model_inputs(model, torch.zeros(input_size, device=device, dtype=dtype))
    rng = [device] if device.type == "cuda" else []
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad(), torch.random.fork_rng(rng):
            _modes(model, False, rules)
            names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
            macs: Counter = Counter()
            inference = {names[i] for i in _run_counting(model, inputs, macs, rules)}
            graph = None
            for training in (True, False):
                _modes(model, training, rules)
                try:
                    calls = _run_counting(model, inputs, rules=rules)
                except Exception:
                    if training:
                        continue  # this network runs in eval mode only: follow that
                    raise
                replay = Replay(type(model).__name__, rules)
                replay.units.inference = inference
                tracer = _Tracer(model, replay, calls)
                for x in tensors(inputs):
                    tracer.register(x, Call("placeholder", "input", (), {}, [], rerun=None))
                _ACTIVE.append(tracer)
                try:
                    with _global_hooks(tracer.before, tracer.after, with_kwargs=True), tracer:
                        output = model(*inputs)
                finally:
                    _ACTIVE.remove(tracer)
                keys = [tracer.key_of(t) for t in tensors(output)]
                tracer.register(None, Call("output", "output", tuple(keys), {}, keys, rerun=None))
                tracer.settle()
                graph = replay.finish(input_size)
                graph.rules = rules
                graph.value_reads = list(dict.fromkeys(tracer.value_reads))
                # the layers inference runs that the traced pass did not record as layers
                # (YOLO's DFL conv, which only inference calls; a conv called twice)
                graph.untraced_macs = sum(
                    n for i, n in macs.items() if names[i] not in graph.layers
                ) // max(input_size[0], 1)
                break
    except NetslimError:
        raise
    except RecursionError:
        raise recursion_error(model) from None
    except Exception as e:
        detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise NetslimError(
            f"{type(model).__name__} does not run on an input of shape {input_size}"
            f"{_source_of(e)}: {detail}"
        ) from None
    finally:
        for m, training in modes.items():
            m.training = training
    return graph
