"""Checkpoints: the official formats load and prune; bad files give clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CFG, randomize_bn

import netslim
from netslim.checkpoint import read_checkpoint, save_checkpoint
from netslim.errors import NetslimError
from netslim.models import VGG
from netslim.slim import prune_model, pruned_checkpoint


def official_training_checkpoint(model: VGG) -> dict:
    """What the paper's main.py saves, as torch 0.3.1 wrote it (no num_batches_tracked),
    from a model wrapped in DataParallel (keys prefixed 'module.')."""
    state = {f"module.{k}": v for k, v in model.state_dict().items() if "num_batches" not in k}
    return {"epoch": 160, "state_dict": state, "best_prec1": 0.9366, "optimizer": {"state": {}}}


def test_official_training_checkpoint_loads_and_prunes(tmp_path, tiny_vgg):
    path = tmp_path / "model_best.pth.tar"
    torch.save(official_training_checkpoint(tiny_vgg), path)
    model = netslim.load(path)
    assert model.cfg == TINY_CFG
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), tiny_vgg(x))

    pruned, report = prune_model(model, 0.5)
    out = tmp_path / "pruned.pth.tar"
    save_checkpoint(pruned_checkpoint(pruned, report, {"arch": "tiny"}), out)
    # the official refine step reads exactly these two keys and rebuilds vgg(cfg=...)
    raw = torch.load(out, weights_only=True)
    assert raw["cfg"] == pruned.cfg
    rebuilt = VGG(raw["cfg"], init_weights=False)
    rebuilt.load_state_dict(raw["state_dict"])
    torch.testing.assert_close(rebuilt.eval()(x), pruned(x))
    torch.testing.assert_close(netslim.load(out)(x), pruned(x))


def test_official_pruned_checkpoint_loads(tmp_path, tiny_vgg):
    pruned, _ = netslim.prune_model(tiny_vgg, 0.4)
    path = tmp_path / "pruned.pth.tar"
    torch.save({"cfg": pruned.cfg, "state_dict": pruned.state_dict()}, path)
    assert netslim.load(path).cfg == pruned.cfg


def test_cfg_is_recovered_from_state_dict_alone(tmp_path):
    cfg = [4, "M", "M", 8, 8, "M", 6]
    torch.save(VGG(cfg).state_dict(), tmp_path / "bare.pth")
    assert netslim.load(tmp_path / "bare.pth").cfg == cfg


def test_missing_file(tmp_path):
    with pytest.raises(NetslimError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")


def test_truncated_file(tmp_path, tiny_vgg):
    path = tmp_path / "cut.pth"
    torch.save({"state_dict": tiny_vgg.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NetslimError, match="not a checkpoint written by torch.save"):
        read_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NetslimError, match="not a checkpoint written by torch.save"):
        read_checkpoint(tmp_path / "notes.txt")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(NetslimError, match="'state_dict'"):
        read_checkpoint(tmp_path / "list.pth")


def test_cfg_that_does_not_match_state_dict(tmp_path, tiny_vgg):
    bad = list(TINY_CFG)
    bad[0] = 7
    torch.save({"cfg": bad, "state_dict": tiny_vgg.state_dict()}, tmp_path / "bad.pth")
    with pytest.raises(NetslimError, match="does not match"):
        netslim.load(tmp_path / "bad.pth")


def test_save_is_atomic(tmp_path, tiny_vgg):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"state_dict": tiny_vgg.state_dict()}, path)
    before = path.read_bytes()

    class Boom:  # torch.save fails part-way while pickling this
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"state_dict": tiny_vgg.state_dict(), "x": Boom()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left


def test_recalibration_restores_accuracy_of_perturbed_statistics(trained, tiny_data):
    _, model = trained
    base = netslim.evaluate(model, tiny_data)[1]
    assert base > 40  # the fixture learned something
    pruned, report = prune_model(model, 0.3, data=tiny_data, recalibrate=8, batch_size=64)
    assert report.acc_unpruned == pytest.approx(base)
    # wreck the running statistics, then let recalibration bring them back
    randomize_bn_stats = {k: v.clone() for k, v in pruned.state_dict().items()}
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(torch.randn_like(m.running_mean) * 3)
                m.running_var.mul_(torch.rand_like(m.running_var) * 10 + 0.1)
    broken = netslim.evaluate(pruned, tiny_data)[1]
    params_before = {k: v.clone() for k, v in pruned.named_parameters()}
    from netslim.slim import recalibration_batches

    netslim.recalibrate_bn(pruned, recalibration_batches(tiny_data, 8, 64))
    restored = netslim.evaluate(pruned, tiny_data)[1]
    assert broken < restored - 10
    assert restored >= report.acc_recalibrated - 2
    for k, v in pruned.named_parameters():  # only BN buffers moved
        assert torch.equal(v, params_before[k])
    assert randomize_bn_stats.keys() == pruned.state_dict().keys()


def test_recalibrated_stats_are_the_average_of_batch_statistics():
    torch.manual_seed(0)
    model = randomize_bn(VGG([4, "M", 6]))
    batches = [torch.randn(16, 3, 32, 32) * (i + 1) for i in range(3)]
    netslim.recalibrate_bn(model, batches)
    assert not model.training  # mode restored
    # first BN sees the first conv's output: its running mean is the mean of batch means
    conv = model.feature[0]
    means = [conv(x).mean(dim=(0, 2, 3)) for x in batches]
    variances = [conv(x).transpose(0, 1).flatten(1).var(dim=1) for x in batches]
    torch.testing.assert_close(model.feature[1].running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(model.feature[1].running_var, torch.stack(variances).mean(0))
    assert model.feature[1].momentum == 0.1


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os

    from netslim.files import atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.html", "<p>hi</p>")
    finally:
        os.umask(mask)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644


def test_known_unpruned_accuracy_is_reused_not_remeasured(trained, tiny_data, monkeypatch):
    _, model = trained
    _, measured = prune_model(model, 0.3, data=tiny_data, recalibrate=2, batch_size=64)
    calls = []
    real = netslim.slim.evaluate
    monkeypatch.setattr(
        netslim.slim, "evaluate", lambda m, *a, **k: calls.append(m) or real(m, *a, **k)
    )
    _, reused = prune_model(
        model, 0.3, data=tiny_data, recalibrate=2, batch_size=64, acc_unpruned=measured.acc_unpruned
    )
    assert model not in calls and len(calls) == 3  # masked, compensated, recalibrated
    assert reused.to_dict() == measured.to_dict()


def test_without_compensation_the_report_still_measures_the_compensated_network(trained, tiny_data):
    """--no-compensate saves the official network; the report's three measures stay those
    of the compensated run (before, its 'compensated' accuracy was the official network's)."""
    _, model = trained
    _, official = prune_model(model, 0.5, compensate=False, data=tiny_data, recalibrate=2)
    _, folded = prune_model(model, 0.5, data=tiny_data, recalibrate=2)
    assert official.saved != folded.saved
    for key in ("acc_masked", "acc_compensated", "acc_recalibrated"):
        assert getattr(official, key) == getattr(folded, key), key


def test_measure_is_the_one_way_to_measure_and_data_is_its_classifier_form(trained, tiny_data):
    """prune_model(measure=, calibration=) with test accuracy as the measure gives what
    prune_model(data=) reports, for the same four networks; the callback sees each once."""
    from netslim.engine.surgery import channel_counts
    from netslim.slim import recalibration_batches

    _, model = trained
    via_data, report = prune_model(model, 0.3, data=tiny_data, recalibrate=4, batch_size=64)
    seen = []

    def accuracy(network):
        seen.append(channel_counts(network))
        return {"accuracy": netslim.evaluate(network, tiny_data)[1]}

    via_measure, generic = prune_model(
        model,
        0.3,
        measure=accuracy,
        recalibrate=4,
        calibration=recalibration_batches(tiny_data, 4, 64),
    )
    assert generic.measured == report.measured
    assert list(report.measured) == ["unpruned", "official", "compensated", "recalibrated"]
    assert [report.measured[w]["accuracy"] for w in report.measured] == [
        report.acc_unpruned,
        report.acc_masked,
        report.acc_compensated,
        report.acc_recalibrated,
    ]
    assert generic.recalibration_images == report.recalibration_images == 4 * 64
    assert seen[0] == channel_counts(model) and all(s == channel_counts(via_data) for s in seen[1:])
    for a, b in zip(via_data.state_dict().values(), via_measure.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(NetslimError, match="not both"):
        prune_model(model, 0.3, data=tiny_data, measure=accuracy)
