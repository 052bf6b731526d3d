"""The pruning engine never hands over a wrong or broken network (issue 27, engine cases).

One test per case: a network whose forward reshapes by a channel count it read
(``x.shape``) prunes exactly or keeps those channels; a network the tracer is fooled by is
repaired by the check after surgery (or refused), never handed over broken; numbers read
from tensor values (``.numpy()``, ``np.asarray``, ``float``, ``.tolist()``, ``.item()``) keep
the channels they could change; the compensation probe follows the traced path or refuses;
ties at the threshold remove the asked share. And every Ultralytics model YAML the installed
release ships: built (or refused in one line), traced, pruned at 0.5 exactly, both ways.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_sparse
from torch import nn

import netslim
from netslim import engine
from netslim.engine.graph import tensors
from netslim.engine.plan import plan_for_macs, plan_pruning, reference_network
from netslim.engine.sparsity import batchnorms
from netslim.errors import NetslimError

TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these networks are small, and on a busy 2-core machine a second
    thread mostly waits (yolov8n pruned at 64 px: 58 s with two, 2 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- helpers (bench/ultralytics_yamls.py uses them too) -----------------------------------------


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return tensors(model(x))


def max_relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest ``max |a - b| / max |b|`` over the outputs; inf where their shapes differ."""
    if [t.shape for t in a] != [t.shape for t in b] or not b:
        return math.inf
    return max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-12)) for p, q in zip(a, b))


def wrapped(model: nn.Module) -> nn.Module:
    """Wrap-around padding (in place), so that a constant map stays constant at the borders,
    where compensation is otherwise approximate."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and any(p > 0 for p in m._reversed_padding_repeated_twice):
            m.padding_mode = "circular"
    return model


def shipped_yamls() -> list[str]:
    """The file names of every model YAML the installed Ultralytics ships (none without it)."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or spec.origin is None:
        return []
    root = Path(spec.origin).parent / "cfg" / "models"
    return sorted(p.name for p in root.rglob("*.yaml"))


@dataclass
class YamlResult:
    """How one Ultralytics YAML fares (see :func:`check_yaml`); an error ends the run."""

    name: str
    error: str | None = None  # the one line that refused it
    stage: str = "build"  # where it stopped: build, trace, plan, done
    prunable: float = 0.0  # the share of BN channels that may be pruned
    removed: float = 0.0  # the share removed at ratio 0.5
    official: float = math.inf  # max relative difference, pruned without compensation vs masked
    compensated: float = math.inf  # same with compensation, vs its reference (wrapped padding)
    seconds: float = 0.0
    size: int = 64  # the input size it was pruned at


def check_yaml(name: str, size: int = 64, seed: int = 0) -> YamlResult:
    """Build ``ultralytics:NAME`` (3 classes), give it random BN statistics and half of each
    prunable group's gammas tiny, prune it at 0.5 at ``size`` px (wrap-around padding; at 2x
    or 4x the size where a map is smaller than a conv's padding) both ways, and compare each
    with its reference network on a random input."""
    result = YamlResult(name, size=size)
    start = time.perf_counter()
    try:
        torch.manual_seed(seed)
        built = netslim.build_model(f"ultralytics:{name}", 3)
        result.stage = "trace"
        model, graph = _traced(built, result, seed)
        norms = torch.cat(list(graph.norms.values()))
        result.prunable = float((~graph.fixed[norms]).float().mean())
        result.stage = "plan"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = plan_pruning(model, 0.5, graph=graph)
        result.removed = plan.pruned_share
        result.stage = "done"
        x = torch.randn(
            1, 3, result.size, result.size, generator=torch.Generator().manual_seed(seed)
        )
        for compensate in (False, True):
            pruned = engine.apply_plan(model, plan, compensate).eval()
            difference = max_relative(
                outputs(pruned, x), outputs(reference_network(model, plan, compensate), x)
            )
            setattr(result, "compensated" if compensate else "official", difference)
    except NetslimError as e:
        result.error = str(e)
    result.seconds = time.perf_counter() - start
    return result


def _traced(model: nn.Module, result: YamlResult, seed: int):
    """``make_sparse`` of the wrapped model at the first of 1x, 2x, 4x ``result.size`` where
    wrap-around padding fits the maps (``result.size`` is set to it)."""
    for scale in (1, 2, 4):
        try:
            size = result.size * scale
            found = make_sparse(wrapped(copy.deepcopy(model)), (1, 3, size, size), seed=seed)
            result.size = size
            return found
        except NetslimError as e:
            if "wrapping around" not in str(e) or scale == 4:
                raise
    raise AssertionError("unreachable")


# YAMLs Ultralytics ships that netslim does not build: RT-DETR decoders, a TorchVision
# backbone (it would fetch weights), open-vocabulary heads wanting text embeddings from a
# CLIP model (World, YOLOE), and the depth and semantic tasks.
UNBUILDABLE = {
    "rtdetr-l.yaml",
    "rtdetr-resnet50.yaml",
    "rtdetr-resnet101.yaml",
    "rtdetr-x.yaml",
    "yolov8-rtdetr.yaml",
    "yolo11-cls-resnet18.yaml",
    "yolo26-depth.yaml",
    "yolo26-sem.yaml",
    "yoloe-11.yaml",
    "yoloe-11-seg.yaml",
    "yoloe-26.yaml",
    "yoloe-26-seg.yaml",
    "yoloe-v8.yaml",
    "yoloe-v8-seg.yaml",
    "yolov8-world.yaml",
    "yolov8-worldv2.yaml",
}
# A few of every generation and task, in the default run; the others only in make test-all.
QUICK = {
    "yolov3-tiny.yaml",
    "yolov5.yaml",
    "yolov8.yaml",
    "yolov8-pose.yaml",
    "yolov10n.yaml",
    "yolo11-obb.yaml",
    "yolo12.yaml",
    "yolo26.yaml",
    "yolo26-cls.yaml",
    "rtdetr-l.yaml",
    "yolov8-worldv2.yaml",
}
EVERY = (pytest.mark.slow, pytest.mark.exhaustive)
YAMLS = [pytest.param(n, marks=() if n in QUICK else EVERY) for n in shipped_yamls()]


def prune(model: nn.Module, ratio: float = 0.5, size: int = 16, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return netslim.prune_model(model, ratio, input_size=(3, size, size), **kwargs)


def plan_of(model: nn.Module, size: int = 16, ratio: float = 0.5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = engine.trace_channels(model, (1, 3, size, size))
        return graph, plan_pruning(model, ratio, graph=graph)


def block(c_in: int, c_out: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.BatchNorm2d(c_out), nn.ReLU()
    )


def assert_exact(model: nn.Module, plan, size: int = 16) -> None:
    """Both ways, the pruned network equals its reference on the traced input and a random one."""
    for compensate in (False, True):
        pruned = engine.apply_plan(model, plan, compensate).eval()
        reference = reference_network(model, plan, compensate)
        for x in (torch.zeros(1, 3, size, size), torch.randn(1, 3, size, size)):
            assert max_relative(outputs(pruned, x), outputs(reference, x)) < TOLERANCE


# -- 1. never a broken network ------------------------------------------------------------------


class MixedAttention(nn.Module):
    """YOLO26's attention, in small: the values ``v`` come from a layer whose channels a
    reshape fixes, and are viewed back with ``C``, the channel count of the input ``x``."""

    def __init__(self, c: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.stem = block(3, c, 3)
        self.qkv = block(c, 2 * c)
        self.proj = block(c, c)
        self.mix = block(c, c)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        B, C, H, W = x.shape
        q, v = self.qkv(x).view(B, self.heads, -1, H * W).chunk(2, dim=2)
        attention = (q.transpose(-2, -1) @ q).softmax(dim=-1)
        y = self.proj((v @ attention).view(B, C, H, W))  # C counts x's channels, not v's
        return self.head(self.mix(x + y))


class CountedExcitation(nn.Module):
    """Squeeze-excitation written with the channel count read from the input: the gate has
    exactly the channels it scales, so they stay prunable."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = block(3, c, 3)
        self.squeeze = nn.Linear(c, 4)
        self.excite = nn.Linear(4, c)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        b, c, _, _ = x.size()
        gate = self.excite(torch.relu(self.squeeze(x.mean((2, 3)).view(b, c))))
        return self.head(x * torch.sigmoid(gate).view(b, c, 1, 1))


def test_a_reshape_by_the_channel_count_of_another_tensor_keeps_the_channels_counted():
    torch.manual_seed(0)
    model, _ = make_sparse(MixedAttention(), (1, 3, 16, 16))
    graph, plan = plan_of(model)
    stem = graph.norms["stem.1"]
    assert bool(graph.fixed[stem].all())  # C never changes, so the view stays right
    assert any(
        "is sized by a channel count (shape in MixedAttention" in r for r in graph.fixed_reasons
    )
    assert plan.kept["mix.1"][0] < 8  # the others still prune
    assert_exact(model, plan)


def test_a_reshape_by_its_own_channel_count_still_prunes():
    torch.manual_seed(0)
    model, _ = make_sparse(CountedExcitation(), (1, 3, 16, 16))
    graph, plan = plan_of(model)
    assert not bool(graph.fixed[graph.norms["stem.1"]].any())
    assert plan.kept["stem.1"][0] < 16  # pruned, and the gate with it
    assert_exact(model, plan)


class Sneaky(nn.Module):
    """Sizes a view by ``int(a.shape[1])``: a plain int the tracer cannot tell from a
    constant, so the trace thinks ``a`` and ``v`` free; pruning either breaks the view."""

    def __init__(self):
        super().__init__()
        self.a, self.v, self.w = block(3, 8, 3), block(3, 8, 3), block(3, 8, 3)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        a, v, w = self.a(x), self.v(x), self.w(x)
        c = int(a.shape[1])
        y = v.view(v.shape[0], c, -1).view(v.shape[0], c, *v.shape[2:])
        return self.head(torch.cat([a, y, w], 1))


@pytest.mark.parametrize("compensate", [False, True])
def test_a_network_the_tracer_cannot_follow_is_repaired_by_the_check_after_surgery(compensate):
    torch.manual_seed(0)
    model, _ = make_sparse(Sneaky(), (1, 3, 16, 16))
    graph, plan = plan_of(model)  # the engine alone: a broken network
    with pytest.raises(RuntimeError, match="invalid for input"):
        engine.apply_plan(model, plan, compensate=False)(torch.zeros(1, 3, 16, 16))
    pruned, report = prune(model, compensate=compensate)
    kept = [r for r in report.fixed if r.startswith("removing channels of")]
    assert [r.split()[3] for r in kept] == ["a.1", "v.1"]  # each group, named, with the failure
    assert all(
        "(it fails on the traced input: RuntimeError" in r and "invalid for input" in r
        for r in kept
    )
    assert report.layers == [("w.1", 4, 8)]
    masks = {
        "a.1": torch.ones(8, dtype=torch.bool),
        "v.1": torch.ones(8, dtype=torch.bool),
        "w.1": model.w[1].weight.abs() > report.threshold,
    }
    x = torch.randn(2, 3, 16, 16)
    expected = netslim.engine.plan.masked_copy(model, masks, zero_beta=not compensate).eval()
    if compensate:  # exact away from the borders: compare the centre
        assert (
            max_relative(
                [outputs(pruned, x)[0][..., 4:-4, 4:-4]], [outputs(expected, x)[0][..., 4:-4, 4:-4]]
            )
            < TOLERANCE
        )
    else:
        assert max_relative(outputs(pruned, x), outputs(expected, x)) < TOLERANCE
    assert "checked after surgery on the traced input and a random input" in report.text()


class Scaled(nn.Module):
    """Scales one branch by ``float(a.shape[1])``, a size turned float, which the tracer
    cannot follow: pruning ``a`` runs, but computes something else. With ``branch``, the
    forward also reads the input's values (so only the layers can be compared)."""

    def __init__(self, branch: bool = False):
        super().__init__()
        self.branch = branch
        self.a = block(3, 8)
        self.y = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))  # not 0 on zeros
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a, y = self.a(x), self.y(x)
        if self.branch and x.abs().mean() > 1e3:  # never true: a value read all the same
            y = -y
        return self.head(torch.cat([a, y * (float(a.shape[1]) / 8)], 1))


@pytest.mark.parametrize("branch", [False, True], ids=["outputs", "layers"])
def test_a_pruned_network_that_computes_something_else_is_repaired(branch):
    torch.manual_seed(0)
    model, _ = make_sparse(Scaled(branch), (1, 3, 16, 16))
    graph, plan = plan_of(model)
    assert bool(graph.value_reads) == branch
    pruned, report = prune(model, compensate=False)
    [kept] = [r for r in report.fixed if r.startswith("removing channels of")]
    what = "the output of head" if branch else "its output"  # head: where the scale shows
    assert kept.startswith(f"removing channels of a.1 broke the pruned network ({what} differs")
    y = model.y[1].weight.abs() > report.threshold
    assert report.layers == [("y.1", int(y.sum()), 8)]
    masks = {"a.1": torch.ones(8, dtype=torch.bool), "y.1": y}
    expected = netslim.engine.plan.masked_copy(model, masks).eval()
    x = torch.zeros(1, 3, 16, 16)  # the traced input (the path traced, with branch)
    assert max_relative(outputs(pruned, x), outputs(expected, x)) < TOLERANCE


def test_a_network_still_broken_after_the_repairs_allowed_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(netslim.slim, "MAX_REPAIRS", 1)  # Sneaky needs two
    torch.manual_seed(0)
    model, _ = make_sparse(Sneaky(), (1, 3, 16, 16))
    with pytest.raises(NetslimError) as error:
        prune(model)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("pruning Sneaky gives a broken network (it fails on the traced input")
    assert "even with 1 group of channels kept whole" in message and "--ignore" in message


# -- 2. numbers read from tensor values ---------------------------------------------------------

READS = {
    ".numpy()": lambda t: float(t.detach().numpy()),
    "np.asarray": lambda t: float(np.asarray(t.detach())),
    "float()": lambda t: float(t),
    ".tolist()": lambda t: t.tolist(),
    ".item()": lambda t: t.item(),
}


class ReadsANumber(nn.Module):
    """A number read from the values of one branch is added after the BatchNorm of another:
    a removed channel there holds that number, which changes with the input."""

    def __init__(self, read: str):
        super().__init__()
        self.read = READS[read]
        self.a, self.b, self.c = block(3, 8), block(8, 8), block(3, 8)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a = self.a(x)
        s = self.read(a.mean())  # a scalar: the same however a is pruned
        y = self.bn(self.conv(self.b(a)))
        return self.head(torch.cat([torch.relu(y + s), self.c(x)], 1))


@pytest.mark.parametrize("read", list(READS))
def test_a_number_read_from_tensor_values_keeps_the_channels_it_is_added_to(read):
    torch.manual_seed(0)
    model, _ = make_sparse(ReadsANumber(read), (1, 3, 16, 16))
    graph, plan = plan_of(model)
    assert graph.value_reads
    assert bool(graph.fixed[graph.norms["bn"]].all())
    assert any(
        "computes with a number that may come from tensor values" in r for r in graph.fixed_reasons
    )
    assert plan.kept["c.1"][0] < 8  # the branch the number never reaches still prunes
    assert_exact(model, plan)


# -- 3. the compensation probe follows the traced path ------------------------------------------


class Branches(nn.Module):
    """On zeros (the traced input) the second branch runs; on any other input the first."""

    def __init__(self):
        super().__init__()
        self.stem = block(3, 8)
        self.first, self.second = block(8, 8), block(8, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        branch = self.first if x.abs().mean() > 1e-3 else self.second
        return self.head(branch(self.stem(x)))


@pytest.mark.parametrize("compensate", [False, True])
def test_the_compensation_probe_measures_on_the_traced_branch(compensate):
    torch.manual_seed(0)
    model, _ = make_sparse(Branches(), (1, 3, 16, 16))
    graph, plan = plan_of(model)
    assert "second.0" in graph.layers and "first.0" not in graph.layers  # the traced branch
    pruned, report = prune(model, compensate=compensate)
    assert report.value_reads and "exact on the path traced" in report.text()
    x = torch.zeros(1, 3, 16, 16)  # the traced path, where the pruned network is exact
    assert (
        max_relative(outputs(pruned, x), outputs(reference_network(model, plan, compensate), x))
        < TOLERANCE
    )


class Alternating(nn.Module):
    """Takes the other branch at every call, whatever the input."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.stem = block(3, 8)
        self.first, self.second = block(8, 8), block(8, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        self.calls += 1
        x = self.stem(x)
        return self.head(self.first(x) if self.calls % 2 else self.second(x))


def test_a_forward_that_changes_its_path_from_run_to_run_is_refused_in_one_line():
    torch.manual_seed(0)
    model, _ = make_sparse(Alternating(), (1, 3, 16, 16))
    with pytest.raises(NetslimError) as error:
        prune(model)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("cannot measure what the removed channels leave")
    assert "its path changes from run to run" in message


# -- 4. ties at the threshold -------------------------------------------------------------------


def fresh_vgg() -> nn.Module:
    """A new vgg11-small: every gamma is 1, all tied."""
    model = netslim.build_model("vgg11-small").eval()
    with torch.no_grad():
        for _, bn in batchnorms(model):
            bn.weight.fill_(1.0)
    return model


def test_a_tie_at_the_threshold_removes_only_the_asked_share():
    model = fresh_vgg()
    total = sum(bn.num_features for _, bn in batchnorms(model))
    pruned, report = prune(model, 0.5, size=32)
    assert round(report.pruned_share * total) == int(total * 0.5) + 1  # as the paper's rule
    for name, kept, size in report.layers:  # spread over the layers, none emptied
        assert abs(kept - size / 2) <= 1, name
    assert report.tie_break == (int(total * 0.5) + 1, total)
    assert f"{total} channels tie at the threshold: removed {int(total * 0.5) + 1}" in report.text()
    assert not report.floored


def test_broken_ties_are_deterministic_and_nested_by_ratio():
    model = fresh_vgg()
    at_3, at_4 = plan_pruning(model, 0.3), plan_pruning(model, 0.4)
    assert torch.equal(at_3.keep, plan_pruning(model, 0.3).keep)
    assert bool((at_4.keep <= at_3.keep).all())  # what 0.3 removes, 0.4 removes too
    assert int((~at_3.keep).sum()) < int((~at_4.keep).sum())


def test_a_macs_target_with_ties_lands_just_under_it():
    model = fresh_vgg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_for_macs(model, 0.5)
        full = plan_pruning(model, 0.0).macs
    assert 0.45 * full < plan.macs <= 0.5 * full  # not the floor: ties went one by one
    assert plan.tie_break is not None


def test_round_to_with_ties_keeps_multiples_and_no_more_than_the_asked_share():
    model = fresh_vgg()
    pruned, report = prune(model, 0.5, size=32, round_to=8)
    assert all(kept % 8 == 0 for _, kept, _ in report.layers)
    assert report.pruned_share <= 0.5 + 1e-9
    assert report.tie_break is not None


# -- every shipped Ultralytics YAML -------------------------------------------------------------


@pytest.mark.parametrize("name", YAMLS)
def test_every_shipped_ultralytics_yaml_prunes_exactly_or_is_refused_in_one_line(name):
    result = check_yaml(name, 64)
    if name in UNBUILDABLE:
        assert result.stage == "build" and result.error and "\n" not in result.error
        assert result.error.startswith(("cannot build the Ultralytics model", name))
        return
    assert result.error is None, result.error
    assert result.removed > 0.2
    assert result.official < TOLERANCE
    assert result.compensated < TOLERANCE
