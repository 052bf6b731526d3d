"""Issue 27, the pruning engine's cost bounds: pruning work linear in the layers, bounded input
sizes, a time and memory estimate before the trace, compiled networks, deep nesting, and
the MACs of YOLO's DFL conv."""

from __future__ import annotations

import cProfile
import math
import pstats
import warnings

import pytest
import torch
from conftest import randomize_bn
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import netslim
import netslim.slim
from netslim import limits
from netslim.engine import guard
from netslim.engine.plan import masked_copy, plan_pruning
from netslim.engine.sparsity import batchnorms
from netslim.engine.stats import count_macs
from netslim.engine.surgery import apply_plan
from netslim.engine.trace import trace_channels
from netslim.errors import NetslimError
from netslim.models import build_model


class Residual(nn.Module):
    """A ResNet basic block, ``x + bn2(conv2(relu(bn1(conv1(x)))))``: the residual stream of
    all the blocks is one group, scored by every block's bn2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def chain(layers: int, channels: int = 4, seed: int = 0, residual: bool = False) -> nn.Module:
    """``layers`` blocks of conv 3x3, BatchNorm, ReLU (or residual ones after a first plain
    block), then a linear head; random BatchNorm statistics, every other channel's gamma tiny."""
    blocks = [
        Residual(channels)
        if residual and i
        else nn.Sequential(
            nn.Conv2d(3 if i == 0 else channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        for i in range(layers)
    ]
    torch.manual_seed(seed)
    model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5))
    randomize_bn(model, seed)
    with torch.no_grad():
        for _, bn in batchnorms(model):
            bn.weight.abs_().add_(0.1)
            bn.weight[::2] *= 1e-3
    return model.eval()


@pytest.fixture
def one_thread():
    """One torch thread: on tensors of a few hundred values a second thread only adds its
    synchronisation (on a busy 2-core machine, 300 layers took 57 s with two, 3 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quiet_prune(model: nn.Module, ratio: float, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-layer floor
        return netslim.prune_model(model, ratio, **kwargs)


def call_counts(fn) -> dict[tuple, int]:
    """How often ``fn()`` calls each function (by file, line and name)."""
    profile = cProfile.Profile()
    profile.enable()
    try:
        fn()
    finally:
        profile.disable()
    return {where: row[1] for where, row in pstats.Stats(profile).stats.items()}


# -- 1. work linear in the number of layers, and deep nesting -------------------------------


@pytest.mark.slow  # 5 s on a 2-core AMD EPYC (bench/deep_chain.py times 10,000 layers)
def test_a_500_layer_chain_prunes_to_exactly_the_official_masked_network(one_thread):
    model = chain(500)
    pruned, report = quiet_prune(model, 0.5, compensate=False, input_size=(3, 8, 8))
    # the official rule, computed here: one global threshold over every |gamma|
    gammas = torch.cat([bn.weight.detach().abs() for _, bn in batchnorms(model)])
    threshold = torch.sort(gammas).values[int(len(gammas) * 0.5)]
    masks = {name: bn.weight.detach().abs() > threshold for name, bn in batchnorms(model)}
    assert report.threshold == pytest.approx(float(threshold))
    assert sum(int(m.sum()) for m in masks.values()) == sum(k for _, k, _ in report.layers)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked_copy(model, masks)(x), rtol=1e-4, atol=1e-5)
    assert pruned[0][0].out_channels == int(masks["0.1"].sum()) < 4


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_pruning_twice_the_layers_calls_no_function_more_than_twice_as_often(one_thread, residual):
    # Work is counted in calls, not timed: a step looping over the layers once per layer
    # (apply_plan rebuilt named_modules() per layer) calls something four times as often.
    # (A loop inside one call, such as list.index, is not seen: bench/deep_chain.py times it.)
    def prune(layers: int) -> None:
        model = chain(layers, residual=residual)
        # (ignore= a class of many modules: its scan was quadratic too)
        quiet_prune(model, 0.5, input_size=(3, 8, 8), ignore=[nn.ReLU])

    small, large = call_counts(lambda: prune(60)), call_counts(lambda: prune(120))
    grew = {
        f"{f[0].split('/')[-1]}:{f[1]} {f[2]}": (small.get(f, 0), n)
        for f, n in large.items()
        if n > 2.2 * small.get(f, 0) + 50
    }
    assert not grew, grew
    assert sum(large.values()) < 2.1 * sum(small.values())


def test_modules_nested_ten_thousand_deep_are_refused_in_one_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    for _ in range(10_000):
        model = nn.Sequential(model, nn.ReLU())
    with pytest.raises(NetslimError, match=r"recursion limit \(\d+\).*nest 10001 deep; flatten"):
        netslim.prune_model(model, 0.5, input_size=(3, 8, 8))
    with pytest.raises(NetslimError, match="nest 10001 deep"):
        trace_channels(model, (1, 3, 8, 8))


def test_a_recursion_error_inside_the_forward_pass_becomes_one_line():
    class Recursive(nn.Module):
        def forward(self, x, n=100_000):
            return x if n == 0 else self.forward(x, n - 1)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Recursive())
    with pytest.raises(NetslimError, match=r"recursion limit \(\d+\) is too low to prune"):
        netslim.prune_model(model, 0.5, input_size=(3, 8, 8))


# -- 2. input sizes bounded as --image-size is ---------------------------------------------


def test_an_input_size_of_100000_pixels_is_refused_as_the_image_size_bound_says():
    with pytest.raises(NetslimError, match="input_size's height must be from 8 to 4096 pixels"):
        netslim.prune_model(chain(2), 0.5, input_size=(3, 100_000, 100_000))
    with pytest.raises(NetslimError, match="input_size's width must be from 8 to 4096 pixels"):
        netslim.prune_model(chain(2), 0.5, input_size=(3, 32, 4))


def test_an_input_that_would_not_fit_in_memory_is_refused_naming_its_size():
    with pytest.raises(NetslimError, match="an input of 100000x4096x4096 takes .* GiB"):
        netslim.prune_model(chain(2), 0.5, input_size=(100_000, 4096, 4096))


def test_an_input_size_that_is_no_shape_is_refused_in_one_line():
    for bad in [32, (3, 32.0, 32), (2, 3, 32, 32), (3, True, 32)]:
        with pytest.raises(NetslimError, match="input_size must be"):
            netslim.prune_model(chain(2), 0.5, input_size=bad)


# -- 3. a time and memory estimate before the trace ----------------------------------------


def small_net() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
    )
    return randomize_bn(model)


def test_the_memory_estimate_extrapolates_what_a_run_at_full_size_makes():
    model = small_net()
    cost = guard.estimate_prune_cost(model, (1, 3, 512, 384))
    with torch.no_grad():
        _, made = guard._probe(model, (1, 3, 512, 384))  # every tensor one pass makes
    own = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    expected = guard.MEMORY_FACTOR * made + guard.COPIES * own
    assert cost.probes == ((64, 64), (128, 128))
    assert cost.peak_bytes == pytest.approx(expected, rel=0.02)
    assert guard.estimate_prune_cost(model, (1, 3, 128, 96)) is None  # as small as the probes


def test_pruning_whose_peak_would_exceed_half_the_memory_is_refused_before_tracing(monkeypatch):
    traced = []
    monkeypatch.setattr(netslim.slim, "trace_channels", lambda *a, **k: traced.append(1))
    monkeypatch.setattr(limits, "ram_bytes", lambda: 64 * 2**20)  # a 64 MiB machine
    with pytest.raises(NetslimError) as error:
        netslim.prune_model(small_net(), 0.5, input_size=(3, 1024, 1024))
    message = str(error.value)
    assert "input_size (1, 3, 1024, 1024)" in message and "more than half of the 64 MiB" in message
    assert "of memory at its peak" in message and "pass a smaller input_size" in message
    assert not traced


def test_yolov8n_at_4096_pixels_is_refused_at_once_on_a_16_gib_machine(monkeypatch):
    monkeypatch.setattr(limits, "ram_bytes", lambda: 16 * 2**30)
    yolo = build_model("ultralytics:yolov8n.yaml", 80)
    with pytest.raises(NetslimError, match=r"GiB of memory at its peak, more than half of the 16"):
        netslim.prune_model(yolo, 0.5, input_size=(3, 4096, 4096))


def test_pruning_estimated_to_take_longer_than_max_seconds_is_refused_naming_both(monkeypatch):
    monkeypatch.delenv("NETSLIM_MAX_PRUNE_SECONDS", raising=False)
    monkeypatch.setattr(
        guard,
        "estimate_prune_cost",
        lambda m, s: guard.PruneCost(1234.5, 2**20, ((64, 64), (128, 128))),
    )
    with pytest.raises(NetslimError) as error:
        netslim.prune_model(small_net(), 0.5, input_size=(3, 1024, 1024), max_seconds=60)
    message = str(error.value)
    assert "would take about 1,234 s here, more than the bound of 60 s" in message
    assert "max_seconds=1235" in message and "NETSLIM_MAX_PRUNE_SECONDS=1235" in message
    with pytest.raises(NetslimError, match="more than the bound of 300 s"):  # the default
        netslim.prune_model(small_net(), 0.5, input_size=(3, 1024, 1024))


def test_the_time_bound_is_read_from_the_environment_and_lifted_by_inf(monkeypatch):
    model = small_net()
    monkeypatch.setenv("NETSLIM_MAX_PRUNE_SECONDS", "0.0001")
    with pytest.raises(NetslimError, match=r"more than the bound of 0.0001 s"):
        netslim.prune_model(model, 0.5, input_size=(3, 256, 256))
    pruned, _ = netslim.prune_model(model, 0.5, input_size=(3, 256, 256), max_seconds=math.inf)
    assert sum(bn.num_features for _, bn in batchnorms(pruned)) < 16
    monkeypatch.setenv("NETSLIM_MAX_PRUNE_SECONDS", "soon")
    with pytest.raises(NetslimError, match="NETSLIM_MAX_PRUNE_SECONDS must be a number"):
        netslim.prune_model(model, 0.5, input_size=(3, 256, 256))
    with pytest.raises(NetslimError, match="max_seconds must be a positive number"):
        netslim.prune_model(model, 0.5, input_size=(3, 256, 256), max_seconds=0)


# -- 4. torch.compile ------------------------------------------------------------------------


def test_a_compiled_network_is_refused_at_once_naming_the_module_to_prune():
    model = small_net()
    with pytest.raises(NetslimError, match=r"compiled with torch.compile.*\(model._orig_mod\)"):
        netslim.prune_model(torch.compile(model), 0.5)
    model[3] = torch.compile(model[3])  # one compiled module inside
    with pytest.raises(NetslimError, match=r"its module 3 was compiled.*\(model.3._orig_mod\)"):
        netslim.prune_model(model, 0.5)
    in_place = small_net()
    in_place.compile()
    with pytest.raises(NetslimError, match=r"compiled in place \(.compile\(\)\)"):
        trace_channels(in_place, (1, 3, 32, 32))


# -- 5. the MACs of YOLO's DFL conv ----------------------------------------------------------


def flop_counter_macs(model: nn.Module, size: int) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2  # a multiply-accumulate is two FLOPs


def test_the_yolo_mac_count_includes_the_dfl_conv_as_flop_counter_mode_does():
    yolo = randomize_bn(build_model("ultralytics:yolov8n.yaml", 80))
    graph = trace_channels(yolo, (1, 3, 64, 64))
    # the DFL conv (16 bins -> 1) runs on 4 sides of 8*8 + 4*4 + 2*2 anchors at 64 px
    assert graph.untraced_macs == 16 * 4 * (8 * 8 + 4 * 4 + 2 * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unpruned, plan = plan_pruning(yolo, 0.0, graph=graph), plan_pruning(yolo, 0.5, graph=graph)
    pruned = apply_plan(yolo, plan)
    assert unpruned.macs == count_macs(yolo, (1, 3, 64, 64)) == flop_counter_macs(yolo, 64)
    assert plan.macs == count_macs(pruned, (1, 3, 64, 64)) == flop_counter_macs(pruned, 64)
    assert plan.macs < unpruned.macs
