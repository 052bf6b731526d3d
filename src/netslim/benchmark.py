"""Did it get faster? Latency and throughput of networks, timed side by side.

:func:`time_interleaved` is the timing loop: a few warm-up calls of every function, then
rounds in which each function runs once in turn, so that the machine's load at any moment
falls on all of them alike; the median of the rounds is each one's latency (or the
minimum: on a machine shared with other work, calls that were preempted inflate the
median, and the fastest call is the closest to the network's own cost).
:func:`benchmark` applies it to networks at several batch sizes in PyTorch eager and in
onnxruntime, both with BatchNorm folded (the deployed form), and :func:`format_table`
prints speed-up against the first network and *efficiency*: speed-up divided by the
reduction in MACs (1.0: the time fell exactly as the arithmetic did).
"""

from __future__ import annotations

import importlib.metadata
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from netslim.engine.fold import fold_bn
from netslim.engine.stats import count_macs, count_params
from netslim.errors import NetslimError
from netslim.models.external import for_deployment

RUNTIMES = ("torch", "onnxruntime", "openvino")
#: The package each runtime needs, and how to install it.
RUNTIME_PACKAGES = {
    "torch": ("torch", "it is netslim's own dependency"),
    "onnxruntime": ("onnxruntime", 'pip install "netslim[export]"'),
    "openvino": ("openvino", 'pip install "netslim[openvino]"'),
}
STATISTICS = {"median": statistics.median, "min": min}


def time_interleaved(
    functions: dict[str, Callable[[], Any]],
    repeats: int = 20,
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
    stat: str = "median",
) -> dict[str, float]:
    """Seconds per call of each function (the ``stat`` of its timings), in interleaved rounds.

    Args:
        functions: name -> a function of no arguments (e.g. one forward pass).
        repeats: timed rounds; each function runs once per round.
        warmup: untimed calls of each function first (allocations, kernel selection).
        sync: called after each call before the clock stops (``torch.cuda.synchronize``
            for asynchronous devices).
        stat: ``"median"`` or ``"min"`` of each function's timings.
    """
    if repeats < 1:
        raise NetslimError(f"repeats must be >= 1, got {repeats}")
    if stat not in STATISTICS:
        raise NetslimError(f"unknown statistic {stat!r}; choose one of: {', '.join(STATISTICS)}")
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - start)
    return {name: STATISTICS[stat](t) for name, t in times.items()}


def runtime_version(runtime: str) -> str:
    """The installed version of ``runtime``'s package; one line naming how to install it
    when it is missing."""
    if runtime not in RUNTIMES:
        raise NetslimError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    package, install = RUNTIME_PACKAGES[runtime]
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise NetslimError(f"runtime {runtime} is not installed: {install}") from None


def forward_on(
    runtime: str,
    model: nn.Module,
    x: torch.Tensor,
    device: torch.device | str = "cpu",
    onnx: bytes | None = None,
) -> Callable[[], Any]:
    """A function of no arguments running ``model`` on ``x`` in ``runtime``.

    ``torch``: eager, under ``inference_mode``, channels_last, on ``device``; ``onnxruntime``
    and ``openvino``: on the CPU with as many threads as PyTorch uses, from the network's
    ONNX export (``onnx``, when already written). ``openvino`` loads OpenVINO into this
    process, after which forks may crash: netslim's own timings run it through
    :func:`in_own_process`. The model should be deployed as timed
    (BatchNorm folded, :func:`netslim.engine.fold.fold_bn`).
    """
    runtime_version(runtime)
    if runtime == "torch":
        return _torch_forward(model, x.to(device))
    from netslim.export import DEFAULT_OPSET, FORMATS

    x = x.cpu()
    if onnx is None:
        onnx = FORMATS["onnx"].write(model.cpu(), x[:2], DEFAULT_OPSET)
    return (_onnxruntime_forward if runtime == "onnxruntime" else _openvino_forward)(onnx, x)


def _torch_forward(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    if x.dim() == 4:
        model = model.to(x.device, memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        model = model.to(x.device)

    def forward() -> Any:
        with torch.inference_mode():
            return model(x)

    return forward


def _onnxruntime_forward(onnx: bytes, x: torch.Tensor) -> Callable[[], Any]:
    from netslim.export import onnx_session

    session = onnx_session(onnx, threads=torch.get_num_threads(), spinning=False)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def in_own_process(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a fresh Python process (spawned), its result returned.

    OpenVINO runs only there: its threading runtime (TBB), once loaded into netslim's
    process, crashed later forks there (a DataLoader's workers died with a segmentation
    fault in the test suite). ``function`` and ``args`` must pickle.
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def time_openvino(
    onnx: dict[str, bytes], x: Any, repeats: int, stat: str, threads: int
) -> dict[str, float]:
    """Seconds per call of each ONNX network on OpenVINO, interleaved as
    :func:`time_interleaved` times them; meant for :func:`in_own_process`."""
    torch.set_num_threads(threads)
    functions = {
        name: _openvino_forward(model, torch.from_numpy(x)) for name, model in onnx.items()
    }
    return time_interleaved(functions, repeats, stat=stat)


def _openvino_forward(onnx: bytes, x: torch.Tensor) -> Callable[[], Any]:
    import openvino

    core = openvino.Core()
    settings = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(core.read_model(onnx), "CPU", settings)
    request, feed = compiled.create_infer_request(), {0: x.numpy()}
    return lambda: request.infer(feed)


@dataclass
class Timing:
    """One network at one batch size in one runtime."""

    name: str
    runtime: str
    batch: int
    macs: int  # per image
    params: int
    latency_ms: float  # per batch: the median (or minimum) of the timed rounds
    images_per_s: float
    speedup: float  # against the first network, same runtime and batch
    macs_reduction: float  # the first network's MACs / this one's
    efficiency: float  # speedup / macs_reduction

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def benchmark(
    models: dict[str, nn.Module],
    batches: tuple[int, ...] = (1, 64),
    runtimes: tuple[str, ...] = ("torch",),
    *,
    repeats: int = 20,
    image_size: int | tuple[int, int] = 32,
    device: torch.device | str = "cpu",
    stat: str = "median",
    progress: Callable[[str], None] | None = None,
) -> list[Timing]:
    """Time every network at every batch size in every runtime, side by side.

    The first network is the baseline of the speed-ups. All are evaluated in fp32 with
    BatchNorm folded; ``torch`` runs eagerly under ``inference_mode`` in channels_last on
    ``device``, ``onnxruntime`` on the CPU with as many threads as PyTorch uses.
    ``stat`` is the statistic of the timed rounds (see :func:`time_interleaved`).
    ``progress`` is called with a line before each step (folding, and each runtime and
    batch size timed), so that a long measurement says what it is doing.
    """
    say = progress or (lambda line: None)
    if not runtimes:
        raise NetslimError(f"give a runtime; choose from: {', '.join(RUNTIMES)}")
    for runtime in runtimes:
        runtime_version(runtime)
    if not models:
        raise NetslimError("give at least one network to benchmark")
    if any(b < 1 for b in batches) or not batches:
        raise NetslimError(f"batch sizes must be >= 1, got {list(batches)}")
    device = torch.device(device)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    size = (1, 3, height, width)
    say(f"folding BatchNorm and counting MACs of {len(models)} networks at {height}x{width}")
    folded = {
        name: for_deployment(fold_bn(m.float().cpu().eval(), size)) for name, m in models.items()
    }
    macs = {name: count_macs(m, size) for name, m in folded.items()}
    params = {name: count_params(m) for name, m in models.items()}
    base = next(iter(models))
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timings = []
    steps = [(runtime, batch) for runtime in runtimes for batch in batches]
    for step, (runtime, batch) in enumerate(steps, 1):
        say(
            f"[{step}/{len(steps)}] {runtime}, batch {batch}: {len(folded)} networks, "
            f"{repeats} interleaved rounds"
        )
        x = torch.randn(batch, *size[1:], generator=torch.Generator().manual_seed(0))
        if runtime == "openvino":  # in a process of its own (in_own_process)
            from netslim.export import DEFAULT_OPSET, FORMATS

            onnx = {n: FORMATS["onnx"].write(m, x[:2], DEFAULT_OPSET) for n, m in folded.items()}
            args = (onnx, x.numpy(), repeats, stat, torch.get_num_threads())
            seconds = in_own_process(time_openvino, *args)
        else:
            functions = {name: forward_on(runtime, m, x, device) for name, m in folded.items()}
            seconds = time_interleaved(
                functions, repeats, sync=sync if runtime == "torch" else None, stat=stat
            )
        for name, s in seconds.items():
            speedup, reduction = seconds[base] / s, macs[base] / macs[name]
            timings.append(
                Timing(
                    name,
                    runtime,
                    batch,
                    macs[name],
                    params[name],
                    1000 * s,
                    batch / s,
                    speedup,
                    reduction,
                    speedup / reduction,
                )
            )
    return timings


def format_table(timings: list[Timing]) -> str:
    """The timings as an aligned text table."""
    width = max([len(t.name) for t in timings] + [7])
    header = (
        f"{'network':<{width}} {'runtime':<11} {'batch':>5} {'MACs':>9} {'params':>10} "
        f"{'ms':>9} {'images/s':>9} {'speed-up':>8} {'MACs ×':>7} {'effic.':>6}"
    )
    lines = [header]
    for t in timings:
        lines.append(
            f"{t.name:<{width}} {t.runtime:<11} {t.batch:>5} {t.macs / 1e6:>8.1f}M "
            f"{t.params:>10,} {t.latency_ms:>9.2f} {t.images_per_s:>9.0f} {t.speedup:>7.2f}× "
            f"{t.macs_reduction:>6.2f}× {t.efficiency:>6.2f}"
        )
    return "\n".join(lines)
