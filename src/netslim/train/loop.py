"""Sparsity training and fine-tuning: one explicit loop, the paper's recipe as defaults.

The loop keeps everything on the training device: batches come from one uint8 tensor
(see :mod:`netslim.data`), losses and correct counts are summed on the device and read
once per epoch, so a GPU never waits for the host. After ``backward()`` the L1
sub-gradient ``lam * sign(gamma)`` is added to every BatchNorm gamma (on unscaled
gradients when fp16 loss scaling is on), then SGD steps.

Each epoch appends one record to ``metrics.jsonl`` in the run folder and writes
``best.pth`` (when test accuracy improved, and always after the first epoch) and then
``last.pth``; every file is written atomically, and in that order, so a ``last.pth``
never names a best epoch that is not on disk. ``resume=True`` continues from
``last.pth`` and reproduces the uninterrupted run exactly: an epoch's shuffling and
augmentation depend only on ``(seed, epoch)``, and the learning rate only on the epoch.

A run folder has one writer at a time (:mod:`netslim.train.runlock`). An epoch whose loss or
weights are not finite stops the run before anything of it is saved. The learning
rate depends only on the epoch and step (:mod:`netslim.recipes`), and λ and early
pruning's state are saved (:mod:`netslim.train.control`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from netslim import recipes
from netslim.checkpoint import model_from_checkpoint, save_checkpoint
from netslim.config import TrainConfig
from netslim.data.batches import ImageData, num_batches
from netslim.engine.sparsity import add_bn_l1_grad, batchnorms, bn_sparsity, gamma_quantiles
from netslim.engine.stats import nonfinite_tensors
from netslim.engine.surgery import channel_counts
from netslim.errors import NetslimError
from netslim.files import make_dirs, remove_temp_files, write_json
from netslim.limits import check_batch_memory
from netslim.models import VGG
from netslim.runtime import distributed, threads
from netslim.runtime.device import autocast, pick_precision
from netslim.train import control, runlock
from netslim.train.distill import Teacher, load_teacher
from netslim.train.evaluate import check_classes, evaluate
from netslim.train.runfolder import (
    check_run_folder,
    repair_run_folder,
    resume_state,
    write_metrics,
)

# Called after every training step as on_step(epoch, epochs, step, steps), all 1-based:
# how an experiment follows a run within its epochs (netslim.lab.progress).
StepHook = Callable[[int, int, int, int], None]


class Progress:
    """A one-line progress bar on stderr, shown only when stdout is a terminal (and no
    ``on_step`` hook reports the steps instead: the bar would break into its lines)."""

    def __init__(self, total: int, label: str, shown: bool = True):
        self.total, self.label = total, label
        self.enabled = shown and sys.stdout.isatty() and distributed.is_main()
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
    data: ImageData,
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
    on_step: Callable[[int, int], None] | None = None,
    teacher: Teacher | None = None,
) -> tuple[float, float]:
    """One epoch of (sparsity) training; returns (mean loss, accuracy in %).

    ``lr_of_step(step)`` (0-based), when given, sets the learning rate before each step;
    ``on_step(step, steps)`` (1-based), when given, is called after each step;
    ``teacher``, when given, adds its distillation term to the loss
    (:mod:`netslim.train.distill`).
    """
    device = data.device
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    total = 0
    steps = num_batches(len(data.train_labels), batch_size)
    progress = Progress(steps, label, shown=on_step is None)
    tuner = threads.start_loop(device.type)  # None unless the thread count follows the load
    for step, (x, y) in enumerate(data.train_batches(batch_size, generator), start=1):
        if lr_of_step is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_of_step(step - 1)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
            if teacher is not None:
                loss = loss + teacher.loss(x, out)
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
        if tuner is not None:
            tuner.step(len(y))
        progress.update(step)
        if on_step is not None:
            on_step(step, steps)
    progress.close()
    loss_sum, correct, total = distributed.sum_over_ranks(loss_sum, correct, total)
    return loss_sum / total, 100.0 * correct / total


def _test_shard(data: ImageData) -> ImageData:
    """``data`` with only this process's contiguous block of the test split."""
    start, stop = distributed.shard_range(len(data.test_labels))
    if stop == start:
        raise NetslimError(
            f"the test split has {len(data.test_labels)} images, fewer than the "
            f"{distributed.world_size()} processes; use more test images or fewer processes"
        )
    return data.test_shard(start, stop)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, as the paper trains.

    The fused kernel (one pass over all parameters) is the same update, 2-8% faster per
    VGG-19 step on a 2-core CPU (bench/RESULTS.md); it exists for CPU and CUDA tensors.
    """
    device = next(model.parameters()).device
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
        fused=True if device.type in ("cpu", "cuda") else None,
    )


def _epoch_line(r: dict[str, Any]) -> str:
    return (
        f"epoch {r['epoch']:3d}/{r['epochs']}  lr {r['lr']:.4g}  "
        f"train loss {r['train_loss']:.3f} acc {r['train_acc']:5.1f}%  "
        f"test loss {r['test_loss']:.3f} acc {r['test_acc']:5.1f}%  "
        f"sparsity {100 * r['sparsity']:5.1f}%  {r['seconds']:.1f}s ({r['images_per_s']:.0f} img/s)"
    )


def _diverged(epoch: int, config: TrainConfig, out: Path, problems: list[str]) -> NetslimError:
    kept = f"{out / 'last.pth'} (epoch {epoch})" if epoch > 0 else "none (it was the first epoch)"
    return NetslimError(
        f"training diverged in epoch {epoch + 1}: {'; '.join(problems)}; stopped without saving "
        f"it. Last good checkpoint: {kept}. Lower --lr (now {config.lr:g}) or --lam (now "
        f"{config.lam:g}), or use --precision fp32."
    )


def _divergence(model: nn.Module, train_loss: float, test_loss: float | None) -> list[str]:
    """What is not finite after an epoch (empty when all is well)."""
    problems = [
        f"{what} loss {value}"
        for what, value in (("train", train_loss), ("test", test_loss))
        if value is not None and not math.isfinite(value)
    ]
    bad = nonfinite_tensors(model)
    if bad:
        total = len([*model.parameters(), *model.buffers()])
        problems.append(f"{len(bad)} of {total} weight tensors hold NaN/Inf (e.g. {bad[0]})")
    return problems


def _teacher(config: TrainConfig, model: nn.Module, device: torch.device) -> Teacher | None:
    """The run's teacher (``config.teacher``), on the training device; None: no distillation."""
    if not config.teacher:
        return None
    teacher = load_teacher(
        config.teacher,
        model,
        weight=config.distill_weight,
        temperature=config.distill_temperature,
        trust=config.arch,
    )
    return teacher.to(device)


def fit(
    config: TrainConfig,
    data: ImageData,
    model: nn.Module,
    out_dir: str | Path,
    *,
    meta: dict[str, Any] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_step: StepHook | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``data`` as ``config`` says, writing the run folder ``out_dir``.

    Args:
        config: the recipe (epochs, lr, lam, ...).
        data: the dataset, already on the training device (or an image folder streamed
            from disk, :class:`netslim.data.imagefolder.ImageFolderStream`).
        model: the network to train (moved to the data's device); replaced by the one
            in ``last.pth`` when resuming.
        out_dir: run folder for ``metrics.jsonl``, ``last.pth`` and ``best.pth``; locked
            against other writers for the run (:mod:`netslim.train.runlock`).
        meta: extra metadata stored in the checkpoints (e.g. ``{'arch': 'vgg19'}``).
        resume: continue from ``out_dir/last.pth`` instead of starting anew.
        log: where the per-epoch lines go.
        on_step: called after every training step as ``on_step(epoch, epochs, step,
            steps)`` (1-based; every process calls it); it replaces the progress bar.

    Returns:
        The metrics records of all epochs of the run (earlier ones too, when resumed).

    Raises:
        NetslimError: bad settings, a folder in use or not writable, or divergence (a
            non-finite loss or weight: nothing of that epoch is saved).
    """
    config.check()
    check_run_folder(out_dir)
    distributed.per_rank_batch(config.batch_size)  # fails early if it does not split evenly
    if len(data.train_labels) < distributed.world_size():
        raise NetslimError(
            f"the training set has {len(data.train_labels)} images, fewer than the "
            f"{distributed.world_size()} processes; use fewer processes or more images"
        )
    check_classes(model, data)
    if not batchnorms(model):  # the L1 term, the logged sparsity and pruning need gammas
        raise NetslimError(
            f"nothing to slim in {type(model).__name__}: it has no BatchNorm with a scaling "
            "factor gamma (affine=True), which sparsity training penalises and pruning ranks"
        )
    check_batch_memory(config.batch_size, data.image_size)
    # Rank 0 alone writes the run folder, so it alone holds the folder's lock.
    with runlock.hold(out_dir) if distributed.is_main() else contextlib.nullcontext():
        if distributed.is_main():
            remove_temp_files(out_dir)  # of writes killed midway; nobody else writes here
        return _fit(
            config, data, model, Path(out_dir), meta, resume, distributed.main_log(log), on_step
        )


def _fit(
    config: TrainConfig,
    data: ImageData,
    model: nn.Module,
    out: Path,
    meta: dict[str, Any] | None,
    resume: bool,
    log: Callable[[str], None],
    on_step: StepHook | None,
) -> list[dict[str, Any]]:
    device = data.device
    dtype = pick_precision(config.precision, device)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    history: list[dict[str, Any]] = []
    # Below any accuracy, so that the first epoch always writes best.pth (even at 0%).
    start_epoch, best_acc = 0, -1.0
    steps = num_batches(len(data.train_labels), config.batch_size)
    controls = control.SparsityControl.from_config(config, steps)  # λ; early stop
    if resume:
        ckpt = resume_state(out, config)
        model = model_from_checkpoint(ckpt, str(out / "last.pth"), trust=config.arch)
        model = model.to(device, memory_format=torch.channels_last)
        optimizer = make_optimizer(model, config)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best_acc = int(ckpt["epoch"]), 100.0 * float(ckpt["best_prec1"])
        history = list(ckpt["netslim"]["history"])
        if scaler is not None and ckpt["netslim"].get("scaler"):
            scaler.load_state_dict(ckpt["netslim"]["scaler"])
        controls.load_state_dict(ckpt["netslim"].get("control"))
        if distributed.is_main():
            repair_run_folder(out, ckpt, log)
        del ckpt
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
    teacher = _teacher(config, model, device)
    if teacher is not None:
        log(
            f"distilling from {config.teacher} (weight {config.distill_weight:g}, "
            f"temperature {config.distill_temperature:g})"
        )
    test_shard = _test_shard(data)
    if distributed.is_main():
        make_dirs(out)
        write_json(out / "config.json", asdict(config))
    hinted = False

    for epoch in range(start_epoch, config.epochs):
        if controls.stopped:  # early pruning ended sparsity training in an earlier run
            break
        lr = recipes.lr_at_step(config, epoch, 0, steps)
        # Shuffling and augmentation depend only on (seed, epoch): resumed runs repeat them.
        generator = torch.Generator(device=device).manual_seed(config.seed * 100_003 + epoch)
        t0 = time.perf_counter()
        train_loss, train_acc = train_epoch(
            run_model,
            data,
            optimizer,
            lam=controls.lam,
            batch_size=config.batch_size,
            generator=generator,
            dtype=dtype,
            scaler=scaler,
            label=f"epoch {epoch + 1}/{config.epochs}",
            label_smoothing=config.label_smoothing,
            lr_of_step=lambda step, e=epoch: recipes.lr_at_step(config, e, step, steps),
            on_step=None
            if on_step is None
            else lambda step, n, e=epoch: on_step(e + 1, config.epochs, step, n),
            teacher=teacher,
        )
        train_seconds = time.perf_counter() - t0
        if not math.isfinite(train_loss):  # no use evaluating a network that blew up
            raise _diverged(epoch, config, out, _divergence(model, train_loss, None))
        distributed.broadcast_buffers(model)  # evaluate and save rank 0's BN statistics
        test_loss, test_acc = evaluate(eval_model, test_shard, config.eval_batch_size, dtype)
        test_loss, test_acc = distributed.mean_over_ranks(
            (test_loss, test_acc), len(test_shard.test_labels)
        )
        # A single step can leave finite losses but NaN weights; never save such an epoch.
        problems = _divergence(model, train_loss, test_loss)
        if problems:
            raise _diverged(epoch, config, out, problems)
        record = {
            "epoch": epoch + 1,
            "epochs": config.epochs,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "sparsity": bn_sparsity(model, config.sparsity_threshold),
            "gamma_quantiles": gamma_quantiles(model),
            "seconds": time.perf_counter() - t0,
            "images_per_s": len(data.train_labels) / train_seconds,
        }
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
            "netslim": {
                **(meta or {}),
                "config": asdict(config),
                "history": history,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "control": controls.state_dict(),
            },
        }
        if isinstance(model, VGG):
            checkpoint["cfg"] = list(model.cfg)  # what the paper's code reads
        if distributed.is_main():
            # best.pth first: a kill between the two writes leaves last.pth one epoch
            # behind (that epoch reruns on --resume), never pointing at a missing best.
            if is_best:
                save_checkpoint(checkpoint, out / "best.pth")
            save_checkpoint(checkpoint, out / "last.pth")
            write_metrics(out, history)
        distributed.barrier()  # no process reads the run folder before rank 0 has written it
        log(_epoch_line(record))
        hint = (
            None
            if device.type != "cpu" or hinted or threads.tuner() is not None  # it adapts
            else threads.slowdown_hint(
                record["images_per_s"], history[0]["images_per_s"], torch.get_num_threads()
            )
        )
        if hint:
            log(hint)
            hinted = True
        if controls.stopped:
            log(
                f"the prune mask at ratio {config.prune_when_stable:g} has settled: "
                f"sparsity training stopped after epoch {epoch + 1}"
            )
            break
    return history
