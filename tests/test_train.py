"""The sparsity API, the schedule, the training loop, resume and divergence."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TRAIN_CFG, randomize_bn, tiny_config, without_timing
from torch import nn

import netslim
import netslim.train.loop as train_module
from netslim.config import TrainConfig
from netslim.engine.sparsity import add_bn_l1_grad, bn_sparsity, gamma_quantiles
from netslim.errors import NetslimError
from netslim.models import VGG
from netslim.recipes import lr_at
from netslim.train.loop import fit
from netslim.train.runfolder import read_metrics

QUIET = {"log": lambda s: None}


def test_l1_subgradient_equals_autograd_of_the_penalty():
    torch.manual_seed(0)
    a, b = randomize_bn(VGG([4, "M", 6])).train(), randomize_bn(VGG([4, "M", 6])).train()
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    lam = 1e-2
    nn.functional.cross_entropy(a(x), y).backward()
    add_bn_l1_grad(a, lam)
    penalty = sum(m.weight.abs().sum() for m in b.modules() if isinstance(m, nn.BatchNorm2d))
    (nn.functional.cross_entropy(b(x), y) + lam * penalty).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_l1_rejects_negative_lambda():
    with pytest.raises(ValueError, match="lam"):
        add_bn_l1_grad(VGG([4]), -1.0)


def test_sparsity_and_quantiles_on_known_gammas():
    model = VGG([4, "M", 6])
    with torch.no_grad():
        model.feature[1].weight.copy_(torch.tensor([0.0, 0.005, -0.009, 0.5]))
        model.feature[5].weight.copy_(torch.tensor([1.0, -2.0, 0.02, 0.001, 0.3, 0.011]))
    assert bn_sparsity(model) == pytest.approx(4 / 10)  # |g| < 0.01: 0, .005, .009, .001
    assert bn_sparsity(model, threshold=0.5) == pytest.approx(7 / 10)
    q = gamma_quantiles(model)
    assert q["q0"] == 0.0 and q["q100"] == 2.0
    # sorted: 0 .001 .005 .009 .011 .02 .3 .5 1 2; the median interpolates the middle two
    assert q["q50"] == pytest.approx((0.011 + 0.02) / 2)


def test_step_schedule_milestones():
    assert [lr_at(e, 0.1, 160) for e in (0, 79, 80, 119, 120, 159)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    # odd epoch counts still decay twice: at epochs 3 and 4 (>= 2.5 and >= 3.75) of 5
    assert [lr_at(e, 0.1, 5) for e in range(5)] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.001])


def _config(**kw) -> TrainConfig:
    return tiny_config(**{"batch_size": 128, **kw})


def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny_data):
    torch.manual_seed(0)
    full = fit(_config(), tiny_data, VGG(TRAIN_CFG), tmp_path / "full", **QUIET)

    class Interrupt(Exception):
        pass

    def stop_after_first_epoch(line: str) -> None:
        raise Interrupt

    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        fit(_config(), tiny_data, VGG(TRAIN_CFG), tmp_path / "cut", log=stop_after_first_epoch)
    assert len(read_metrics(tmp_path / "cut")) == 1
    resumed = fit(_config(), tiny_data, VGG([4]), tmp_path / "cut", resume=True, **QUIET)

    assert without_timing(resumed) == without_timing(full)
    assert without_timing(read_metrics(tmp_path / "cut")) == without_timing(full)
    a = torch.load(tmp_path / "full" / "last.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_metrics_and_checkpoints(tmp_path, tiny_data):
    torch.manual_seed(0)
    history = fit(_config(epochs=2), tiny_data, VGG(TRAIN_CFG), tmp_path, **QUIET)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == history
    keys = {
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "sparsity",
        "gamma_quantiles",
        "seconds",
        "images_per_s",
    }
    assert keys <= history[0].keys()
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert {"epoch", "state_dict", "best_prec1", "optimizer", "cfg"} <= ckpt.keys()
    assert ckpt["epoch"] == 2 and ckpt["cfg"] == TRAIN_CFG
    assert ckpt["best_prec1"] == pytest.approx(max(r["test_acc"] for r in history) / 100)
    # the logged test accuracy is what the saved model scores
    model = netslim.load(tmp_path / "last.pth")
    assert netslim.evaluate(model, tiny_data)[1] == pytest.approx(history[-1]["test_acc"])
    assert netslim.bn_sparsity(model) == pytest.approx(history[-1]["sparsity"])


def test_existing_run_needs_resume_and_resume_needs_same_settings(tmp_path, tiny_data):
    fit(_config(epochs=1), tiny_data, VGG(TRAIN_CFG), tmp_path, **QUIET)
    with pytest.raises(NetslimError, match="--resume"):
        fit(_config(epochs=1), tiny_data, VGG(TRAIN_CFG), tmp_path, **QUIET)
    with pytest.raises(NetslimError, match="lr"):
        fit(_config(epochs=1, lr=0.5), tiny_data, VGG(TRAIN_CFG), tmp_path, resume=True, **QUIET)
    with pytest.raises(NetslimError, match="does not exist"):
        fit(_config(), tiny_data, VGG(TRAIN_CFG), tmp_path / "new", resume=True, **QUIET)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_data, monkeypatch):
    real = train_module.train_epoch
    calls = []

    def diverge_in_second_epoch(*args, **kwargs):
        calls.append(1)
        loss, acc = real(*args, **kwargs)
        return (float("nan"), acc) if len(calls) == 2 else (loss, acc)

    monkeypatch.setattr(train_module, "train_epoch", diverge_in_second_epoch)
    with pytest.raises(NetslimError, match=r"diverged.*epoch 2.*last\.pth \(epoch 1\)"):
        fit(_config(), tiny_data, VGG(TRAIN_CFG), tmp_path, **QUIET)
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 1
    assert len(read_metrics(tmp_path)) == 1


def test_real_divergence_is_caught(tmp_path, tiny_data):
    with pytest.raises(NetslimError, match="diverged"):
        fit(_config(lr=1e12, epochs=1), tiny_data, VGG(TRAIN_CFG), tmp_path, **QUIET)
    assert not (tmp_path / "last.pth").exists()


@pytest.mark.parametrize(
    "bad, match",
    [({"lam": -1e-4}, "lam"), ({"epochs": 0}, "epochs"), ({"precision": "fp8"}, "precision")],
)
def test_bad_settings(tmp_path, tiny_data, bad, match):
    with pytest.raises(NetslimError, match=match):
        fit(_config(**bad), tiny_data, VGG(TRAIN_CFG), tmp_path, **QUIET)


def test_bf16_training_runs_and_learns(tmp_path, tiny_data):
    torch.manual_seed(0)
    history = fit(_config(precision="bf16", epochs=2), tiny_data, VGG(TRAIN_CFG), tmp_path, **QUIET)
    assert history[-1]["train_loss"] < history[0]["train_loss"] or history[-1]["test_acc"] > 15
    assert next(netslim.load(tmp_path / "last.pth").parameters()).dtype == torch.float32
