"""How many CPU threads PyTorch computes with, and a hint when that is too many.

PyTorch's CPU kernels run on a pool of OpenMP threads, by default one per physical core.
When other work shares the cores, those threads wait on each other at every kernel's
barrier and training can slow several-fold (measured in bench/RESULTS.md); fewer threads
than cores then run faster. ``--threads N`` sets the pool; without it netslim keeps
``OMP_NUM_THREADS`` when set, and otherwise uses the physical cores this process may run
on (CPU affinity and a cgroup CPU quota count), shared among torchrun's local processes.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

from netslim.errors import NetslimError


def _cpu_quota() -> int | None:
    """The CPUs a cgroup v2 quota allows (``cpu.max``, e.g. docker --cpus), if there is one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.floor(int(quota) / int(period)))


@functools.cache
def _torch_default() -> int:
    """torch's own thread count before netslim changes it: OMP_NUM_THREADS, else the
    physical cores."""
    import torch

    return torch.get_num_threads()


def default_threads() -> int:
    """The thread count netslim uses when ``--threads`` is not given (see module docs)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return _torch_default()  # torch already follows it
    cores = _torch_default()
    if hasattr(os, "sched_getaffinity"):
        cores = min(cores, len(os.sched_getaffinity(0)))
    quota = _cpu_quota()
    if quota is not None:
        cores = min(cores, quota)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun processes here
    return max(1, cores // max(1, local))


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads (None: :func:`default_threads`); returns the count."""
    import torch

    _torch_default()  # remember it before changing it
    if threads is not None and threads < 1:
        raise NetslimError(f"--threads must be at least 1, got {threads}")
    count = default_threads() if threads is None else threads
    torch.set_num_threads(count)
    return count


def slowdown_hint(rate: float, first_rate: float, threads: int) -> str | None:
    """A hint when training runs at under a third of its first epoch's images/s, else None."""
    if not first_rate > 0 or rate >= first_rate / 3:
        return None
    note = f"note: {rate:.0f} images/s, under a third of the first epoch's {first_rate:.0f}"
    if threads == 1:
        return f"{note}: is the machine busy with other work?"
    fewer = max(1, threads // 2)
    return (
        f"{note}: on a busy machine {threads} CPU threads wait on each other; "
        f"try --threads {fewer} (or OMP_NUM_THREADS={fewer})"
    )
