"""Data-parallel training: two gloo processes under torchrun on the CPU, and the helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_imagefolder import write_images
from torch import nn

import netslim
from netslim import cli
from netslim.data import augment, make_synthetic
from netslim.data.imagefolder import load_imagefolder
from netslim.engine.sparsity import add_bn_l1_grad, batchnorms
from netslim.errors import NetslimError
from netslim.models import VGG
from netslim.runtime import distributed

pytestmark = pytest.mark.slow  # not in make test-fast

WORKER = Path(__file__).with_name("torchrun_worker.py")
SRC = Path(netslim.__file__).resolve().parents[1]  # where `-m netslim` finds the package
TRAIN = [
    "train",
    "--dataset",
    "synthetic",
    "--train-size",
    "512",
    "--test-size",
    "256",
    "--arch",
    "vgg11-small",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--lr",
    "0.05",
    "--lam",
    "1e-2",
    "--precision",
    "fp32",
    "--device",
    "cpu",
]


def torchrun(dump: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    """``torchrun --standalone --nproc_per_node 2 torchrun_worker.py dump args...``."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(dump),
        *args,
    ]
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "NETSLIM_DIST_TIMEOUT": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    dump.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)


def state(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, weights_only=True)
    return obj.get("state_dict", obj)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 2-process, 2-epoch run: (run folder, dump folder, the process)."""
    tmp = tmp_path_factory.mktemp("ddp")
    done = torchrun(tmp / "dump", *TRAIN, "--out", str(tmp / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run", tmp / "dump", done


def test_two_processes_train_one_model_and_write_one_run(full_run):
    run, dump, done = full_run
    # both ranks end with the same parameters and BN statistics, and that is what was saved
    rank0, rank1 = state(dump / "rank0.pt"), state(dump / "rank1.pt")
    assert same(rank0, rank1)
    assert same(rank0, state(run / "last.pth"))
    assert not torch.equal(
        rank0["feature.1.weight"], torch.full_like(rank0["feature.1.weight"], 0.5)
    )
    # one writer: exactly the files of a single-process run, each epoch logged once
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pth",
        "config.json",
        "last.pth",
        "metrics.jsonl",
    ]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert done.stdout.count("epoch   2/2") == 1 and done.stdout.count("done:") == 1
    # the logged test numbers are those of the saved model on the whole test set
    data = make_synthetic(512, 256, seed=0)
    loss, acc = netslim.evaluate(netslim.load(run / "last.pth"), data)
    assert acc == pytest.approx(records[-1]["test_acc"])
    assert loss == pytest.approx(records[-1]["test_loss"], rel=1e-4)


def test_resume_under_torchrun_after_a_rank_crashed(full_run, tmp_path):
    run, _, _ = full_run
    out = ["--out", str(tmp_path / "run")]
    crashed = torchrun(tmp_path / "dump", *TRAIN, *out, env={"FAIL_AT": "1:1"})
    assert crashed.returncode != 0
    assert "simulated crash of rank 1" in crashed.stderr
    assert state(tmp_path / "run" / "last.pth") is not None
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["epoch"] == 1

    resumed = torchrun(tmp_path / "dump", *TRAIN, *out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert same(state(tmp_path / "run" / "last.pth"), state(run / "last.pth"))
    assert without_times(netslim.train.read_metrics(tmp_path / "run")) == without_times(
        netslim.train.read_metrics(run)
    )


def test_global_batch_must_split_evenly():
    assert distributed.per_rank_batch(64, 2) == 32
    with pytest.raises(NetslimError, match="--batch-size 64 does not divide by the 3 processes"):
        distributed.per_rank_batch(64, 3)


def test_a_batch_size_that_does_not_split_stops_every_rank_clearly(tmp_path):
    args = [*TRAIN, "--batch-size", "63", "--out", str(tmp_path / "run")]
    done = torchrun(tmp_path / "dump", *args, timeout=60)
    assert done.returncode != 0
    for rank in (0, 1):
        assert f"error (rank {rank}): --batch-size 63 does not divide by the 2" in done.stderr
    assert not (tmp_path / "run").exists()


def test_sync_bn_on_the_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    with pytest.raises(NetslimError, match="--sync-bn needs GPUs"):
        distributed.wrap_model(VGG([4]), sync_bn=True)


def test_a_share_of_a_batch_is_augmented_as_within_the_whole_batch():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    whole = augment(images, torch.Generator().manual_seed(3))
    share = augment(images[4:9], torch.Generator().manual_seed(3), start=4, total=10)
    assert torch.equal(share, whole[4:9])


def test_sync_batchnorm_layers_get_the_l1_term():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(VGG([4, "M", 6]))
    bns = batchnorms(model)
    assert len(bns) == 2 and all(isinstance(m, nn.SyncBatchNorm) for _, m in bns)
    for _, bn in bns:
        bn.weight.grad = torch.zeros_like(bn.weight)
    add_bn_l1_grad(model, 0.1)
    assert all(torch.equal(bn.weight.grad, torch.full_like(bn.weight, 0.1)) for _, bn in bns)


def test_single_process_helpers_are_no_ops():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    model = VGG([4])
    assert distributed.wrap_model(model, sync_bn=True) is model
    assert distributed.mean_over_ranks((1.5, 2.5), 7) == (1.5, 2.5)
    assert distributed.sum_over_ranks(torch.tensor(2.0), 3) == [2.0, 3.0]


@pytest.mark.parametrize(
    "command", [["prune", "x.pth", "--ratio", "0.5", "--out", "y"], ["info", "x.pth"]]
)
def test_commands_that_are_not_distributed_refuse_torchrun(monkeypatch, capsys, command):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert "(rank 1)" in err and "does not run under torchrun" in err


def test_world_size_without_torchrun_variables_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main([*TRAIN, "--out", str(tmp_path)]) == 2
    assert "start netslim with torchrun" in capsys.readouterr().err


def test_two_processes_stream_an_image_folder(tmp_path):
    write_images(tmp_path / "images", "train", 16, seed=0)
    write_images(tmp_path / "images", "val", 6, seed=1)
    args = [
        "train",
        "--dataset",
        "imagefolder",
        "--data-root",
        str(tmp_path / "images"),
        "--loader",
        "stream",
        "--workers",
        "1",
        "--arch",
        "vgg11-small",
        "--epochs",
        "1",
        "--batch-size",
        "12",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "run"),
    ]
    done = torchrun(tmp_path / "dump", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same(state(tmp_path / "dump" / "rank0.pt"), state(tmp_path / "dump" / "rank1.pt"))
    data = load_imagefolder(tmp_path / "images")
    logged = netslim.train.read_metrics(tmp_path / "run")[-1]["test_acc"]
    assert netslim.evaluate(netslim.load(tmp_path / "run" / "last.pth"), data)[1] == pytest.approx(
        logged
    )


def test_the_lab_under_torchrun(tmp_path):
    args = [
        "demo",
        "--train-size",
        "256",
        "--test-size",
        "128",
        "--epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--lams",
        "0",
        "1e-2",
        "--prune-lam",
        "1e-2",
        "--ratios",
        "0.5",
        "--sweep",
        "0.3",
        "--recalibrate",
        "1",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "lab"),
    ]
    done = torchrun(tmp_path / "dump", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    lab = tmp_path / "lab"
    assert (lab / "report.html").is_file() and done.stdout.count("done: report") == 1
    # only rank 0 speaks: the lab's lines (headlines, epochs, its closing summary) once each
    assert done.stdout.count("== sparsity training λ=0,") == 1
    assert done.stdout.count("epoch   1/1") == 3  # 2 trainings and 1 fine-tuning
    assert done.stdout.count("lab took ") == 1
    # the last fit, the fine-tuning, ends identical on both ranks, as saved by rank 0
    finetuned = state(lab / "finetune" / "ratio=0.5" / "last.pth")
    assert same(state(tmp_path / "dump" / "rank0.pt"), finetuned)
    assert same(state(tmp_path / "dump" / "rank1.pt"), finetuned)
    assert len(netslim.train.read_metrics(lab / "train" / "lam=1e-2")) == 1


def test_fewer_training_images_than_processes_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    data = make_synthetic(n_train=1, n_test=4, seed=0)
    config = netslim.TrainConfig(
        arch="vgg11-small",
        dataset="synthetic",
        epochs=1,
        batch_size=2,
        precision="fp32",
        device="cpu",
    )
    with pytest.raises(NetslimError, match="1 images, fewer than the 2 processes"):
        netslim.fit(config, data, netslim.build_model("vgg11-small"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
