"""Recipes, the L1 term under the fast schedule, early pruning and λ auto (issue 13)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict, replace

import pytest
import torch
from conftest import TRAIN_CFG, tiny_config, without_timing
from torch import nn

import netslim
from netslim import recipes
from netslim.cli import main
from netslim.cli.commands import _train_config, lab_config
from netslim.cli.parser import build_parser
from netslim.config import LabConfig, TrainConfig
from netslim.data import make_synthetic, train_batches
from netslim.engine.sparsity import batchnorms
from netslim.engine.surgery import channel_counts
from netslim.errors import NetslimError
from netslim.lab.early import train_prune_finetune
from netslim.models import VGG
from netslim.recipes import lr_at
from netslim.train import control
from netslim.train.loop import fit, make_optimizer, train_epoch
from netslim.train.runfolder import read_metrics

pytestmark = pytest.mark.slow  # not in make test-fast

QUIET = {"log": lambda s: None}
FAST = {
    "epochs": 40,
    "batch_size": 256,
    "lr": 0.2,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "linear",
    "warmup_epochs": 2.0,
    "nesterov": True,
    "label_smoothing": 0.1,
}


@pytest.fixture(scope="module")
def small_data():
    return make_synthetic(n_train=384, n_test=128, seed=0)


# --------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------


def test_each_recipe_resolves_to_its_documented_settings():
    paper = TrainConfig()  # the defaults have always been the paper's recipe
    assert recipes.resolve("paper", {}) == {k: getattr(paper, k) for k in recipes.RECIPE_KEYS}
    assert recipes.resolve("paper", {})["epochs"] == 160 and paper.schedule == "step"
    assert recipes.resolve("fast", {}) == FAST
    # a value given wins, None means "not given"
    assert recipes.resolve("fast", {"lr": 0.3, "nesterov": None, "seed": 5}) == {**FAST, "lr": 0.3}
    with pytest.raises(NetslimError, match="--recipe"):
        recipes.resolve("slow", {})


def _cli_config(*argv: str) -> TrainConfig:
    args = build_parser().parse_args(["train", "--dataset", "synthetic", "--out", "x", *argv])
    return _train_config(args, args.arch)


def test_cli_flags_override_the_recipe_and_config_records_the_resolved_values():
    assert asdict(_cli_config()) == asdict(replace(TrainConfig(), lam=1e-4, dataset="synthetic"))
    config = _cli_config("--recipe", "fast", "--lr", "0.3", "--no-nesterov", "--epochs", "7")
    assert config.recipe == "fast"
    assert {k: getattr(config, k) for k in FAST} == {
        **FAST,
        "lr": 0.3,
        "nesterov": False,
        "epochs": 7,
    }
    auto = _cli_config("--lam", "auto", "--target-ratio", "0.6")
    assert (auto.lam_auto, auto.lam, auto.target_ratio) == (True, control.LAM_START, 0.6)


def test_finetune_multipass_and_lab_take_the_recipe_too():
    for command in (["finetune", "p.pth"], ["multipass"]):
        args = build_parser().parse_args(
            [*command, "--recipe", "fast", "--out", "x", "--weight-decay", "0"]
        )
        config = _train_config(args, "vgg19")
        assert {k: getattr(config, k) for k in FAST} == {**FAST, "weight_decay": 0.0}
    lab = lab_config(build_parser().parse_args(["lab", "--recipe", "fast", "--lr", "0.2"]))
    assert (lab.epochs, lab.finetune_epochs, lab.batch_size, lab.lr) == (40, 40, 256, 0.2)
    assert {k: getattr(lab.train_config(1e-4), k) for k in FAST} == {**FAST, "lr": 0.2}
    assert lab.finetune_config().lam == 0 and lab.finetune_config().nesterov
    # the demo's own epochs win over the recipe's; the rest is the recipe's
    demo = lab_config(build_parser().parse_args(["demo", "--recipe", "fast"]))
    assert (demo.epochs, demo.finetune_epochs, demo.batch_size) == (5, 3, 256)
    paper = lab_config(build_parser().parse_args(["lab"]))
    assert paper == LabConfig()  # the paper recipe leaves the lab as it was


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lam", "auto"], "--target-ratio"),
        (["--target-ratio", "0.5"], "--lam auto"),
        (["--prune-when-stable", "1.5"], "ratio"),
        (["--prune-when-stable", "0.5", "--stable-epochs", "0"], "--stable-epochs"),
        (["--schedule", "linear", "--warmup-epochs", "-1"], "--warmup-epochs"),
        (["--nesterov", "--momentum", "0"], "--nesterov"),
        (["--label-smoothing", "1"], "--label-smoothing"),
    ],
)
def test_bad_recipe_settings_give_one_clear_line(tmp_path, capsys, argv, message):
    code = main(["train", "--dataset", "synthetic", "--out", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_linear_schedule_by_hand_and_step_schedule_unchanged():
    fast = tiny_config(**{**FAST, "epochs": 10})
    lr = FAST["lr"]
    # t = epoch + (step + 0.5) / steps; warm-up lr * t / 2 below t = 2, then lr * (10 - t) / 8
    assert recipes.lr_at_step(fast, 0, 0, 4) == pytest.approx(lr * 0.125 / 2)
    assert recipes.lr_at_step(fast, 1, 3, 4) == pytest.approx(lr * 1.875 / 2)
    assert recipes.lr_at_step(fast, 5, 1, 4) == pytest.approx(lr * (10 - 5.375) / 8)
    assert recipes.lr_at_step(fast, 9, 3, 4) == pytest.approx(lr * 0.125 / 8)
    # a fine-tuning shorter than twice the warm-up warms up for half of it
    short = replace(fast, epochs=2)
    assert recipes.lr_at_step(short, 0, 1, 2) == pytest.approx(lr * 0.75 / 1)
    assert recipes.lr_at_step(short, 1, 1, 2) == pytest.approx(lr * 0.25 / 1)
    paper = tiny_config(epochs=160, lr=0.1)
    for epoch in (0, 79, 80, 120, 159):
        for step in (0, 7):
            assert recipes.lr_at_step(paper, epoch, step, 8) == lr_at(epoch, 0.1, 160)


def test_l1_term_under_the_fast_schedule_equals_the_documented_formula():
    """One step at epoch 3 of the fast recipe: γ moves by exactly
    ``-(1 + momentum) * lr_t * (∂CE_smoothed/∂γ + wd * γ + lam * sign(γ))`` (first Nesterov step)."""
    config = tiny_config(**{**FAST, "epochs": 10, "batch_size": 32, "lam": 1e-2})
    data = make_synthetic(n_train=32, n_test=8, seed=1)  # one batch: one step
    lr_t = recipes.lr_at_step(config, 3, 0, 1)
    moved = {}
    for lam in (config.lam, 0.0):
        torch.manual_seed(0)
        model = VGG([8, "M", 16])
        before = [bn.weight.detach().clone() for _, bn in batchnorms(model)]
        optimizer = make_optimizer(model, config)
        generator = torch.Generator().manual_seed(7)
        train_epoch(
            model,
            data,
            optimizer,
            lam=lam,
            batch_size=32,
            generator=generator,
            dtype=None,
            label_smoothing=config.label_smoothing,
            lr_of_step=lambda step: recipes.lr_at_step(config, 3, step, 1),
        )
        moved[lam] = [bn.weight.detach() - b for (_, bn), b in zip(batchnorms(model), before)]
    # The gradient of the smoothed loss, by hand, on the same batch in training mode.
    torch.manual_seed(0)
    model = VGG([8, "M", 16]).train()
    x, y = next(iter(train_batches(data, 32, torch.Generator().manual_seed(7))))
    nn.functional.cross_entropy(model(x), y, label_smoothing=0.1).backward()
    for i, (_, bn) in enumerate(batchnorms(model)):
        gamma, grad = bn.weight.detach(), bn.weight.grad
        step = 1 + config.momentum  # Nesterov's first step: g + momentum * (buffer = g)
        expected = -step * lr_t * (grad + config.weight_decay * gamma)
        torch.testing.assert_close(moved[0.0][i], expected, rtol=1e-4, atol=1e-7)
        l1 = -step * lr_t * config.lam * torch.sign(gamma)
        torch.testing.assert_close(moved[config.lam][i] - moved[0.0][i], l1, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------
# Early pruning
# --------------------------------------------------------------------------------------


def _set_gammas(model: nn.Module, values: list[float]) -> None:
    with torch.no_grad():
        flat = torch.tensor(values)
        for _, bn in batchnorms(model):
            bn.weight.copy_(flat[: bn.num_features])
            flat = flat[bn.num_features :]


def _removed_by_hand(values: list[float], ratio: float) -> torch.Tensor:
    """The paper's rule, restated: remove every |γ| at or below sorted(|γ|)[int(n * ratio)]."""
    g = torch.tensor(values).abs()
    return g <= torch.sort(g).values[int(len(values) * ratio)]


def test_early_pruning_triggers_on_a_handmade_gamma_trajectory_at_the_right_epoch():
    model = VGG([8, "M", 8])  # 16 BN channels
    ranks = [*range(0, 16, 2), *range(1, 16, 2)]  # both layers keep some: no floor binds
    base = [0.05 * (r + 1) for r in ranks]
    swapped = list(base)  # the 9th smallest (removed) and 10th (kept) trade: 2 of 16 change
    a, b = ranks.index(8), ranks.index(9)
    swapped[a], swapped[b] = base[b], base[a]
    trajectory = [
        base,  # epoch 1: nothing to compare with
        base[::-1],  # 2: the ranking reversed
        [v * 0.5 for v in base[::-1]],  # 3: same ranking, smaller values: distance 0
        [v * 0.5 for v in base],  # 4: reversed again
        [v * 0.4 for v in base],  # 5: 0
        swapped,  # 6: two channels swap sides: above a tol of 0.1
        swapped,  # 7: 0
        [v * 0.9 for v in swapped],  # 8: 0 -> second stable epoch in a row: stop
    ]
    watch = control.StableMask(0.5, tol=0.1, epochs=2)
    distances, previous = [], None
    for epoch, values in enumerate(trajectory, start=1):
        _set_gammas(model, values)
        distances.append(watch.update(model, epoch))
        removed = _removed_by_hand(values, 0.5)
        assert torch.equal(control.removal_mask(model, 0.5), removed)
        if previous is not None:
            assert distances[-1] == pytest.approx((removed != previous).float().mean().item())
        previous = removed
        assert watch.stopped_at == (8 if epoch == 8 else None), epoch
    assert distances[0] is None and distances[2] == distances[4] == distances[6] == 0.0
    assert distances[1] > 0.5 and distances[5] == pytest.approx(2 / 16)


def _early(config_kw=None, **kw) -> TrainConfig:
    settings = {
        **FAST,
        "epochs": 6,
        "batch_size": 64,
        "lam_auto": True,
        "lam": 1e-4,
        "target_ratio": 0.5,
        "prune_when_stable": 0.5,
        "stable_tol": 1.0,
        "stable_epochs": 3,
    }
    return tiny_config(**{**settings, **(config_kw or {}), **kw})


def test_early_pruning_stops_prunes_and_fine_tunes_the_smaller_network(tmp_path, small_data):
    # A tolerance of 1 counts every epoch after the first as settled: stop after epoch 4.
    torch.manual_seed(0)
    out = tmp_path / "run"
    tuned = train_prune_finetune(
        _early(),
        small_data,
        VGG(TRAIN_CFG),
        out,
        finetune_epochs=2,
        recalibrate=1,
        meta={"arch": "tiny"},
        **QUIET,
    )
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [r.get("stopped_early", False) for r in records] == [False] * 3 + [True]
    assert records[0]["mask_distance"] is None
    assert all(0 <= r["mask_distance"] <= 1 for r in records[1:])
    pruned = netslim.load(out / "pruned.pth")
    assert pruned.cfg != netslim.load(out / "last.pth").cfg
    assert sum(bn.num_features for _, bn in batchnorms(pruned)) < sum(TRAIN_CFG[::2])
    assert [r["epoch"] for r in tuned] == [1, 2] and tuned == read_metrics(out / "finetune")
    final = netslim.load(out / "finetune" / "last.pth")
    assert channel_counts(final) == channel_counts(pruned)
    tune_config = json.loads((out / "finetune" / "config.json").read_text())
    assert tune_config["lam"] == 0.0 and tune_config["prune_when_stable"] is None
    assert tune_config["lam_auto"] is False and tune_config["schedule"] == "linear"


# --------------------------------------------------------------------------------------
# λ auto
# --------------------------------------------------------------------------------------


def test_lam_controller_rules():
    # 10 epochs of 100 summed lr each; the ramp ends after epoch 5 (q's path: 0.41 down to 0.01)
    auto = control.AutoLam(target_ratio=0.8, epoch_lr=[100.0] * 10, lam=1e-4, threshold=0.01)
    # epoch 1 sets the path's start; feed-forward: (q - thr) / Σ lr of epochs 2-5, not capped
    assert auto.update(1, quantile=0.41, train_acc=50.0) == pytest.approx(0.40 / 400)
    assert auto.path(2) == pytest.approx(0.31) and auto.path(5) == pytest.approx(0.01)
    # above the path: gain 1.5, over the 3 epochs left to the ramp's end
    assert auto.update(2, quantile=0.35, train_acc=60.0) == pytest.approx(1.5 * 0.34 / 300)
    # below the path: gain back to 1; the formula's 0.04 / 300 is under half the last λ
    assert auto.update(3, quantile=0.05, train_acc=60.0) == pytest.approx(1.5 * 0.34 / 300 / 2)
    # 6 points below the best accuracy: λ halved, whatever q, and the gain kept
    assert auto.update(4, quantile=0.5, train_acc=54.0) == pytest.approx(1.5 * 0.34 / 300 / 4)
    assert auto.gain == control.GAIN_MIN == 1
    # past the ramp the path is the threshold and the horizon 3 epochs
    assert auto.update(6, quantile=0.1, train_acc=60.0) == pytest.approx(1.5 * 0.09 / 300)
    lam = auto.lam
    assert auto.update(7, quantile=0.005, train_acc=60.0) == pytest.approx(lam / 2)  # held
    for epoch in range(8, 30):  # a network that never sparsifies: gain and λ at their caps
        auto.update(epoch, quantile=0.5, train_acc=60.0)
    assert auto.gain == control.GAIN_MAX and auto.lam == control.LAM_MAX


def test_lam_auto_raises_lambda_when_sparsity_lags(tmp_path, small_data):
    torch.manual_seed(0)
    config = tiny_config(epochs=4, lam_auto=True, lam=1e-4, target_ratio=0.9)
    model = VGG(TRAIN_CFG)
    records = fit(config, small_data, model, tmp_path, **QUIET)
    lams = [r["lam"] for r in records]
    assert lams[0] == 1e-4
    steps = -(-len(small_data.train_labels) // config.batch_size)
    epoch_lr = [
        sum(recipes.lr_at_step(config, e, s, steps) for s in range(steps)) / (1 - config.momentum)
        for e in range(config.epochs)
    ]
    best = float("-inf")
    for r, next_lam in zip(records, lams[1:]):  # each decision follows the documented formula
        assert r["sparsity"] < 0.9  # a tiny run is never sparse at 90%
        hurt, best = r["train_acc"] < best - control.ACC_DROP, max(best, r["train_acc"])
        if hurt:
            assert next_lam == pytest.approx(r["lam"] / 2)
            continue
        last = min(r["epoch"] + control.HOLD, config.epochs)  # 3 epochs past the ramp (2)
        pull = sum(epoch_lr[min(r["epoch"], last - 1) : last])
        wanted = r["lam_gain"] * (r["gamma_quantile"] - config.sparsity_threshold) / pull
        if r["epoch"] > 1:
            wanted = min(2 * r["lam"], max(r["lam"] / 2, wanted))
        assert next_lam == pytest.approx(min(control.LAM_MAX, wanted))
    gammas = torch.cat([bn.weight.detach().abs() for _, bn in batchnorms(model)])
    assert records[-1]["gamma_quantile"] == pytest.approx(torch.quantile(gammas, 0.9).item())
    assert lams[-1] > lams[0]


# --------------------------------------------------------------------------------------
# Resume in the middle of each stage
# --------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def _stop_at_epoch_line(n: int):
    seen = []

    def log(line: str) -> None:
        if line.startswith("epoch "):
            seen.append(line)
            if len(seen) == n:
                raise Interrupt

    return log


def _state(path):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("cut", [2, 5], ids=["sparsity-stage", "fine-tuning-stage"])
def test_resume_in_the_middle_of_each_stage_reproduces_the_uninterrupted_run(
    tmp_path, small_data, cut
):
    # λ auto and early pruning both decide: stop after epoch 4 of 6, then 3 of fine-tuning.
    config = _early()
    run = {"finetune_epochs": 3, "recalibrate": 1, "meta": {"arch": "tiny"}}
    torch.manual_seed(0)
    train_prune_finetune(config, small_data, VGG(TRAIN_CFG), tmp_path / "full", **run, **QUIET)
    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        train_prune_finetune(
            config,
            small_data,
            VGG(TRAIN_CFG),
            tmp_path / "cut",
            **run,
            log=_stop_at_epoch_line(cut),
        )
    train_prune_finetune(
        config, small_data, VGG([4]), tmp_path / "cut", resume=True, **run, **QUIET
    )
    full, cut_dir = tmp_path / "full", tmp_path / "cut"
    for stage in ("", "finetune"):
        assert without_timing(read_metrics(full / stage)) == without_timing(
            read_metrics(cut_dir / stage)
        )
        a, b = _state(full / stage / "last.pth"), _state(cut_dir / stage / "last.pth")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lams = [r["lam"] for r in read_metrics(full)]
    assert len(set(lams)) > 1  # the controller acted, so its state was restored on resume


def test_lab_stops_the_pruned_run_early_and_plots_it(tmp_path):
    out = tmp_path / "lab"
    argv = [
        "demo",
        "--train-size",
        "256",
        "--test-size",
        "64",
        "--lams",
        "1e-3",
        "--prune-lam",
        "1e-3",
        "--ratios",
        "0.5",
        "--sweep",
        "--epochs",
        "5",
        "--finetune-epochs",
        "1",
        "--recalibrate",
        "1",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--recipe",
        "fast",
        "--prune-when-stable",
        "0.5",
        "--stable-tol",
        "1",
        "--stable-epochs",
        "2",
        "--target-ratio",
        "0.5",
        "--out",
        str(out),
    ]
    code, printed = _run_cli(argv)
    assert code == 0, printed
    records = read_metrics(out / "train" / "lam=1e-3")
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["stopped_early"]
    assert records[-1]["lam"] > records[0]["lam"] == 1e-3
    train_config = json.loads((out / "train" / "lam=1e-3" / "config.json").read_text())
    assert train_config["recipe"] == "fast" and train_config["batch_size"] == 256
    assert (out / "figures" / "fig6_early_pruning_and_lam.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "Figure 6" in report
    # the text says what ran: the stop epoch from the metrics, the schedule from config.json
    assert f"training stopped after epoch {records[-1]['epoch']}, when the prune mask" in report
    assert f"over the first {train_config['warmup_epochs']:g} epochs" in report
    assert "drops tenfold" not in report
    # the early-stopped training counts as finished: running the lab again trains nothing
    code, printed = _run_cli(argv)
    assert code == 0 and "epoch " not in printed and printed.count("done already") == 4
    assert read_metrics(out / "train" / "lam=1e-3") == records


def _run_cli(argv: list[str]) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    return code, stdout.getvalue()


def test_early_pruning_and_lam_auto_under_torchrun(tmp_path):
    """Two gloo processes take the same decisions: one stop, one λ, identical networks."""
    from test_distributed import TRAIN, same, state, torchrun

    argv = [
        *TRAIN,
        "--epochs",
        "3",
        "--recipe",
        "fast",
        "--batch-size",
        "64",
        "--lam",
        "auto",
        "--target-ratio",
        "0.5",
        "--prune-when-stable",
        "0.5",
        "--stable-tol",
        "1",
        "--stable-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--recalibrate",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    done = torchrun(tmp_path / "dump", *argv, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["stopped_early"]
    assert records[1]["lam"] != records[0]["lam"]  # λ auto decided (the same on both ranks)
    assert done.stdout.count("has settled") == 1 and done.stdout.count("done:") == 1
    # both ranks fine-tuned the same pruned network to the same weights, the saved ones
    rank0, rank1 = state(tmp_path / "dump" / "rank0.pt"), state(tmp_path / "dump" / "rank1.pt")
    assert same(rank0, rank1) and same(rank0, state(run / "finetune" / "last.pth"))
    assert netslim.load(run / "finetune" / "last.pth").cfg == netslim.load(run / "pruned.pth").cfg
