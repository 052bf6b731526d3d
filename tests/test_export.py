"""Export: ONNX and torch.export files equal the PyTorch network; folded BN; bench; errors."""

from __future__ import annotations

import builtins
import json
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TINY_CFG, randomize_bn
from torch import nn

import netslim
from netslim import benchmark
from netslim.checkpoint import save_checkpoint
from netslim.cli import main
from netslim.engine.plan import plan_pruning
from netslim.engine.stats import count_macs
from netslim.errors import NetslimError
from netslim.export import FORMATS, export, pick_format
from netslim.models import VGG, DenseNet, PreActResNet, ResNet, build_model

pytestmark = pytest.mark.slow  # not in make test-fast


def small(arch: str) -> nn.Module:
    """Small variants of each architecture family (same layer types, fewer layers)."""
    torch.manual_seed(0)
    model = {
        "vgg": lambda: VGG(TINY_CFG),
        "resnet56": lambda: ResNet([(8, 2, 1), (16, 2, 2)], stem=8),
        "resnet164": lambda: PreActResNet(11),
        "densenet40": lambda: DenseNet(7, 6),
        "mobilenetv2": lambda: build_model("mobilenetv2"),
    }[arch]()
    return randomize_bn(model)


def pruned(model: nn.Module, ratio: float = 0.5) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return netslim.apply_plan(model, plan_pruning(model, ratio)).eval()


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 32, 32, generator=g) for n in (1, 7)]


def rel_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("arch", ["vgg", "resnet56", "resnet164", "densenet40", "mobilenetv2"])
@pytest.mark.parametrize("prune", [False, True])
def test_onnx_file_equals_pytorch(tmp_path, arch, prune):
    model = small(arch)
    model = pruned(model) if prune else model
    path = tmp_path / "net.onnx"
    result = export(model, path)
    assert result.format == "onnx" and result.opset == 18 and result.max_rel_diff <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (images,) = session.get_inputs()
    assert images.name == "images" and not isinstance(images.shape[0], int)  # free batch axis
    with torch.no_grad():
        for x in batches():
            got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
            assert got.shape == (x.shape[0], 10)
            assert rel_diff(got, model(x)) < 1e-4


@pytest.mark.parametrize("arch, fold", [("vgg", True), ("resnet56", False)])
def test_pt2_file_equals_pytorch(tmp_path, arch, fold):
    model = pruned(small(arch), 0.6)
    path = tmp_path / "net.pt2"
    assert export(model, path, fold=fold).format == "pt2"
    program = torch.export.load(path)
    norms = [n for n in program.graph.nodes if "batch_norm" in str(n.target)]
    assert bool(norms) == (not fold)  # --no-fold keeps every BatchNorm
    with torch.no_grad():
        for x in batches():
            assert rel_diff(program.module()(x), model(x)) < 1e-4


@pytest.mark.parametrize("arch", ["vgg", "resnet56", "resnet164", "densenet40", "mobilenetv2"])
def test_folded_bn_equals_unfolded(arch):
    model = pruned(small(arch))
    folded = netslim.fold_bn(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    left = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    if arch in ("vgg", "resnet56", "mobilenetv2"):  # every BN follows a conv: all fold
        assert not left
    elif arch == "resnet164":  # a block's first BN reads the residual sum and stays
        assert 0 < len(left) < len(bns)
    else:  # DenseNet: every BN reads a concatenation (or the stem's output, shared)
        assert len(left) == len(bns)
    with torch.no_grad():
        for x in batches():
            assert rel_diff(folded(x), model(x)) < 1e-5
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # left unchanged


def test_onnx_graph_has_no_batchnorm_after_a_conv(tmp_path):
    # the TorchScript exporter folds conv + BN itself, with or without --no-fold
    for fold in (True, False):
        export(small("vgg"), tmp_path / f"{fold}.onnx", fold=fold)
        ops = {n.op_type for n in onnx.load(tmp_path / f"{fold}.onnx").graph.node}
        assert "Conv" in ops and "BatchNormalization" not in ops


def test_format_errors():
    with pytest.raises(NetslimError, match="unknown export format 'tflite'.*onnx, pt2"):
        pick_format("x.onnx", "tflite")
    with pytest.raises(NetslimError, match=r"suffix.*\.onnx \(onnx\), \.pt2 \(pt2\)"):
        pick_format("model.bin")
    assert pick_format("model.bin", "pt2") == "pt2" and pick_format("a/M.ONNX") == "onnx"


def test_unsupported_opset_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(NetslimError, match="ONNX opset must be from 9 to 20 .*got 99"):
        export(small("vgg"), tmp_path / "net.onnx", opset=99)
    assert list(tmp_path.iterdir()) == [] and "Torch IR" not in capsys.readouterr().err


def test_unwritable_path_writes_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(NetslimError, match="cannot write"):
        export(small("vgg"), blocker / "net.onnx")
    with pytest.raises(NetslimError, match="cannot write"):
        export(small("vgg"), tmp_path, "onnx")  # a folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_failed_check_writes_nothing(tmp_path, monkeypatch):
    spec = FORMATS["onnx"]
    broken = spec.__class__(
        spec.suffix, spec.write, lambda c: lambda x: torch.zeros(x.shape[0], 10)
    )
    monkeypatch.setitem(FORMATS, "onnx", broken)
    with pytest.raises(
        NetslimError, match="differs from the PyTorch network by 1 .*nothing written"
    ):
        export(small("vgg"), tmp_path / "net.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(NetslimError, match=r'pip install "netslim\[export\]"'):
        export(small("vgg"), tmp_path / "net.onnx")
    assert list(tmp_path.iterdir()) == []


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_export_and_bench(tmp_path, capsys):
    model = small("vgg")
    small_net = pruned(model, 0.6)
    for name, net in (("big", model), ("small", small_net)):
        save_checkpoint({"cfg": net.cfg, "state_dict": net.state_dict()}, tmp_path / f"{name}.pth")
    code, out, err = run(capsys, "export", tmp_path / "small.pth", "--out", tmp_path / "s.onnx")
    assert code == 0, err
    assert "opset 18" in out and "BatchNorm folded" in out and "max relative difference" in out
    code, out, err = run(capsys, "export", tmp_path / "small.pth", "--out", tmp_path / "s.x")
    assert code == 2 and "--format" in err and not (tmp_path / "s.x").exists()

    code, out, err = run(
        capsys,
        "bench",
        tmp_path / "big.pth",
        tmp_path / "small.pth",
        "--batch",
        "1,3",
        "--runtime",
        "torch,onnxruntime,openvino",
        "--repeats",
        "3",
        "--json",
    )
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["runtime"], r["batch"]) for r in rows[::2]] == [
        ("torch", 1),
        ("torch", 3),
        ("onnxruntime", 1),
        ("onnxruntime", 3),
        ("openvino", 1),
        ("openvino", 3),
    ]
    reduction = count_macs(model) / count_macs(small_net)
    for big, little in zip(rows[::2], rows[1::2]):
        assert big["speedup"] == 1.0 and big["macs"] == count_macs(model)
        assert little["macs_reduction"] == pytest.approx(reduction)
        assert little["speedup"] == pytest.approx(big["latency_ms"] / little["latency_ms"])
        assert little["efficiency"] == pytest.approx(little["speedup"] / reduction)
        assert little["images_per_s"] == pytest.approx(
            1000 * little["batch"] / little["latency_ms"]
        )
    code, out, err = run(capsys, "bench", tmp_path / "big.pth", "--runtime", "tvm")
    assert code == 2 and "unknown runtime" in err


def test_latencies_are_timed_interleaved(monkeypatch):
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    seconds = benchmark.time_interleaved(functions, repeats=3, warmup=2)
    assert calls == list("aabbcc") + list("abc") * 3
    assert set(seconds) == set("abc") and all(s >= 0 for s in seconds.values())
    fake = {"a": lambda: None}
    for stat, expected in (("median", 2), ("min", 1)):
        clock = iter([0, 1, 10, 15, 20, 22])  # calls of 1, 5 and 2 seconds
        monkeypatch.setattr(benchmark.time, "perf_counter", clock.__next__)
        assert benchmark.time_interleaved(fake, repeats=3, warmup=0, stat=stat) == {"a": expected}
    with pytest.raises(NetslimError, match="unknown statistic 'mean'"):
        benchmark.time_interleaved(fake, stat="mean")


def test_bench_names_each_network_by_what_it_is_and_says_what_it_is_timing(tmp_path, capsys):
    """Columns say architecture and pruning (from the files' records), not file stems; each
    step is announced on stderr while it runs, so stdout stays the table (or the JSON)."""
    model = netslim.build_model("vgg5-small")
    pruned_net, report = netslim.prune_model(model, 0.5)
    netslim.save(model, tmp_path / "a.pth", arch="vgg5-small")
    netslim.save(pruned_net, tmp_path / "b.pth", report, arch="vgg5-small")
    argv = ["bench", tmp_path / "a.pth", tmp_path / "b.pth", "--batch", "1,2", "--repeats", "2"]
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    assert [r["name"] for r in json.loads(out)] == ["vgg5-small", "vgg5-small pruned 0.5"] * 2
    steps = [line for line in err.splitlines() if line.startswith("netslim: [")]
    assert steps == [
        "netslim: [1/2] torch, batch 1: 2 networks, 2 interleaved rounds",
        "netslim: [2/2] torch, batch 2: 2 networks, 2 interleaved rounds",
    ]
    netslim.save(model, tmp_path / "c.pth", arch="vgg5-small")  # two alike: file names added
    code, out, err = run(capsys, "bench", tmp_path / "a.pth", tmp_path / "c.pth", "--repeats", "2")
    assert code == 0, err
    assert "vgg5-small (a)" in out and "vgg5-small (c)" in out
