"""Checks before the engine runs a network: what it cannot trace, and what pruning would cost.

Each fails in one line at once instead of after minutes, or with a traceback from deep
inside torch:

* a network compiled with ``torch.compile`` (its forward runs through Dynamo, which the
  tracer cannot follow: it failed after 70 s);
* modules nested deeper than Python's recursion limit allows (copying a network takes
  about :data:`FRAMES_PER_LEVEL` frames per level of nesting);
* an input size at which pruning would need more memory than the machine has, or more time
  than a bound: :func:`estimate_prune_cost` runs the network at two small sizes and scales
  the time and the activation bytes it measures by the number of pixels.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from netslim import limits
from netslim.engine.graph import tensors
from netslim.engine.rules import Rules, default_rules
from netslim.errors import NetslimError

# copy.deepcopy's frames per level of module nesting (deepcopy, _reconstruct, _deepcopy_dict
# for the module's __dict__ and for its _modules): more than a forward pass takes
FRAMES_PER_LEVEL = 6

# Calibration of the estimate (bench/deep_chain.py --yolo prints estimate and measurement
# side by side). Pruning (trace, surgery, the check after it, MAC counts) took 25 to 37 times
# a plain forward pass's per-pixel time (yolov8n at 1280 and 2048 px), and about 150 times
# its per-op time (a 1,000-layer chain at 8x8: the replay of each op). Its peak memory grew
# by 1.4 to 1.5 times the bytes of every tensor one forward pass makes (the trace keeps them
# all; yolov8n at 320 to 1280 px, resnet18 at 448), plus fixed costs.
PIXEL_PASSES = 30
OP_PASSES = 150
MEMORY_FACTOR = 2
COPIES = 2  # the network's own tensors: the pruned copy and the reference copy
# The highest recursion limit the error suggests: pruning a 1,500-deep nesting at a limit of
# 9,150 worked; a 10,000-deep one at 60,111 overflowed the C stack (a segmentation fault).
SAFE_RECURSION_LIMIT = 10_000
PROBE_SIDE = 128  # the larger probe's longest sides; the smaller probe has half of them


def nesting_depth(model: nn.Module) -> int:
    """How deep ``model``'s modules nest (0: no children), found without recursion."""
    deepest, seen, todo = 0, set(), [(model, 0)]
    while todo:
        module, depth = todo.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        deepest = max(deepest, depth)
        todo.extend((child, depth + 1) for child in module._modules.values() if child is not None)
    return deepest


def _frames_in_use() -> int:
    frame, count = sys._getframe(), 0
    while frame is not None:
        frame, count = frame.f_back, count + 1
    return count


def recursion_error(model: nn.Module) -> NetslimError:
    """The error for a network nested too deep for Python's recursion limit."""
    depth, limit = nesting_depth(model), sys.getrecursionlimit()
    need = max(_frames_in_use() + FRAMES_PER_LEVEL * depth + 100, limit + 1)
    # a much higher limit overflows the C stack instead (a 10,000-deep nesting crashed so)
    raise_it = (
        f", or raise the limit with sys.setrecursionlimit({need}) before pruning"
        if need <= SAFE_RECURSION_LIMIT
        else ""
    )
    return NetslimError(
        f"Python's recursion limit ({limit}) is too low to prune {type(model).__name__}, whose "
        f"modules nest {depth} deep; flatten the nesting (one nn.Sequential of the blocks "
        f"rather than each block holding the next){raise_it}"
    )


def check_nesting(model: nn.Module) -> None:
    """NetslimError when copying ``model`` would exceed Python's recursion limit."""
    need = _frames_in_use() + FRAMES_PER_LEVEL * nesting_depth(model)
    if need > sys.getrecursionlimit():
        raise recursion_error(model)


def check_not_compiled(model: nn.Module) -> None:
    """NetslimError when ``model`` or one of its modules was compiled with ``torch.compile``
    (or ``module.compile()``): Dynamo runs its forward, and the tracer cannot follow it."""
    if "torch._dynamo" not in sys.modules:  # nothing can have been compiled
        return
    from torch._dynamo.eval_frame import OptimizedModule

    for name, module in model.named_modules():
        if isinstance(module, OptimizedModule):
            which = "the network" if not name else f"its module {name}"
            raise NetslimError(
                f"{which} was compiled with torch.compile, whose forward the pruning engine "
                f"cannot trace; prune the module before compiling it "
                f"({'model' if not name else 'model.' + name}._orig_mod), then compile the "
                "pruned network"
            )
        if getattr(module, "_compiled_call_impl", None) is not None:
            which = "the network" if not name else f"its module {name}"
            raise NetslimError(
                f"{which} was compiled in place (.compile()), whose forward the pruning engine "
                "cannot trace; prune a copy built without .compile(), then compile the pruned "
                "network"
            )


@dataclass
class PruneCost:
    """What pruning at one input size is estimated to take.

    Attributes:
        seconds: wall-clock seconds, on this machine as it runs now.
        peak_bytes: the most memory (bytes) pruning holds at once, beyond the network itself.
        probes: the two small ``(H, W)`` sizes the network was run at.
    """

    seconds: float
    peak_bytes: int
    probes: tuple[tuple[int, int], tuple[int, int]]


class _Bytes(TorchFunctionMode):
    """Adds up the bytes of every tensor the ops make, keeping them alive (so that no
    storage is counted twice, or freed and its address reused)."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        value = func(*args, **(kwargs or {}))
        for t in tensors(value):
            self.kept.setdefault(t.untyped_storage().data_ptr(), t)
        return value

    @property
    def total(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.kept.values())


def _probe(
    model: nn.Module, size: tuple[int, ...], rules: Rules | None = None
) -> tuple[float, int]:
    """The bytes of the tensors a forward pass of ``model`` at ``size`` makes, and its
    seconds (the best of two runs after that one, which also warms up)."""
    rules = rules or default_rules()
    param = next(model.parameters())
    x = torch.zeros(size, device=param.device, dtype=param.dtype)
    counter = _Bytes()
    with counter:
        model(*rules.model_inputs(model, x))
    nbytes, best = counter.total, float("inf")
    del counter
    for _ in range(2):
        start = time.perf_counter()
        model(*rules.model_inputs(model, x))
        if param.device.type == "cuda":
            torch.cuda.synchronize(param.device)
        best = min(best, time.perf_counter() - start)
    return best, nbytes


def _fit(values: tuple[float, float], pixels: tuple[int, int]) -> tuple[float, float]:
    """``(fixed, per_pixel)`` of the line through two measurements at two pixel counts, both
    at least 0. No growth means a constant (a torchvision detector resizes every input to
    800 px itself)."""
    slope = (values[1] - values[0]) / (pixels[1] - pixels[0])
    if slope <= 0:
        return max(values), 0.0
    return max(values[1] - slope * pixels[1], 0.0), slope


def _probes(
    model: nn.Module, *sizes: tuple[int, ...], rules: Rules | None = None
) -> list[tuple[float, int]] | None:
    """:func:`_probe` at each size in eval mode (the modes restored after); None when the
    network does not run at one of them (Inception-v3 needs at least 75x75)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng([]):
            return [_probe(model, size, rules) for size in sizes]
    except Exception:
        return None
    finally:
        for m, training in modes.items():
            m.training = training


def estimate_prune_cost(
    model: nn.Module, input_size: tuple[int, ...], rules: Rules | None = None
) -> PruneCost | None:
    """Estimate the time and peak memory of pruning ``model`` at ``input_size`` (N, C, H, W).

    Runs ``model`` in eval mode (restored after) at two small sizes, (H, W) each cut to at
    most half of :data:`PROBE_SIDE` and then :data:`PROBE_SIDE` (twice those where the
    network does not run so small), and extrapolates by the number of pixels. None when the
    input is no larger than the probes (nothing to bound), or when the network does not run
    at the probe sizes (the trace then says why).
    """
    n, c, h, w = input_size
    for side in (PROBE_SIDE, 2 * PROBE_SIDE):  # larger probes for a network that needs them
        large = (min(h, side), min(w, side))
        small = (min(h, side // 2), min(w, side // 2))
        pixels = (small[0] * small[1], large[0] * large[1])
        if h * w <= pixels[1] or pixels[0] == pixels[1]:
            return None  # no larger than the probes: nothing to bound
        measured = _probes(model, (n, c, *small), (n, c, *large), rules=rules)
        if measured is not None:
            break
    else:
        return None  # the trace at the real size reports what is wrong, in one line
    (t0, b0), (t1, b1) = measured
    fixed, per_pixel = _fit((t0, t1), pixels)
    seconds = OP_PASSES * fixed + PIXEL_PASSES * per_pixel * h * w
    fixed_bytes, bytes_per_pixel = _fit((b0, b1), pixels)
    own = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    peak = MEMORY_FACTOR * (fixed_bytes + bytes_per_pixel * h * w) + COPIES * own
    return PruneCost(seconds, int(peak), (small, large))


def check_prune_cost(
    model: nn.Module,
    input_size: tuple[int, ...],
    max_seconds: float | None = None,
    rules: Rules | None = None,
) -> PruneCost | None:
    """NetslimError when pruning ``model`` at ``input_size`` is estimated to take more than
    half the memory there is, or more than ``max_seconds``
    (:func:`netslim.limits.prune_seconds_bound`); returns the estimate."""
    bound = limits.prune_seconds_bound(max_seconds)
    extra = {} if rules is None else {"rules": rules}  # (tests stand in a two-argument one)
    cost = estimate_prune_cost(model, input_size, **extra)
    if cost is None:
        return None
    (h0, w0), (h1, w1) = cost.probes
    what = (
        f"pruning {type(model).__name__} at input_size {tuple(input_size)} (estimated from runs "
        f"at {h0}x{w0} and {h1}x{w1})"
    )
    param = next(model.parameters(), None)
    memory = None  # this machine's RAM, or the GPU's memory where the network lives
    if param is not None and param.device.type == "cuda":
        memory = torch.cuda.get_device_properties(param.device).total_memory
    limits.check_prune_cost(cost.seconds, cost.peak_bytes, bound, what, memory)
    return cost
