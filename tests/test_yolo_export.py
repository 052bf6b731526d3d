"""Issue 28, the hand-off to deployment: a pruned YOLO leaves netslim as Ultralytics users
expect. ``netslim export`` (and ``netslim.export``) write it through Ultralytics' own
exporter, so that the ONNX carries Ultralytics' metadata (names, stride, task, imgsz) and
``YOLO(path)`` predicts and validates with it, giving the PyTorch network's boxes; the image
size defaults to the one the checkpoint records; every bad request is one line."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import onnx
import pytest
import torch
from conftest import TINY_CFG, randomize_bn
from test_yolo import cli, write_data

import netslim
from netslim.errors import NetslimError
from netslim.models import VGG

pytestmark = pytest.mark.slow  # not in make test-fast: it prunes and exports YOLOs
NAMES = {0: "red", 1: "green"}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> dict[str, Path]:
    """A yolov8n with trained-looking BatchNorms and its data set's class names, pruned by
    half at 64 pixels: the .pth, the .pt beside it, and the tiny data set."""
    from netslim.yolo.files import write_model
    from netslim.yolo.prune import prune

    root = tmp_path_factory.mktemp("yolo-export")
    data = write_data(root / "data", n_train=2, n_val=4)
    torch.manual_seed(0)  # the same network every run: the boxes compared below are fixed
    model = randomize_bn(netslim.build_model("ultralytics:yolov8n.yaml", 2))
    # class scores around 0.5, not Ultralytics' initial 1e-3: boxes to compare
    with torch.no_grad():
        for branch in model.model[-1].cv3:
            branch[-1].bias.zero_()
    model.names = dict(NAMES)
    write_model(model, root / "y.pt")
    prune(root / "y.pt", root / "p.pth", ratio=0.5, imgsz=64, log=lambda *_: None)
    return {"pth": root / "p.pth", "pt": root / "p.pt", "data": data, "source": root / "y.pt"}


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def input_shape(path: Path) -> list:
    (images,) = onnx.load(str(path)).graph.input
    return [d.dim_value or d.dim_param for d in images.type.tensor_type.shape.dim]


def conv_widths(path: Path) -> list[int]:
    """The output channels of every Conv in an ONNX file (BatchNorm folded into them)."""
    graph = onnx.load(str(path)).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    return sorted(shapes[n.input[1]][0] for n in graph.node if n.op_type == "Conv")


def test_the_onnx_of_a_pruned_yolo_carries_ultralytics_metadata_and_its_pruned_widths(
    pruned, tmp_path, capsys
):
    out = tmp_path / "y.onnx"
    code, printed, err = cli(capsys, "export", pruned["pth"], "--out", out)  # no --image-size
    assert code == 0, err
    assert "64x64 images, Ultralytics' metadata: task detect, 2 classes, stride 32" in printed
    assert "max relative difference" in printed and f"yolo predict model={out} imgsz=64" in printed
    meta = metadata(out)
    assert meta["task"] == "detect" and meta["stride"] == "32" and meta["imgsz"] == "[64, 64]"
    assert (
        ast.literal_eval(meta["names"]) == NAMES
    )  # kept through the .pth, as Ultralytics writes them
    assert input_shape(out) == [1, 3, 64, 64]
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["output0"]  # not "logits"

    model = netslim.load(pruned["pth"])
    widths = sorted(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    full = netslim.build_model("ultralytics:yolov8n.yaml", 2)
    assert conv_widths(out) == widths  # the pruned network, every layer
    assert sum(widths) < sum(
        m.out_channels for m in full.modules() if isinstance(m, torch.nn.Conv2d)
    )
    assert list(tmp_path.iterdir()) == [out]  # its temporary folder is gone


def test_ultralytics_predicts_and_validates_with_it_giving_the_pytorch_boxes(pruned, tmp_path):
    from ultralytics import YOLO

    out = tmp_path / "y.onnx"
    netslim.export(netslim.load(pruned["pth"]), out)
    images = sorted(str(p) for p in (pruned["data"].parent / "images" / "val").iterdir())
    settings = dict(imgsz=64, conf=0.05, max_det=20, device="cpu", verbose=False)
    onnx_results = YOLO(str(out), task="detect").predict(images, **settings)
    torch_results = YOLO(str(pruned["pt"])).predict(images, **settings)
    assert sum(len(r.boxes) for r in torch_results) > 0  # something to compare
    for got, want in zip(onnx_results, torch_results):
        assert got.names == NAMES  # from the file's metadata
        # boxes clear of the conf threshold: one scored 0.05 +- 1e-6 may fall either side
        got, want = (r.boxes[r.boxes.conf > 0.06] for r in (got, want))
        assert len(got) == len(want)
        torch.testing.assert_close(got.xyxy, want.xyxy, atol=1e-2, rtol=1e-3)
        torch.testing.assert_close(got.conf, want.conf, atol=1e-4, rtol=1e-3)
        assert torch.equal(got.cls, want.cls)

    metrics = YOLO(str(out), task="detect").val(
        data=str(pruned["data"]), imgsz=64, batch=2, device="cpu", plots=False, verbose=False
    )
    assert 0.0 <= metrics.box.map <= 1.0  # `yolo val model=y.onnx` works


def test_the_size_defaults_to_the_one_the_checkpoint_records(pruned, tmp_path, capsys):
    model = netslim.load(pruned["pth"])  # pruned at 64: netslim.load keeps it where
    assert model.args["imgsz"] == 64  # Ultralytics keeps it
    result = netslim.export(model, tmp_path / "a.onnx")
    assert result.image_size == 64 and input_shape(result.path) == [1, 3, 64, 64]

    code, printed, err = cli(capsys, "export", pruned["pt"], "--out", tmp_path / "b.onnx")
    assert code == 0, err  # the .pt written beside the .pth records imgsz as Ultralytics does
    assert "64x64 images" in printed and metadata(tmp_path / "b.onnx")["imgsz"] == "[64, 64]"

    code, printed, err = cli(
        capsys,
        "export",
        pruned["pth"],
        "--out",
        tmp_path / "c.onnx",
        "--image-size",
        "96",
        "--dynamic",
    )
    assert code == 0, err  # a size given wins; --dynamic frees batch, height and width
    assert "96x96 images" in printed
    assert input_shape(tmp_path / "c.onnx") == ["batch", 3, "height", "width"]


def test_netslim_export_is_the_function_even_after_its_module_is_imported(pruned, tmp_path):
    import netslim.export  # makes the attribute the module; it is callable all the same

    result = netslim.export(netslim.load(pruned["pth"]), tmp_path / "y.onnx")
    assert result.metadata["task"] == "detect" and result.image_size == 64
    assert callable(netslim.export) and netslim.export.export is not None


def test_other_ultralytics_formats_go_through_its_exporter_and_are_checked(
    pruned, tmp_path, capsys
):
    out = tmp_path / "y.torchscript"  # a format Ultralytics runs here without extra packages
    code, printed, err = cli(capsys, "export", pruned["pt"], "--out", out)
    assert code == 0, err
    assert "checked against PyTorch" in printed and err == ""  # no deprecation chatter
    from ultralytics import YOLO

    assert YOLO(str(out), task="detect").predict(
        str(next((pruned["data"].parent / "images" / "val").iterdir())), imgsz=64, verbose=False
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--out", "{tmp}/y.onnx", "--image-size", "70"],
            "image size 70 is not a multiple of the network's stride 32; pass 64 or 96",
        ),
        (["--out", "{tmp}/y.onnx", "--no-fold"], "Ultralytics' exporter always folds BatchNorm"),
        (["--out", "{tmp}/y.bin", "--format", "onnx"], "name the onnx export NAME.onnx"),
        (["--out", "{tmp}/y.onnx", "--format", "onxx"], "unknown export format 'onxx' for a YOLO"),
        (["--out", "{tmp}/y.xyz"], "cannot tell the export format of"),
        (
            ["--out", "{tmp}/y.onnx", "--opset", "3"],
            "ONNX opset must be from 9 to 20 (default 18), got 3",
        ),
    ],
    ids=["stride", "no-fold", "suffix", "format", "unknown-suffix", "opset"],
)
def test_a_bad_request_is_one_line_and_writes_nothing(pruned, tmp_path, capsys, extra, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, _, err = cli(capsys, "export", pruned["pth"], *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("openvino") is not None, reason="openvino installed")
def test_a_format_whose_package_is_missing_is_one_line_and_installs_nothing(
    pruned, tmp_path, capsys
):
    code, _, err = cli(capsys, "export", pruned["pth"], "--out", tmp_path / "y_openvino_model")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "openvino export needs the package openvino, which is not installed" in err
    assert importlib.util.find_spec("openvino") is None and list(tmp_path.iterdir()) == []


def test_a_file_that_fails_the_check_is_not_written(pruned, tmp_path):
    (tmp_path / "y.onnx").write_text("the old file")
    with pytest.raises(
        NetslimError, match="differs from the PyTorch network by .* nothing written"
    ):
        netslim.export(netslim.load(pruned["pth"]), tmp_path / "y.onnx", tolerance=0.0)
    assert (tmp_path / "y.onnx").read_text() == "the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["y.onnx"]  # no temporary folder left


def test_a_classifier_keeps_netslims_own_export(tmp_path, capsys):
    model = randomize_bn(VGG(TINY_CFG))
    result = netslim.export(model, tmp_path / "v.onnx")
    assert result.metadata == {} and input_shape(result.path) == ["batch", 3, 32, 32]
    assert [o.name for o in onnx.load(str(result.path)).graph.output] == ["logits"]
    with pytest.raises(NetslimError, match="is for a YOLO written through Ultralytics' exporter"):
        netslim.export(model, tmp_path / "w.onnx", dynamic=True)
