"""Detectors and segmenters traced by running them, pruned exactly (issue 22).

Every network: fresh weights, random BatchNorm statistics and about half of each
prunable group's gammas made tiny; pruned at 0.5, it equals the masked network on every
output tensor (before NMS for the detectors that run it: the backbone's feature maps and
the heads' outputs), without compensation and, with wrap-around padding, with it; saved
and loaded back by name (no module pickled), it gives the same outputs again.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from conftest import make_sparse, randomize_bn
from torch import nn

import netslim
from netslim import engine
from netslim.engine.graph import tensors
from netslim.engine.plan import masked_copy, reference_network
from netslim.models import model_inputs

pytestmark = pytest.mark.slow  # not in make test-fast

YOLO = {
    "yolov5nu": "yolov5nu.yaml",
    "yolov8n": "yolov8n.yaml",
    "yolo11n": "yolo11n.yaml",
    "yolov8n-seg": "yolov8n-seg.yaml",
    "yolo11n-seg": "yolo11n-seg.yaml",
    "yolov8n-cls": "yolov8n-cls.yaml",
}
TORCHVISION = [
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large",
    "fcn_resnet50",
    "lraspp_mobilenet_v3_large",
]
SMALL = {"retinanet_resnet50_fpn": {"min_size": 160, "max_size": 160}}  # keep it fast


def builder(name: str):
    """``(spec, build)``: the spec the network is saved under and a builder of it."""
    if name in YOLO:
        spec = f"ultralytics:{YOLO[name]}"
        return spec, lambda: netslim.build_model(spec, 10 if name.endswith("cls") else 3)
    spec = f"torchvision:{name}"
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": 5, **SMALL.get(name, {})}
    return spec, lambda: torchvision.models.get_model(name, **kwargs)


def wrapped(model: nn.Module) -> nn.Module:
    """Wrap-around padding, so that a constant map stays constant at the borders too (where
    compensation is otherwise approximate). DeepLab's ASPP convs (dilation 12-36) cannot wrap
    around maps this small: they become undilated 3x3 convs, with the same channels."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if max(m.dilation) >= 12:
                m.dilation, m.padding = (1, 1), tuple(k // 2 for k in m.kernel_size)
                m._reversed_padding_repeated_twice = [p for p in m.padding[::-1] for _ in (0, 1)]
            m.padding_mode = "circular"
    return model


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every output tensor, in order; for a torchvision detector the tensors before NMS:
    its head's outputs (for a two-stage one, the FPN's maps and the RPN head's)."""
    seen: list = []
    handles = []
    if type(model).__module__.startswith("torchvision.models.detection"):
        heads = [model.backbone, model.rpn.head] if hasattr(model, "rpn") else [model.head]
        handles = [m.register_forward_hook(lambda m, i, o: seen.append(o)) for m in heads]
    try:
        with torch.no_grad():
            out = model(*model_inputs(model, x))
    finally:
        for h in handles:
            h.remove()
    return tensors(seen) if handles else tensors(out)


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) > 0
    for p, q in zip(a, b):
        assert p.shape == q.shape
        scale = q.abs().max().clamp_min(1e-12)
        assert ((p - q).abs().max() / scale).item() < 1e-4


@pytest.mark.parametrize("name", [*YOLO, *TORCHVISION])
def test_a_detector_or_segmenter_prunes_exactly_and_reloads(name, tmp_path):
    spec, build = builder(name)
    torch.manual_seed(0)
    size = (1, 3, 64, 64) if name.endswith("cls") else (1, 3, 128, 128)
    model, graph = make_sparse(wrapped(build()), size)
    x = torch.randn(1, *size[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = engine.plan_pruning(model, 0.5, graph=graph)
    assert plan.pruned_share > 0.2
    official = engine.apply_plan(model, plan, compensate=False).eval()
    assert_same(outputs(official, x), outputs(masked_copy(model, plan.masks), x))
    compensated = engine.apply_plan(model, plan, compensate=True).eval()
    assert_same(outputs(compensated, x), outputs(reference_network(model, plan, True), x))
    netslim.save(compensated, tmp_path / "p.pth", arch=spec, image_size=size[-1])
    loaded = netslim.load(tmp_path / "p.pth", None if name not in SMALL else build)
    assert_same(outputs(wrapped(loaded), x), outputs(compensated, x))  # padding: no part of a file


def test_the_model_outputs_keep_their_channels():
    """Box, class, mask-coefficient and prototype maps, logits: whatever a network returns."""
    torch.manual_seed(0)
    model, graph = make_sparse(
        netslim.build_model("ultralytics:yolov8n-seg.yaml", 3), (1, 3, 128, 128)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = engine.apply_plan(model, engine.plan_pruning(model, 0.5, graph=graph)).eval()
    x = torch.randn(1, 3, 128, 128)
    shapes = [t.shape for t in outputs(model, x)]
    assert [t.shape for t in outputs(pruned, x)] == shapes
    head = pruned.model[-1]
    assert [c[-1].out_channels for c in head.cv2] == [64] * 3  # 4 x reg_max box distributions
    assert [c[-1].out_channels for c in head.cv3] == [3] * 3  # the classes
    assert [c[-1].out_channels for c in head.cv4] == [32] * 3  # mask coefficients
    assert head.proto.cv3.conv.out_channels == 32  # the prototype masks


def test_yolo_c2f_splits_are_pruned_with_equal_halves():
    """C2f cuts cv1's output in two with chunk(2): both halves shrink, each as much."""
    torch.manual_seed(0)
    model, graph = make_sparse(netslim.build_model("ultralytics:yolov8n.yaml", 3), (1, 3, 128, 128))
    assert len(graph.ties) == 8  # the eight C2f blocks of yolov8n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = engine.plan_pruning(model, 0.5, graph=graph)
    for tie in graph.ties:
        kept = [int(plan.keep[piece].sum()) for piece in tie]
        assert len(set(kept)) == 1 and kept[0] < len(tie[0])
    pruned = engine.apply_plan(model, plan, compensate=False)
    c2f = [m for m in pruned.modules() if type(m).__name__ == "C2f"]
    assert all(m.cv1.conv.out_channels % 2 == 0 for m in c2f)
    assert sum(m.cv1.conv.out_channels for m in c2f) < sum(
        m.cv1.conv.out_channels for m in model.modules() if type(m).__name__ == "C2f"
    )


class Pyramid(nn.Module):
    """Python the old symbolic tracer refused: a loop over a list of feature maps, a branch
    on a shape, ``*args``, a dict output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            for _ in range(3)
        )
        self.heads = nn.ModuleList(nn.Conv2d(8, 2, 1) for _ in range(3))

    def forward(self, *images):
        x = self.stem(images[0])
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        if maps[-1].shape[-1] < 4:  # a branch on a shape: the small map is pooled away
            maps[-1] = maps[-1] + nn.functional.adaptive_avg_pool2d(maps[-1], 1)
        return {f"p{i}": head(m) for i, (head, m) in enumerate(zip(self.heads, maps))}


def test_python_control_flow_is_traced_exactly():
    torch.manual_seed(0)
    model, graph = make_sparse(Pyramid(), (1, 3, 16, 16))
    assert graph.fixed_reasons == ["the network's output"] or not graph.fixed_reasons
    plan = engine.plan_pruning(model, 0.5, graph=graph)
    assert plan.pruned_share > 0.3
    x = torch.randn(2, 3, 16, 16)
    pruned = engine.apply_plan(model, plan, compensate=False).eval()
    assert_same(outputs(pruned, x), outputs(masked_copy(model, plan.masks), x))


def test_a_path_that_depends_on_values_is_named_in_the_report():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = self.b(self.a(x))
            if y.mean() > 0:  # the path depends on the values
                y = y * 2
            return self.fc(y.mean((2, 3)))

    model = randomize_bn(Gate())
    _, report = netslim.prune_model(model, 0.5, input_size=(3, 16, 16))
    assert any("__bool__" in line for line in report.value_reads)
    assert "exact on the path traced" in report.text()
