"""The rules the engine follows beyond ``torch.nn``: a :class:`Rules` object, scoped to a call.

The engine's core knows ``torch.nn`` and ``torch`` (:mod:`netslim.engine.ops`). What it
needs to know of other libraries, and of your own layers, is a :class:`Rules` object passed
to :func:`~netslim.engine.trace.trace_channels`, :func:`~netslim.engine.plan.plan_pruning`
and the rest (``rules=None``: :func:`default_rules`). The traced graph keeps the rules it
was traced with, so surgery and the check after it follow the same ones::

    from netslim import engine

    rules = engine.default_rules().copy()       # the defaults, adapters included
    rules.register_per_channel(MySwish)         # acts on each channel alone
    rules.register_opaque(MyMixer)              # keep every channel it touches
    rules.register_layer(MyConv, params={"weight": ("out", "in"), "bias": ("out",)})
    plan = engine.plan_pruning(model, 0.5, rules=rules)
    pruned = engine.apply_plan(model, plan)     # follows plan.graph.rules

**Adapters** add what other libraries need (timm's ``Conv2dSame``, a torchvision detector's
list of images, ...). Each is a function ``register(rules)``; the default rules run every
one the first time they are built, not at ``import netslim.engine``: netslim's own (the
package :data:`BUILTIN_ADAPTERS`, imported by name then) and those other packages declare
under the entry point group :data:`ADAPTER_GROUP`. Adapters name a library's classes as
strings (``"timm.layers.conv2d_same:Conv2dSame"``), resolved only once that module has been
imported by someone else: no adapter imports its library, and a network holding one of its
modules has imported it.
"""

from __future__ import annotations

import importlib
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

#: A class, or ``"package.module:Name"`` naming one without importing it.
ClassRef = Union[type, str]
#: ``(model, images) -> the arguments to call model with``, or None to leave it to others.
InputAdapter = Callable[[nn.Module, torch.Tensor], Union[tuple, None]]
#: The entry point group under which packages declare adapters: ``register(rules)`` each.
ADAPTER_GROUP = "netslim.adapters"
#: netslim's own adapters: a package whose ``register(rules)`` runs each of them.
BUILTIN_ADAPTERS = "netslim.adapters"

AXES = ("in", "out")


@dataclass
class LayerSpec:
    """How to slice a prunable layer of your own (:meth:`Rules.register_layer`).

    Attributes:
        params: parameter (or buffer) name -> what each leading axis of it holds: ``"out"``
            (one entry per output channel), ``"in"`` (one per input channel) or None (kept
            whole); axes not named are kept whole. E.g. ``{"weight": ("out", "in"),
            "bias": ("out",)}`` for a conv's layout.
        in_dim: the dim of the layer's input holding its input channels (1 for NCHW).
        out_dim: the dim of its output holding its output channels.
        attrs: attributes to set to the new counts, attribute -> ``"in"`` or ``"out"``
            (e.g. ``{"in_channels": "in", "out_channels": "out"}``).
    """

    params: dict[str, tuple[str | None, ...]]
    in_dim: int = 1
    out_dim: int = 1
    attrs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        axes = [a for spec in self.params.values() for a in spec]
        if not self.params or any(a not in (*AXES, None) for a in axes):
            raise ValueError('params: each axis is "in", "out" or None')
        if "out" not in axes or "in" not in axes:
            raise ValueError('params must name at least one "in" and one "out" axis')
        if any(v not in AXES for v in self.attrs.values()):
            raise ValueError('attrs: each attribute is set to "in" or "out"')

    def counts(self, m: nn.Module) -> tuple[int, int] | None:
        """``(inputs, outputs)`` of ``m``, read from its tensors' shapes; None where they do
        not fit the spec (a tensor missing, or of fewer dims)."""
        found: dict[str, int] = {}
        for name, axes in self.params.items():
            t = _tensor(m, name)
            if t is not None and t.dim() < len(axes):
                return None
            for axis, what in enumerate(axes):
                if what is not None and t is not None:
                    found.setdefault(what, t.shape[axis])
        if "in" not in found or "out" not in found:
            return None
        return found["in"], found["out"]

    def resize(self, m: nn.Module, n_in: int, n_out: int) -> None:
        """Give ``m`` fresh, uninitialised tensors for ``n_in`` inputs and ``n_out`` outputs."""
        sizes = {"in": n_in, "out": n_out}
        for name, axes in self.params.items():
            t = _tensor(m, name)
            if t is None:
                continue
            shape = list(t.shape)
            for axis, what in enumerate(axes):
                if what is not None:
                    shape[axis] = sizes[what]
            _set(m, name, t.new_empty(shape))
        for attr, what in self.attrs.items():
            setattr(m, attr, sizes[what])

    @torch.no_grad()
    def copy(self, old: nn.Module, new: nn.Module, kept_in: torch.Tensor, kept_out: torch.Tensor):
        """Copy the kept inputs' and outputs' entries of ``old``'s tensors into ``new``'s."""
        kept = {"in": kept_in, "out": kept_out}
        for name, axes in self.params.items():
            t = _tensor(old, name)
            if t is None:
                continue
            for axis, what in enumerate(axes):
                if what is not None:
                    t = t.index_select(axis, kept[what].to(t.device))
            _tensor(new, name).copy_(t)


def _tensor(m: nn.Module, name: str) -> torch.Tensor | None:
    t = getattr(m, name, None)
    return t if isinstance(t, torch.Tensor) else None


def _set(m: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in m._parameters:
        requires = m._parameters[name].requires_grad
        m._parameters[name] = nn.Parameter(value, requires_grad=requires)
    else:
        m._buffers[name] = value


def resolve(ref: Any) -> Any:
    """The object ``ref`` names (``"package.module:Name"``), or None while that module is not
    imported (no instance of it can exist yet); anything else is returned as it is."""
    if not isinstance(ref, str) or ":" not in ref:
        return ref
    path, _, name = ref.partition(":")
    obj = sys.modules.get(path)
    for part in name.split("."):
        obj = getattr(obj, part, None)
    return obj


class Rules:
    """What the engine knows beyond ``torch.nn``: classes and functions it may trust, layers
    it can prune, and what other libraries need. Scoped: pass it to the calls that should
    follow it (``rules=``); :func:`default_rules` is used where none is given.

    Classes are named by the class itself or by a string ``"package.module:Name"``
    (resolved lazily, :func:`resolve`); a rule for a class holds for its subclasses too.
    """

    def __init__(self) -> None:
        self.per_channel: set[Any] = set()  # module classes, functions, tensor method names
        self.opaque: set[Any] = set()
        self.convs: dict[ClassRef, bool] = {}  # conv subclass -> pads like padding="same"
        self.linears: set[ClassRef] = set()
        self.norms: dict[ClassRef, tuple[str, ...]] = {}  # BatchNorm subclass -> its extras
        self.selections: dict[ClassRef, str] = {}  # channel selection -> its index buffer
        self.layers: dict[ClassRef, LayerSpec] = {}
        self.input_adapters: list[InputAdapter] = []
        self.after_resize_hooks: list[Callable[[nn.Module], Any]] = []
        self._cache: tuple[int, dict[str, tuple]] | None = None

    # -- building -----------------------------------------------------------------------
    def copy(self) -> Rules:
        """An independent copy: what is registered on it leaves this one alone."""
        return Rules().extend(self)

    def extend(self, other: Rules) -> Rules:
        """Add ``other``'s rules to these (in place); returns ``self``."""
        self.per_channel |= other.per_channel
        self.opaque |= other.opaque
        self.convs.update(other.convs)
        self.linears |= other.linears
        self.norms.update(other.norms)
        self.selections.update(other.selections)
        self.layers.update(other.layers)
        self.input_adapters += [f for f in other.input_adapters if f not in self.input_adapters]
        self.after_resize_hooks += [
            f for f in other.after_resize_hooks if f not in self.after_resize_hooks
        ]
        self._cache = None
        return self

    def register_per_channel(self, target: Any) -> Any:
        """``target`` acts on each channel alone, like an activation: an ``nn.Module``
        subclass (traced as one op, not looked into), a function (an ``autograd.Function``
        too) or a tensor method's name. Trusted as said (a wrong claim prunes wrongly);
        the engine still probes it at 0 and 1 to learn what a removed channel becomes.
        Returns ``target``, so it also works as a decorator."""
        self.per_channel.add(_key(target))
        self._cache = None
        return target

    def register_opaque(self, target: Any) -> Any:
        """``target`` mixes or reads channels in ways the engine cannot follow: every
        channel it reads or writes is kept, with the reason in the prune report (a module is
        traced as one op, whatever it holds). ``target`` as for :meth:`register_per_channel`."""
        self.opaque.add(_key(target))
        self._cache = None
        return target

    def unregister(self, target: Any) -> None:
        """Forget every rule about ``target``."""
        key = _key(target)
        for rules in (self.per_channel, self.opaque, self.linears):
            rules.discard(key)
        for table in (self.convs, self.norms, self.selections, self.layers):
            table.pop(key, None)
        self._cache = None

    def register_layer(
        self,
        cls: ClassRef,
        *,
        params: dict[str, tuple[str | None, ...]],
        in_dim: int = 1,
        out_dim: int = 1,
        attrs: dict[str, str] | None = None,
    ) -> ClassRef:
        """A layer of your own with weights, pruned like a conv: each output channel is new
        (a BatchNorm after it scores it), computed from the input channels, and a removed
        input channel (zero in the masked network) contributes nothing once its slice of
        the weights is gone. ``params``, ``in_dim``, ``out_dim``, ``attrs``: see
        :class:`LayerSpec`. Surgery slices those tensors; the trace checks once per layer that
        the sliced layer computes what the whole one does on the kept channels, and keeps
        the layer's channels (with the reason) where it does not."""
        self.layers[cls] = LayerSpec(dict(params), in_dim, out_dim, dict(attrs or {}))
        self._cache = None
        return cls

    def register_conv(self, cls: ClassRef, *, same_padding: bool = False) -> ClassRef:
        """An ``nn.Conv2d`` subclass whose own ``forward`` computes a plain convolution
        (``same_padding``: after zero padding of its own, as timm's ``Conv2dSame``)."""
        self.convs[cls] = same_padding
        self._cache = None
        return cls

    def register_linear(self, cls: ClassRef) -> ClassRef:
        """An ``nn.Linear`` subclass whose own ``forward`` computes a plain linear layer."""
        self.linears.add(cls)
        self._cache = None
        return cls

    def register_norm(self, cls: ClassRef, *, then: Iterable[str] = ("drop", "act")) -> ClassRef:
        """A BatchNorm subclass whose ``forward`` is the BatchNorm followed by its submodules
        ``then``, in order (timm's ``BatchNormAct2d``); each must act on each channel alone
        (registered, known, or found so by probing), else its channels are kept."""
        self.norms[cls] = tuple(then)
        self._cache = None
        return cls

    def register_selection(self, cls: ClassRef, *, index: str = "index") -> ClassRef:
        """A channel selection: output channel ``j`` is input channel ``module.<index>[j]``.
        What it reads is kept; its outputs are pruned by cutting the index."""
        self.selections[cls] = index
        self._cache = None
        return cls

    def add_input_adapter(self, adapter: InputAdapter) -> InputAdapter:
        """``adapter(model, images)``: the arguments to call ``model`` with on a batch, or
        None for a model it does not know (the first answer wins; default ``(images,)``)."""
        self.input_adapters.append(adapter)
        return adapter

    def add_after_resize(self, hook: Callable[[nn.Module], Any]) -> Callable:
        """``hook(model)``, run in place after surgery resized layers: bring attributes
        derived from channel counts in line (Ultralytics' C2f keeps a half width)."""
        self.after_resize_hooks.append(hook)
        return hook

    # -- asking ---------------------------------------------------------------------------
    def _classes(self) -> dict[str, tuple]:
        """The classes each table names that resolve now, cached until more modules load."""
        stamp = len(sys.modules)
        if self._cache is None or self._cache[0] != stamp:

            def classes(refs: Iterable[Any]) -> tuple:
                found = (resolve(r) for r in refs)
                return tuple(c for c in found if isinstance(c, type))

            def pairs(table: dict) -> tuple:
                found = ((resolve(r), v) for r, v in table.items())
                return tuple((c, v) for c, v in found if isinstance(c, type))

            self._cache = (
                stamp,
                {
                    "per_channel": classes(self.per_channel),
                    "opaque": classes(self.opaque),
                    "linears": classes(self.linears),
                    "convs": pairs(self.convs),
                    "norms": pairs(self.norms),
                    "selections": pairs(self.selections),
                    "layers": pairs(self.layers),
                    "functions": tuple(
                        f
                        for f in map(resolve, self.per_channel)
                        if not isinstance(f, (type, str)) and f is not None
                    ),
                    "opaque_functions": tuple(
                        f
                        for f in map(resolve, self.opaque)
                        if not isinstance(f, (type, str)) and f is not None
                    ),
                },
            )
        return self._cache[1]

    def _lookup(self, table: str, module: Any) -> Any:
        for cls, value in self._classes()[table]:
            if isinstance(module, cls):
                return value
        return None

    def is_per_channel_module(self, module: Any) -> bool:
        """Whether ``module``'s class was registered per-channel."""
        return isinstance(module, self._classes()["per_channel"])

    def is_opaque_module(self, module: Any) -> bool:
        return isinstance(module, self._classes()["opaque"])

    def is_per_channel_function(self, target: Any) -> bool:
        """Whether a function, or a tensor method by name, was registered per-channel."""
        return _hashable(target) and (
            target in self.per_channel or target in self._classes()["functions"]
        )

    def is_opaque_function(self, target: Any) -> bool:
        return _hashable(target) and (
            target in self.opaque or target in self._classes()["opaque_functions"]
        )

    def conv_padding(self, module: Any) -> bool | None:
        """For a registered conv subclass, whether it pads like ``"same"``; else None."""
        return self._lookup("convs", module)

    def is_plain_linear(self, module: Any) -> bool:
        return isinstance(module, self._classes()["linears"])

    def norm_extras(self, module: Any) -> tuple[str, ...] | None:
        """For a registered BatchNorm subclass, the submodules its forward runs after it."""
        return self._lookup("norms", module)

    def selection_index(self, module: Any) -> str | None:
        """For a channel selection, the name of its index buffer; else None."""
        return self._lookup("selections", module)

    def layer_spec(self, module: Any) -> LayerSpec | None:
        """For a registered prunable layer of your own, how to slice it; else None."""
        return self._lookup("layers", module)

    def records_whole(self, module: Any) -> bool:
        """Whether a rule names ``module``, so the tracer records it as one op."""
        c = self._classes()
        whole = (*c["per_channel"], *c["opaque"])
        return isinstance(module, whole) or any(
            isinstance(module, cls) for t in ("selections", "layers") for cls, _ in c[t]
        )

    def model_inputs(self, model: nn.Module, images: torch.Tensor) -> tuple:
        """The arguments to call ``model`` with on a batch of ``images`` (N, C, H, W): the
        first input adapter's answer, else the batch itself."""
        for adapter in self.input_adapters:
            found = adapter(model, images)
            if found is not None:
                return found
        return (images,)

    def after_resize(self, model: nn.Module) -> nn.Module:
        """Run every after-resize hook on ``model`` (in place); returns it."""
        for hook in self.after_resize_hooks:
            hook(model)
        return model


def _key(target: Any) -> Any:
    if isinstance(target, type) and issubclass(target, torch.autograd.Function):
        return target.apply
    return target


def _hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


# -- the default rules, and where adapters come from -------------------------------------

_DEFAULT: Rules | None = None
_LOCK = threading.Lock()


def default_rules() -> Rules:
    """The rules used where a call gets none: the core's, plus every adapter
    (:func:`load_adapters`), built on first use. Registering on them affects every later
    call in this process; prefer ``default_rules().copy()`` and ``rules=``."""
    global _DEFAULT
    with _LOCK:
        if _DEFAULT is None:
            rules = Rules()
            load_adapters(rules)
            _DEFAULT = rules
        return _DEFAULT


def _entry_points() -> list[Any]:
    from importlib import metadata

    found = metadata.entry_points()
    if hasattr(found, "select"):
        return list(found.select(group=ADAPTER_GROUP))
    return list(found.get(ADAPTER_GROUP, []))  # Python 3.9: a dict of groups


def load_adapters(rules: Rules) -> Rules:
    """Run every adapter on ``rules``: netslim's own (:data:`BUILTIN_ADAPTERS`), then each
    entry point of the group :data:`ADAPTER_GROUP` (a ``register(rules)`` function, or a
    module that has one). A third-party adapter that fails is skipped with a warning."""
    importlib.import_module(BUILTIN_ADAPTERS).register(rules)
    for point in _entry_points():
        if point.value.split(":")[0].startswith(BUILTIN_ADAPTERS + "."):
            continue  # netslim's own, run above
        try:
            target = point.load()
            register = getattr(target, "register", target)
            register(rules)
        except Exception as e:  # a broken plug-in must not stop pruning
            warnings.warn(f"netslim adapter {point.name} ({point.value}) failed: {e}", stacklevel=2)
    return rules


def register_per_channel(target: Any) -> Any:
    """:meth:`Rules.register_per_channel` on the default rules (process-wide)."""
    return default_rules().register_per_channel(target)


def register_opaque(target: Any) -> Any:
    """:meth:`Rules.register_opaque` on the default rules (process-wide)."""
    return default_rules().register_opaque(target)


def unregister(target: Any) -> None:
    """:meth:`Rules.unregister` on the default rules."""
    default_rules().unregister(target)


def model_inputs(model: nn.Module, images: torch.Tensor) -> tuple:
    """The arguments to call ``model`` with on a batch of ``images``, as the default rules say
    (:meth:`Rules.model_inputs`: a list of images for a torchvision detector)."""
    return default_rules().model_inputs(model, images)
