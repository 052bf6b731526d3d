"""Threshold semantics, the per-layer floor, surgery, bias compensation, parameter counts."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import TINY_CFG, randomize_bn
from torch import nn

from netslim.engine.plan import PrunePlan, global_threshold, masked_copy, plan_pruning
from netslim.engine.sparsity import batchnorms
from netslim.engine.stats import count_macs, count_params
from netslim.engine.surgery import apply_plan
from netslim.errors import NetslimError
from netslim.models import VGG, build_model


def prune(model, ratio, *, compensate=True):
    """Plan and surgery, unchecked: the engine's two steps (netslim.prune_model adds the rest)."""
    plan = plan_pruning(model, ratio)
    return apply_plan(model, plan, compensate=compensate), plan


def official_masks(model: nn.Module, percent: float) -> list[torch.Tensor]:
    """The paper's vggprune.py, step by step: a flat |gamma| buffer, sort, index, compare."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    total = sum(m.weight.shape[0] for m in bns)
    buffer = torch.zeros(total)
    index = 0
    for m in bns:
        size = m.weight.shape[0]
        buffer[index : index + size] = m.weight.data.abs().clone()
        index += size
    y, _ = torch.sort(buffer)
    thre = y[int(total * percent)]
    return [m.weight.data.abs().gt(thre).float() for m in bns]


def test_threshold_is_value_at_int_total_times_ratio_with_ties():
    gammas = torch.tensor([0.5, -0.2, 0.2, 0.1, 0.2, 0.9, -0.05, 0.3, 0.2, 0.7])
    ordered = sorted(abs(g) for g in gammas.tolist())  # 0.05 0.1 0.2 0.2 0.2 0.2 0.3 0.5 0.7 0.9
    for ratio in (0.1, 0.25, 0.3, 0.5, 0.6, 0.99):
        assert global_threshold(gammas, ratio) == pytest.approx(ordered[int(10 * ratio)])
    # ratio 0.3: threshold 0.2, and all four tied 0.2s go (keep strictly greater): 6 removed.
    kept = gammas.abs() > global_threshold(gammas, 0.3)
    assert int(kept.sum()) == 4
    assert global_threshold(gammas, 0.0) == float("-inf")  # ratio 0 keeps everything


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(NetslimError, match=r"ratio"):
        global_threshold(torch.ones(4), ratio)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_masks_equal_official_vggprune(tiny_vgg, ratio):
    plan = plan_pruning(tiny_vgg, ratio)
    assert not plan.floored
    ours = [plan.masks[name].float() for name, _ in batchnorms(tiny_vgg)]
    for a, b in zip(ours, official_masks(tiny_vgg, ratio)):
        assert torch.equal(a, b)


def test_floor_keeps_largest_channels_and_warns_naming_the_layer(tiny_vgg):
    bn = tiny_vgg.feature[5]  # the second BN layer, 16 channels
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(1e-4, 2e-3, 16))  # far below every other |gamma|
    with pytest.warns(UserWarning, match=r"feature\.5"):
        plan = plan_pruning(tiny_vgg, 0.2, min_keep=0.25)
    assert plan.floored == ["feature.5"]
    assert plan.masks["feature.5"].nonzero().flatten().tolist() == [12, 13, 14, 15]
    # the smallest share of channels the official rule would remove: all 16 of them
    assert official_masks(tiny_vgg, 0.2)[1].sum() == 0
    pruned = apply_plan(tiny_vgg, plan)
    assert pruned.cfg[2] == 4
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_floor_is_at_least_one_channel(tiny_vgg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_pruning(tiny_vgg, 0.99, min_keep=0.0)
    assert all(kept >= 1 for kept, _ in plan.kept.values())


def test_pruned_equals_masked_without_compensation(tiny_vgg):
    pruned, plan = prune(tiny_vgg, 0.5, compensate=False)
    assert plan.pruned_share >= 0.5
    x = torch.randn(4, 3, 32, 32)
    masked = masked_copy(tiny_vgg, plan.masks, zero_beta=True)
    torch.testing.assert_close(pruned.eval()(x), masked(x), rtol=1e-4, atol=1e-5)
    # and the input model is untouched
    assert tiny_vgg.feature[1].weight.numel() == TINY_CFG[0]


def _only(plan: PrunePlan, layer: str) -> PrunePlan:
    """The plan with every group but the one scaled by BN ``layer`` kept whole."""
    keep = torch.ones_like(plan.keep)
    units = plan.graph.norms[layer]
    keep[units] = plan.keep[units]
    return dataclasses.replace(plan, keep=keep)


def test_compensation_is_exact_for_channels_feeding_the_classifier(tiny_vgg):
    last = list(plan_pruning(tiny_vgg, 0.5).masks)[-1]
    plan = _only(plan_pruning(tiny_vgg, 0.5), last)
    assert plan.kept[last][0] < 24
    x = torch.randn(4, 3, 32, 32)
    zeroed = masked_copy(tiny_vgg, plan.masks, zero_beta=False)  # gamma = 0, beta kept
    torch.testing.assert_close(
        apply_plan(tiny_vgg, plan).eval()(x), zeroed(x), rtol=1e-4, atol=1e-5
    )
    uncompensated = apply_plan(tiny_vgg, plan, compensate=False).eval()(x)
    assert (uncompensated - zeroed(x)).abs().max() > 1e-3


def test_compensation_is_exact_in_the_interior_of_the_next_feature_map(tiny_vgg):
    plan = _only(plan_pruning(tiny_vgg, 0.5), "feature.1")  # first BN; a max-pool follows
    pruned = apply_plan(tiny_vgg, plan).eval()
    zeroed = masked_copy(tiny_vgg, plan.masks, zero_beta=False)
    x = torch.randn(4, 3, 32, 32)
    a, b = pruned.feature[:6](x), zeroed.feature[:6](x)  # output of the next BN, 16x16
    torch.testing.assert_close(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-5)
    assert (a - b).abs().max() > 1e-4  # the border is only approximate, as documented


def test_compensation_comes_closer_to_zeroed_gamma_network(tiny_vgg):
    x = torch.randn(8, 3, 32, 32)
    compensated, plan = prune(tiny_vgg, 0.5)
    plain, _ = prune(tiny_vgg, 0.5, compensate=False)
    target = masked_copy(tiny_vgg, plan.masks, zero_beta=False)(x)
    err_comp = (compensated.eval()(x) - target).abs().mean()
    err_plain = (plain.eval()(x) - target).abs().mean()
    assert err_comp < err_plain


def params_from_cfg(cfg, num_classes=10) -> int:
    total, in_ch = 0, 3
    for v in cfg:
        if v != "M":
            total += 9 * in_ch * v + 2 * v  # conv weights, BN gamma and beta
            in_ch = v
    return total + in_ch * num_classes + num_classes


def macs_from_cfg(cfg, num_classes=10) -> int:
    total, in_ch, side = 0, 3, 32
    for v in cfg:
        if v == "M":
            side //= 2
        else:
            total += side * side * v * in_ch * 9
            in_ch = v
    return total + in_ch * num_classes


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_pruned_params_and_macs_equal_count_from_cfg(ratio):
    torch.manual_seed(1)
    model = randomize_bn(build_model("vgg19"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, _ = prune(model, ratio)
    assert count_params(pruned) == params_from_cfg(pruned.cfg)
    assert count_macs(pruned) == macs_from_cfg(pruned.cfg)
    if ratio == 0.0:
        assert pruned.cfg == model.cfg


def test_vgg19_matches_the_paper_size():
    model = build_model("vgg19")
    assert count_params(model) == params_from_cfg(model.cfg) == 20_035_018  # paper: 20.04M
    assert 2 * count_macs(model) == pytest.approx(7.97e8, rel=0.002)  # paper: 7.97e8 FLOPs


def test_pruned_network_trains_one_step(tiny_vgg):
    pruned, _ = prune(tiny_vgg, 0.6)
    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(
        pruned(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])
    )
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_vgg_cfg_validation():
    with pytest.raises(NetslimError, match="bad entry"):
        VGG([64, "X", 128])
    with pytest.raises(NetslimError, match="unknown architecture"):
        build_model("vgg7")
