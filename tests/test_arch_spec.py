"""``--arch torchvision:NAME``, ``timm:NAME`` and ``package.module:callable``: end to end
through the CLI, stored in checkpoints, and their errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import randomize_bn

import netslim
from netslim.cli import main
from netslim.errors import NetslimError

pytestmark = pytest.mark.slow  # not in make test-fast

DATA = ["--dataset", "synthetic", "--train-size", "128", "--test-size", "64", "--device", "cpu"]
TINY = [*DATA, "--batch-size", "64", "--precision", "fp32"]  # training flags too
SRC = str(Path(netslim.__file__).parents[1])


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_torchvision_resnet18_train_prune_finetune_info(tmp_path, capsys):
    run_dir, pruned, tuned = tmp_path / "sparse", tmp_path / "pruned.pth", tmp_path / "tuned"
    code, _, err = run(
        capsys,
        "train",
        "--arch",
        "torchvision:resnet18",
        *TINY,
        "--epochs",
        "1",
        "--lam",
        "1e-3",
        "--out",
        str(run_dir),
    )
    assert code == 0, err
    code, out, err = run(
        capsys,
        "prune",
        str(run_dir / "last.pth"),
        "--ratio",
        "0.5",
        "--out",
        str(pruned),
        *DATA,
        "--recalibrate",
        "1",
    )
    assert code == 0, err
    assert "BN recalibrated" in out
    model = netslim.load(pruned)  # rebuilt from the stored spec and channel counts
    assert type(model) is torchvision.models.ResNet
    unpruned = netslim.load(run_dir / "last.pth")
    assert netslim.count_params(model) < netslim.count_params(unpruned)
    meta = torch.load(pruned, weights_only=True)["netslim"]
    assert meta["arch"] == "torchvision:resnet18" and meta["image_size"] == 32
    assert meta["prune"]["params_after"] == netslim.count_params(model)

    code, _, err = run(capsys, "finetune", str(pruned), *TINY, "--epochs", "1", "--out", str(tuned))
    assert code == 0, err
    code, out, _ = run(capsys, "info", str(tuned / "last.pth"), "--json")
    info = json.loads(out)
    assert info["arch"] == "torchvision:resnet18" and info["kind"] == "finetune"
    assert info["params"] == netslim.count_params(model)
    assert info["macs"] == netslim.count_macs(model)


BUILDER = """
    from torch import nn

    def build(num_classes):
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 3, padding=1, stride=2), nn.BatchNorm2d(24), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, num_classes),
        )
"""


def write_module(root: Path) -> None:
    (root / "mypkg").mkdir(parents=True)
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "mymod.py").write_text(textwrap.dedent(BUILDER))


def test_your_own_builder_from_the_command_line(tmp_path):
    """A module the CLI imports from PYTHONPATH: train, prune, info in fresh processes (the
    last two told to trust the module their checkpoints name)."""
    write_module(tmp_path / "code")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(tmp_path / "code")])}

    def netslim_cli(*argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "netslim", *argv],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    netslim_cli(
        "train",
        "--arch",
        "mypkg.mymod:build",
        *TINY,
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
    )
    # a checkpoint naming your module is built only with your consent (issue 20)
    netslim_cli(
        "prune",
        str(tmp_path / "run" / "last.pth"),
        "--ratio",
        "0.4",
        "--out",
        str(tmp_path / "p.pth"),
        "--trust-module",
        "mypkg.mymod",
    )
    info = json.loads(
        netslim_cli("info", str(tmp_path / "p.pth"), "--json", "--trust-module", "mypkg")
    )
    assert info["arch"] == "mypkg.mymod:build"
    assert info["conv_channels"][0] < 16 or info["conv_channels"][1] < 24


def test_a_module_in_the_current_folder_is_found(tmp_path, capsys, monkeypatch):
    write_module(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mypkg", raising=False)
    monkeypatch.delitem(sys.modules, "mypkg.mymod", raising=False)
    model = netslim.build_model("mypkg.mymod:build", num_classes=7)
    assert model[-1].out_features == 7


def test_pruned_own_module_loads_with_its_builder(tmp_path):
    def builder():
        torch.manual_seed(1)
        return torchvision.models.mobilenet_v3_small(num_classes=10)

    model = randomize_bn(builder())
    pruned, report = netslim.prune_model(model, 0.3, input_size=(1, 3, 64, 64))
    path = tmp_path / "pruned.pth"
    netslim.save(pruned, path, report, image_size=64)
    with pytest.raises(NetslimError, match=r"load it with netslim.load\(path, builder\)"):
        netslim.load(path)
    loaded = netslim.load(path, builder)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned.eval()(x))
    meta = torch.load(path, weights_only=True)["netslim"]
    assert meta["image_size"] == 64 and meta["prune"]["macs_after"] == report.macs_after


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        (
            "torchvision:resnet19",
            "no torchvision classification model 'resnet19'; did you mean resnet18",
        ),
        ("timm:resnet_18", "no timm model 'resnet_18'; did you mean resnet18"),
        ("nosuchpkg.models:build", "cannot import nosuchpkg.models (No module named 'nosuchpkg')"),
        ("os:getcwd", "--arch os:getcwd: building the model failed: TypeError"),
        ("os.path:sep", "os.path has no callable named 'sep'"),
    ],
)
def test_an_architecture_that_cannot_be_built_is_one_clear_line(tmp_path, capsys, arch, message):
    code, _, err = run(capsys, "train", "--arch", arch, *TINY, "--out", str(tmp_path / "r"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_a_missing_zoo_package_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    code, _, err = run(capsys, "train", "--arch", "timm:resnet18", *TINY, "--out", str(tmp_path))
    assert code == 2
    assert "--arch timm:resnet18 needs the package timm" in err
    assert "pip install 'netslim[zoo]'" in err


def test_a_malformed_spec_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--arch", "my pkg:build", "--out", "x"])
    assert e.value.code == 2
    assert "bad spec 'my pkg:build'" in capsys.readouterr().err


def test_the_core_never_imports_torchvision_or_timm():
    code = (
        "import sys, netslim, netslim.cli.commands; netslim.build_model('resnet18'); "
        "print(sorted(m for m in ('torchvision', 'timm') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_prune_and_info_work_at_the_image_size_the_checkpoint_records(tmp_path, capsys):
    """Inception-v3 cannot take 32x32: a checkpoint saved at 80 px prunes and counts at 80."""
    torch.manual_seed(0)
    spec = "torchvision:inception_v3"
    model = randomize_bn(netslim.build_model(spec, 10))
    netslim.save(model, tmp_path / "m.pth", arch=spec, image_size=80)
    code, _, err = run(
        capsys, "prune", str(tmp_path / "m.pth"), "--ratio", "0.3", "--out", str(tmp_path / "p.pth")
    )
    assert code == 0, err
    pruned = netslim.load(tmp_path / "p.pth")
    meta = torch.load(tmp_path / "p.pth", weights_only=True)["netslim"]
    assert meta["image_size"] == 80
    assert meta["prune"]["macs_after"] == netslim.count_macs(pruned, (1, 3, 80, 80))
    code, out, _ = run(capsys, "info", str(tmp_path / "p.pth"))
    assert code == 0 and "per 80x80 image" in out


def test_the_lab_takes_a_spec_and_checks_it_before_training(tmp_path, capsys):
    code, _, err = run(
        capsys,
        "lab",
        "--arch",
        "torchvision:resnet19",
        "--dataset",
        "synthetic",
        "--out",
        str(tmp_path / "lab"),
    )
    assert code == 2 and "no torchvision classification model 'resnet19'" in err
    assert not (tmp_path / "lab").exists()
    netslim.LabConfig(arch="torchvision:resnet18").check()  # a good spec passes
