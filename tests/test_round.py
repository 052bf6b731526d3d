"""--round-to: multiples of N channels, the top-|gamma| ones, never more than a group has."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import randomize_bn

import netslim
from netslim.cli import main
from netslim.engine.plan import channel_scores, plan_for_macs, plan_pruning, round_kept
from netslim.models import VGG, ResNet


def test_round_kept_adds_the_next_best_channels():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.7, 0.3, 0.2, 0.6, 0.4, 0.8])
    keep = scores > 0.65  # 0.9, 0.7, 0.8
    rounded = round_kept(keep, scores, 4)
    assert int(rounded.sum()) == 4 and bool(rounded[keep].all())
    assert rounded.tolist() == (scores >= 0.6).tolist()  # the next best: 0.6
    assert torch.equal(round_kept(keep, scores, 1), keep)
    assert torch.equal(round_kept(keep, scores, 3), keep)  # already a multiple


def test_round_kept_never_exceeds_the_group():
    scores = torch.rand(10, generator=torch.Generator().manual_seed(0))
    keep = scores > scores.sort().values[0]  # 9 of 10 kept
    assert int(round_kept(keep, scores, 8).sum()) == 10  # 16 > 10: the whole group
    small = torch.tensor([True, False, False])
    assert bool(round_kept(small, torch.tensor([0.3, 0.1, 0.2]), 8).all())  # 3 < 8: whole


def sparse_resnet() -> torch.nn.Module:
    return randomize_bn(ResNet([(16, 2, 1), (32, 2, 2), (48, 2, 2)], stem=16))


@pytest.mark.parametrize("n", [4, 8, 16])
def test_plan_keeps_multiples_of_n_and_the_top_gammas(n):
    model = sparse_resnet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = plan_pruning(model, 0.6)
        rounded = plan_pruning(model, 0.6, round_to=n)
    scores = netslim.engine.plan._unit_scores(plain.graph, channel_scores(model))
    assert rounded.round_to == n
    for group in plain.graph.prunable.values():
        kept, before = rounded.keep[group.units], plain.keep[group.units]
        count = int(kept.sum())
        assert count <= group.size
        assert count % n == 0 or count == group.size
        assert count >= int(before.sum()) and bool(kept[before].all())
        if count < group.size:  # the kept channels are the best ones
            assert scores[group.units][kept].min() >= scores[group.units][~kept].max()
    assert rounded.macs >= plain.macs


def test_round_to_one_is_the_plain_plan():
    model = sparse_resnet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = plan_pruning(model, 0.5), plan_pruning(model, 0.5, round_to=1)
    assert torch.equal(a.keep, b.keep)


def test_target_macs_searches_rounded_plans():
    model = sparse_resnet()
    total = netslim.count_macs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_for_macs(model, 0.5, round_to=8)
    assert plan.macs <= 0.5 * total
    for group in plan.graph.prunable.values():
        count = int(plan.keep[group.units].sum())
        assert count % 8 == 0 or count == group.size
    pruned = netslim.apply_plan(model, plan)
    assert netslim.count_macs(pruned) == plan.macs


def test_round_to_must_be_positive():
    with pytest.raises(netslim.NetslimError, match="--round-to must be a whole number"):
        plan_pruning(sparse_resnet(), 0.5, round_to=0)


def test_cli_prune_round_to_reports_both_ways(tmp_path, capsys):
    torch.manual_seed(0)
    model = randomize_bn(VGG([32, "M", 48, "M", 40, 24, "M", 64]))
    netslim.save_checkpoint(
        {"cfg": model.cfg, "state_dict": model.state_dict()}, tmp_path / "a.pth"
    )
    assert (
        main(
            [
                "prune",
                str(tmp_path / "a.pth"),
                "--ratio",
                "0.5",
                "--round-to",
                "8",
                "--out",
                str(tmp_path / "p.pth"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "before rounding to a multiple of 8" in out and "before rounding to multiples of 8:" in out
    )
    pruned = netslim.load(tmp_path / "p.pth")
    widths = [c for c in pruned.cfg if c != "M"]
    assert all(w % 8 == 0 or w == full for w, full in zip(widths, [32, 48, 40, 24, 64]))
    assert (
        main(
            [
                "prune",
                str(tmp_path / "a.pth"),
                "--ratio",
                "0.5",
                "--round-to",
                "0",
                "--out",
                str(tmp_path / "q.pth"),
            ]
        )
        == 2
    )
    assert "--round-to" in capsys.readouterr().err and not (tmp_path / "q.pth").exists()
