"""Hostile files and inputs (issue 20): one test per case, named for what netslim promises.

Files never run code a checkpoint names; sizes that would exhaust the machine fail before
any work; damaged files and non-finite networks are refused; figures are right or refused;
nothing ends in a traceback. Every file here is tiny and generated. (Item 7, threads under
load, is tests/test_reliability_threads.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_bn
from PIL import Image
from torch import nn

import netslim
from netslim import limits
from netslim.checkpoint import read_checkpoint
from netslim.cli import main
from netslim.data.imagefolder import decode_image, load_imagefolder
from netslim.engine.plan import plan_pruning, reference_network
from netslim.engine.surgery import apply_plan
from netslim.errors import NetslimError
from netslim.export import check_inputs, output_tensors, relative_difference

SRC = str(Path(netslim.__file__).parents[1])
OFFICIAL = Path(__file__).parents[1] / ".." / "shared" / "official-checkpoints"
DATA = ["--dataset", "synthetic", "--train-size", "64", "--test-size", "32", "--device", "cpu"]

# A builder module that leaves a marker file when it is imported: proof that it ran.
MARKING_MODULE = """
    from pathlib import Path
    Path(__file__).with_name("IMPORTED").write_text("ran")
    from torch import nn

    def build(num_classes):
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
        )
"""


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The single line a refusal prints (asserting there is just one)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def module_checkpoint(tmp_path, monkeypatch) -> Path:
    """A checkpoint whose spec names ``marking:build``; ``marking.py`` lies in the current
    folder, as a downloaded archive would leave it. Returns the checkpoint."""
    (tmp_path / "marking.py").write_text(textwrap.dedent(MARKING_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "marking", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    model = randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        )
    )
    netslim.save(model, tmp_path / "model.pth", arch="marking:build")
    return tmp_path / "model.pth"


def flip_bytes(path: Path, count: int = 64, bit: bool = False) -> None:
    """Flip ``count`` bytes (or one bit) in the middle of the largest tensor record."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    if bit:
        data[middle] ^= 0x10
    else:
        for i in range(middle, middle + count):
            data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------
# 1. A checkpoint names code only with consent
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["info"],
        ["prune", "--ratio", "0.5", "--out", "p.pth"],
        ["export", "--out", "m.onnx"],
        ["bench", "--repeats", "1", "--batch", "1"],
        ["finetune", *DATA, "--out", "ft"],
    ],
    ids=["info", "prune", "export", "bench", "finetune"],
)
def test_a_checkpoint_naming_a_module_in_the_current_folder_imports_nothing(
    module_checkpoint, capsys, command
):
    name, *rest = command
    code, _, err = run(capsys, name, module_checkpoint, *rest)
    line = one_line(err)
    assert code == 2 and "saved from the module marking" in line
    assert "--trust-module marking" in line
    assert not (module_checkpoint.parent / "IMPORTED").exists()


def test_netslim_load_of_a_file_naming_a_module_imports_nothing(module_checkpoint):
    with pytest.raises(NetslimError, match=r"trust='marking'"):
        netslim.load(module_checkpoint)
    assert not (module_checkpoint.parent / "IMPORTED").exists()


def test_a_checkpoint_naming_a_standard_library_module_imports_nothing(tmp_path):
    """``this:build`` would print the Zen of Python from any folder: it is not imported."""
    model = randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 32 * 32, 10)
        )
    )
    netslim.save(model, tmp_path / "this.pth", arch="this:build")
    code = (
        "import sys, netslim\ntry:\n    netslim.load(sys.argv[1])\n"
        "except netslim.NetslimError as e:\n    print(e)\n"
        "print('imported' if 'this' in sys.modules else 'not imported')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "this.pth")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "The Zen of Python" not in done.stdout
    assert done.stdout.splitlines()[-1] == "not imported"
    assert "--trust-module this" in done.stdout


def test_trusting_the_module_or_its_package_loads_the_checkpoint(module_checkpoint, capsys):
    code, out, err = run(capsys, "info", module_checkpoint, "--json", "--trust-module", "marking")
    assert code == 0, err
    assert json.loads(out)["arch"] == "marking:build"
    assert (module_checkpoint.parent / "IMPORTED").exists()
    model = netslim.load(module_checkpoint, trust=["other", "marking:build"])  # a spec works too
    assert isinstance(model[1], nn.BatchNorm2d)
    with pytest.raises(NetslimError, match="saved from the module marking"):
        netslim.load(module_checkpoint, trust="mark")  # a prefix of the name is not its package


def test_a_run_of_your_own_module_resumes_without_being_told_again(module_checkpoint, capsys):
    """The module --arch named at the start is the run's own: --resume builds it again."""
    out = module_checkpoint.parent / "run"
    train = [
        "train",
        "--arch",
        "marking:build",
        *DATA,
        "--batch-size",
        "32",
        "--precision",
        "fp32",
        "--threads",
        "1",
        "--out",
        out,
    ]
    assert run(capsys, *train, "--epochs", "1")[0] == 0
    code, _, err = run(capsys, *train, "--epochs", "2", "--resume")
    assert code == 2 and "settings differ" in err  # the run's epochs are part of its settings
    code, _, err = run(capsys, *train, "--epochs", "1", "--resume")
    assert code == 0, err


# --------------------------------------------------------------------------------------
# 2. Inputs that would exhaust the machine fail before any work
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["train", *DATA, "--image-size", "100000", "--out", "r"],
        [
            "train",
            "--dataset",
            "imagefolder",
            "--data-root",
            "imgs",
            "--image-size",
            "100000",
            "--out",
            "r",
        ],
        ["export", "m.pth", "--out", "m.onnx", "--image-size", "100000"],
        ["bench", "m.pth", "--image-size", "5000"],
        ["prune", "m.pth", "--ratio", "0.5", "--out", "p.pth", "--image-size", "4097"],
    ],
    ids=["train", "imagefolder", "export", "bench", "prune"],
)
def test_an_image_size_beyond_the_maximum_is_refused_before_any_work(
    tmp_path, capsys, monkeypatch, argv
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"must be from 8 to {limits.MAX_IMAGE_SIZE} pixels" in err
    assert not (tmp_path / "r").exists()


def test_an_image_size_of_zero_is_refused_not_replaced(tmp_path, capsys, tiny_vgg):
    """``export --image-size 0`` exported at 32 without a word."""
    netslim.save(tiny_vgg, tmp_path / "m.pth", arch="vgg11")
    with pytest.raises(SystemExit):
        main(
            [
                "export",
                str(tmp_path / "m.pth"),
                "--out",
                str(tmp_path / "m.pt2"),
                "--image-size",
                "0",
            ]
        )
    assert "must be from 8 to" in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()


def test_a_checkpoint_recording_an_impossible_image_size_is_refused(tmp_path, capsys, tiny_vgg):
    netslim.save(tiny_vgg, tmp_path / "m.pth", image_size=100000)
    code, _, err = run(capsys, "info", tmp_path / "m.pth")
    assert code == 2
    assert "its recorded image size must be from 8 to" in one_line(err)


def test_a_thread_count_beyond_the_cpus_is_refused(tmp_path, capsys):
    """1,000 threads on 2 cores: a run of 8 s had not ended after 300 s."""
    before = torch.get_num_threads()
    code, _, err = run(
        capsys,
        "prune",
        "--threads",
        "1000",
        tmp_path / "m.pth",
        "--ratio",
        "0.5",
        "--out",
        tmp_path / "p.pth",
    )
    most = limits.cpu_count()
    assert (
        code == 2 and f"--threads 1000 is more than the CPUs this process may use ({most})" in err
    )
    assert torch.get_num_threads() == before


def test_workers_beyond_the_cpus_are_refused(tmp_path):
    with pytest.raises(NetslimError, match=r"--workers 1000 is more than the CPUs this process"):
        load_imagefolder(tmp_path, workers=1000)


def test_a_batch_larger_than_memory_is_refused(tmp_path, capsys, tiny_vgg):
    netslim.save(tiny_vgg, tmp_path / "m.pth", arch="vgg11")
    code, _, err = run(
        capsys, "bench", tmp_path / "m.pth", "--batch", "100000", "--image-size", "2048"
    )
    assert code == 2 and "a batch of 100000 images of 2048x2048 takes" in one_line(err)
    assert "lower --batch or --image-size" in err


def test_a_synthetic_set_larger_than_memory_is_refused(capsys, tmp_path):
    code, _, err = run(
        capsys,
        "train",
        "--dataset",
        "synthetic",
        "--train-size",
        "10000000000",
        "--device",
        "cpu",
        "--out",
        tmp_path / "r",
    )
    assert code == 2 and "painting 10,000,000,000 synthetic images takes" in one_line(err)


def test_channel_counts_larger_than_the_stored_weights_are_refused(tmp_path, tiny_vgg):
    """A file cannot make netslim allocate layers larger than the tensors it holds."""
    netslim.save(tiny_vgg, tmp_path / "m.pth", arch="vgg11")
    ckpt = torch.load(tmp_path / "m.pth", weights_only=True)
    ckpt["netslim"]["arch"] = "resnet56"  # built from its counts, not from its cfg
    ckpt["channels"] = {"conv1": [3, 10**9, 1, 0]}
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(
        NetslimError, match=r"channel counts \[3, 1000000000, 1, 0\] of layer conv1"
    ):
        netslim.load(tmp_path / "bad.pth")


def test_a_class_count_larger_than_the_stored_weights_is_refused(tmp_path):
    model = randomize_bn(netslim.build_model("resnet56"))
    netslim.save(model, tmp_path / "m.pth", arch="resnet56")
    ckpt = torch.load(tmp_path / "m.pth", weights_only=True)
    ckpt["netslim"]["num_classes"] = 10**12
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(NetslimError, match="number of classes 1000000000000 cannot be right"):
        netslim.load(tmp_path / "bad.pth")


# --------------------------------------------------------------------------------------
# 3. Corruption never passes silently
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "prune", "export"])
@pytest.mark.parametrize("bit", [False, True], ids=["64 bytes", "one bit"])
def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, capsys, tiny_vgg, command, bit):
    path = tmp_path / "m.pth"
    netslim.save(tiny_vgg, path, arch="vgg11")
    flip_bytes(path, bit=bit)
    extra = {
        "info": [],
        "prune": ["--ratio", "0.5", "--out", tmp_path / "p.pth"],
        "export": ["--out", tmp_path / "m.pt2"],
    }[command]
    code, _, err = run(capsys, command, path, *extra)
    line = one_line(err)
    assert code == 2 and f"{path} is damaged" in line and "fails its CRC-32 check" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


def test_an_intact_checkpoint_reads_back_exactly(tmp_path, tiny_vgg):
    """The CRC check refuses only damaged files: an intact one reads back bit for bit."""
    netslim.save(tiny_vgg, tmp_path / "m.pth", arch="vgg11")
    loaded = netslim.load(tmp_path / "m.pth")
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), tiny_vgg.state_dict().values())
    )


# --------------------------------------------------------------------------------------
# 4. Checked exports check
# --------------------------------------------------------------------------------------


def test_export_of_a_network_holding_nan_writes_nothing(tmp_path, capsys, tiny_vgg):
    with torch.no_grad():
        tiny_vgg.classifier.weight[0, 0] = float("nan")
    netslim.save(tiny_vgg, tmp_path / "m.pth", arch="vgg11")
    code, _, err = run(capsys, "export", tmp_path / "m.pth", "--out", tmp_path / "m.pt2")
    assert code == 2 and "holds NaN or Inf in 1 of its tensors" in one_line(err)
    assert not (tmp_path / "m.pt2").exists()


def test_the_export_check_fails_on_nan_outputs(tiny_vgg):
    """NaN compared with NaN is not a difference of 0: the check reports infinity."""

    def worst(run) -> float:  # over the check's own inputs, as export compares them
        with torch.no_grad():
            return max(
                relative_difference(output_tensors(tiny_vgg(x)), output_tensors(run(x)))
                for _, x in check_inputs(32)
            )

    assert worst(lambda x: torch.full((len(x), 10), float("nan"))) == float("inf")
    with torch.no_grad():
        tiny_vgg.classifier.bias.fill_(float("nan"))
    assert worst(lambda x: tiny_vgg(x)) == float("inf")


# --------------------------------------------------------------------------------------
# 5. Figures are right or refused
# --------------------------------------------------------------------------------------

TINY_NET = """
    from torch import nn

    def build(num_classes):
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
        )
"""


@pytest.mark.slow
def test_multipass_counts_the_final_macs_at_the_run_image_size(tmp_path, monkeypatch):
    from netslim.config import TrainConfig
    from netslim.data import make_synthetic
    from netslim.lab.multipass import run_multipass

    (tmp_path / "tinynet.py").write_text(textwrap.dedent(TINY_NET))
    monkeypatch.syspath_prepend(str(tmp_path))
    small = make_synthetic(64, 32)
    grow = lambda x: x.repeat_interleave(2, -1).repeat_interleave(2, -2)  # noqa: E731  64x64
    data = replace(
        small, train_images=grow(small.train_images), test_images=grow(small.test_images)
    )
    config = TrainConfig(
        arch="tinynet:build",
        dataset="synthetic",
        epochs=1,
        batch_size=32,
        precision="fp32",
        device="cpu",
        image_size=64,
    )
    model = netslim.build_model("tinynet:build")
    summary = run_multipass(
        config,
        data,
        model,
        tmp_path / "mp",
        passes=1,
        ratio=0.5,
        finetune_epochs=1,
        recalibrate=1,
        log=lambda s: None,
    )
    final = netslim.load(tmp_path / "mp" / "finetune" / "last.pth", trust="tinynet")
    assert summary[-1]["macs"] == netslim.count_macs(final, (1, 3, 64, 64))
    assert summary[-1]["macs"] > netslim.count_macs(final, (1, 3, 32, 32))
    assert summary[-1]["macs"] == summary[0]["macs"]  # the pass's own figure, also at 64x64


@pytest.mark.parametrize("command", ["train", "info"])
def test_a_sparsity_threshold_of_nan_is_refused(tmp_path, capsys, command):
    argv = (
        ["train", *DATA, "--out", tmp_path / "r"]
        if command == "train"
        else ["info", tmp_path / "m.pth"]
    )
    with pytest.raises(SystemExit):
        main([str(a) for a in [*argv, "--sparsity-threshold", "nan"]])
    assert "--sparsity-threshold: must be > 0 and finite" in capsys.readouterr().err
    with pytest.raises(NetslimError, match="--sparsity-threshold must be > 0"):
        netslim.TrainConfig(sparsity_threshold=float("nan")).check()


def write_folder(root: Path, pixel) -> None:
    """A 2-class image folder whose every image is ``pixel(class, i)``."""
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(pixel(c, i)).save(root / split / c / f"{i}.png")


def test_constant_images_are_refused_naming_the_zero_std(tmp_path):
    """Blank images failed later as "training diverged, lower --lr"."""
    write_folder(tmp_path, lambda c, i: np.full((16, 16, 3), 128, np.uint8))
    with pytest.raises(NetslimError, match=r"vary by less than one grey level in channel R, G, B"):
        load_imagefolder(tmp_path, image_size=16)
    write_folder(tmp_path / "ok", lambda c, i: np.full((16, 16, 3), 40 * i, np.uint8))
    assert load_imagefolder(tmp_path / "ok", image_size=16).std[0] > 0.1


def test_a_float_tiff_decodes_from_0_1_not_to_black(tmp_path):
    values = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    decoded = decode_image(str(tmp_path / "f.tif"), 16, resize="stretch")
    expected = torch.from_numpy(np.rint(values.astype(np.float64) * 255).astype(np.uint8))
    assert torch.equal(decoded[0], expected) and decoded.max() > 200


def test_a_float_tiff_of_no_known_range_is_one_line(tmp_path):
    Image.fromarray(np.full((8, 8), 1000.0, np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(NetslimError, match=r"f.tif \(float pixels from 1000 to 1000, neither"):
        decode_image(str(tmp_path / "f.tif"), 8)


def test_a_32bit_integer_tiff_is_scaled_from_its_own_range(tmp_path):
    """Scaled as 16-bit, every value above 65535 came out white."""
    wide = np.random.default_rng(0).integers(0, 2**31 - 1, (16, 16)).astype(np.int32)
    Image.fromarray(wide).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    decoded = decode_image(str(tmp_path / "i.tif"), 16, resize="stretch")
    expected = np.rint(wide.astype(np.float64) * 255 / (2**31 - 1)).astype(np.uint8)
    assert torch.equal(decoded[0], torch.from_numpy(expected))


def test_a_builder_without_batchnorm_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """It trained without a word, although nothing in it can be slimmed."""
    (tmp_path / "nobn.py").write_text(
        "from torch import nn\n\ndef build(num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), "
        "nn.Linear(4 * 30 * 30, num_classes))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "nobn", raising=False)
    code, _, err = run(capsys, "train", "--arch", "nobn:build", *DATA, "--out", tmp_path / "r")
    assert code == 2 and "nothing to slim in Sequential: it has no BatchNorm" in one_line(err)
    assert not (tmp_path / "r").exists()


def test_prune_model_leaves_the_callers_model_in_train_mode(tiny_vgg):
    tiny_vgg.train()
    before = {k: v.clone() for k, v in tiny_vgg.state_dict().items()}
    netslim.prune_model(tiny_vgg, 0.5)
    assert tiny_vgg.training and all(m.training for m in tiny_vgg.modules())
    assert all(torch.equal(before[k], v) for k, v in tiny_vgg.state_dict().items())


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="the paper's checkpoints are not in shared/")
@pytest.mark.parametrize("lie", ["width", "short"])
@pytest.mark.parametrize("name", ["resnet164_pruned40.pth.tar", "densenet40_pruned40.pth.tar"])
def test_a_paper_file_whose_cfg_lies_is_refused(tmp_path, name, lie):
    """The VGG path refused a cfg that contradicts the weights; ResNet-164 and DenseNet-40
    files are now held to the same."""
    ckpt = torch.load(OFFICIAL / name, weights_only=True, map_location="cpu")
    cfg = list(ckpt["cfg"])
    ckpt["cfg"] = cfg[:-1] if lie == "short" else [cfg[0] + 1, *cfg[1:]]
    torch.save(ckpt, tmp_path / name)
    with pytest.raises(NetslimError, match="its cfg does not match the"):
        netslim.load(tmp_path / name)


# --------------------------------------------------------------------------------------
# 6. No tracebacks
# --------------------------------------------------------------------------------------


def test_a_network_mixing_affine_and_non_affine_batchnorm_prunes_exactly():
    """pruning._scores looked every BatchNorm up among the affine ones: a KeyError."""
    torch.manual_seed(0)
    model = nn.Sequential(  # unpadded: compensation is exact too (no borders)
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.BatchNorm2d(8, affine=False),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 10),
    )
    for bn in (model[1], model[7]):
        randomize_bn(bn)
    plan = plan_pruning(model, 0.5)
    x = torch.randn(2, 3, 16, 16)
    for compensate in (False, True):
        pruned = apply_plan(model, plan, compensate=compensate).eval()
        assert pruned[3].out_channels == 8  # no gamma scales the non-affine one's channels
        assert pruned[0].out_channels < 8 or pruned[6].out_channels < 12
        with torch.no_grad():
            expected = reference_network(model, plan, compensate)(x)
            torch.testing.assert_close(pruned(x), expected, rtol=1e-4, atol=1e-5)


def write_huge_png(path: Path, width: int, height: int) -> None:
    """A valid tiny PNG whose header declares ``width`` x ``height`` pixels."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_a_png_declaring_50000_by_50000_pixels_is_one_line(tmp_path):
    write_huge_png(tmp_path / "bomb.png", 50000, 50000)
    with pytest.raises(NetslimError, match="bomb.png declares more pixels than Pillow decodes"):
        decode_image(str(tmp_path / "bomb.png"), 32)


@pytest.mark.parametrize(
    "source, kind", [("def build(:\n", "SyntaxError"), ("raise ValueError('no')\n", "ValueError")]
)
def test_a_builder_module_that_fails_on_import_is_one_line(
    tmp_path, capsys, monkeypatch, source, kind
):
    (tmp_path / "broken.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "broken", raising=False)
    code, _, err = run(capsys, "train", "--arch", "broken:build", *DATA, "--out", tmp_path / "r")
    assert code == 2 and f"importing broken failed: {kind}" in one_line(err)


@pytest.mark.slow
def test_report_of_a_lab_whose_metrics_were_cut_mid_line_renders(micro_lab, tmp_path, capsys):
    """The report reads the history from last.pth, as train --resume repairs it."""
    from netslim.lab.report import load_results

    lab = tmp_path / "lab"
    shutil.copytree(micro_lab, lab)
    metrics = lab / "train" / "lam=1e-4" / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole[: len(whole) - 40])  # cut inside the last record
    code, _, err = run(capsys, "report", lab)
    assert code == 0, err
    assert load_results(lab).train[1e-4] == [json.loads(line) for line in whole.splitlines()]


def test_prune_model_of_a_model_on_the_meta_device_is_one_line():
    with torch.device("meta"):
        model = netslim.build_model("vgg11-small")
    with pytest.raises(NetslimError, match="on the meta device"):
        netslim.prune_model(model, 0.5)


def test_a_damaged_checkpoint_from_read_checkpoint_names_the_record(tmp_path, tiny_vgg):
    netslim.save(tiny_vgg, tmp_path / "m.pth", arch="vgg11")
    flip_bytes(tmp_path / "m.pth", bit=True)
    with pytest.raises(NetslimError, match=r"its record \S+/data/\d+ fails its CRC-32 check"):
        read_checkpoint(tmp_path / "m.pth")
