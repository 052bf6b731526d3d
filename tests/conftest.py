"""Shared fixtures: tiny networks and data, so the whole suite runs in a few minutes on 2 CPUs."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from netslim.config import LabConfig, TrainConfig
from netslim.data import make_synthetic
from netslim.engine.sparsity import batchnorms
from netslim.models import VGG
from netslim.train.loop import fit

# Ultralytics keeps its settings here during the tests, not in the home folder.
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="netslim-ultralytics-"))

TINY_CFG = [8, "M", 16, "M", 16, 16, "M", 24, "M", 24]  # for surgery tests
TRAIN_CFG = [16, "M", 32, "M", 32, "M", 64, "M", 64]  # learns synthetic data to ~70% in seconds


def tiny_config(**overrides) -> TrainConfig:
    """A short fp32 CPU run on synthetic data (a tiny VGG passed to fit), with overrides."""
    base = dict(
        arch="tiny",
        dataset="synthetic",
        lam=1e-4,
        epochs=3,
        batch_size=64,
        precision="fp32",
        device="cpu",
    )
    return TrainConfig(**{**base, **overrides})


def without_timing(records: list[dict]) -> list[dict]:
    """metrics.jsonl records without their wall-clock fields, to compare two runs."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in records]


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN random gammas, betas and running statistics, as a trained net would have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in batchnorms(model):
            n = bn.num_features
            bn.weight.copy_(torch.randn(n, generator=g) * 0.5)
            bn.bias.copy_(torch.randn(n, generator=g) * 0.3)
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


def make_sparse(
    model: torch.nn.Module, input_size=(1, 3, 32, 32), share: float = 0.5, seed: int = 0
):
    """``model`` with random BN statistics, and a random ``share`` of each channel group's
    units made unimportant in *all* the BNs that scale them, as sparsity training would;
    returns the model (in eval mode) and its channel graph."""
    from netslim.engine import trace_channels

    model = randomize_bn(model, seed)
    bns = dict(batchnorms(model))
    g = torch.Generator().manual_seed(seed)
    graph = trace_channels(model, input_size)
    weak = torch.zeros(graph.num_units, dtype=torch.bool)
    for group in graph.prunable.values():
        weak[group.units[torch.randperm(group.size, generator=g)[: int(share * group.size)]]] = True
    with torch.no_grad():
        for name, units in graph.norms.items():
            if name in bns:  # the affine ones
                bns[name].weight.abs_().add_(0.1)
                small = weak[units]
                bns[name].weight[small] = 1e-3 * torch.rand(int(small.sum()), generator=g)
    return model.eval(), graph


@pytest.fixture
def tiny_vgg() -> VGG:
    torch.manual_seed(0)
    return randomize_bn(VGG(TINY_CFG))


@pytest.fixture(scope="session")
def tiny_data():
    return make_synthetic(n_train=2048, n_test=512, seed=0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_data):
    """A tiny VGG sparsity-trained for a few epochs on synthetic data: (run dir, model)."""
    out = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    model = VGG(TRAIN_CFG)
    config = tiny_config(lam=1e-3, epochs=8)
    fit(config, tiny_data, model, out, meta={"arch": "tiny"}, log=lambda s: None)
    from netslim.checkpoint import load

    return out, load(out / "last.pth")


# A lab small enough for the tests (about 20 s on 2 CPUs): test_report reads it, the
# reliability tests copy it.
MICRO_LAB = LabConfig(
    arch="vgg11-small",
    dataset="synthetic",
    train_size=256,
    test_size=128,
    epochs=2,
    finetune_epochs=1,
    batch_size=128,
    recalibrate=2,
    sweep=[0.3, 0.7],
    precision="fp32",
    device="cpu",
)


@pytest.fixture(scope="session")
def micro_lab(tmp_path_factory):
    """A finished micro lab (made through the Python API); copy it before changing it."""
    from netslim.lab.experiment import run_lab

    out = tmp_path_factory.mktemp("micro_lab") / "lab"
    run_lab(MICRO_LAB, out, log=lambda line: None)
    return out
