"""Sparsity training and fine-tuning: one explicit loop, the paper's recipe as defaults.

The loop keeps everything on the training device: batches come from one uint8 tensor
(see :mod:`netslim.data`), losses and correct counts are summed on the device and read
once per epoch, so a GPU never waits for the host. After ``backward()`` the L1
sub-gradient ``lam * sign(gamma)`` is added to every BatchNorm gamma (on unscaled
gradients when fp16 loss scaling is on), then SGD steps.

Each epoch appends one record to ``metrics.jsonl`` in the run folder and writes
``last.pth`` and, when test accuracy improved, ``best.pth``; every file is written
atomically. ``resume=True`` continues from ``last.pth`` and reproduces the
uninterrupted run exactly: an epoch's shuffling and augmentation depend only on
``(seed, epoch)``, the learning rate only on the epoch and step
(:mod:`netslim.recipes`), and λ and early pruning's state are saved (:mod:`netslim.control`).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from netslim import control, distributed, recipes
from netslim.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from netslim.data import Dataset, eval_batches, num_batches, train_batches
from netslim.errors import NetslimError
from netslim.files import atomic_write_text
from netslim.models import VGG, num_outputs
from netslim.sparsity import add_bn_l1_grad, bn_sparsity, gamma_quantiles
from netslim.surgery import channel_counts

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in its checkpoints."""

    arch: str = "vgg19"
    dataset: str = "cifar10"
    data_root: str = "data"
    lam: float = 0.0
    epochs: int = 160
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    sparsity_threshold: float = 0.01
    precision: str = "auto"
    device: str = "auto"
    eval_batch_size: int = 1000
    compile: bool = False  # torch.compile the model for training and evaluation
    train_size: int | None = None
    test_size: int | None = None
    image_size: int = 32  # imagefolder datasets are resized to this
    resize: str = "crop"  # and how: see netslim.imagefolder
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm over the global batch
    # The recipe's settings (netslim.recipes): its name, and the values it resolved to.
    recipe: str = "paper"
    schedule: str = "step"
    warmup_epochs: float = 0.0
    nesterov: bool = False
    label_smoothing: float = 0.0
    # Decisions between epochs (netslim.control): λ chosen for the user, early pruning.
    lam_auto: bool = False
    target_ratio: float | None = None
    prune_when_stable: float | None = None
    stable_tol: float = 0.02
    stable_epochs: int = 3

    def check(self) -> None:
        """Raise NetslimError naming the first setting that makes no sense."""
        if not self.lam >= 0:  # also catches NaN
            raise NetslimError(f"--lam must be >= 0 (the L1 weight on BN gammas), got {self.lam}")
        if self.epochs < 1:
            raise NetslimError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise NetslimError("--batch-size must be at least 1")
        if not self.lr > 0:
            raise NetslimError(f"--lr must be > 0, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise NetslimError(
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        recipes.check_schedule(self)
        control.check_config(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def pick_device(name: str = "auto") -> torch.device:
    """``'auto'`` picks CUDA, then Apple MPS, then the CPU; any torch device name works too."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NetslimError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NetslimError(
            "--device cuda was asked for but no CUDA GPU is available; use --device cpu"
        )
    return device


def pick_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    ``auto`` is bf16 where it is fast and safe (CUDA GPUs with bf16, CPUs with AVX512-BF16
    or AMX), fp32 elsewhere. BatchNorm runs in fp32 under autocast either way.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_at(epoch: int, base_lr: float, epochs: int) -> float:
    """The paper's step schedule: divide by 10 at 50% and at 75% of the epochs (integer milestones)."""
    milestones = (epochs // 2, (epochs * 3) // 4)
    return base_lr * 0.1 ** sum(epoch >= m for m in milestones)


class Progress:
    """A one-line progress bar on stderr, shown only when stdout is a terminal."""

    def __init__(self, total: int, label: str):
        self.total, self.label = total, label
        self.enabled = sys.stdout.isatty() and distributed.is_main()
        self.start = time.perf_counter()

    def update(self, step: int) -> None:
        if not self.enabled or (step % 10 and step != self.total):
            return
        done = step / self.total
        bar = "#" * int(30 * done)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done - elapsed if done else 0.0
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {step}/{self.total}  eta {eta:4.0f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()


def train_epoch(
    model: nn.Module,
    data: Dataset,
    optimizer: torch.optim.Optimizer,
    *,
    lam: float,
    batch_size: int,
    generator: torch.Generator,
    dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
    label: str = "train",
    label_smoothing: float = 0.0,
    lr_of_step: Callable[[int], float] | None = None,
) -> tuple[float, float]:
    """One epoch of (sparsity) training; returns (mean loss, accuracy in %).

    ``lr_of_step(step)`` (0-based), when given, sets the learning rate before each step.
    """
    device = data.device
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    total = 0
    progress = Progress(num_batches(len(data.train_labels), batch_size), label)
    for step, (x, y) in enumerate(_train_batches(data, batch_size, generator), start=1):
        if lr_of_step is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_of_step(step - 1)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the L1 term must see true gradients
            add_bn_l1_grad(model, lam)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            add_bn_l1_grad(model, lam)
            optimizer.step()
        loss_sum += loss.detach().float() * len(y)
        correct += (out.argmax(1) == y).sum()
        total += len(y)
        progress.update(step)
    progress.close()
    loss_sum, correct, total = distributed.sum_over_ranks(loss_sum, correct, total)
    return loss_sum / total, 100.0 * correct / total


def _train_batches(
    data: Dataset, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's share of one epoch's batches (all of them in a single process).

    ``data`` is a Dataset in memory or an ImageFolderStream (see :mod:`netslim.imagefolder`).
    """
    if isinstance(data, Dataset):
        return distributed.shard_batches(train_batches(data, batch_size, generator))
    return data.train_batches(batch_size, generator)  # a stream reads only its own share


def _test_shard(data: Dataset) -> Dataset:
    """``data`` with only this process's contiguous block of the test split."""
    start, stop = distributed.shard_range(len(data.test_labels))
    if stop == start:
        raise NetslimError(
            f"the test split has {len(data.test_labels)} images, fewer than the "
            f"{distributed.world_size()} processes; use more test images or fewer processes"
        )
    if isinstance(data, Dataset):
        return replace(data, test_images=data.test_images[start:stop],
                       test_labels=data.test_labels[start:stop])  # fmt: skip
    return data.test_shard(start, stop)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: Dataset,
    batch_size: int = 1000,
    dtype: torch.dtype | None = None,
    split: str = "test",
) -> tuple[float, float]:
    """Mean loss and accuracy (%) of ``model`` on a split of ``data``, in eval mode."""
    device = data.device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    total = 0
    batches = (
        eval_batches(data, batch_size, split=split)
        if isinstance(data, Dataset)
        else data.eval_batches(batch_size, split=split)
    )
    for x, y in batches:
        with autocast(device, dtype):
            out = model(x.contiguous(memory_format=torch.channels_last))
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        total += len(y)
    model.train(was_training)
    return loss_sum.item() / total, 100.0 * correct.item() / total


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run folder's ``metrics.jsonl`` (empty if there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def changed_settings(
    saved: dict[str, Any], now: dict[str, Any], where: str, ignore: tuple[str, ...] = ("device",)
) -> list[str]:
    """Each setting of ``now`` that differs from ``saved``, as ``"lr (0.1 in the run, 0.5 now)"``.

    Settings in ``ignore`` may change freely (where a run executes does not change its result).
    """
    return [
        f"{key} ({saved.get(key)!r} in {where}, {value!r} now)"
        for key, value in now.items()
        if key not in ignore and saved.get(key) != value
    ]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, as the paper trains.

    The fused kernel (one pass over all parameters) is the same update, 2-8% faster per
    VGG-19 step on a 2-core CPU (bench/RESULTS.md); it exists for CPU and CUDA tensors.
    """
    device = next(model.parameters()).device
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.nesterov,
                           fused=True if device.type in ("cpu", "cuda") else None)  # fmt: skip


def _epoch_line(r: dict[str, Any]) -> str:
    return (
        f"epoch {r['epoch']:3d}/{r['epochs']}  lr {r['lr']:.4g}  "
        f"train loss {r['train_loss']:.3f} acc {r['train_acc']:5.1f}%  "
        f"test loss {r['test_loss']:.3f} acc {r['test_acc']:5.1f}%  "
        f"sparsity {100 * r['sparsity']:5.1f}%  {r['seconds']:.1f}s ({r['images_per_s']:.0f} img/s)"
    )


def fit(
    config: TrainConfig,
    data: Dataset,
    model: nn.Module,
    out_dir: str | Path,
    *,
    meta: dict[str, Any] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``data`` as ``config`` says, writing the run folder ``out_dir``.

    Args:
        config: the recipe (epochs, lr, lam, ...).
        data: the dataset, already on the training device (or an image folder streamed
            from disk, :class:`netslim.imagefolder.ImageFolderStream`).
        model: the network to train (moved to the data's device); replaced by the one
            in ``last.pth`` when resuming.
        out_dir: run folder for ``metrics.jsonl``, ``last.pth`` and ``best.pth``.
        meta: extra metadata stored in the checkpoints (e.g. ``{'arch': 'vgg19'}``).
        resume: continue from ``out_dir/last.pth`` instead of starting anew.
        log: where the per-epoch lines go.

    Returns:
        The metrics records of all epochs of the run (earlier ones too, when resumed).
    """
    config.check()
    distributed.per_rank_batch(config.batch_size)  # fails early if it does not split evenly
    if len(data.train_labels) < distributed.world_size():
        raise NetslimError(
            f"the training set has {len(data.train_labels)} images, fewer than the "
            f"{distributed.world_size()} processes; use fewer processes or more images"
        )
    log = distributed.main_log(log)
    out = Path(out_dir)
    device = data.device
    dtype = pick_precision(config.precision, device)
    if num_outputs(model) != data.num_classes:
        raise NetslimError(
            f"the model has {num_outputs(model)} outputs but dataset "
            f"{data.name} has {data.num_classes} classes; use a matching --dataset"
        )
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    history: list[dict[str, Any]] = []
    start_epoch, best_acc = 0, 0.0
    controls = control.SparsityControl(config)  # λ of each epoch; early pruning's stop
    if resume:
        last = out / "last.pth"
        if not last.exists():
            raise NetslimError(
                f"cannot resume: {last} does not exist; start the run without --resume"
            )
        ckpt = read_checkpoint(last)
        saved = asdict(TrainConfig.from_dict(ckpt["netslim"]["config"]))
        changed = changed_settings(saved, asdict(config), "the run", ignore=("device", "compile"))
        if changed:
            raise NetslimError(
                f"cannot resume {out}: settings differ from the run's: {', '.join(changed)}; "
                "resume with the original settings (see its config.json)"
            )
        model = model_from_checkpoint(ckpt, str(last)).to(device, memory_format=torch.channels_last)
        optimizer = make_optimizer(model, config)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best_acc = int(ckpt["epoch"]), 100.0 * float(ckpt["best_prec1"])
        history = list(ckpt["netslim"]["history"])
        if scaler is not None and ckpt["netslim"].get("scaler"):
            scaler.load_state_dict(ckpt["netslim"]["scaler"])
        controls.load_state_dict(ckpt["netslim"].get("control"))
        log(f"resuming {out} after epoch {start_epoch}/{config.epochs}")
    elif (out / "last.pth").exists():
        raise NetslimError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    # Every process has checked the folder (and read last.pth) before rank 0 writes to it.
    distributed.barrier()
    # DDP and the compiled module share their parameters with ``model``, which is what
    # gets saved. Evaluation runs on each process alone, so never through DDP.
    train_model = distributed.wrap_model(model, config.sync_bn)
    run_model = torch.compile(train_model) if config.compile else train_model
    eval_model = run_model if train_model is model else model
    test_shard = _test_shard(data)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(asdict(config), indent=2) + "\n")

    steps = num_batches(len(data.train_labels), config.batch_size)
    for epoch in range(start_epoch, config.epochs):
        if controls.stopped:  # early pruning ended sparsity training in an earlier run
            break
        lr = recipes.lr_at_step(config, epoch, 0, steps)
        # Shuffling and augmentation depend only on (seed, epoch): resumed runs repeat them.
        generator = torch.Generator(device=device).manual_seed(config.seed * 100_003 + epoch)
        t0 = time.perf_counter()
        train_loss, train_acc = train_epoch(
            run_model, data, optimizer, lam=controls.lam, batch_size=config.batch_size,
            generator=generator, dtype=dtype, scaler=scaler,
            label=f"epoch {epoch + 1}/{config.epochs}", label_smoothing=config.label_smoothing,
            lr_of_step=lambda step, e=epoch: recipes.lr_at_step(config, e, step, steps),
        )  # fmt: skip
        train_seconds = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            kept = (
                f"{out / 'last.pth'} (epoch {epoch})"
                if epoch > 0
                else "none (it was the first epoch)"
            )
            raise NetslimError(
                f"training diverged: the loss became {train_loss} in epoch {epoch + 1}; stopped. "
                f"Last good checkpoint: {kept}. Try a lower --lr or --lam, or --precision fp32."
            )
        distributed.broadcast_buffers(model)  # evaluate and save rank 0's BN statistics
        test_loss, test_acc = evaluate(eval_model, test_shard, config.eval_batch_size, dtype)
        test_loss, test_acc = distributed.mean_over_ranks(
            (test_loss, test_acc), len(test_shard.test_labels)
        )
        record = {
            "epoch": epoch + 1, "epochs": config.epochs, "lr": lr,
            "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": test_loss, "test_acc": test_acc,
            "sparsity": bn_sparsity(model, config.sparsity_threshold),
            "gamma_quantiles": gamma_quantiles(model),
            "seconds": time.perf_counter() - t0,
            "images_per_s": len(data.train_labels) / train_seconds,
        }  # fmt: skip
        controls.end_epoch(model, record)  # adds "lam" (and the mask distance)
        history.append(record)
        is_best = test_acc > best_acc
        best_acc = max(best_acc, test_acc)
        checkpoint = {
            "epoch": epoch + 1,
            "state_dict": {k: v.contiguous() for k, v in model.state_dict().items()},
            "best_prec1": best_acc / 100.0,  # a fraction, as the official code stores it
            "optimizer": optimizer.state_dict(),
            "channels": channel_counts(model),
            "netslim": {**(meta or {}), "config": asdict(config), "history": history,
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "control": controls.state_dict()},
        }  # fmt: skip
        if isinstance(model, VGG):
            checkpoint["cfg"] = list(model.cfg)  # what the paper's code reads
        if distributed.is_main():
            save_checkpoint(checkpoint, out / "last.pth")
            if is_best:
                save_checkpoint(checkpoint, out / "best.pth")
            atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        distributed.barrier()  # no process reads the run folder before rank 0 has written it
        log(_epoch_line(record))
        if controls.stopped:
            log(f"the prune mask at ratio {config.prune_when_stable:g} has settled: "
                f"sparsity training stopped after epoch {epoch + 1}")  # fmt: skip
            break
    return history
