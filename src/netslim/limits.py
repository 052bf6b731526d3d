"""Upper bounds on the sizes a user or a file asks for, checked before any work starts.

A size that cannot work on this machine should fail in one line at once, not after
minutes of swapping: an ``--image-size`` of 100000 grew an image decoder to 12 GB in a
minute, and ``--threads 1000`` started 1,896 threads on a 2-core machine. The bounds
are documented maxima (:data:`MAX_IMAGE_SIZE`) or read off the machine: the CPUs this
process may run on and its RAM. Torch-free, like :mod:`netslim.config`.
"""

from __future__ import annotations

import math
import os

from netslim.errors import NetslimError

MIN_IMAGE_SIZE = 8  # smaller maps vanish after a few stride-2 layers
# Detectors train at up to 1280-1536 px; 4096 leaves room and keeps one decoded image
# (48 MiB as uint8) and a batch's activations far from exhausting a machine.
MAX_IMAGE_SIZE = 4096
MEMORY_SHARE = 4  # a single buffer may take at most 1/4 of the RAM
# Pruning keeps every activation of its traced pass: its estimated peak may take at most
# 1/2 of the memory (the rest: the network's copies, the interpreter, the system).
PRUNE_MEMORY_SHARE = 2
# Pruning takes seconds at a network's training size; an estimate beyond this means a
# mistaken input size. Lifted by prune_model(max_seconds=...) or this variable.
MAX_PRUNE_SECONDS = 300.0
MAX_PRUNE_SECONDS_VARIABLE = "NETSLIM_MAX_PRUNE_SECONDS"


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def ram_bytes() -> int | None:
    """The machine's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_image_size(size: object, flag: str = "--image-size") -> int:
    """``size`` as an int, or NetslimError unless it is a whole number of pixels from
    :data:`MIN_IMAGE_SIZE` to :data:`MAX_IMAGE_SIZE`."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise NetslimError(f"{flag} must be a whole number of pixels, got {size!r}")
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise NetslimError(
            f"{flag} must be from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, got {size}"
        )
    return size


def check_count(value: object, flag: str, most: int, why: str) -> int:
    """``value`` as an int, or NetslimError unless ``1 <= value <= most`` (``why`` names the bound)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NetslimError(f"{flag} must be at least 1, got {value!r}")
    if value > most:
        raise NetslimError(f"{flag} {value} is more than {why} ({most}); use at most {most}")
    return value


def check_threads(threads: object, flag: str = "--threads") -> int:
    """A CPU thread count from 1 to the CPUs this process may use."""
    return check_count(threads, flag, cpu_count(), "the CPUs this process may use")


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """NetslimError when one buffer of ``nbytes`` would take more than a quarter of the RAM.

    ``what`` names the buffer ("a batch of 64 images of 4096x4096"), ``fix`` what to lower.
    """
    ram = ram_bytes()
    if ram is not None and nbytes > ram // MEMORY_SHARE:
        raise NetslimError(
            f"{what} takes {_gib(nbytes)} as float32, more than a quarter of this machine's "
            f"{_gib(ram)} of memory; {fix}"
        )


def check_batch_memory(batch: int, image_size: int, flag: str = "--batch-size") -> None:
    """Refuse a float32 input batch that could not fit (the activations are larger still)."""
    check_memory(
        4 * 3 * batch * image_size * image_size,
        f"a batch of {batch} images of {image_size}x{image_size}",
        f"lower {flag} or --image-size",
    )


def prune_seconds_bound(max_seconds: float | None = None) -> float:
    """The most seconds pruning may be estimated to take: ``max_seconds`` when given, else
    the environment variable :data:`MAX_PRUNE_SECONDS_VARIABLE`, else :data:`MAX_PRUNE_SECONDS`
    (``inf`` lifts the bound)."""
    what = "max_seconds"
    if max_seconds is None:
        text = os.environ.get(MAX_PRUNE_SECONDS_VARIABLE, "").strip()
        if not text:
            return MAX_PRUNE_SECONDS
        what = MAX_PRUNE_SECONDS_VARIABLE
        try:
            max_seconds = float(text)
        except ValueError:
            raise NetslimError(
                f"{what} must be a number of seconds (or inf), got {text!r}"
            ) from None
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)):
        raise NetslimError(f"{what} must be a number of seconds (or inf), got {max_seconds!r}")
    if not max_seconds > 0:  # NaN too
        raise NetslimError(
            f"{what} must be a positive number of seconds (or inf), got {max_seconds}"
        )
    return float(max_seconds)


def check_prune_cost(
    seconds: float, peak_bytes: int, max_seconds: float, what: str, memory: int | None = None
) -> None:
    """NetslimError when pruning is estimated to take more than half the memory
    (``memory``, default this machine's RAM) or more than ``max_seconds``.

    ``what`` names the pruning and how the estimate was made ("pruning YOLO at ... (estimated
    from runs at 64x64 and 128x128)").
    """
    memory = ram_bytes() if memory is None else memory
    fix = "pass a smaller input_size (the size the network trains at)"
    if memory is not None and peak_bytes > memory // PRUNE_MEMORY_SHARE:
        raise NetslimError(
            f"{what} would take about {_gib(peak_bytes)} of memory at its peak, more than half "
            f"of the {_gib(memory)} there is; {fix}"
        )
    if seconds > max_seconds:
        raise NetslimError(
            f"{what} would take about {_seconds(seconds)} here, more than the bound of "
            f"{_seconds(max_seconds)}; {fix}, or allow it with max_seconds={math.ceil(seconds)} "
            f"({MAX_PRUNE_SECONDS_VARIABLE}={math.ceil(seconds)} for the command line)"
        )


def _seconds(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds >= 10 else f"{seconds:.2g} s"


def _gib(nbytes: int) -> str:
    if nbytes >= 2**80:  # a size typed with hundreds of digits: too large for a float
        return f"about 10^{len(str(nbytes >> 30)) - 1} GiB"
    return f"{nbytes / 2**30:.3g} GiB" if nbytes >= 2**30 else f"{math.ceil(nbytes / 2**20)} MiB"
