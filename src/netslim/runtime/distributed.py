"""Data-parallel training under ``torchrun``: process group, ranks, shards, reductions.

``torchrun --nproc_per_node N -m netslim train ...`` starts N copies of netslim, each
with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in its environment. :func:`session`
joins them into one process group (NCCL on CUDA GPUs, gloo on the CPU); without
``WORLD_SIZE > 1`` nothing is initialised and every helper here is a no-op, so the
single-process code path is the same code.

How the work is split:

* ``--batch-size`` is the *global* batch, summed over all processes, so the recipe
  (learning rate, steps per epoch) does not change with the number of processes. Each
  process trains on its slice of every global batch; the batch size must divide by the
  number of processes.
* Every process draws the same epoch permutation and augmentation from the same seed,
  so together the slices are exactly the batches a single process would train on.
* DistributedDataParallel averages gradients across processes inside ``backward()``;
  the L1 term ``lam * sign(gamma)`` is then added on every process to identical
  gradients and identical gammas, so the parameters stay identical.
* BatchNorm normalises each process's slice (with ``--sync-bn``, on GPUs, the global
  batch); before each evaluation every process takes rank 0's running statistics, the
  ones that are saved. The last, partial batch of an epoch is split as evenly as it
  goes (slices differ by at most one image, and DDP weighs them equally).
* Loss, accuracy and image counts are summed over processes before they are logged,
  and each process evaluates a contiguous block of the test split.
* Only rank 0 writes files and prints.

A process that fails makes ``torchrun`` stop the others; a process that waits on a
collective operation longer than the timeout (``NETSLIM_DIST_TIMEOUT`` minutes,
default 30) fails instead of hanging forever.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from netslim.errors import NetslimError

DEFAULT_TIMEOUT_MINUTES = 30.0
T = TypeVar("T")


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank, 0 to ``world_size() - 1`` (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """How many processes train together (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the one process that writes files and prints: rank 0."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment asks for more than one process (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_minutes() -> float:
    """The collective-operation timeout from ``NETSLIM_DIST_TIMEOUT`` (minutes), default 30."""
    text = os.environ.get("NETSLIM_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise NetslimError(
            f"NETSLIM_DIST_TIMEOUT must be a positive number of minutes, got {text!r}"
        )
    return minutes


def init(device: str = "auto") -> None:
    """Join the process group that ``torchrun`` set up, if there is one.

    Uses NCCL when this process trains on a CUDA GPU (``cuda:LOCAL_RANK``), gloo
    otherwise. Does nothing without ``WORLD_SIZE > 1`` or when already initialised.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return
    missing = [
        k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise NetslimError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: start netslim with "
            "torchrun (e.g. torchrun --nproc_per_node 2 -m netslim train ...), which sets them all"
        )
    timeout = datetime.timedelta(minutes=timeout_minutes())
    if uses_cuda(device):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def uses_cuda(device: str) -> bool:
    """Whether ``--device`` (``auto``, ``cuda``, ``cuda:N``, ``cpu``, ...) means a CUDA GPU."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def local_device(device: str) -> str:
    """The device this process trains on: ``cuda:LOCAL_RANK`` for a CUDA device under torchrun.

    Each process on a machine gets its own GPU; any other device name is kept as it is.
    """
    if is_distributed() and uses_cuda(device):
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def shutdown() -> None:
    """Leave the process group (after every rank has finished its work)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[None]:
    """Run the body inside the process group (if torchrun started this process), then leave it."""
    init(device)
    try:
        yield
    finally:
        shutdown()


def barrier() -> None:
    """Wait until every process gets here (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. a download), then the other ranks run it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run ``fn`` on rank 0 alone while the other processes wait for it to finish.

    Returns its result on rank 0, None elsewhere. For work that only one process should
    do (pruning, writing a report) between stages that all processes share.
    """
    result = fn(*args, **kwargs) if is_main() else None
    barrier()
    return result


def main_log(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` on rank 0; on the other processes a log that says nothing (one speaks for all)."""
    return log if is_main() else _silent


def _silent(line: str) -> None:
    pass


def per_rank_batch(batch_size: int, world: int | None = None) -> int:
    """The images each process trains on per step: ``batch_size`` split over the processes.

    Raises NetslimError when the global batch size does not divide by the number of processes.
    """
    world = world_size() if world is None else world
    if batch_size % world:
        raise NetslimError(
            f"--batch-size {batch_size} does not divide by the {world} processes: it is the "
            f"global batch, split evenly over them; use a multiple of {world}, "
            f"e.g. {batch_size + world - batch_size % world}"
        )
    return batch_size // world


def shard_range(n: int) -> tuple[int, int]:
    """``(start, stop)`` of this process's contiguous block of ``n`` items, sizes within one."""
    world, r = world_size(), rank()
    return r * n // world, (r + 1) * n // world


def shard_batches(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's slice of each global batch; a batch smaller than the world is skipped.

    Every process must iterate the same global batches (same seed); a slice may be at
    most one image smaller than another (only in the last, partial batch).
    """
    world = world_size()
    for x, y in batches:
        if world == 1:
            yield x, y
        elif len(y) >= world:  # a process with no images could not run BatchNorm
            start, stop = shard_range(len(y))
            yield x[start:stop], y[start:stop]


def sum_over_ranks(*values: float | torch.Tensor) -> list[float]:
    """The sums of ``values`` over all processes, as Python floats (one reduction)."""
    flat = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().cpu() for v in values])
    if is_distributed():
        # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
        device = torch.device("cuda", torch.cuda.current_device()) if _nccl() else "cpu"
        flat = flat.to(device)
        dist.all_reduce(flat)
    return flat.cpu().tolist()


def _nccl() -> bool:
    return is_distributed() and dist.get_backend() == "nccl"


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics).

    DDP copies rank 0's buffers at the start of each training forward, but each
    process then updates its own from its own slice; evaluating and saving after an
    epoch must use one set, the one rank 0 saves.
    """
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def wrap_model(model: nn.Module, sync_bn: bool = False) -> nn.Module:
    """The module to train: ``model`` itself alone, DistributedDataParallel under torchrun.

    ``sync_bn`` turns every BatchNorm into a SyncBatchNorm first (in place), which
    normalises over the global batch instead of each process's slice; PyTorch has it
    for GPUs only. Parameters and state_dict keys stay those of ``model``.
    """
    if not is_distributed():
        return model
    device = next(model.parameters()).device
    if sync_bn:
        if device.type == "cpu":
            raise NetslimError(
                "--sync-bn needs GPUs (PyTorch's SyncBatchNorm does not run on the CPU); "
                "drop it: each process then normalises its own slice of the batch"
            )
        _convert_children_to_sync_bn(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _convert_children_to_sync_bn(model: nn.Module) -> None:
    # convert_sync_batchnorm returns a new module only when the root itself is a
    # BatchNorm; for a network it swaps the children in place, which keeps ``model``
    # (the module that is saved) the one being trained.
    for name, child in model.named_children():
        setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))


def mean_over_ranks(means: tuple[float, ...], count: int) -> tuple[float, ...]:
    """Means over all processes' items from each process's ``means`` over its ``count`` items.

    Unchanged in a single process.
    """
    if not is_distributed():
        return means
    *sums, total = sum_over_ranks(*(m * count for m in means), count)
    return tuple(s / total for s in sums)


def rank_from_env() -> int:
    """The rank torchrun gave this process (``RANK``), readable before and after the group."""
    return int(os.environ.get("RANK", "0"))
