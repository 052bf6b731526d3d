"""Issue 27, export: the file is honest about control flow and about its input size.

An ONNX or torch.export file holds the path one example input took through the forward
pass. Where that path depends on tensor values, the check runs the file on inputs that
take other paths and refuses it when they disagree, or writes it with a warning naming
where the forward pass read values. And ``netslim.export(model, path)`` fixes the image
size the network says it takes (an Ultralytics model 640 or its own ``imgsz``), never a
silent 32 for a network that says nothing.
"""

from __future__ import annotations

import textwrap
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from conftest import TINY_CFG, randomize_bn
from torch import nn

import netslim
from netslim.cli import main
from netslim.errors import NetslimError
from netslim.export import declared_image_size, export
from netslim.models import VGG, ResNet


class Branchy(nn.Module):
    """Two heads, picked by a branch on the input's mean: ``if x.mean() > threshold``."""

    def __init__(self, threshold: float):
        super().__init__()
        torch.manual_seed(0)
        self.threshold = threshold
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Linear(8, 10)
        self.b = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x).mean((2, 3))
        if x.mean() > self.threshold:  # the value read the tests look for
            return self.a(features)
        return self.b(features)


BRANCH_LINE = f"test_reliability_export.py:{Branchy.forward.__code__.co_firstlineno + 2}"


class ParameterSwitch(nn.Module):
    """Branches on a parameter's value: the same path whatever the input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gate = nn.Parameter(torch.ones(1))
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return y if self.gate.item() > 0 else -y


def onnx_input_shape(path) -> list:
    (images,) = onnx.load(path).graph.input
    return [d.dim_value or d.dim_param for d in images.type.tensor_type.shape.dim]


def tiny_detector():
    """An Ultralytics detection model small enough to export in seconds (strides 8-32)."""
    from ultralytics.nn.tasks import DetectionModel

    conv = lambda c: [-1, 1, "Conv", [c, 3, 2]]  # noqa: E731
    cfg = {
        "nc": 2,
        "backbone": [conv(8), conv(8), conv(16), conv(16), conv(16)],
        "head": [[[2, 3, 4], 1, "Detect", ["nc"]]],
    }
    return DetectionModel(cfg, verbose=False).eval()


# -- control flow ------------------------------------------------------------------------


def test_a_branch_the_check_inputs_split_refuses_the_onnx_file(tmp_path):
    # the mean of the check inputs is about 0, +3, -3, 0 and 0: some go each way
    with pytest.raises(NetslimError) as failure:
        export(Branchy(0.0), tmp_path / "b.onnx", image_size=16)
    message = str(failure.value)
    assert "differs from the PyTorch network by" in message and "nothing written" in message
    assert f"reads tensor values (__bool__ in Branchy ({BRANCH_LINE}))" in message
    assert "\n" not in message and list(tmp_path.iterdir()) == []


def test_a_branch_only_bright_images_take_is_caught_by_the_shifted_input(tmp_path):
    # the example and the normal, scaled and zero inputs have a mean near 0: only
    # normal + 3 takes the other branch
    with pytest.raises(NetslimError, match=r"on normal \+ 3 images; nothing written"):
        export(Branchy(1.0), tmp_path / "b.onnx", image_size=16)
    assert list(tmp_path.iterdir()) == []


def test_the_refused_file_really_holds_one_path_only(tmp_path):
    """What the refusal prevents: the exporter alone writes a file right for one branch."""
    model = Branchy(0.0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own TracerWarning
        torch.onnx.export(
            model,
            (torch.full((1, 3, 16, 16), 1.0),),
            tmp_path / "raw.onnx",
            dynamo=False,
            input_names=["images"],
        )
    session = ort.InferenceSession(tmp_path / "raw.onnx", providers=["CPUExecutionProvider"])
    for value, same in ((2.0, True), (-2.0, False)):
        x = torch.full((1, 3, 16, 16), value)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            assert torch.allclose(got, model(x), atol=1e-5) == same


def test_a_branch_the_check_inputs_split_refuses_the_pt2_file_in_one_line(tmp_path, capsys):
    with pytest.raises(NetslimError) as failure:
        export(Branchy(0.0), tmp_path / "b.pt2", image_size=16)
    message = str(failure.value)
    assert message.startswith("pt2 export of Branchy failed: its forward pass reads tensor")
    assert f"(__bool__ in Branchy ({BRANCH_LINE}))" in message and "\n" not in message
    assert capsys.readouterr().err == ""  # torch.export's graph dump and log lines hidden
    assert list(tmp_path.iterdir()) == []


def test_a_branch_every_check_input_takes_alike_writes_the_file_with_a_warning(tmp_path):
    model = Branchy(-100.0).eval()  # every check input has a mean above -100
    with pytest.warns(UserWarning, match=r"reads tensor values \(__bool__ in Branchy") as seen:
        result = export(model, tmp_path / "b.onnx", image_size=16)
    (warning,) = seen
    assert BRANCH_LINE in str(warning.message) and "may give other outputs" in str(warning.message)
    assert result.value_reads == [f"__bool__ in Branchy ({BRANCH_LINE})"]
    assert result.max_rel_diff <= 1e-4
    # the warning is true: an input below -100 takes the other branch, which the file lacks
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    x = torch.full((1, 3, 16, 16), -200.0)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        assert not torch.allclose(got, model(x), rtol=1e-3)


def test_a_branch_on_a_parameter_is_not_a_value_read(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would fail the test
        result = export(ParameterSwitch(), tmp_path / "p.onnx", image_size=16)
    assert result.value_reads == []


def test_a_boolean_mask_of_the_input_is_a_value_read(tmp_path):
    class Masked(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[x > 0].sum().reshape(1, 1)  # the mask's size depends on the values

    with pytest.warns(UserWarning, match=r"reads tensor values \(__getitem__ in Masked"):
        result = export(Masked(), tmp_path / "m.onnx", image_size=8)
    assert result.value_reads[0].startswith("__getitem__ in Masked (test_reliability_export.py:")


def test_a_network_that_reads_no_values_exports_without_a_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = export(randomize_bn(VGG(TINY_CFG)), tmp_path / "v.pt2")
    assert result.value_reads == [] and result.max_rel_diff <= 1e-4


BRANCHNET = """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            y = self.bn(self.conv(x)).relu().mean((2, 3))
            if x.mean() > -100:  # every check input takes this side
                return self.fc(y)
            return -self.fc(y)

    def build(num_classes):
        return Net(num_classes)
"""


def test_the_cli_prints_the_value_read_warning_in_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "branchnet.py").write_text(textwrap.dedent(BRANCHNET))
    monkeypatch.syspath_prepend(str(tmp_path))
    netslim.save(
        netslim.build_model("branchnet:build", 10),
        tmp_path / "b.pth",
        arch="branchnet:build",
        image_size=24,
    )
    code = main(
        [
            "export",
            str(tmp_path / "b.pth"),
            "--out",
            str(tmp_path / "b.onnx"),
            "--trust-module",
            "branchnet",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    (line,) = err.strip().splitlines()
    assert line.startswith("netslim: warning: Net's forward pass reads tensor values (__bool__")
    assert "branchnet.py:14" in line
    assert "24x24 images" in out and "normal + 3" in out  # the recorded size, and the inputs
    assert onnx_input_shape(tmp_path / "b.onnx") == ["batch", 3, 24, 24]


# -- the image size ----------------------------------------------------------------------


def test_a_yolo_without_a_recorded_size_is_taken_at_ultralytics_640():
    assert declared_image_size(netslim.build_model("ultralytics:yolov8n.yaml", 80)) == 640


def test_an_ultralytics_model_is_exported_at_the_imgsz_it_was_trained_at(tmp_path):
    model = tiny_detector()
    model.args = {"imgsz": [64, 64]}  # as a trained Ultralytics model keeps its arguments
    result = export(model, tmp_path / "y.onnx")  # through Ultralytics' exporter: batch 1
    assert result.image_size == 64 and result.metadata["imgsz"] == [64, 64]
    assert onnx_input_shape(tmp_path / "y.onnx") == [1, 3, 64, 64]


def test_a_non_square_imgsz_asks_for_image_size(tmp_path):
    model = tiny_detector()
    model.args = {"imgsz": [64, 96]}
    with pytest.raises(
        NetslimError,
        match=r"imgsz its model.args records is \[64, 96\], not one "
        r"square size; export takes square images: pass image_size=N",
    ):
        export(model, tmp_path / "y.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_netslim_architecture_is_exported_at_32(tmp_path):
    result = export(randomize_bn(ResNet([(8, 1, 1)], stem=8)), tmp_path / "r.onnx")
    assert result.image_size == 32 and onnx_input_shape(result.path) == ["batch", 3, 32, 32]


def test_a_network_that_says_no_size_asks_for_image_size_and_writes_nothing(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)  # CIFAR at 32 or ImageNet at 224?
    with pytest.raises(
        NetslimError,
        match="export needs image_size=: ResNet does not say which "
        "image size it takes .* pass image_size=N",
    ):
        export(model, tmp_path / "r.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_image_size_given_is_the_one_in_the_file(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    result = export(model, tmp_path / "r.onnx", image_size=48)
    assert result.image_size == 48 and onnx_input_shape(result.path) == ["batch", 3, 48, 48]


def test_a_size_the_network_cannot_take_is_one_line(tmp_path):
    # four max-pools and a 2x2 average pool: a CIFAR VGG takes 32x32 images only
    with pytest.raises(NetslimError) as failure:
        export(randomize_bn(VGG(TINY_CFG)), tmp_path / "v.onnx", image_size=64)
    message = str(failure.value)
    assert message.startswith("VGG does not run on random normal images of 64x64 pixels (")
    assert message.endswith("pass the image size it takes (--image-size, image_size=)")
    assert "\n" not in message and list(tmp_path.iterdir()) == []
