"""When a run means nothing, netslim says so (issue 30): the rules of netslim.lab.health on
hand-made numbers, both lab reports' warnings on hand-made results, one finished lab whose
report and console carry the warning, the YOLO lab started from a trained .pt with λ auto,
and a YOLO .pt that is not on disk."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from netslim.cli import main
from netslim.cli.parser import parse
from netslim.config import LabConfig, TrainConfig, YoloLab
from netslim.errors import NetslimError
from netslim.lab import health
from netslim.lab.document import slimming_document, to_html, to_markdown

DENSE = "sparsity training left the γs dense"
TIED = "sits among tied γs"
LOW_MAP = "too low to compare"
CHANCE = "points of chance"


# --------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------


def test_dense_gammas_warn_under_half_the_ratio_pruned():
    line = health.dense(0.02, 0.5, 0.01, "0.03")
    assert DENSE in line and "2.0% of |γ| are under 0.01" in line and "50%" in line
    assert "--lam auto --target-ratio 0.5" in line and "\n" not in line
    assert health.dense(0.249, 0.5, 0.01, "0.03") is not None
    assert health.dense(0.25, 0.5, 0.01, "0.03") is None  # half the ratio: sparse enough
    assert health.dense(0.6, 0.5, 0.01, "0.03") is None


def test_a_threshold_among_tied_gammas_warns_unless_the_tie_is_small_or_at_zero():
    line = health.tied((2601, 4752), 5000, 1.0, 0.5)  # a fresh yolov8n asked for 50%
    assert TIED in line and "4752 of 5000 |γ| (95%) equal 1" in line and "2601 removed" in line
    assert "sparsity-train first" in line and "\n" not in line
    assert health.tied(None, 5000, 1.0, 0.5) is None  # no tie was broken
    assert health.tied((1, 3), 5000, 0.7, 0.5) is None  # fp16's few equal γs: under 1%
    assert health.tied((2000, 4000), 5000, 0.0, 0.5) is None  # zeros: nothing left to rank


def test_an_unpruned_map_under_the_floor_warns_naming_each_network():
    line = health.low_map({"at λ = 0": 0.0, "at λ = 0.03": 0.2}, "mAP50-95")
    assert LOW_MAP in line and "0.0000 at λ = 0" in line and "0.03" not in line
    assert "train longer" in line and "\n" not in line
    assert health.low_map({"at λ = 0": 0.01, "at λ = 0.03": 0.4}, "mAP50-95") is None


def test_an_accuracy_near_chance_warns():
    line = health.near_chance(11.5, 10)
    assert CHANCE in line and "11.50%" in line and "10.00% for 10 classes" in line
    assert health.near_chance(12.0, 10) is None
    assert health.near_chance(51.0, 2) is not None and health.near_chance(60.0, 2) is None


def test_a_warning_stands_atop_both_forms_of_the_report():
    def document(warnings: list[str]) -> list:
        return slimming_document(
            title="t",
            summary="what ran",
            warnings=warnings,
            training=[],
            pruning_title="p",
            pruning=[],
            reproduce=[],
        )

    markdown = to_markdown(document(["γs dense; use --lam auto"]), {})
    assert markdown.startswith("# t\n\n> **Warning:** γs dense; use --lam auto\n\nwhat ran")
    assert "<p class='warning'><strong>Warning:</strong> γs dense" in to_html(
        document(["γs dense"]), {}
    )
    assert "Warning" not in to_markdown(document([]), {})


# --------------------------------------------------------------------------------------
# Each report's warnings, from hand-made results
# --------------------------------------------------------------------------------------


def classifier_results(sparsity: float, tie_break, accuracy: float):
    from netslim.lab.report import LabResults

    config = LabConfig(lams=[0.0, 1e-4], prune_lam=1e-4, ratios=[0.5, 0.9])
    prune = {
        r: {"threshold": 0.5, "tie_break": tie_break, "acc_unpruned": accuracy}
        for r in config.ratios
    }
    return LabResults(
        run=Path("lab"),
        config=config,
        info={},
        train_config=TrainConfig(),
        num_classes=10,
        train={1e-4: [{"epoch": 1, "sparsity": 0.1}, {"epoch": 2, "sparsity": sparsity}]},
        gammas={1e-4: np.full(1000, 0.5)},
        prune=prune,
        sweep={},
        finetune={},
    )


def test_the_classifier_report_warns_of_a_dense_tied_run_at_chance_and_not_of_a_healthy_one():
    from netslim.lab.report import run_warnings

    sick = run_warnings(classifier_results(0.0, (450, 1000), 10.5))
    assert [DENSE in sick[0], TIED in sick[1], TIED in sick[2], CHANCE in sick[3]] == [True] * 4
    assert "λ = 1e-4" in sick[0] and "90%" in sick[0]  # the largest ratio pruned
    assert "let --target-ratio 0.9 choose λ" in sick[0]  # the lab's own flag for λ auto
    assert run_warnings(classifier_results(0.92, None, 90.0)) == []


def yolo_results(sparsity: float, tie_break, unpruned: float):
    from netslim.yolo.report import YoloResults

    lab = YoloLab(model="yolov8n.yaml", data="d.yaml", lams=[0.0, 0.03], ratios=[0.5], sweep=[0.3])
    prune = {
        (lam, r): {
            "threshold": 1.0 if lam == 0.03 else 0.8,
            "tie_break": tie_break if lam == 0.03 else None,
            "measured": {"unpruned": {"mAP50-95": unpruned}},
        }
        for lam in lab.lams
        for r in lab.all_ratios()
    }
    return YoloResults(
        out=Path("lab"),
        lab=lab,
        metric="mAP50-95",
        key="metrics/mAP50-95(B)",
        train={lam: [{"epoch": 1, "sparsity": sparsity}] for lam in lab.lams},
        gammas={lam: np.ones(4000) for lam in lab.lams},
        prune=prune,
        finetune={},
    )


def test_the_yolo_report_warns_of_a_dense_tied_run_without_map_and_not_of_a_healthy_one():
    from netslim.yolo.report import run_warnings

    sick = run_warnings(yolo_results(0.0, (2000, 4000), 0.0))
    assert len(sick) == 3 and DENSE in sick[0] and TIED in sick[1] and LOW_MAP in sick[2]
    assert "λ = 0.03" in sick[0] and "--lam auto --target-ratio 0.5" in sick[0]
    assert "0.0000 at λ = 0," in sick[2]
    assert run_warnings(yolo_results(0.6, None, 0.41)) == []


def test_yolo_prune_warns_of_a_tied_threshold_and_of_a_map_too_low():
    from netslim.slim import PruneReport
    from netslim.yolo.prune import run_warnings

    fresh = nn.Sequential(nn.Conv2d(3, 100, 1), nn.BatchNorm2d(100))  # every γ is 1

    def report(tie_break, unpruned: float) -> PruneReport:
        return PruneReport(
            ratio=0.5,
            threshold=1.0,
            pruned_share=0.5,
            cfg=None,
            layers=[],
            floored=[],
            compensated=True,
            params_before=1,
            params_after=1,
            macs_before=1,
            macs_after=1,
            tie_break=tie_break,
            measured={"unpruned": {"mAP50": 0.0, "mAP50-95": unpruned}},
        )

    sick = run_warnings(fresh, report((51, 100), 0.0), "runs/fresh.pt")
    assert TIED in sick[0] and "100 of 100 |γ| (100%) equal 1" in sick[0]
    assert LOW_MAP in sick[1] and "0.0000 of fresh.pt" in sick[1] and len(sick) == 2
    assert run_warnings(fresh, report(None, 0.3), "runs/trained.pt") == []


# --------------------------------------------------------------------------------------
# A finished lab: the report's top and the console
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_lab_left_dense_says_so_atop_its_report_and_on_the_console(micro_lab, tmp_path, capsys):
    """The micro lab prunes λ = 1e-4 after 2 epochs: its γs are still dense."""
    from netslim.lab.report import render_report

    copy = tmp_path / "lab"
    shutil.copytree(micro_lab, copy)
    with pytest.warns(health.RunWarning, match=DENSE):
        render_report(copy)
    top = (copy / "report.md").read_text().split("## Sparsity training")[0]
    assert f"> **Warning:** {DENSE}: at the end of the λ = 1e-4 run" in top
    assert f"<strong>Warning:</strong> {DENSE}" in (copy / "report.html").read_text()
    assert main(["report", str(copy)]) == 0
    assert f"netslim: warning: {DENSE}" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The YOLO lab: a trained .pt, λ auto and early stopping; a .pt that is not there
# --------------------------------------------------------------------------------------


def test_the_yolo_lab_takes_lam_auto_and_prune_when_stable():
    args = parse(
        ["yolo", "lab", "--model", "m.pt", "--data", "d.yaml", "optimizer=SGD", "--lam", "auto"]
        + ["--target-ratio", "0.5", "--prune-when-stable", "0.6", "--out", "lab"]
    )
    assert (args.lams, args.target_ratio, args.prune_when_stable) == (["auto"], 0.5, 0.6)
    lab = YoloLab(
        model="m.pt", data="d", lams=[0.0, "auto"], target_ratio=0.5, settings={"optimizer": "SGD"}
    )
    assert lab.prune_lam == "auto"  # λ auto's run is the one pruned
    with pytest.raises(NetslimError, match="--lam auto needs --target-ratio"):
        YoloLab(model="m.pt", data="d", lams=["auto"], settings={"optimizer": "SGD"})
    with pytest.raises(NetslimError, match="add optimizer=SGD"):
        YoloLab(model="m.pt", data="d", lams=["auto"], target_ratio=0.5)
    with pytest.raises(NetslimError, match="--target-ratio is the goal of λ auto"):
        YoloLab(model="m.pt", data="d", lams=[0.02], target_ratio=0.5)


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_the_yolo_lab_trains_a_trained_pt_with_lam_auto(tmp_path, monkeypatch):
    """What the lab hands Ultralytics' training: the .pt's network, read without running
    code, and yolo train's own λ auto and early stopping (stopped before pruning)."""
    from test_yolo import write_data

    import netslim
    from netslim.yolo import lab as yolo_lab
    from netslim.yolo.files import read_model, write_model

    data = write_data(tmp_path / "data")
    write_model(netslim.build_model("ultralytics:yolov8n.yaml", 2), tmp_path / "mine.pt")
    calls, real_train = [], yolo_lab.yolo_train.train

    def train(*args, **kwargs) -> Path:
        calls.append((args, kwargs))
        return args[2]

    def prune(*args, **kwargs) -> None:
        raise _Stop  # the training runs are what this test looks at

    monkeypatch.setattr(yolo_lab.yolo_train, "train", train)
    monkeypatch.setattr(yolo_lab.yolo_prune, "prune", prune)
    lab = YoloLab(
        model=str(tmp_path / "mine.pt"),
        data=str(data),
        lams=[0.0, "auto"],
        target_ratio=0.5,
        prune_when_stable=0.5,
        epochs=3,
        image_size=64,
        batch_size=8,
        settings={"optimizer": "SGD"},
    )
    with pytest.raises(_Stop):
        yolo_lab.run_lab(lab, tmp_path / "lab", log=lambda line: None)
    (plain, plain_kw), (auto, auto_kw) = calls
    assert isinstance(plain[0], nn.Module) and auto[0] is plain[0]
    expected = read_model(tmp_path / "mine.pt").state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in plain[0].state_dict().items())
    assert plain_kw["lam"] == 0.0 and "target_ratio" not in plain_kw
    assert "prune_when_stable" not in plain_kw  # only the run the lab prunes stops early
    assert auto[2] == tmp_path / "lab" / "lamauto" and auto_kw["lam"] == "auto"
    assert (auto_kw["target_ratio"], auto_kw["prune_when_stable"]) == (0.5, 0.5)
    assert (auto_kw["stable_tol"], auto_kw["stable_epochs"]) == (0.02, 3)
    inspect.signature(real_train).bind(*auto, **auto_kw)  # what yolo train itself takes


def test_a_yolo_pt_that_is_not_on_disk_says_nothing_downloads(tmp_path):
    from netslim.yolo.files import read_yolo

    missing = tmp_path / "yolov8n.pt"
    with pytest.raises(NetslimError) as raised:
        read_yolo(missing)
    line = str(raised.value)
    assert "\n" not in line and line.startswith(f"{missing} does not exist: ")
    assert "netslim never downloads weights" in line and "Ultralytics' downloads are off" in line
    assert "download yolov8n.pt from Ultralytics' releases" in line and "yolov8n.yaml" in line


@pytest.mark.parametrize("step", ["lab", "train"])
def test_yolo_lab_and_train_with_a_missing_pt_are_one_line_and_write_nothing(
    tmp_path, capsys, step
):
    from test_yolo import write_data

    data = write_data(tmp_path / "data", n_train=2, n_val=1)
    out = tmp_path / "out"
    argv = ["yolo", step, "--model", str(tmp_path / "yolov8n.pt"), "--data", str(data)]
    assert main([*argv, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "yolov8n.pt does not exist: netslim never downloads" in lines[0]
    assert not out.exists()


def test_netslim_prune_of_an_untrained_classifier_warns_of_tied_gammas(tmp_path, capsys):
    """Every γ of a fresh network is 1: the threshold sits among ties, and the CLI says so
    (with what to do); a sparsity-trained network (γs spread) gets no such line."""
    import netslim

    torch.manual_seed(0)
    fresh = netslim.build_model("vgg5-small")
    netslim.save(fresh, tmp_path / "fresh.pth", arch="vgg5-small")
    argv = [
        "prune",
        str(tmp_path / "fresh.pth"),
        "--ratio",
        "0.5",
        "--out",
        str(tmp_path / "p.pth"),
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "netslim: warning: the prune threshold at ratio 0.5 sits among tied γs" in err
    assert "sparsity-train first" in err
    with torch.no_grad():
        for module in fresh.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features) + 0.05)
    netslim.save(fresh, tmp_path / "spread.pth", arch="vgg5-small")
    argv[1], argv[-1] = str(tmp_path / "spread.pth"), str(tmp_path / "q.pth")
    assert main(argv) == 0
    assert "tied" not in capsys.readouterr().err
