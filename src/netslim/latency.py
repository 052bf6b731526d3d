"""How long a pruned network will take on the runtime it ships to, known before pruning.

A :class:`LatencyTable` is measured once per network, runtime, machine, image size and
batch (:func:`latency_table`), then predicts the time of any plan in microseconds of
arithmetic (:meth:`LatencyTable.predict`), which is what
:func:`~netslim.engine.plan.plan_for_latency` asks of it thousands of times.

**Measured in context.** A layer timed alone is not the layer inside its network: on
onnxruntime a lone convolution pays for converting its input and output to the blocked
layout that, inside the network, is converted once for many layers (yolov8n at 640 px:
its 63 convolutions timed alone add up to 2.9x the whole network's time). So the table
times *whole networks*: the unpruned one and versions of it with every prunable group cut
to the same share of its width (:data:`SHARES`, each width a multiple of ``step``), and
reads each layer's time from the runtime's own profiler (onnxruntime's profiling,
OpenVINO's performance counters, or forward hooks for PyTorch eager).

* A layer's time is interpolated over its share of MACs kept (``kept in x kept out`` over
  ``in x out``; kept groups for a grouped convolution), between the shares measured, with
  each width first rounded up to a multiple of ``step``: the runtime's blocked kernels
  compute whole blocks.
* **Width steps**: one more version keeps every group one channel short of the 50% one;
  a layer whose input or output width is off the step pays the factor measured there.
  Where a width of 33 runs slower than 40, the table says so, and the choice follows it.
* The rest (activations, additions, concatenations, resizing, layout conversions, the
  head's decoding) is interpolated over the share of the layers' output values kept.
* The sum is scaled so that the unpruned network's prediction is its measured latency.

A table cannot see everything a runtime does across layers, so after pruning the pruned
network is timed whole beside the unpruned one (:mod:`netslim.slim`), and a plan more than
10% off its budget is corrected and made again.

The table is saved as JSON (:meth:`LatencyTable.save`) with what it was measured for
(:attr:`LatencyTable.key`: the network's layer shapes, runtime and version, CPU, threads,
image size, batch, step); :func:`load_table` refuses a file measured for anything else.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from netslim.benchmark import (
    forward_on,
    in_own_process,
    runtime_version,
    time_interleaved,
    time_openvino,
)
from netslim.engine.fold import fold_bn
from netslim.engine.graph import ChannelGraph, Layer
from netslim.engine.plan import PrunePlan, plan_keeping
from netslim.engine.surgery import apply_plan
from netslim.engine.trace import trace_channels
from netslim.errors import NetslimError
from netslim.files import make_dirs, write_json
from netslim.models.external import for_deployment

TABLE_FORMAT = 1
#: The shares of every prunable group's width kept in the versions of the network timed.
SHARES = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125)
#: Profiled runs of each version (after two warm-up runs); each layer's median is kept.
RUNS = 7
#: The ops that are a traced layer's own arithmetic in a runtime's profile.
LAYER_OPS = {"Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm", "Convolution",
             "FullyConnected", "conv", "linear"}  # fmt: skip


@dataclass
class LayerTimes:
    """One layer's measured milliseconds, in context, at the kept widths of each version."""

    kind: str  # "conv", "grouped" (its time follows the kept groups) or "linear"
    full: tuple[int, int]  # its (input, output) width unpruned
    shares: list[float]  # share of its MACs kept in each version timed, ascending
    ms: list[float]  # its milliseconds in each
    off_step: float = 1.0  # its time with widths one below a multiple of step / at it

    def at(self, n_in: int, n_out: int, step: int) -> float:
        """Milliseconds with ``n_in`` inputs and ``n_out`` outputs kept."""
        share = _macs_share(
            self.kind, self.full, _up(n_in, step, self.full[0]), _up(n_out, step, self.full[1])
        )
        t = _interpolate(self.shares, self.ms, share)
        off = (n_in % step and n_in < self.full[0]) or (n_out % step and n_out < self.full[1])
        return t * self.off_step if off else t


def _up(n: int, step: int, full: int) -> int:
    """``n`` rounded up to a multiple of ``step`` (the runtime computes whole blocks)."""
    return min(full, math.ceil(n / step) * step)


def _macs_share(kind: str, full: tuple[int, int], n_in: int, n_out: int) -> float:
    if kind == "grouped":
        return n_out / full[1]
    return (n_in * n_out) / (full[0] * full[1])


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise linear through ``(xs, ys)`` (``xs`` ascending); below the first point, in
    proportion to it (toward zero time at zero width); above the last, the last."""
    if x <= xs[0]:
        return ys[0] * x / xs[0] if xs[0] > 0 else ys[0]
    for j in range(1, len(xs)):
        if x <= xs[j]:
            w = (x - xs[j - 1]) / (xs[j] - xs[j - 1]) if xs[j] > xs[j - 1] else 1.0
            return ys[j - 1] + w * (ys[j] - ys[j - 1])
    return ys[-1]


@dataclass
class LatencyTable:
    """Measured in-context times of a network's layers; predicts the milliseconds of a plan.

    Attributes:
        key: what it was measured for (see :func:`table_key`); a saved table is reused
            only for the same key.
        whole_ms: the unpruned network's measured time per batch (the fastest of the runs).
        layers: layer name -> its :class:`LayerTimes`.
        rest: ``(shares of the layers' output values kept, milliseconds)`` of everything
            not in a layer, per version timed, ascending.
        scale: what makes the unpruned network's prediction its measured time.
        versions: ``(share of the widths kept, measured milliseconds)`` of each version.
        seconds: how long measuring it took.
    """

    key: dict[str, Any]
    whole_ms: float
    layers: dict[str, LayerTimes]
    rest: tuple[list[float], list[float]]
    scale: float = 1.0
    versions: list[tuple[float, float]] = field(default_factory=list)
    seconds: float = 0.0
    _index: list[tuple[LayerTimes, Layer]] = field(default_factory=list, repr=False)
    _graph_id: int | None = field(default=None, repr=False)

    @property
    def step(self) -> int:
        return int(self.key["step"])

    def predict(self, plan: PrunePlan) -> float:
        """Milliseconds per batch of the network ``plan`` would build."""
        if self._graph_id != id(plan.graph):
            self._bind(plan.graph)
        keep, step = plan.keep, self.step
        layer_ms, values, full_values = 0.0, 0, 0
        for times, layer in self._index:
            n_in, n_out = int(keep[layer.inputs].sum()), int(keep[layer.outputs].sum())
            layer_ms += times.at(n_in, n_out, step)
            values += layer.pixels * n_out
            full_values += layer.pixels * times.full[1]
        share = values / full_values if full_values else 1.0
        return self.scale * (layer_ms + _interpolate(*self.rest, share))

    def _bind(self, graph: ChannelGraph) -> None:
        missing = [name for name in self.layers if name not in graph.layers]
        if missing:
            raise NetslimError(
                f"the latency table does not fit this network: it has no layer {missing[0]}; "
                "measure a table for it (delete the table file)"
            )
        self._index = [(times, graph.layers[name]) for name, times in self.layers.items()]
        self._graph_id = id(graph)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for private in ("_index", "_graph_id"):
            d.pop(private)
        return d

    def save(self, path: str | Path) -> None:
        """Write the table as JSON, atomically (making its folder)."""
        make_dirs(Path(path).parent)
        write_json(path, self.to_dict())


def machine() -> str:
    """The CPU a table is measured on, as a name that changes when it does."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{cpu}, {os.cpu_count()} cores" + (f", ONEDNN_MAX_CPU_ISA={isa}" if isa else "")


def fingerprint(graph: ChannelGraph) -> str:
    """A hash of the network's traced layers and their shapes (not its weights)."""
    shapes = [
        (name, x.kind, len(x.inputs), len(x.outputs), x.pixels, x.kernel, x.groups)
        for name, x in sorted(graph.layers.items())
        if x.inference
    ]
    return hashlib.sha256(json.dumps([graph.input_size, shapes]).encode()).hexdigest()[:16]


def table_key(
    graph: ChannelGraph, runtime: str, batch: int, device: torch.device | str, step: int
) -> dict[str, Any]:
    """What a table is valid for: a saved one is used only where every entry matches."""
    device = torch.device(device)
    on_gpu = runtime == "torch" and device.type == "cuda"
    return {
        "format": TABLE_FORMAT,
        "network": fingerprint(graph),
        "runtime": runtime,
        "runtime_version": runtime_version(runtime),
        "machine": torch.cuda.get_device_name(device) if on_gpu else machine(),
        "threads": torch.get_num_threads(),
        "image_size": list(graph.input_size[2:]),
        "batch": batch,
        "step": step,
    }


def load_table(path: str | Path, key: dict[str, Any]) -> LatencyTable:
    """The table saved at ``path``; NetslimError naming the first difference when it was
    measured for another network, runtime, machine, size or batch than ``key``."""
    try:
        d = json.loads(Path(path).read_text())
        saved = d["key"]
        if saved != key:
            what = next(k for k in key if saved.get(k) != key[k])
            raise NetslimError(
                f"{path} was measured for another {what.replace('_', ' ')} "
                f"({saved.get(what)!r}, not {key[what]!r})"
            )
        layers = {name: LayerTimes(**t) for name, t in d.pop("layers").items()}
        for t in layers.values():
            t.full = tuple(t.full)
        d["rest"] = tuple(d["rest"])
        d["versions"] = [tuple(v) for v in d["versions"]]
        return LatencyTable(layers=layers, **d)
    except NetslimError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NetslimError(f"{path} is not a netslim latency table ({e})") from None


def _widths(group_size: int, share: float, step: int) -> int:
    return min(group_size, max(step, math.ceil(share * group_size / step) * step))


def latency_table(
    model: nn.Module,
    graph: ChannelGraph,
    runtime: str = "onnxruntime",
    batch: int = 1,
    *,
    step: int = 8,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Measure ``model``'s latency table on ``runtime`` at the graph's image size.

    Args:
        model: the unpruned network (unchanged).
        graph: its traced channels (:func:`netslim.engine.trace_channels`) at the image
            size the network runs at.
        runtime: ``"onnxruntime"`` (CPU), ``"torch"`` (eager, on ``device``) or
            ``"openvino"`` (CPU).
        batch: images per call.
        step: the width step: versions keep multiples of it (8 suits the CPU runtimes).
        progress: called with a line before each version is timed.
    """
    runtime_version(runtime)  # one line when unknown or not installed
    if not isinstance(batch, int) or batch < 1:
        raise NetslimError(f"--batch must be a whole number >= 1, got {batch}")
    say = progress or (lambda line: None)
    start = time.perf_counter()
    key = table_key(graph, runtime, batch, device, step)
    size = (1, *graph.input_size[1:])
    names = [n for n, x in graph.layers.items() if x.inference and x.kind != "custom"]
    sizes = [g.size for g in graph.prunable.values()]
    versions = [(share, [_widths(n, share, step) for n in sizes]) for share in SHARES]
    half = [_widths(n, 0.5, step) for n in sizes]
    versions.append((-0.5, [n - 1 if 1 < n < full else n for n, full in zip(half, sizes)]))
    x = torch.randn(batch, *size[1:], generator=torch.Generator().manual_seed(0))
    profiles, plans = [], []
    for k, (share, counts) in enumerate(versions, 1):
        what = (
            f"{share:.0%} of every group's width" if share > 0 else "one channel off the 50% widths"
        )
        say(
            f"latency table [{k}/{len(versions)}]: {runtime}, batch {batch}, {size[2]}x{size[3]}, {what}"
        )
        plan = plan_keeping(graph, counts)
        network = model if share == 1.0 else apply_plan(model, plan, compensate=False)
        deployed = for_deployment(fold_bn(_cpu_float(network), size))
        profiles.append(_profile(runtime, deployed, x, names, device))
        plans.append(plan)
    whole_ms = profiles[0].wall_ms
    layers = {}
    for name in names:
        layer = graph.layers[name]
        if not all(name in p.layer_ms for p in profiles):
            continue  # not found in the profile: its time counts in the rest
        full = (len(layer.inputs), len(layer.outputs))
        points = sorted(
            (_macs_share(layer.kind, full, *_kept(plan, layer)), p.layer_ms[name])
            for plan, p in zip(plans[:-1], profiles[:-1])
        )
        shares, ms = _merge(points)
        off = profiles[-1].layer_ms[name] / max(profiles[2].layer_ms[name], 1e-9)
        changed = _kept(plans[-1], layer) != _kept(plans[2], layer)
        layers[name] = LayerTimes(layer.kind, full, shares, ms, off if changed else 1.0)
    rest = []
    for plan, p in zip(plans[:-1], profiles[:-1]):
        in_layers = sum(p.layer_ms.get(n, 0.0) for n in layers)
        rest.append(
            (_values_share(plan, [graph.layers[n] for n in layers]), p.total_ms - in_layers)
        )
    table = LatencyTable(
        key,
        whole_ms,
        layers,
        _merge(sorted(rest)),
        1.0,
        [(share, p.wall_ms) for (share, _), p in zip(versions, profiles)],
    )
    # the unpruned network predicted at its measured time (a layer whose width no version
    # changes has the mean of its versions' times, which need not add up to that exactly)
    table.scale = whole_ms / table.predict(plans[0])
    table.seconds = time.perf_counter() - start
    return table


def _kept(plan: PrunePlan, layer: Layer) -> tuple[int, int]:
    return int(plan.keep[layer.inputs].sum()), int(plan.keep[layer.outputs].sum())


def _values_share(plan: PrunePlan, layers: list[Layer]) -> float:
    full = sum(x.pixels * len(x.outputs) for x in layers)
    kept = sum(x.pixels * int(plan.keep[x.outputs].sum()) for x in layers)
    return kept / full if full else 1.0


def _merge(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Sorted points with equal x merged (their mean y), as two lists."""
    merged: dict[float, list[float]] = {}
    for x, y in points:
        merged.setdefault(round(x, 9), []).append(y)
    xs = sorted(merged)
    return xs, [statistics.fmean(merged[x]) for x in xs]


def _cpu_float(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cpu().float().eval()


@dataclass
class Profile:
    wall_ms: float  # the fastest of the runs, whole
    total_ms: float  # the median run's profiled time (what the layers' times add up in)
    layer_ms: dict[str, float]  # per traced layer, its median over the runs


def layer_of(node: str, names: set[str]) -> str | None:
    """The traced layer a runtime's node belongs to, from the module path in its name:
    ``/model.0/conv/Conv_output_0_nchwc`` -> ``model.0.conv``; the exporter names a child
    of a container by its name there, ``/layers/layers.0/layers.0.0/conv1/Conv`` ->
    ``layers.0.0.conv1``. None when no traced layer's path is in it."""
    path, last, found = "", "", None
    for part in (p for p in node.strip("/").split("/") if p):
        if last and part.startswith(last + "."):
            path += part[len(last) :]
        else:
            path = f"{path}.{part}" if path else part
        last = part
        if path in names:
            found = path
    return found


#: Ops a runtime fuses into the convolution before them; the fused node is named after
#: the last one's output, so :func:`_name_fusions` names those outputs after the layer.
FUSED_AFTER = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Add", "Sum"}


def _name_fusions(onnx: bytes) -> bytes:
    """``onnx`` with the output of each op that a runtime may fuse into the layer before it
    (a ReLU after a convolution, an addition of its output) renamed after that layer's
    node, so that the fused node's profile still names the layer."""
    import onnx as onnx_lib

    model = onnx_lib.load_from_string(onnx)
    origin: dict[str, str] = {}  # tensor -> the layer node whose output it carries
    renamed: dict[str, str] = {}
    for node in model.graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        if node.op_type in LAYER_OPS:  # its output named after it too (OpenVINO names
            for k, out in enumerate(node.output):  # a network's last layer by its output)
                new = f"{node.name}/out{k}"
                renamed[out], origin[new] = new, node.name
                node.output[k] = new
        elif node.op_type in FUSED_AFTER:
            source = next((origin[i] for i in node.input if i in origin), None)
            if source is not None:
                for k, out in enumerate(node.output):
                    new = f"{source}/{node.op_type}_{len(renamed)}"
                    renamed[out], origin[new] = new, source
                    node.output[k] = new
    for out in model.graph.output:
        out.name = renamed.get(out.name, out.name)
    return model.SerializeToString()


def _profile(
    runtime: str, model: nn.Module, x: torch.Tensor, names: list[str], device: torch.device | str
) -> Profile:
    if runtime == "torch":
        wall = forward_on(runtime, model, x, device)
        wall_ms = 1000 * time_interleaved({"w": wall}, RUNS, stat="min")["w"]
        runs = _profile_torch(model, x.to(device), names)
    else:
        from netslim.export import DEFAULT_OPSET, FORMATS

        onnx = _name_fusions(FORMATS["onnx"].write(model.cpu(), x[:2], DEFAULT_OPSET))
        if runtime == "onnxruntime":
            wall = forward_on(runtime, model, x, device, onnx)
            wall_ms = 1000 * time_interleaved({"w": wall}, RUNS, stat="min")["w"]
            runs = _profile_onnxruntime(onnx, x, set(names))
        else:  # OpenVINO in a process of its own (benchmark.in_own_process says why)
            args = (onnx, x.numpy(), set(names), torch.get_num_threads())
            wall_ms, runs = in_own_process(_time_and_profile_openvino, *args)
    totals = [sum(ops.values()) + rest for ops, rest in runs]
    layer_ms = {
        name: statistics.median(ops.get(name, 0.0) for ops, _ in runs)
        for name in {n for ops, _ in runs for n in ops}
    }
    return Profile(wall_ms, statistics.median(totals), layer_ms)


def _time_and_profile_openvino(
    onnx: bytes, x: Any, names: set[str], threads: int
) -> tuple[float, list[Run]]:
    torch.set_num_threads(threads)
    x = torch.from_numpy(x)
    wall = time_openvino({"w": onnx}, x.numpy(), RUNS, "min", threads)["w"]
    return 1000 * wall, _profile_openvino(onnx, x, names)


#: One profiled run: (traced layer -> ms, ms of everything else).
Run = tuple[dict[str, float], float]


def _profile_onnxruntime(onnx: bytes, x: torch.Tensor, names: set[str]) -> list[Run]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.enable_profiling = True
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as timed
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        for _ in range(2 + RUNS):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs: list[Run] = []
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs.append(({}, 0.0))
        elif event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and runs:
            _add(
                runs,
                event["name"].removesuffix("_kernel_time"),
                event["args"].get("op_name"),
                event["dur"] / 1000,
                names,
            )
    return _last(runs)


def _profile_openvino(onnx: bytes, x: torch.Tensor, names: set[str]) -> list[Run]:
    import openvino

    core = openvino.Core()
    settings = {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
        "PERF_COUNT": True,
    }
    request = core.compile_model(core.read_model(onnx), "CPU", settings).create_infer_request()
    runs: list[Run] = []
    for _ in range(2 + RUNS):
        request.infer({0: x.numpy()})
        runs.append(({}, 0.0))
        for info in request.get_profiling_info():
            ms = info.real_time.total_seconds() * 1000  # 0 for a node fused away, or < 1 us
            _add(runs, info.node_name, info.node_type, ms, names)
    return _last(runs)


def _profile_torch(model: nn.Module, x: torch.Tensor, names: list[str]) -> list[Run]:
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    model = model.to(x.device)
    started: dict[str, float] = {}
    current: dict[str, float] = {}

    def before(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            sync()
            started[name] = time.perf_counter()

        return hook

    def after(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            sync()
            current[name] = current.get(name, 0.0) + 1000 * (time.perf_counter() - started[name])

        return hook

    hooks = []
    for name in names:
        module = model.get_submodule(name)
        hooks += [
            module.register_forward_pre_hook(before(name)),
            module.register_forward_hook(after(name)),
        ]
    runs: list[Run] = []
    try:
        with torch.inference_mode():
            for _ in range(2 + RUNS):
                current.clear()
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                total = 1000 * (time.perf_counter() - start)
                runs.append((dict(current), total - sum(current.values())))
    finally:
        for hook in hooks:
            hook.remove()
    return _last(runs)


def _add(runs: list[Run], node: str, op: str | None, ms: float, names: set[str]) -> None:
    ops, rest = runs[-1]
    name = layer_of(node, names) if op in LAYER_OPS else None
    if name is None:
        runs[-1] = (ops, rest + ms)
    else:
        ops[name] = ops.get(name, 0.0) + ms


def _last(runs: list[Run]) -> list[Run]:
    """The profiled runs after the two warm-up runs."""
    return runs[2:] if len(runs) > 2 else runs


#: How a latency budget is spent: the paper's |gamma| threshold raised until the budget
#: is met (the default), or the most importance per millisecond (greedy, as HALP's
#: knapsack). With |gamma| as the importance the second strips the early, costly layers to
#: 8 channels: on yolov8n at equal predicted latency it kept 0.0003 mAP50-95 where the
#: threshold kept 0.205 (bench/RESULTS.md), so it waits for a loss-aware importance=.
CHOICES = ("threshold", "latency")
#: A measured latency this far from the budget (as a share of it) is corrected.
TOLERANCE = 0.10
#: Corrections after the first plan (NetAdapt's loop: measure, rescale the budget, replan).
CORRECTIONS = 2


@dataclass
class LatencyBudget:
    """Prune to a latency measured on a runtime: ``netslim prune --target-latency``.

    Give ``share`` (of the unpruned network's measured latency, in (0, 1)) or ``ms`` (an
    absolute budget per batch). The table is measured on ``runtime`` at the prune's image
    size and ``batch`` (or read from ``table`` when it was measured for the same; a file
    measured for anything else is measured again and overwritten). ``choice``: see
    :data:`CHOICES`. ``verify``: time the pruned network against the unpruned one and
    correct a plan more than :data:`TOLERANCE` off.
    """

    share: float | None = None
    ms: float | None = None
    runtime: str = "onnxruntime"
    batch: int = 1
    table: str | Path | None = None
    choice: str = "threshold"
    step: int = 8
    verify: bool = True
    device: str = "cpu"
    image_size: int | None = None  # None: the size the network is pruned at
    progress: Callable[[str], None] | None = field(default=None, repr=False)

    def check(self) -> LatencyBudget:
        """Itself, or one line naming what is wrong."""
        if (self.share is None) == (self.ms is None):
            raise NetslimError("give one latency budget: --target-latency F or --target-ms MS")
        if self.share is not None and not (
            isinstance(self.share, (int, float)) and 0 < self.share < 1
        ):
            raise NetslimError(
                "--target-latency must be a share of the unpruned network's latency in (0, 1), "
                f"e.g. 0.6, got {self.share}"
            )
        if self.ms is not None and not (
            isinstance(self.ms, (int, float)) and math.isfinite(self.ms) and self.ms > 0
        ):
            raise NetslimError(
                f"--target-ms must be a positive number of milliseconds, got {self.ms}"
            )
        if self.choice not in CHOICES:
            raise NetslimError(
                f"unknown latency choice {self.choice!r}; choose one of: {', '.join(CHOICES)}"
            )
        if not isinstance(self.batch, int) or self.batch < 1:
            raise NetslimError(f"--batch must be a whole number >= 1, got {self.batch}")
        if self.image_size is not None and (
            not isinstance(self.image_size, int) or self.image_size < 1
        ):
            raise NetslimError(f"--image-size must be a whole number >= 1, got {self.image_size}")
        if not isinstance(self.step, int) or self.step < 1:
            raise NetslimError(f"the width step must be a whole number >= 1, got {self.step}")
        runtime_version(self.runtime)  # one line when unknown or not installed
        return self


def table_for(
    model: nn.Module, graph: ChannelGraph, budget: LatencyBudget
) -> tuple[LatencyTable, str]:
    """The latency table of ``model`` for ``budget``: read from ``budget.table`` when it
    was measured for the same network, runtime, machine, size and batch, else measured
    (and saved there; with no file named, in :func:`cache_folder`). Returns it and a line
    saying which. ``graph`` is traced again at ``budget.image_size`` where that differs."""
    size = budget.image_size
    if size is not None and tuple(graph.input_size[2:]) != (size, size):
        graph = trace_channels(model, (1, graph.input_size[1], size, size), rules=graph.rules)
    key = table_key(graph, budget.runtime, budget.batch, budget.device, budget.step)
    if budget.table is None:
        size_name = "x".join(map(str, key["image_size"]))
        name = f"{key['network']}-{key['runtime']}-{size_name}-b{key['batch']}.json"
        budget = replace(budget, table=cache_folder() / name)
    if Path(budget.table).exists():
        try:
            return load_table(budget.table, key), f"latency table read from {budget.table}"
        except NetslimError as e:
            why = f"{e}; measured again"
    else:
        why = "latency table measured"
    table = latency_table(
        model,
        graph,
        budget.runtime,
        budget.batch,
        step=budget.step,
        device=budget.device,
        progress=budget.progress,
    )
    table.save(budget.table)
    return table, f"{why} in {table.seconds:.0f} s, saved to {budget.table}"


def cache_folder() -> Path:
    """Where latency tables are kept when no file is named: ``$NETSLIM_CACHE/latency``,
    else ``$XDG_CACHE_HOME/netslim/latency``, else ``~/.cache/netslim/latency``."""
    if os.environ.get("NETSLIM_CACHE"):
        return Path(os.environ["NETSLIM_CACHE"]) / "latency"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "netslim" / "latency"
