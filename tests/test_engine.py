"""The dependency-aware pruning engine on every architecture: exactness, coupling, sizes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import make_sparse as sparse
from conftest import randomize_bn
from torch import nn

import netslim
from netslim.checkpoint import save_checkpoint
from netslim.engine.plan import masked_copy, plan_for_macs, plan_pruning
from netslim.engine.sparsity import batchnorms
from netslim.engine.stats import count_macs, count_params
from netslim.engine.surgery import apply_plan
from netslim.engine.trace import trace_channels
from netslim.errors import NetslimError
from netslim.models import build_model
from netslim.slim import prune_model, pruned_checkpoint

ARCHS = ["resnet56", "resnet164", "densenet40", "resnet18", "mobilenetv2", "vgg11-small"]


def make_sparse(model: nn.Module, share: float = 0.5, seed: int = 0, input_size=(1, 3, 32, 32)):
    """conftest's, the model alone."""
    return sparse(model, input_size, share, seed)[0]


def sparse_model(arch: str, share: float = 0.5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make_sparse(build_model(arch), share, seed)


def circular(model: nn.Module) -> nn.Module:
    """Wrap-around padding: a constant map stays constant at the borders too."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.padding_mode = "circular"
    return model


def _plan(model, ratio=0.5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan_pruning(model, ratio)


@pytest.fixture(scope="module", params=ARCHS)
def pruned_case(request):
    model = sparse_model(request.param)
    plan = _plan(model)
    return request.param, model, plan


def test_pruned_equals_masked_without_compensation(pruned_case):
    arch, model, plan = pruned_case
    assert plan.pruned_share > 0.2, arch
    pruned = apply_plan(model, plan, compensate=False).eval()
    x = torch.randn(3, 3, 32, 32)
    expected = masked_copy(model, plan.masks, zero_beta=True)(x)
    torch.testing.assert_close(pruned(x), expected, rtol=1e-4, atol=1e-5)


def test_compensation_equals_zeroed_gamma_network_without_zero_padding(pruned_case):
    arch, model, plan = pruned_case
    model = circular(model)
    x = torch.randn(3, 3, 32, 32)
    zeroed = masked_copy(model, plan.masks, zero_beta=False)(x)  # gamma 0, beta kept
    compensated = apply_plan(model, plan, compensate=True).eval()(x)
    torch.testing.assert_close(compensated, zeroed, rtol=1e-4, atol=1e-5)
    plain = apply_plan(model, plan, compensate=False).eval()(x)
    assert (plain - zeroed).abs().max() > 1e-3  # the fold is what makes them equal


def test_params_and_macs_equal_an_independent_count(pruned_case):
    arch, model, plan = pruned_case
    pruned = apply_plan(model, plan)
    # count from the plan's kept channels, layer by layer, with no module in sight
    params = 0
    for name, layer in plan.graph.layers.items():
        n_in, n_out = int(plan.kept_of(layer.inputs).sum()), int(plan.kept_of(layer.outputs).sum())
        per_out = len(layer.inputs) // layer.groups if layer.kind == "grouped" else n_in
        has_bias = pruned.get_submodule(name).bias is not None
        params += n_out * per_out * layer.kernel + (n_out if has_bias else 0)
    params += sum(2 * int(m.sum()) for m in plan.masks.values())
    assert count_params(pruned) == params
    assert count_macs(pruned) == plan.macs < count_macs(model)


def test_channels_joined_by_an_addition_are_never_split(pruned_case):
    arch, model, plan = pruned_case
    masks = plan.masks
    names = [n for n, _ in batchnorms(model)]
    if arch == "resnet56":  # the stream of each stage: stem/projection BN and every bn2
        stages = [["bn1"] + [n for n in names if n.startswith("layers.0.") and n.endswith("bn2")]]
        for s in (1, 2):
            stages.append(
                [
                    n
                    for n in names
                    if n.startswith(f"layers.{s}.")
                    and (n.endswith("bn2") or n.endswith("shortcut.1"))
                ]
            )
    elif arch == "resnet164":  # pre-activation: the stream is read by each bn1 and the last bn
        stages = [
            [
                n
                for n in names
                if n.startswith(f"layers.{s}.")
                and n.endswith("bn1")
                and not n.startswith(f"layers.{s}.0.")
            ]
            for s in range(3)
        ]
        stages[2].append("bn")
    elif arch == "mobilenetv2":  # projection BNs of the blocks joined by residuals (stage 32)
        stages = [[f"features.{i}.block.7" for i in (6, 7, 8)]]
    elif arch == "resnet18":
        stages = [["bn1", "layers.0.0.bn2", "layers.0.1.bn2"]]
    elif arch == "densenet40":  # the stem's 24 channels, as read by every BN of block 1
        stages = [[f"features.{i}.bn" for i in range(13)]]
        masks = {n: m[:24] for n, m in masks.items()}
    else:
        stages = []
    for stage in stages:
        first = masks[stage[0]]
        assert 0 < int(first.sum()) < first.numel(), (arch, stage[0])  # really pruned
        for name in stage[1:]:
            assert torch.equal(masks[name], first), (arch, name)


def test_pruned_network_trains_one_step(pruned_case):
    arch, model, plan = pruned_case
    pruned = apply_plan(model, plan).train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    before = F.cross_entropy(pruned(x), y)
    before.backward()
    netslim.add_bn_l1_grad(pruned, 1e-4)
    opt.step()
    assert torch.isfinite(before)
    assert not torch.equal(pruned(x), pruned(x).detach() * 0)  # still computes something


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_target_macs_lands_within_a_few_percent(arch, fraction):
    model = sparse_model(arch, share=0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_for_macs(model, fraction)
    pruned = apply_plan(model, plan)
    achieved = count_macs(pruned) / count_macs(model)
    assert fraction - 0.03 <= achieved <= fraction, (arch, achieved)


def test_target_macs_beyond_the_floor_is_a_clear_error():
    model = sparse_model("resnet56")
    with pytest.raises(NetslimError, match="cannot reach"):
        plan_for_macs(model, 0.001, min_keep=0.5)


@pytest.mark.parametrize("arch", ["resnet56", "densenet40", "mobilenetv2"])
def test_pruned_checkpoint_loads_with_one_call(tmp_path, arch):
    model = sparse_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = prune_model(model, 0.5)
    path = tmp_path / "pruned.pth"
    save_checkpoint(pruned_checkpoint(pruned, report, {"arch": arch}), path)
    raw = torch.load(path, weights_only=True)  # plain data, no pickled modules
    assert set(raw) == {"channels", "state_dict", "netslim"}
    loaded = netslim.load(path)
    assert type(loaded) is type(pruned) and count_params(loaded) == count_params(pruned)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), pruned.eval()(x))


def test_residual_kept_comparison_leaves_more_macs():
    model = sparse_model("resnet56")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = prune_model(model, 0.5)
    assert report.macs_after < report.macs_residual_kept < report.macs_before
    kept = trace_channels(model).residual_kept()
    plan = plan_pruning(model, 0.5, graph=kept)
    torch.testing.assert_close(  # the official way is exact too: nothing on the stream goes
        apply_plan(model, plan, compensate=False)(torch.ones(1, 3, 32, 32)),
        masked_copy(model, plan.masks)(torch.ones(1, 3, 32, 32)),
    )
    assert plan.macs == report.macs_residual_kept


def test_vgg_gets_a_cfg_and_other_networks_do_not():
    model = sparse_model("vgg11-small")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = prune_model(model, 0.5)
    assert report.cfg == pruned.cfg and report.cfg != model.cfg
    assert prune_model(sparse_model("resnet56"), 0.5)[1].cfg is None


# -- what the engine refuses, by name ----------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        x = self.bn(self.conv(x))
        if x.sum() > 0:  # control flow on values: traced, what it read is kept
            x = -x
        return self.fc(x.mean((2, 3)))


class WithGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.gn, self.fc = nn.GroupNorm(2, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.gn(self.bn(self.conv(x))).mean((2, 3)))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = (
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.Linear(4, 2),
        )
        self.stem = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(self.bn(self.conv(self.conv(x))).mean((2, 3)))


class PaddedShortcut(nn.Module):
    """The original CIFAR ResNet's 'option A' shortcut: zero channels padded onto x."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.Linear(8, 2),
        )

    def forward(self, x):
        x = self.bn(self.conv(x)) + F.pad(x, (0, 0, 0, 0, 0, 5))
        return self.fc(x.mean((2, 3)))


class ChannelMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.Linear(30, 2)

    def forward(self, x):  # a mean over channels, whose result happens to be 30 wide
        return self.fc(self.bn(self.conv(x)).mean(1).mean(2))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.g, self.bn_g = nn.Conv2d(8, 8, 3, groups=2), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = self.bn_g(self.g(F.relu(self.bn_a(self.a(x)))))
        return self.fc(F.relu(self.bn_b(self.b(x))).mean((2, 3)))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            DataDependent(),
            r"nothing to slim in DataDependent.*call_method sum in DataDependent "
            r"\(test_engine\.py:\d+\)",
        ),
        (WithGroupNorm(), r"nothing to slim in WithGroupNorm.*GroupNorm in gn \(test_engine"),
        (Shared(), r"Conv2d called more than once in forward\(\) in conv \(test_engine"),
        (
            PaddedShortcut(),
            r"call_function pad changing the channels in PaddedShortcut \(test_engine\.py:\d+\)",
        ),
        (ChannelMean(), r"call_method mean in ChannelMean"),
    ],
)
def test_unprunable_models_get_a_clear_error_naming_the_culprit(model, message):
    with pytest.raises(NetslimError, match=message):
        plan_pruning(model, 0.5)


def test_grouped_conv_loses_whole_convolution_groups():
    model = randomize_bn(Grouped())
    with torch.no_grad():  # the first convolution group (channels 0-3 of bn_a and bn_g) is weak
        for bn in (model.bn_a, model.bn_g):
            bn.weight.abs_().add_(0.5)[:4] = 1e-3
    graph = trace_channels(model)
    g = graph.layers["g"]
    assert g.kind == "grouped" and len(torch.unique(g.inputs)) == 2  # one unit per conv group
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = netslim.plan_pruning(model, 0.3)
        pruned = netslim.apply_plan(model, plan, compensate=False)
    assert (pruned.g.groups, pruned.g.in_channels, pruned.a.out_channels) == (1, 4, 4)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(pruned.eval()(x), masked_copy(model, plan.masks)(x))


class CatTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.b, self.bn_b = nn.Conv2d(12, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = F.relu(self.bn_a(self.a(x)))
        x = torch.cat([x, x], dim=1)  # the same tensor twice: 12 channels, two views of 6
        return self.fc(F.relu(self.bn_b(self.b(x))).mean((2, 3)))


def test_a_tensor_concatenated_with_itself_keeps_both_copies_in_step():
    model = randomize_bn(CatTwice())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = netslim.plan_pruning(model, 0.5)
        pruned = netslim.apply_plan(model, plan, compensate=False)
    kept = pruned.a.out_channels
    assert 0 < kept < 6 and pruned.b.in_channels == 2 * kept
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(pruned.eval()(x), masked_copy(model, plan.masks)(x))
