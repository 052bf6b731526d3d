"""The paper's own ResNet-164 and DenseNet-40 files: read exactly, pruned, fine-tuned, written back.

The files and the logits the paper's models give on a stored input were made with the
network-slimming code itself (see ../shared/official-checkpoints/README.md).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn

import netslim
from netslim.checkpoint import save_official
from netslim.cli import main
from netslim.engine.plan import masked_copy, plan_pruning
from netslim.engine.surgery import apply_plan, channel_counts
from netslim.errors import NetslimError
from netslim.models import VGG, ChannelGather
from netslim.models.densenet import DenseLayer
from netslim.official import official_checkpoint
from netslim.slim import prune_model, pruned_checkpoint

# shared/ lies beside the clone (CI); NETSLIM_OFFICIAL_CHECKPOINTS points elsewhere (a worktree)
FILES = Path(
    os.environ.get(
        "NETSLIM_OFFICIAL_CHECKPOINTS",
        Path(__file__).parents[1] / ".." / "shared" / "official-checkpoints",
    )
)
needs_files = pytest.mark.skipif(
    not FILES.is_dir(), reason=f"the paper's checkpoints are not in {FILES.resolve()}"
)

pytestmark = pytest.mark.slow  # not in make test-fast

# file -> the key of its logits in outputs.pt
CASES = {
    "resnet164.pth.tar": "resnet164",
    "resnet164_pruned40.pth.tar": "resnet164_pruned",
    "densenet40.pth.tar": "densenet40",
    "densenet40_pruned40.pth.tar": "densenet40_pruned",
}
PRUNED = ["resnet164_pruned40.pth.tar", "densenet40_pruned40.pth.tar"]
TINY = ["--dataset", "synthetic", "--train-size", "32", "--test-size", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def oracle() -> dict[str, torch.Tensor]:
    return torch.load(FILES / "outputs.pt", map_location="cpu", weights_only=True)


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def quiet_plan(model, ratio):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan_pruning(model, ratio)


@needs_files
@pytest.mark.parametrize("name", CASES)
def test_logits_equal_the_paper_models(name, oracle):
    model = netslim.load(FILES / name)
    same(logits(model, oracle["input"]), oracle[CASES[name]])
    gathers = [m for m in model.modules() if isinstance(m, ChannelGather)]
    if name.startswith("resnet"):  # a selection in every block and before the last BN
        assert len(gathers) == 55
    elif name == "densenet40.pth.tar":  # selects everything: no gather, plain densenet40
        assert gathers == [] and channel_counts(model) == channel_counts(
            netslim.build_model("densenet40")
        )
    else:  # channels no later layer selects are removed outright; the selections stay
        assert len(gathers) == 39
        assert min(m.conv.out_channels for m in model.features if isinstance(m, DenseLayer)) < 12


@needs_files
def test_netslim_prunes_the_paper_resnet_as_resprune_does(oracle):
    """At the paper's threshold, without compensation: the same channels, the same network."""
    model = netslim.load(FILES / "resnet164.pth.tar")
    pruned, report = prune_model(model, 0.4, compensate=False)
    same(logits(pruned, oracle["input"]), oracle["resnet164_pruned"])
    assert channel_counts(pruned) == channel_counts(
        netslim.load(FILES / "resnet164_pruned40.pth.tar")
    )
    assert "read through the channel selection" in report.text()
    paper = torch.load(FILES / "resnet164_pruned40.pth.tar", map_location="cpu", weights_only=True)
    written = official_checkpoint(pruned)  # the paper's own file, but for unselected BN stats
    assert written["cfg"] == paper["cfg"] and list(written["state_dict"]) == list(
        paper["state_dict"]
    )
    for key in ("layer3.17.select.indexes", "select.indexes", "layer2.5.conv2.weight", "fc.weight"):
        assert torch.equal(written["state_dict"][key], paper["state_dict"][key]), key


@needs_files
@pytest.mark.parametrize("name", ["resnet164.pth.tar", *PRUNED])
def test_further_pruned_equals_masked(name, oracle):
    model = randomize_bn(netslim.load(FILES / name))  # gammas spread out, as after training
    plan = quiet_plan(model, 0.4)
    assert plan.pruned_share > 0.3
    x = oracle["input"]
    same(
        logits(apply_plan(model, plan, compensate=False), x),
        logits(masked_copy(model, plan.masks, zero_beta=True), x),
    )
    for m in model.modules():  # wrap-around padding: compensation is exact everywhere
        if isinstance(m, torch.nn.Conv2d):
            m.padding_mode = "circular"
    same(
        logits(apply_plan(model, plan, compensate=True), x),
        logits(masked_copy(model, plan.masks, zero_beta=False), x),
    )


@needs_files
@pytest.mark.parametrize("name", CASES)
def test_save_official_round_trip(name, oracle, tmp_path):
    written = save_official(FILES / name, tmp_path / "paper.pth")
    original = torch.load(FILES / name, map_location="cpu", weights_only=True)
    on_disk = torch.load(tmp_path / "paper.pth", map_location="cpu", weights_only=True)
    assert set(on_disk) == {"cfg", "state_dict"} and on_disk["cfg"] == written["cfg"]
    if "cfg" in original:
        assert on_disk["cfg"] == original["cfg"]
    sd, old = on_disk["state_dict"], original["state_dict"]
    assert list(sd) == list(old)
    assert all(sd[k].shape == old[k].shape and sd[k].dtype == old[k].dtype for k in old)
    if name.startswith("resnet"):  # same tensors, but for the stats of unselected channels
        for key in old:
            module, _, stat = key.rpartition(".")
            if stat.startswith("running") and module.split(".")[-1] in ("bn1", "bn"):
                flags = old[module.removesuffix("bn1").removesuffix("bn") + "select.indexes"].bool()
                assert torch.equal(sd[key][flags], old[key][flags]), key
            else:
                assert torch.equal(sd[key], old[key]), key
    same(logits(netslim.load(tmp_path / "paper.pth"), oracle["input"]), oracle[CASES[name]])


def test_save_official_writes_a_vgg_as_the_paper_does(tmp_path):
    with pytest.raises(NetslimError, match="4 max-pools"):
        save_official(VGG([8, 16, "M", 16]), tmp_path / "x.pth")
    model = randomize_bn(netslim.build_model("vgg11-small"))
    pruned, report = prune_model(model, 0.5)
    ckpt = pruned_checkpoint(pruned, report, {"arch": "vgg11-small", "num_classes": 10})
    written = save_official(ckpt, tmp_path / "paper.pth")
    assert written["cfg"] == ckpt["cfg"] == pruned.cfg
    assert list(written["state_dict"]) == list(ckpt["state_dict"])
    x = torch.randn(2, 3, 32, 32)
    same(logits(netslim.load(tmp_path / "paper.pth"), x), logits(pruned, x))


@needs_files
def test_save_official_refuses_what_the_paper_cannot_express(tmp_path, capsys):
    with pytest.raises(NetslimError, match="pre-activated input, the paper's the raw input"):
        save_official(netslim.build_model("resnet164"), tmp_path / "x.pth")
    pruned, _ = prune_model(randomize_bn(netslim.load(FILES / PRUNED[0])), 0.4)  # compensated
    torch.save(
        {
            "netslim": {"arch": "resnet164"},
            "channels": channel_counts(pruned),
            "state_dict": pruned.state_dict(),
        },
        tmp_path / "comp.pth",
    )
    code, out, err = run(
        capsys,
        "export",
        str(tmp_path / "comp.pth"),
        "--format",
        "official",
        "--out",
        str(tmp_path / "paper.pth"),
    )
    assert code == 2 and "has a bias" in err and "--no-compensate" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "paper.pth").exists()


def test_a_paper_network_of_another_depth_is_refused(tmp_path, capsys):
    t = torch.zeros(4, 4, 1, 1)
    sd = {f"layer1.{b}.{k}": t for b in range(2) for k in ("conv3.weight", "bn1.weight")}
    torch.save({"state_dict": sd}, tmp_path / "r20.pth")
    code, _, err = run(capsys, "info", str(tmp_path / "r20.pth"))
    assert code == 2 and "the paper's ResNet of depth 20; netslim reads its depth 164" in err


@needs_files
@pytest.mark.parametrize("name", CASES)
def test_cli_info_prune_load(name, tmp_path, capsys, oracle):
    path, out_path = str(FILES / name), tmp_path / "pruned.pth"
    code, out, err = run(capsys, "info", path, "--json")
    assert code == 0, err
    info = json.loads(out)
    model = netslim.load(path)
    assert info["arch"] == name.split("_")[0].split(".")[0]
    assert info["kind"] == ("pruned" if "pruned" in name else "train")
    assert info["params"] == netslim.count_params(model)
    assert info["channel_selections"] == sum(isinstance(m, ChannelGather) for m in model.modules())

    code, out, err = run(capsys, "prune", path, "--ratio", "0.4", "--out", str(out_path))
    assert code == 0, err
    saved = torch.load(out_path, weights_only=True)
    assert saved["netslim"]["arch"] == info["arch"] and "channels" in saved
    expected, _ = prune_model(model, 0.4)  # the same pruning, in this process
    x = oracle["input"]
    same(logits(netslim.load(out_path), x), logits(expected, x))


@needs_files
@pytest.mark.parametrize("name", PRUNED)
def test_cli_prune_with_data_and_finetune(name, tmp_path, capsys):
    path, pruned, tuned = str(FILES / name), tmp_path / "p.pth", tmp_path / "ft"
    code, out, err = run(
        capsys, "prune", path, "--ratio", "0.4", "--out", str(pruned), *TINY, "--recalibrate", "1"
    )
    assert code == 0, err
    assert "official masking" in out and "BN recalibrated" in out
    code, out, err = run(
        capsys,
        "finetune",
        str(pruned),
        *TINY,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
        str(tuned),
    )
    assert code == 0, err
    before, after = netslim.load(pruned), netslim.load(tuned / "last.pth")
    assert channel_counts(after) == channel_counts(before)
    indexes = [(k, v) for k, v in before.state_dict().items() if k.endswith("select.index")]
    assert indexes and all(torch.equal(after.state_dict()[k], v) for k, v in indexes)
    assert not torch.equal(after.fc.weight, before.fc.weight)  # it trained
    if name.startswith("resnet"):
        assert all(b.raw_shortcut for b in after.modules() if hasattr(b, "raw_shortcut"))


def test_a_netslim_pruned_densenet_is_written_in_the_paper_layout(tmp_path):
    """Channels netslim removed from the stream (stem, dense and transition convs) become
    zero weights that no selection keeps: the paper's model computes the same."""
    from test_engine import sparse_model  # half of every channel group unimportant

    pruned, _ = prune_model(sparse_model("densenet40"), 0.5, compensate=False)
    counts = channel_counts(pruned)
    assert counts["conv1"][1] < 24 and counts["features.12.conv"][1] < 168  # stem, transition
    written = save_official(pruned, tmp_path / "paper.pth")
    assert len(written["cfg"]) == 39 and written["state_dict"]["conv1.weight"].shape[0] == 24
    x = torch.randn(2, 3, 32, 32)
    same(logits(netslim.load(tmp_path / "paper.pth"), x), logits(pruned, x))


class _Selecting(nn.Module):
    """A stream read whole by one conv and, through a selection, in part by another."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.select = ChannelGather(torch.tensor([0, 2, 3, 5, 7]))
        self.bn1, self.conv1 = nn.BatchNorm2d(5), nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        s = F.relu(self.bn0(self.conv0(x)))
        y = self.conv1(F.relu(self.bn1(self.select(s)))) + self.conv2(s)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn2(y)), 1), 1))


def test_the_engine_prunes_a_gathers_outputs_and_keeps_what_it_reads():
    torch.manual_seed(0)
    model = randomize_bn(_Selecting())
    with torch.no_grad():
        model.bn0.weight[:4] = 1e-3  # would go, but the selection reads the stream
        model.bn1.weight[[1, 3]] = 1e-3  # selected channels 2 and 5 go from the selection
    plan = quiet_plan(model, 0.3)
    assert plan.masks["bn0"].all() and plan.masks["bn1"].tolist() == [
        True,
        False,
        True,
        False,
        True,
    ]
    reason = "read through the channel selection select (the paper's layout)"
    assert plan.graph.fixed[plan.graph.norms["bn0"]].all() and reason in plan.fixed_reasons
    pruned = apply_plan(model, plan, compensate=False).eval()
    assert pruned.select.index.tolist() == [0, 3, 7] and pruned.conv1.in_channels == 3
    x = torch.randn(2, 3, 16, 16)
    same(logits(pruned, x), logits(masked_copy(model, plan.masks), x))
    report = prune_model(model, 0.3)[1]
    assert f"  - {reason}" in report.text()


def test_a_resnet164_of_the_paper_layout_round_trips_without_the_files(tmp_path):
    """Built here rather than read: selections in every block, raw-input projection shortcuts."""
    from netslim.official import install_gathers

    model = netslim.build_model("resnet164")
    stream = {"": 256}
    for name, block in model.named_modules():
        if hasattr(block, "raw_shortcut"):
            stream[name + "."] = block.bn1.num_features
    install_gathers(model, {f"{k}select.index": torch.arange(w) for k, w in stream.items()})
    model = randomize_bn(model)
    pruned, _ = prune_model(model, 0.4, compensate=False)
    written = save_official(pruned, tmp_path / "paper.pth")
    assert len(written["cfg"]) == 163
    x = torch.randn(2, 3, 32, 32)
    same(logits(netslim.load(tmp_path / "paper.pth"), x), logits(pruned, x))
