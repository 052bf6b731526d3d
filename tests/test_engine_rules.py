"""The engine's rules as an object: scoped to a call, built from adapters that live outside
the engine, per-channel modules found by probing rather than by name, and layers of your
own with weights that the engine prunes once told how to slice them."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn

from netslim import engine
from netslim.engine import rules as rules_module
from netslim.engine.ops import probe_per_channel
from netslim.engine.plan import reference_network
from netslim.errors import NetslimError

EXAMPLE = Path(__file__).parent.parent / "examples" / "custom_layer.py"
SIZE = (1, 3, 12, 12)
ARCHITECTURES = ("vgg", "resnet", "densenet", "mobilenet", "yolo_yaml", "external")


def test_importing_the_engine_loads_no_architecture_and_no_library():
    """``import netslim.engine`` (and building the default rules, which runs every adapter)
    loads no netslim architecture and none of torchvision, timm, Ultralytics."""
    code = (
        "import json, sys, netslim.engine as e\n"
        "at_import = sorted(sys.modules)\n"
        "e.default_rules()\n"
        "print(json.dumps([at_import, sorted(sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for loaded in json.loads(out.stdout):
        netslim = [m for m in loaded if m.startswith("netslim.")]
        assert not [m for m in netslim if m.startswith("netslim.models")], netslim
        assert not [m for m in loaded if m.split(".")[0] in ("torchvision", "timm", "ultralytics")]


# -- scoped rules ------------------------------------------------------------------------


class MySwish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.special.expit(x)  # an op the engine does not know


def network(middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        middle,
        nn.Conv2d(8, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 10),
    )
    return randomize_bn(model)


def assert_pruned_exactly(model: nn.Module, plan: engine.PrunePlan) -> nn.Module:
    pruned = engine.apply_plan(model, plan, compensate=False).eval()
    x = torch.randn(2, *SIZE[1:])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference_network(model, plan, False)(x))
    return pruned


def test_rules_registered_on_a_copy_hold_only_where_passed():
    model = network(MySwish())
    rules = engine.default_rules().copy()
    rules.register_per_channel(MySwish)
    assert len(engine.trace_channels(model, SIZE, rules=rules).prunable) == 2
    assert len(engine.trace_channels(model, SIZE).prunable) == 1  # the defaults: unchanged
    assert not engine.default_rules().is_per_channel_module(MySwish())
    plan = engine.plan_pruning(model, 0.5, rules=rules)
    assert plan.graph.rules is rules  # surgery and checks follow the graph's rules
    assert_pruned_exactly(model, plan)


def test_copy_and_extend_carry_every_kind_of_rule():
    base = engine.Rules()
    base.register_opaque("some.module:Thing")
    base.register_conv(nn.Conv2d, same_padding=True)
    base.add_input_adapter(lambda model, images: None)
    other = engine.Rules().register_per_channel("relu")
    merged = base.copy().extend(engine.Rules())
    merged.extend(engine.Rules())
    assert merged.opaque == base.opaque and merged.convs == base.convs
    assert merged.input_adapters == base.input_adapters
    assert engine.Rules().extend(base).copy().convs == {nn.Conv2d: True}
    assert other == "relu"  # registration returns its target (a decorator)
    merged.unregister(nn.Conv2d)
    assert base.convs == {nn.Conv2d: True} and merged.convs == {}


def test_a_class_named_by_a_string_resolves_only_once_its_module_is_loaded():
    rules = engine.Rules()
    rules.register_per_channel("netslim_no_such_module:Act")
    assert rules_module.resolve("netslim_no_such_module:Act") is None
    assert rules_module.resolve("torch.nn.modules.activation:SiLU") is nn.SiLU
    rules.register_per_channel("torch.nn.modules.activation:Mish")
    assert rules.is_per_channel_module(nn.Mish())


def test_adapters_come_from_netslim_and_from_entry_points(monkeypatch):
    class Point:
        def __init__(self, name, value, load):
            self.name, self.value, self.load = name, value, load

    seen = []

    def broken():
        raise ImportError("no such package")

    points = [
        Point("mine", "mine.adapter:register", lambda: seen.append),
        Point("broken", "broken:register", broken),
        Point("builtin", "netslim.adapters.timm:register", lambda: seen.append),
    ]
    monkeypatch.setattr(rules_module, "_entry_points", lambda: points)
    rules = engine.Rules()
    with pytest.warns(UserWarning, match="netslim adapter broken"):
        rules_module.load_adapters(rules)
    assert seen == [rules]  # the third party's ran once; netslim's own not a second time
    assert "timm.layers.conv2d_same:Conv2dSame" in rules.convs  # netslim's own adapters
    assert "netslim.models.gather:ChannelGather" in rules.selections


def test_the_timm_adapter_lets_conv2d_same_be_pruned():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(
        timm_layers.Conv2dSame(3, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        timm_layers.Conv2dSame(8, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    model = randomize_bn(model)
    assert "0" in engine.trace_channels(model, SIZE).layers
    bare = engine.trace_channels(model, SIZE, rules=engine.Rules())  # no adapters
    assert "0" not in bare.layers
    assert any("Conv2dSame (its own forward)" in r for r in bare.fixed_reasons)


# -- per-channel by what a module does, not by its name ---------------------------------------


class SiLU(nn.Module):
    """Named like an activation, but subtracts the mean over the channels: it mixes them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x - x.mean(dim=1, keepdim=True))


class Swish(nn.Module):  # noqa: D101 - per-channel, under a name the engine never saw
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class NormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in short: a BatchNorm2d whose forward also runs ``act``."""

    def __init__(self, n: int, act: nn.Module):
        super().__init__(n)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
        )
        return self.act(self.drop(x))


def norm_act_network(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        NormAct(8, act),
        nn.Conv2d(8, 6, 1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    return randomize_bn(model)


def why_kept(graph: engine.ChannelGraph, layer: str) -> str:
    """Why the channels ``layer`` writes are kept (their group's reason)."""
    return next(g.fixed for g in graph.groups.values() if layer in g.producers) or ""


def test_a_class_named_silu_that_mixes_channels_is_not_per_channel():
    model = norm_act_network(SiLU())
    graph = engine.trace_channels(model, SIZE)
    assert "1" not in graph.norms and bool(graph.fixed[graph.layers["0"].outputs].all())
    assert "NormAct (its own forward)" in why_kept(graph, "0")
    assert not probe_per_channel(SiLU(), torch.randn(1, 8, 4, 4))


def test_an_unknown_activation_inside_a_norm_is_probed_and_pruned_exactly():
    model = norm_act_network(Swish())
    plan = engine.plan_pruning(model, 0.5)
    assert not bool(plan.graph.fixed[plan.graph.norms["1"]].any()) and plan.pruned_share > 0
    assert_pruned_exactly(model, plan)


def test_a_norm_whose_forward_is_not_norm_then_act_is_kept():
    class Twisted(NormAct):
        def forward(self, x):
            return self.act(super().forward(x)) * 2  # not the BatchNorm, then the act

    torch.manual_seed(0)
    model = randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), Twisted(8, nn.ReLU()), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
        )
    )
    graph = engine.trace_channels(model, SIZE)
    assert "Twisted (its own forward)" in why_kept(graph, "0")


@pytest.mark.parametrize(
    "module, per_channel",
    [
        (nn.SELU(), True),
        (nn.Softsign(), True),
        (nn.Softmax(dim=-1), True),
        (nn.Softmax(dim=1), False),
        (nn.LocalResponseNorm(2), False),
        (SiLU(), False),
        (nn.PReLU(8), False),  # holds a parameter per channel: surgery would have to cut it
        (nn.Flatten(), False),
        (nn.ChannelShuffle(2), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_the_probe_tells_per_channel_modules_from_the_rest(module, per_channel):
    assert probe_per_channel(module, torch.randn(1, 8, 5, 5)) is per_channel


def test_an_unknown_parameter_free_torch_module_is_probed_and_pruned_exactly():
    model = network(nn.SELU())  # not in the engine's tables
    plan = engine.plan_pruning(model, 0.5)
    assert len(plan.graph.prunable) == 2 and plan.graph.fixed_reasons == []
    assert_pruned_exactly(model, plan)
    mixing = engine.trace_channels(network(nn.Softmax(dim=1)), SIZE)
    assert any("module Softmax" in r for r in mixing.fixed_reasons)


# -- a layer of your own with weights ---------------------------------------------------------


class Pointwise(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)
        self.gain = nn.Parameter(torch.rand(n_in) + 0.5)  # one per input channel
        self.width = n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.gain.view(1, -1, 1, 1)
        return torch.einsum("oi,nihw->nohw", self.weight, x) + self.bias.view(1, -1, 1, 1)


def pointwise_rules() -> engine.Rules:
    rules = engine.default_rules().copy()
    rules.register_layer(
        Pointwise,
        params={"weight": ("out", "in"), "bias": ("out",), "gain": ("in",)},
        attrs={"width": "out"},
    )
    return rules


def pointwise_network(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        act,
        Pointwise(8, 12),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 6, 1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    return randomize_bn(model)


def test_a_registered_layer_is_pruned_like_a_conv_and_equals_the_masked_network():
    model = pointwise_network(nn.ReLU())
    assert not engine.trace_channels(model, SIZE).layers.get("3")  # unregistered: unknown
    plan = engine.plan_pruning(model, 0.5, rules=pointwise_rules())
    layer = plan.graph.layers["3"]
    assert layer.kind == "custom" and plan.graph.fixed_reasons == []
    pruned = assert_pruned_exactly(model, plan)
    n_in, n_out = int(plan.kept_of(layer.inputs).sum()), int(plan.kept_of(layer.outputs).sum())
    assert (n_in, n_out) != (8, 12)
    assert pruned[3].weight.shape == (n_out, n_in) and pruned[3].gain.shape == (n_in,)
    assert pruned[3].width == n_out
    # with compensation too: it equals its reference (no padded layer reads a pruned channel
    # with a constant; the registered layer's removed inputs hold zero there)
    compensated = engine.apply_plan(model, plan).eval()
    x = torch.randn(2, *SIZE[1:])
    with torch.no_grad():
        torch.testing.assert_close(compensated(x), reference_network(model, plan, True)(x))
    assert engine.plan_pruning(model, 0.5, rules=pointwise_rules()).macs == plan.macs


def test_a_registered_layer_reading_a_constant_keeps_those_channels():
    """Hardsigmoid(0) = 0.5: a removed channel reaches the layer as a constant, which it has
    no way to fold: those channels are kept, with the reason."""
    model = pointwise_network(nn.Hardsigmoid())
    plan = engine.plan_pruning(model, 0.5, rules=pointwise_rules())
    assert bool(plan.masks["1"].all())
    assert any("a registered layer" in r for r in plan.fixed_reasons)
    assert_pruned_exactly(model, plan)


def test_a_registration_that_does_not_fit_the_layer_keeps_its_channels():
    rules = engine.default_rules().copy()
    rules.register_layer(Pointwise, params={"weight": ("in", "out"), "bias": ("out",)})
    graph = engine.trace_channels(pointwise_network(nn.ReLU()), SIZE, rules=rules)
    assert "3" not in graph.layers
    assert any("Pointwise (registered layer" in r for r in graph.fixed_reasons)


def test_a_layer_spec_must_name_inputs_and_outputs():
    with pytest.raises(ValueError, match="in"):
        engine.Rules().register_layer(Pointwise, params={"weight": ("out",)})
    with pytest.raises(ValueError, match="axis"):
        engine.Rules().register_layer(Pointwise, params={"weight": ("rows", "in")})


def test_the_custom_layer_example_runs_and_is_exact(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        difference = runpy.run_path(str(EXAMPLE))["main"]()
    assert difference < 1e-5
    out = capsys.readouterr().out
    assert "without the registration: 0 groups" in out and "Pointwise (24, 16) ->" in out


def test_the_ultralytics_adapter_keeps_the_c2f_half_width_in_step():
    pytest.importorskip("ultralytics")
    import netslim
    from netslim.engine.surgery import channel_counts, resize_layers

    model = netslim.build_model("ultralytics:yolov8n.yaml", 3)
    counts = channel_counts(model)
    c2f = next(n for n, m in model.named_modules() if type(m).__name__ == "C2f")
    cv1 = f"{c2f}.cv1.conv"
    counts[cv1] = [counts[cv1][0], 16, 1, counts[cv1][3]]  # halves of 8, as surgery leaves them
    resized = resize_layers(model, {cv1: counts[cv1]})
    assert resized.get_submodule(c2f).c == 8
    bare = netslim.build_model("ultralytics:yolov8n.yaml", 3)
    resize_layers(bare, {cv1: counts[cv1]}, rules=engine.Rules())  # no adapters: stale
    assert bare.get_submodule(c2f).c != 8


def test_prune_model_takes_the_same_scoped_rules():
    """netslim.prune_model, the one prune entry point, passes rules= to the trace, the plan,
    the surgery, its check and the MACs count: the registered layer is pruned there too."""
    import netslim

    example = runpy.run_path(str(EXAMPLE))
    model, rules = example["network"](), example["rules_with_pointwise"]()
    with pytest.raises(NetslimError, match="nothing to slim"):  # default rules: kept whole
        netslim.prune_model(model, 0.5, compensate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = netslim.prune_model(model, 0.5, compensate=False, rules=rules)
    assert pruned[3].weight.shape[0] < model[3].weight.shape[0]
    assert report.macs_after < report.macs_before and report.checked_on
