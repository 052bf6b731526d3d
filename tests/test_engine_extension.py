"""The engine's extension API: your own layers registered, layers left alone (``ignore=``),
your own channel importance (``importance=``)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_bn
from torch import nn

import netslim
from netslim import engine
from netslim.engine.plan import masked_copy
from netslim.errors import NetslimError


class MySwish(nn.Module):
    """An activation of one's own, built on an op the engine does not know."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.special.expit(x)


class MixChannels(nn.Module):
    """A layer that mixes channels (a cumulative sum over them) without weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=1)


def network(middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        middle,
        nn.Conv2d(8, 12, 3),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 10),
    )
    return randomize_bn(model)


@pytest.fixture
def registry():
    """Registrations made in a test are undone after it."""
    made: list = []
    yield made
    for target in made:
        engine.unregister(target)


def test_an_unknown_activation_keeps_its_channels_and_says_why():
    graph = engine.trace_channels(network(MySwish()), (1, 3, 16, 16))
    assert any("special_expit" in reason for reason in graph.fixed_reasons)
    assert len(graph.prunable) == 1  # only the second conv's channels


def test_a_registered_activation_is_pruned_exactly(registry):
    registry.append(engine.register_per_channel(MySwish))
    model = network(MySwish())
    plan = engine.plan_pruning(model, 0.5)
    assert len(plan.graph.prunable) == 2 and plan.graph.fixed_reasons == []
    pruned = engine.apply_plan(model, plan, compensate=False).eval()
    assert pruned[0].out_channels < 8
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(x), masked_copy(model, plan.masks)(x), rtol=1e-4, atol=1e-5
        )


def test_a_registered_function_is_per_channel(registry):
    class FunctionSwish(nn.Module):
        def forward(self, x):
            return x * torch.special.expit(x)

    registry.append(engine.register_per_channel(torch.special.expit))
    graph = engine.trace_channels(network(FunctionSwish()), (1, 3, 16, 16))
    assert len(graph.prunable) == 2


def test_a_registered_opaque_layer_keeps_what_it_touches(registry):
    model = network(MixChannels())
    assert len(engine.trace_channels(model, (1, 3, 16, 16)).prunable) == 1  # cumsum: unknown
    registry.append(engine.register_per_channel(MixChannels))  # a wrong claim would prune ...
    assert len(engine.trace_channels(model, (1, 3, 16, 16)).prunable) == 2
    engine.unregister(MixChannels)
    registry.append(engine.register_opaque(MixChannels))  # ... the right one keeps them
    graph = engine.trace_channels(model, (1, 3, 16, 16))
    assert len(graph.prunable) == 1
    assert any("MixChannels (registered opaque)" in r for r in graph.fixed_reasons)


def test_ignored_layers_keep_every_channel_and_are_reported():
    model = randomize_bn(netslim.build_model("resnet56"))
    free = engine.plan_pruning(model, 0.5)
    assert free.kept["layers.2.0.bn1"][0] < free.kept["layers.2.0.bn1"][1]
    plan = engine.plan_pruning(model, 0.5, ignore=["layers.2", model.conv1])
    for name, (kept, total) in plan.kept.items():
        if name.startswith("layers.2.") and name.endswith("bn1"):
            assert kept == total, name
    graph = plan.graph
    assert bool(graph.fixed[graph.layers["conv1"].outputs].all())
    assert "excluded by ignore= (layers.2)" in plan.fixed_reasons
    assert "excluded by ignore= (conv1)" in plan.fixed_reasons
    with pytest.raises(NetslimError, match="nothing to slim in ResNet.*excluded by ignore="):
        engine.plan_pruning(model, 0.5, ignore=[nn.Conv2d])  # every conv left: nothing to prune


def test_ignoring_a_module_that_is_not_there_is_one_line():
    model = randomize_bn(netslim.build_model("vgg11-small"))
    with pytest.raises(NetslimError, match="has no module named 'head'"):
        engine.plan_pruning(model, 0.5, ignore=["head"])


def test_importance_replaces_gamma_as_gammas_of_those_values_would():
    """Scoring by importance gives the plan that gammas equal to those scores give."""
    model = randomize_bn(netslim.build_model("resnet56"), seed=3)
    scores = {
        name: torch.rand(bn.num_features, generator=torch.Generator().manual_seed(i))
        for i, (name, bn) in enumerate(netslim.engine.sparsity.batchnorms(model))
    }
    by_importance = engine.plan_pruning(model, 0.4, importance=lambda name, bn: scores[name])
    same = randomize_bn(netslim.build_model("resnet56"), seed=3)
    with torch.no_grad():
        for name, bn in netslim.engine.sparsity.batchnorms(same):
            bn.weight.copy_(scores[name])
    by_gamma = engine.plan_pruning(same, 0.4)
    assert torch.equal(by_importance.keep, by_gamma.keep)
    assert not torch.equal(by_importance.keep, engine.plan_pruning(model, 0.4).keep)


def test_an_importance_of_the_wrong_shape_is_one_line():
    model = randomize_bn(netslim.build_model("vgg11-small"))
    with pytest.raises(NetslimError, match=r"must return one score per channel"):
        engine.plan_pruning(model, 0.5, importance=lambda name, bn: torch.ones(3))


def test_prune_model_and_the_command_line_take_ignore(tmp_path, capsys):
    model = randomize_bn(netslim.build_model("vgg11-small"))
    pruned, report = netslim.prune_model(model, 0.5, ignore=["feature.0"])
    assert pruned.feature[0].out_channels == model.feature[0].out_channels  # kept whole
    assert "feature.1" not in [name for name, _, _ in report.layers]  # its group: not prunable
    assert "excluded by ignore= (feature.0)" in report.fixed
    netslim.save(model, tmp_path / "m.pth", arch="vgg11-small")
    from netslim.cli import main

    assert (
        main(
            [
                "prune",
                str(tmp_path / "m.pth"),
                "--ratio",
                "0.5",
                "--ignore",
                "feature.0",
                "--out",
                str(tmp_path / "p.pth"),
            ]
        )
        == 0
    )
    assert "excluded by ignore= (feature.0)" in capsys.readouterr().out
    assert netslim.load(tmp_path / "p.pth").feature[0].out_channels == model.feature[0].out_channels
