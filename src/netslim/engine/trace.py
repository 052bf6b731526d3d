"""Tracing a network with torch.fx: the forward pass as a graph of ops, replayed on unit codes.

:func:`trace_channels` is the engine's entry point: it records the ops of ``forward`` and
hands each to :class:`netslim.engine.ops.Replay`, which sorts the channels into units and
groups (:class:`netslim.engine.graph.ChannelGraph`). torch.fx traces symbolically, so a
forward pass whose control flow depends on the input's values cannot be traced: that is
a one-line error naming the source line.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx, nn

from netslim.engine.graph import ChannelGraph
from netslim.engine.ops import LAYER_TYPES, Call, Replay, registered_module
from netslim.errors import NetslimError
from netslim.models.gather import ChannelGather


def _source_of(error: BaseException) -> str:
    """The innermost frame of the traceback outside torch: where the user's code failed."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if torch_dir not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {Path(f.filename).name}:{f.lineno}, in {f.name}: {f.line})"


class _LayerTracer(fx.Tracer):
    """torch.fx's tracer, keeping every conv, linear and BatchNorm (subclasses too),
    netslim's channel selections and the modules the registry names whole."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            isinstance(m, (*LAYER_TYPES, ChannelGather))
            or registered_module(m)
            or super().is_leaf_module(m, qualname)
        )


class _FxReplay(fx.Interpreter):
    """Runs a traced graph on a real input, handing every node to ``replay`` as a Call."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module, replay: Replay):
        super().__init__(gm, garbage_collect_values=False)
        self.model, self.replay = model, replay
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.replay.step(n, self.to_call(n), value)
        return value

    def to_call(self, node: fx.Node) -> Call:
        module = self.module.get_submodule(node.target) if node.op == "call_module" else None
        return Call(
            op=node.op, target=node.target, args=node.args, kwargs=node.kwargs,
            inputs=list(node.all_input_nodes), rerun=lambda replace: self.rerun(node, replace),
            module=module, calls=self.calls[node.target] if module is not None else 1,
            describe=type(module).__name__ if module is not None else getattr(
                node.target, "__name__", str(node.target)),
            locate=lambda: (self.where(node), self.line(node)),
        )  # fmt: skip

    def rerun(self, node: fx.Node, replace: Callable[[fx.Node], Any]) -> Any:
        """``node``'s op again, each input node replaced by ``replace(node)``."""
        args = fx.node.map_arg(node.args, replace)
        kwargs = fx.node.map_arg(node.kwargs, replace)
        if node.op == "call_module":
            return self.module.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            self_arg, *rest = args
            return getattr(self_arg, node.target)(*rest, **kwargs)
        return node.target(*args, **kwargs)

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


def trace_channels(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> ChannelGraph:
    """Trace ``model`` and sort its channels into units and groups (see the module docs).

    The network is traced with torch.fx, keeping every conv, linear and BatchNorm layer (and
    every module the registry of :mod:`netslim.engine.ops` names) whole, and the graph is
    run once on zeros of ``input_size``, each node handed to a
    :class:`~netslim.engine.ops.Replay`. The graph of training mode is replayed when it
    traces (it holds what only training runs, an auxiliary head, say), with every module in
    eval mode; the layers of inference mode are marked as those the MACs count.

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
            replay = Replay(type(model).__name__)
            replay.units.inference = called
            interpreter = _FxReplay(fx.GraphModule(model, candidate), model, replay)
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
    return replay.finish(input_size)
