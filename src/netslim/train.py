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

A run folder has one writer at a time (:mod:`netslim.runlock`). An epoch whose loss or
weights are not finite stops the run before anything of it is saved. The learning
rate depends only on the epoch and step (:mod:`netslim.recipes`), and λ and early
pruning's state are saved (:mod:`netslim.control`).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from netslim import control, distributed, recipes, runlock, threads
from netslim.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from netslim.config import TrainConfig
from netslim.data import Dataset, eval_batches, num_batches, train_batches
from netslim.errors import NetslimError
from netslim.files import atomic_write_text, make_dirs, remove_temp_files
from netslim.limits import check_batch_memory
from netslim.models import VGG, num_outputs
from netslim.sparsity import add_bn_l1_grad, batchnorms, bn_sparsity, gamma_quantiles
from netslim.stats import nonfinite_tensors
from netslim.surgery import channel_counts
from netslim.threads import slowdown_hint


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


def check_classes(model: nn.Module, data: Dataset) -> None:
    """Raise NetslimError unless ``model`` has one output per class of ``data``: a network
    measured or trained on data with other classes gives numbers that mean nothing."""
    if num_outputs(model) != data.num_classes:
        raise NetslimError(
            f"the model has {num_outputs(model)} outputs but dataset "
            f"{data.name} has {data.num_classes} classes; use a matching --dataset"
        )


def lr_at(epoch: int, base_lr: float, epochs: int) -> float:
    """The paper's step schedule: the learning rate of 0-based ``epoch`` of ``epochs``.

    Divided by 10 from the first epoch at or past 50% of the run and again at 75%, compared
    as floats (``epoch >= epochs * 0.5``): the milestones are ``ceil(epochs / 2)`` and
    ``ceil(3 * epochs / 4)``, so no run decays before its first epoch has run (1 epoch
    stays at ``base_lr``; 2 epochs decay once, in the second). The paper's main.py decays
    when ``epoch in [epochs * 0.5, epochs * 0.75]``: the same where those are whole
    numbers (160 epochs: 80 and 120), never where they are not (3 epochs: 1.5, 2.25).
    """
    return base_lr * 0.1 ** sum(epoch >= epochs * share for share in (0.5, 0.75))


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
    tuner = threads.start_loop(device.type)  # None unless the thread count follows the load
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
        if tuner is not None:
            tuner.step(len(y))
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


def run_files(out_dir: str | Path) -> str:
    """What a finished run folder holds, for the closing line: only files that exist."""
    out = Path(out_dir)
    checkpoints = [name for name in ("last.pth", "best.pth") if (out / name).is_file()]
    text = (
        f"checkpoints in {out}/ ({', '.join(checkpoints)})"
        if checkpoints
        else f"no checkpoint in {out}/"
    )
    if (out / "metrics.jsonl").is_file():
        text += f", metrics in {out / 'metrics.jsonl'}"
    return text


def check_run_folder(out_dir: str | Path) -> None:
    """Refuse, before any work, a run folder that is a file or lies under a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NetslimError(f"--out {out} is a file; a run needs a folder (choose another --out)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NetslimError(
                    f"--out {out} lies under {parent}, which is a file; choose another --out"
                )
            break


def _diverged(epoch: int, config: TrainConfig, out: Path, problems: list[str]) -> NetslimError:
    kept = f"{out / 'last.pth'} (epoch {epoch})" if epoch > 0 else "none (it was the first epoch)"
    return NetslimError(
        f"training diverged in epoch {epoch + 1}: {'; '.join(problems)}; stopped without saving "
        f"it. Last good checkpoint: {kept}. Lower --lr (now {config.lr:g}) or --lam (now "
        f"{config.lam:g}), or use --precision fp32."
    )


def _divergence(model: nn.Module, train_loss: float, test_loss: float | None) -> list[str]:
    """What is not finite after an epoch (empty when all is well)."""
    problems = [f"{what} loss {value}" for what, value in (("train", train_loss), ("test", test_loss))
                if value is not None and not math.isfinite(value)]  # fmt: skip
    bad = nonfinite_tensors(model)
    if bad:
        total = len([*model.parameters(), *model.buffers()])
        problems.append(f"{len(bad)} of {total} weight tensors hold NaN/Inf (e.g. {bad[0]})")
    return problems


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
        out_dir: run folder for ``metrics.jsonl``, ``last.pth`` and ``best.pth``; locked
            against other writers for the run (:mod:`netslim.runlock`).
        meta: extra metadata stored in the checkpoints (e.g. ``{'arch': 'vgg19'}``).
        resume: continue from ``out_dir/last.pth`` instead of starting anew.
        log: where the per-epoch lines go.

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
        return _fit(config, data, model, Path(out_dir), meta, resume, distributed.main_log(log))


def _resume_state(out: Path, config: TrainConfig) -> dict[str, Any]:
    """The checkpoint ``out/last.pth`` to continue, checked to be a netslim run of ``config``."""
    last = out / "last.pth"
    if not last.exists():
        raise NetslimError(f"cannot resume: {last} does not exist; start the run without --resume")
    ckpt = read_checkpoint(last)
    meta = ckpt.get("netslim")
    if not (isinstance(meta, dict) and "config" in meta and "history" in meta
            and "optimizer" in ckpt and "epoch" in ckpt):  # fmt: skip
        raise NetslimError(
            f"cannot resume {out}: {last} was not written by netslim train or finetune (it holds "
            "no run settings or history, e.g. a checkpoint of the paper's main.py); to train "
            f"from its weights use netslim finetune {last} --out NEW_FOLDER"
        )
    saved = asdict(TrainConfig.from_dict(meta["config"]))
    changed = changed_settings(saved, asdict(config), "the run", ignore=("device", "compile"))
    if changed:
        raise NetslimError(
            f"cannot resume {out}: settings differ from the run's: {', '.join(changed)}; "
            "resume with the original settings (see its config.json)"
        )
    return ckpt


def _repair_run_folder(out: Path, ckpt: dict[str, Any], log: Callable[[str], None]) -> None:
    """Put back what a resumed run's folder lost (rank 0): its metrics.jsonl and best.pth."""
    history = ckpt["netslim"]["history"]
    try:
        logged = read_metrics(out)
    except ValueError:  # a damaged metrics.jsonl: the checkpoint's history is the truth
        logged = None
    if logged != history:
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    if history and not (out / "best.pth").exists():
        earlier = max((r["test_acc"] for r in history[:-1]), default=-1.0)
        if history[-1]["test_acc"] > earlier:
            save_checkpoint(ckpt, out / "best.pth")  # the last epoch is the best one
        else:
            log(f"note: {out / 'best.pth'} is missing and its epoch is lost; the next epoch "
                "that beats it writes a new one")  # fmt: skip


def _fit(
    config: TrainConfig,
    data: Dataset,
    model: nn.Module,
    out: Path,
    meta: dict[str, Any] | None,
    resume: bool,
    log: Callable[[str], None],
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
    controls = control.SparsityControl(config, steps)  # λ of each epoch; early pruning's stop
    if resume:
        ckpt = _resume_state(out, config)
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
            _repair_run_folder(out, ckpt, log)
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
    test_shard = _test_shard(data)
    if distributed.is_main():
        make_dirs(out)
        atomic_write_text(out / "config.json", json.dumps(asdict(config), indent=2) + "\n")
    hinted = False

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
            # best.pth first: a kill between the two writes leaves last.pth one epoch
            # behind (that epoch reruns on --resume), never pointing at a missing best.
            if is_best:
                save_checkpoint(checkpoint, out / "best.pth")
            save_checkpoint(checkpoint, out / "last.pth")
            atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        distributed.barrier()  # no process reads the run folder before rank 0 has written it
        log(_epoch_line(record))
        hint = (
            None
            if device.type != "cpu" or hinted or threads.tuner() is not None  # it adapts
            else slowdown_hint(
                record["images_per_s"], history[0]["images_per_s"], torch.get_num_threads()
            )
        )
        if hint:
            log(hint)
            hinted = True
        if controls.stopped:
            log(f"the prune mask at ratio {config.prune_when_stable:g} has settled: "
                f"sparsity training stopped after epoch {epoch + 1}")  # fmt: skip
            break
    return history
