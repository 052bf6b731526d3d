"""The pruning engine on hand-made networks, one case each: exact, or fixed with a reason.

Every case is checked both ways: the pruned network without compensation equals the
official masked network (pruned gamma and beta zeroed), and with compensation (on a
copy with circular padding, where a constant map stays constant) equals the reference
network (pruned gamma zeroed).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import fx, nn

from netslim.engine.plan import plan_pruning, reference_network
from netslim.engine.sparsity import batchnorms
from netslim.engine.stats import count_macs
from netslim.engine.surgery import apply_plan
from netslim.engine.trace import trace_channels
from netslim.errors import NetslimError
from netslim.slim import prune_model

SIZE = (1, 3, 12, 12)


def sparse(model: nn.Module, size=SIZE, share: float = 0.5, seed: int = 0) -> nn.Module:
    """Random BN statistics, and a random ``share`` of every group's units made unimportant."""
    torch.manual_seed(seed)
    model = randomize_bn(model, seed)
    graph = trace_channels(model, size)
    g = torch.Generator().manual_seed(seed)
    weak = torch.zeros(graph.num_units, dtype=torch.bool)
    for group in graph.prunable.values():
        weak[group.units[torch.randperm(group.size, generator=g)[: int(share * group.size)]]] = True
    bns = dict(batchnorms(model))
    with torch.no_grad():
        for name, units in graph.norms.items():
            bns[name].weight.abs_().add_(0.1)[weak[units]] = 1e-3
    return model.eval()


def plan_of(model: nn.Module, size=SIZE, ratio: float = 0.5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan_pruning(model, ratio, graph=trace_channels(model, size))


def assert_exact(model: nn.Module, size=SIZE, pruned_some: bool = True):
    """Pruned == masked (no compensation) and == reference (compensation, circular padding)."""
    x = torch.randn(2, *size[1:])
    plan = plan_of(model, size)
    if pruned_some:
        assert plan.pruned_share > 0
    pruned = apply_plan(model, plan, compensate=False).eval()
    torch.testing.assert_close(pruned(x), reference_network(model, plan, False)(x))
    circular = copy.deepcopy(model)
    for m in circular.modules():
        if isinstance(m, nn.Conv2d):
            m.padding_mode = "circular"
    cplan = plan_of(circular, size)
    compensated = apply_plan(circular, cplan).eval()
    torch.testing.assert_close(compensated(x), reference_network(circular, cplan, True)(x))
    return plan


def conv_bn(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out)
    )


class Head(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


# -- silent wrong results of the earlier engine ----------------------------------------------


class OneSidedAdd(nn.Module):
    """An FPN lateral / a projection shortcut without BN: only one side is scaled."""

    def __init__(self, then_bn: bool = False):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.a, self.bn_a = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 1)
        self.post = nn.BatchNorm2d(8) if then_bn else nn.Identity()
        self.out, self.head = conv_bn(8, 6), Head(6)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.post(self.bn_a(self.a(x)) + self.b(x)))
        return self.head(F.relu(self.out(x)))


def test_a_one_sided_addition_is_fixed_and_the_rest_pruned_exactly():
    model = sparse(OneSidedAdd())
    plan = assert_exact(model)
    graph = plan.graph
    assert bool(graph.fixed[graph.norms["bn_a"]].all())  # b's channels are not zero there
    assert not bool(graph.fixed[graph.norms["stem.1"]].any())
    assert any(
        re.fullmatch(
            r"read by out\.0 \(test_engine_cases\.py:\d+\) where no BatchNorm scales them", r
        )
        for r in graph.fixed_reasons
    )


def test_a_one_sided_addition_followed_by_a_batchnorm_is_pruned_exactly():
    model = sparse(OneSidedAdd(then_bn=True))
    plan = assert_exact(model)
    assert int(plan.masks["post"].sum()) < 8 and torch.equal(plan.masks["post"], plan.masks["bn_a"])


class AfterNorm(nn.Module):
    """A function with f(0) != 0 after a BatchNorm, read by a 1x1 or a padded 3x3 conv."""

    def __init__(self, f, k: int):
        super().__init__()
        self.f = f
        self.stem, self.next, self.head = conv_bn(3, 8), conv_bn(8, 6, k), Head(6)

    def forward(self, x):
        return self.head(F.relu(self.next(self.f(self.stem(x)))))


FUNCTIONS = {
    "hard_sigmoid": lambda x: F.relu6(x + 3) / 6,
    "hardsigmoid": nn.Hardsigmoid(),
    "sigmoid": torch.sigmoid,
    "plus_constant": lambda x: F.relu(x) + 0.5,
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_f0_nonzero_after_a_batchnorm_is_folded_in_both_modes(name):
    model = sparse(AfterNorm(FUNCTIONS[name], k=1))
    plan = assert_exact(model)
    assert int(plan.masks["stem.1"].sum()) < 8  # pruned, and the constant folded
    pruned = apply_plan(model, plan, compensate=False)
    assert pruned.next[0].bias is not None or pruned.next[1].running_mean is not None


def test_f0_nonzero_read_through_zero_padding_is_fixed():
    model = sparse(AfterNorm(FUNCTIONS["hard_sigmoid"], k=3))
    plan = assert_exact(model, pruned_some=True)
    assert bool(plan.masks["stem.1"].all())
    assert any("nonzero f(0)" in r and "next.0" in r for r in plan.fixed_reasons)


def test_no_compensate_promise_in_the_readme_is_the_masked_network():
    model = sparse(AfterNorm(FUNCTIONS["sigmoid"], k=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = prune_model(model, 0.5, compensate=False, input_size=SIZE[1:])
    x = torch.randn(2, *SIZE[1:])
    plan = plan_of(model)
    torch.testing.assert_close(pruned(x), reference_network(model, plan, False)(x))


# -- what the earlier engine refused ---------------------------------------------------------


class SharedRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()  # one module, called at three places (torchvision's ResNet)
        self.a, self.b, self.c, self.head = conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 6), Head(6)

    def forward(self, x):
        x = self.relu(self.a(x))
        x = self.relu(self.b(x) + x)
        return self.head(self.relu(self.c(x)))


def test_a_parameter_free_module_called_at_several_places_is_a_function():
    plan = assert_exact(sparse(SharedRelu()))
    assert not plan.fixed_reasons


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d, in short: a BatchNorm2d subclass that also applies an act."""

    def __init__(self, n: int, act: nn.Module):
        super().__init__(n)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x):
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


class WithSubclasses(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), BatchNormAct(8, act)
        self.b, self.bn_b = nn.Conv2d(8, 6, 1), BatchNormAct(6, nn.ReLU())
        self.head = Head(6)

    def forward(self, x):
        torch._assert(x.dim() == 4, "an image batch")  # arithmetic on sizes: not channels
        n = x.shape[0] // 1 * x.size(-1) // x.size(-1)
        x = self.bn_b(self.b(self.bn_a(self.a(x))))
        return self.head(x.view(n, -1, x.shape[2], x.shape[3]))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.Hardsigmoid()], ids=["relu", "hardsigmoid"])
def test_a_batchnorm_subclass_with_its_own_act_is_that_batchnorm_then_the_act(act):
    model = sparse(WithSubclasses(act))
    plan = assert_exact(model)
    pruned = apply_plan(model, plan)
    assert type(pruned.bn_a) is BatchNormAct and pruned.bn_a.num_features < 8
    assert type(pruned.bn_a.act) is type(act)


class StandardisedConv(nn.Conv2d):
    """Weight standardisation: its forward reads all input channels' weights together."""

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class WithStandardised(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.ws = conv_bn(3, 8), StandardisedConv(8, 8, 3, padding=1)
        self.bn, self.out, self.head = nn.BatchNorm2d(8), conv_bn(8, 6), Head(6)

    def forward(self, x):
        return self.head(F.relu(self.out(F.relu(self.bn(self.ws(F.relu(self.stem(x))))))))


def test_a_conv_subclass_with_its_own_forward_is_kept_and_named():
    plan = assert_exact(sparse(WithStandardised()))
    assert bool(plan.masks["stem.1"].all()) and bool(plan.masks["bn"].all())
    assert not bool(plan.masks["out.1"].all())
    assert any("StandardisedConv (its own forward)" in r and "ws" in r for r in plan.fixed_reasons)


def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """torchvision's, in short: identity in eval, a per-sample scale in training."""
    if not training:
        return x
    keep = torch.rand(x.shape[0], 1, 1, 1) >= p
    return x * keep / (1 - p)


fx.wrap("stochastic_depth")


class DropPath(nn.Module):
    def forward(self, x):  # timm's: a Python branch on self.training
        if not self.training:
            return x
        return x * (torch.rand(x.shape[0], 1, 1, 1) > 0.1)


class WithDrops(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 8)
        self.drop, self.head = DropPath(), Head(8)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = x + stochastic_depth(self.b(x), 0.2, self.training)
        return self.head(F.relu(x + self.drop(self.c(x))))


def test_stochastic_depth_and_drop_path_pass_channels_through():
    plan = assert_exact(sparse(WithDrops()))
    assert not plan.fixed_reasons
    pruned = apply_plan(sparse(WithDrops()), plan).train()
    pruned(torch.randn(2, *SIZE[1:])).sum().backward()  # and it still trains


class Slices(nn.Module):
    """A split (GhostNet, CSPNet, Res2Net), a no-op slice, and a concatenation of pieces."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 8), conv_bn(4, 4), conv_bn(8, 8)
        self.d, self.head = conv_bn(8, 6), Head(6)

    def forward(self, x):
        x = F.relu(self.a(x))
        left, right = torch.split(x, 4, dim=1)
        x = torch.cat([left, F.relu(self.b(right))], dim=1)
        x = F.relu(self.c(x))[:, :8]  # the whole tensor: no cut
        return self.head(F.relu(self.d(x)))


def test_a_split_fixes_the_channels_it_cuts_and_a_whole_slice_does_not():
    plan = assert_exact(sparse(Slices()))
    assert bool(plan.masks["a.1"].all())  # split at a size written in forward()
    assert not bool(plan.masks["b.1"].all()) and not bool(plan.masks["c.1"].all())
    assert any("split" in r and "cuts or regroups" in r for r in plan.fixed_reasons)


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle: a view to 5-D, a transpose and a view back."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 8), conv_bn(8, 8, 1), conv_bn(8, 6)
        self.head = Head(6)

    def forward(self, x):
        x = F.relu(self.b(F.relu(self.a(x))))
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(F.relu(self.c(x)))


def test_a_channel_shuffle_fixes_the_channels_crossing_it_and_prunes_the_rest():
    plan = assert_exact(sparse(Shuffle()))
    assert bool(plan.masks["b.1"].all())
    assert not bool(plan.masks["a.1"].all()) and not bool(plan.masks["c.1"].all())
    assert any("view" in r for r in plan.fixed_reasons)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(3, 8), conv_bn(8, 8)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.out, self.head = conv_bn(8, 6, 1), Head(6)

    def forward(self, x):
        x = F.silu(self.b(F.relu(self.a(x))))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.head(F.relu(self.out(x * gate)))


def test_squeeze_excitation_ties_the_gate_to_the_channels_it_scales():
    model = sparse(SqueezeExcite())
    plan = assert_exact(model)
    pruned = apply_plan(model, plan)
    kept = int(plan.masks["b.1"].sum())
    assert kept < 8 and pruned.fc2.out_channels == kept == pruned.fc1.in_channels
    assert bool(plan.beta_zeroed["b.1"].any())  # the gate varies: compensation cannot fold


class NoBatchNorm(nn.Module):
    def __init__(self, norm: nn.Module | None = None):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 8, 3), norm or nn.Identity(), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.b(F.relu(self.norm(self.a(x)))).mean((2, 3))


@pytest.mark.parametrize(
    ("norm", "message"),
    [
        (None, r"^nothing to slim in NoBatchNorm: no BatchNorm scales any prunable channel$"),
        (nn.GroupNorm(2, 8), r"no BatchNorm scales any prunable channel$"),
        (nn.LayerNorm([8, 30, 30]), r"no BatchNorm scales any prunable channel$"),
    ],
)
def test_a_network_without_batchnorm_is_a_one_line_error(norm, message):
    with pytest.raises(NetslimError, match=message):
        prune_model(NoBatchNorm(norm), 0.5)


# -- the report and the input size ---------------------------------------------------------


def test_the_report_lists_what_was_fixed_with_module_and_source_line():
    model = sparse(OneSidedAdd())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = prune_model(model, 0.5, input_size=SIZE[1:])
    text = report.text()
    assert "kept whatever their gamma" in text
    assert re.search(r"read by out\.0 \(test_engine_cases\.py:\d+\) where no BatchNorm", text)
    assert "test_engine_cases.py:" in text and report.fixed


class Fixed20(nn.Module):
    """A network that takes 20x20 inputs only (its classifier reads 6 x 5 x 5 features)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(3, 8), conv_bn(8, 6)
        self.fc = nn.Linear(6 * 5 * 5, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.a(x)), 2)
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.b(x)), 2), 1))


def test_prune_model_traces_measures_and_compensates_at_the_input_size():
    model = sparse(Fixed20(), size=(1, 3, 20, 20))
    with pytest.raises(NetslimError, match=r"does not run on an input of shape \(1, 3, 32, 32\)"):
        prune_model(model, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = prune_model(model, 0.5, input_size=(3, 20, 20))
        _, same = prune_model(model, 0.5, input_size=(1, 3, 20, 20))
    assert report.input_size == same.input_size == (1, 3, 20, 20)
    assert report.macs_after < report.macs_before and pruned.fc.in_features < 150
    with pytest.raises(NetslimError, match="input_size must be"):
        prune_model(model, 0.5, input_size=(20, 20))


class AuxHead(nn.Module):
    """GoogLeNet and Inception-v3: an auxiliary classifier that only training runs."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = conv_bn(3, 8), conv_bn(8, 6), Head(6)
        self.aux = nn.Sequential(conv_bn(8, 4, 1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
        self.aux(torch.zeros(1, 8, 12, 12))  # materialise the lazy layer

    def forward(self, x):
        x = F.relu(self.a(x))
        aux = self.aux(x) if self.training else None
        x = self.head(F.relu(self.b(x)))
        return (x, aux) if self.training else x


def test_an_auxiliary_head_of_training_is_pruned_with_the_channels_it_reads():
    model = sparse(AuxHead())
    plan = assert_exact(model)
    assert not plan.graph.layers["aux.0.0"].inference and plan.graph.layers["a.0"].inference
    pruned = apply_plan(model, plan).train()
    assert pruned.aux[0][0].in_channels == int(plan.masks["a.1"].sum()) < 8
    out, aux = pruned(torch.randn(2, *SIZE[1:]))
    (out.sum() + aux.sum()).backward()
    assert plan.macs == count_macs(pruned, SIZE)  # MACs of inference, without the head
