"""A YOLO slimmed end to end through Ultralytics' trainer and validator (issue 23), on tiny
generated data: sparsity training, pruning measured three ways, fine-tuning that keeps the
pruned widths, export, and the files that come out loading in plain Ultralytics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import netslim
from netslim.cli import main
from netslim.engine.surgery import channel_counts
from netslim.errors import NetslimError

pytestmark = pytest.mark.slow  # not in make test-fast

RUN = ["--image-size", "64", "--batch-size", "8", "--device", "cpu"]
QUICK = ["workers=0", "nbs=8", "amp=False", "warmup_epochs=0", "mosaic=0"]  # a step per batch


def write_data(root: Path, segments: bool = False, n_train: int = 16, n_val: int = 8) -> Path:
    """A tiny YOLO data set: red and green rectangles on dark backgrounds; its data.yaml."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            image, lines = np.full((64, 64, 3), int(rng.integers(0, 80)), np.uint8), []
            for _ in range(int(rng.integers(1, 3))):
                c, (w, h) = int(rng.integers(0, 2)), rng.integers(10, 32, 2)
                x0, y0 = int(rng.integers(0, 64 - w)), int(rng.integers(0, 64 - h))
                image[y0 : y0 + h, x0 : x0 + w] = (220, 40, 40) if c == 0 else (40, 220, 40)
                if segments:
                    corners = [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]
                    lines.append(
                        f"{c} " + " ".join(f"{x / 64:.4f} {y / 64:.4f}" for x, y in corners)
                    )
                else:
                    lines.append(
                        f"{c} {(x0 + w / 2) / 64:.4f} {(y0 + h / 2) / 64:.4f} {w / 64:.4f} {h / 64:.4f}"
                    )
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: green\n"
    )
    return root / "data.yaml"


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------
# The L1 term inside Ultralytics' optimizer step
# --------------------------------------------------------------------------------------


def test_the_l1_step_acts_on_unscaled_gradients_after_clipping():
    """Under AMP's GradScaler and Ultralytics' clipping (max norm 10), one step moves every
    parameter by lr * (clip(g) + lam * sign(gamma)), g the true gradient: checked by hand.
    The term is a step pre-hook netslim's trainer installs on every optimizer it builds."""
    from netslim.yolo.run import SparsityRun
    from netslim.yolo.seam import add_l1_hook, trainer_for

    SparsityDetectionTrainer = trainer_for("detect")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -0.5, 0.2, -0.1]))
    x = torch.randn(8, 3, 8, 8) * 30  # large: the gradient norm is far above 10
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    true = torch.autograd.grad(100 * (model(x) ** 2).sum(), list(model.parameters()))

    trainer = SparsityDetectionTrainer.__new__(SparsityDetectionTrainer)  # Ultralytics' own step
    trainer.model, trainer.ema, trainer.device = model, None, torch.device("cpu")
    trainer.netslim = SparsityRun(lam=3.0)
    # every optimizer netslim's trainer builds (Ultralytics' build_optimizer) gets the hook
    assert len(trainer.build_optimizer(model, name="Adam", lr=0.1)._optimizer_step_pre_hooks) == 1
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    add_l1_hook(trainer.optimizer, trainer)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer.scaler.scale(100 * (model(x) ** 2).sum()).backward()
    trainer.optimizer_step()

    names = [n for n, _ in model.named_parameters()]
    norm = torch.sqrt(sum((g**2).sum() for g in true))
    assert norm > 10  # clipping engaged
    for name, g in zip(names, true):
        penalty = 3.0 * torch.sign(reference[name]) if name == "1.weight" else 0.0
        expected = reference[name] - 0.1 * (g * (10.0 / (norm + 1e-6)) + penalty)
        torch.testing.assert_close(
            dict(model.named_parameters())[name].detach(), expected, rtol=1e-4, atol=1e-6
        )


# --------------------------------------------------------------------------------------
# The whole flow, detect and segment
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("yaml, segments", [("yolov8n.yaml", False), ("yolov8n-seg.yaml", True)])
def test_train_prune_finetune_export_and_plain_ultralytics(tmp_path, capsys, yaml, segments):
    data = write_data(tmp_path / "data", segments=segments)
    sparse = tmp_path / "sparse"
    code, _, err = cli(
        capsys,
        "yolo",
        "train",
        "--model",
        yaml,
        "--data",
        data,
        "--lam",
        "1e-2",
        "--epochs",
        "1",
        *RUN,
        "--out",
        sparse,
        *QUICK,
    )
    assert code == 0, err
    records = [json.loads(line) for line in (sparse / "sparsity.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1] and records[0]["lam"] == 1e-2
    assert records[0]["gamma_quantiles"]["q50"] < 1.0  # the L1 term moved the gammas (from 1)

    pruned = tmp_path / "p50.pth"
    code, out, err = cli(
        capsys,
        "yolo",
        "prune",
        sparse / "weights" / "last.pt",
        "--ratio",
        "0.5",
        "--data",
        data,
        "--recalibrate",
        "2",
        *RUN,
        "--out",
        pruned,
    )
    assert code == 0, err
    report = json.loads(pruned.with_suffix(".json").read_text())["prune"]
    assert set(report["measured"]) == {"unpruned", "official", "compensated", "recalibrated"}
    assert "mAP50-95" in report["measured"]["official"]
    assert report["macs_after"] < report["macs_before"]

    tuned = tmp_path / "tuned"
    code, _, err = cli(
        capsys,
        "yolo",
        "finetune",
        pruned,
        "--data",
        data,
        "--epochs",
        "1",
        *RUN,
        "--out",
        tuned,
        *QUICK,
    )
    assert code == 0, err
    assert channel_counts(netslim.load(tuned / "finetuned.pth")) == channel_counts(
        netslim.load(pruned)
    )

    from ultralytics import YOLO

    yolo = YOLO(str(tuned / "weights" / "best.pt"))  # plain Ultralytics, its own loader
    assert channel_counts(yolo.model) == channel_counts(netslim.load(pruned))
    fp32 = netslim.load(tuned / "finetuned.pth").state_dict()  # best.pt's network, before fp16
    for name, value in yolo.model.state_dict().items():
        assert fp32[name].dtype == torch.float32 or not fp32[name].is_floating_point()
        assert torch.equal(fp32[name].half(), value.half()), name  # YOLO() turns it to fp32
    metrics = yolo.val(data=str(data), imgsz=64, batch=8, device="cpu", plots=False, verbose=False)
    assert 0.0 <= metrics.box.map <= 1.0
    capsys.readouterr()  # what plain Ultralytics printed
    code, out, err = cli(
        capsys, "yolo", "val", tuned / "weights" / "best.pt", "--data", data, "--json", *RUN
    )
    assert code == 0, err
    assert json.loads(out)["mAP50-95"] == pytest.approx(metrics.box.map, abs=1e-4)  # only JSON
    code, out, err = cli(
        capsys,
        "export",
        tuned / "finetuned.pth",
        "--out",
        tmp_path / "y.onnx",
        "--image-size",
        "64",
    )
    assert code == 0, err
    assert "max relative difference" in out and (tmp_path / "y.onnx").is_file()


def test_an_interrupted_sparsity_run_resumes(tmp_path, capsys, monkeypatch):
    from netslim.yolo import run as yolo_run

    data = write_data(tmp_path / "data")
    real = yolo_run.SparsityRun.end_epoch

    def record_then_stop(self, epoch, *args, **kwargs):
        stop = real(self, epoch, *args, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt  # killed right after epoch 1 was saved
        return stop

    monkeypatch.setattr(yolo_run.SparsityRun, "end_epoch", record_then_stop)
    argv = [
        "yolo",
        "train",
        "--model",
        "yolov8n.yaml",
        "--data",
        data,
        "--lam",
        "1e-2",
        "--epochs",
        "2",
        *RUN,
        "--out",
        tmp_path / "run",
        *QUICK,
    ]
    assert cli(capsys, *argv)[0] == 130
    from netslim.yolo.files import read_checkpoint  # a mid-run file, read without running code

    assert read_checkpoint(tmp_path / "run" / "weights" / "last.pt")["epoch"] == 0
    monkeypatch.setattr(yolo_run.SparsityRun, "end_epoch", real)
    code, _, err = cli(capsys, *argv, "--resume")
    assert code == 0, err
    epochs = [
        json.loads(line)["epoch"]
        for line in (tmp_path / "run" / "sparsity.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2]
    code, _, err = cli(capsys, *[a if a != "1e-2" else "1e-3" for a in argv], "--resume")
    assert code == 2 and "trained at --lam 0.01, not 0.001" in err


def test_lam_auto_and_prune_when_stable_steer_ultralytics_training(tmp_path, capsys):
    from netslim.config import LAM_START
    from netslim.yolo.run import read_sparsity

    data = write_data(tmp_path / "data")
    argv = [
        "yolo",
        "train",
        "--model",
        "yolov8n.yaml",
        "--data",
        data,
        "--lam",
        "auto",
        "--target-ratio",
        "0.5",
        "--epochs",
        "4",
        *RUN,
        *QUICK,
    ]
    code, _, err = cli(capsys, *argv, "--out", tmp_path / "adam")
    assert code == 2 and "add optimizer=SGD" in err
    code, _, err = cli(
        capsys,
        *argv,
        "optimizer=SGD",
        "lr0=0.1",
        "--prune-when-stable",
        "0.5",
        "--stable-tol",
        "1",
        "--stable-epochs",
        "1",
        "--out",
        tmp_path / "run",
    )
    assert code == 0, err
    records = read_sparsity(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2]  # the mask first compared (and settled) at 2
    assert records[1]["stopped_early"] and records[1]["mask_distance"] <= 1
    # λ: LAM_START in epoch 1, then the feed-forward rule on the 0.5-quantile of |γ|:
    # (q - threshold) / (sum of lr / (1 - momentum) over the steps to the ramp's end), with
    # 2 optimizer steps an epoch (16 images, batch 8, nbs 8), lr0 0.1, linear decay to 1%
    assert records[0]["lam"] == LAM_START
    epoch_lr = [2 * 0.1 * ((1 - e / 4) * 0.99 + 0.01) / (1 - 0.937) for e in range(4)]
    expected = (records[0]["gamma_quantile"] - 0.01) / sum(epoch_lr[1:4])
    assert records[1]["lam"] == pytest.approx(expected, rel=1e-6)
    # the classifiers' record schema (one control for both flows)
    assert {"stable_epochs", "gamma_quantile_path", "lam_gain"} <= set(records[1])


# --------------------------------------------------------------------------------------
# Bad input: one line
# --------------------------------------------------------------------------------------


def test_a_data_yaml_that_is_missing_or_empty_is_one_line(tmp_path, capsys):
    code, _, err = cli(
        capsys,
        "yolo",
        "train",
        "--model",
        "yolov8n.yaml",
        "--data",
        tmp_path / "no.yaml",
        "--out",
        tmp_path / "r",
    )
    assert code == 2 and "no.yaml does not exist" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "empty.yaml").write_text(
        f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: [a]\n"
    )
    code, _, err = cli(
        capsys,
        "yolo",
        "train",
        "--model",
        "yolov8n.yaml",
        "--data",
        tmp_path / "empty.yaml",
        "--out",
        tmp_path / "r",
    )
    assert code == 2 and "its train split" in err and "holds no images" in err


def test_a_classifier_checkpoint_in_the_yolo_flow_and_the_reverse_are_one_line(tmp_path, capsys):
    netslim.save(netslim.build_model("vgg11-small"), tmp_path / "vgg.pth", arch="vgg11-small")
    code, _, err = cli(
        capsys, "yolo", "prune", tmp_path / "vgg.pth", "--ratio", "0.5", "--out", tmp_path / "p.pth"
    )
    assert code == 2 and "holds a VGG, not an Ultralytics YOLO" in err
    from netslim.yolo.files import write_model

    write_model(netslim.build_model("ultralytics:yolov8n.yaml", 2), tmp_path / "y.pt")
    code, _, err = cli(
        capsys, "prune", tmp_path / "y.pt", "--ratio", "0.5", "--out", tmp_path / "q.pth"
    )
    assert code == 2 and "is an Ultralytics checkpoint" in err and "netslim yolo prune" in err


class RunsCode:
    """Unpickled by plain pickle, this creates the file ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def test_a_tampered_ultralytics_file_runs_no_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    from netslim.yolo.files import read_model, write_model

    write_model(netslim.build_model("ultralytics:yolov8n.yaml", 2), tmp_path / "y.pt")
    checkpoint = torch.load(tmp_path / "y.pt", weights_only=False)
    checkpoint["train_args"] = {"note": RunsCode(marker)}
    torch.save(checkpoint, tmp_path / "tampered.pt")
    with pytest.raises(NetslimError, match="refused to unpickle it.*--trust-pickle"):
        read_model(tmp_path / "tampered.pt")
    assert not marker.exists()
    code, _, err = cli(
        capsys, "yolo", "val", tmp_path / "tampered.pt", "--data", tmp_path / "d.yaml"
    )
    assert code == 2 and "refused to unpickle" in err and not marker.exists()
    read_model(tmp_path / "tampered.pt", trust_pickle=True)  # the file really runs code if trusted
    assert marker.exists()


def test_an_untouched_ultralytics_file_reads_back_its_weights(tmp_path):
    from netslim.yolo.files import read_model, write_model

    model = netslim.build_model("ultralytics:yolov8n.yaml", 2).eval()
    write_model(model, tmp_path / "y.pt")
    again = read_model(tmp_path / "y.pt")
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values())
    )


# --------------------------------------------------------------------------------------
# The lab for a detector
# --------------------------------------------------------------------------------------


def test_the_yolo_lab_runs_the_seed_experiment_and_its_report_shows_its_numbers(tmp_path, capsys):
    data = write_data(tmp_path / "data")
    argv = [
        "yolo",
        "lab",
        "--model",
        "yolov8n.yaml",
        "--data",
        data,
        *QUICK,
        "--lams",
        "0",
        "1e-2",
        "--ratios",
        "0.5",
        "--sweep",
        "0.3",
        "--epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--recalibrate",
        "1",
        *RUN,
        "--out",
        tmp_path / "lab",
    ]
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    lab = tmp_path / "lab"
    for name in ("lam0", "lam0.01"):
        assert json.loads((lab / name / "netslim.json").read_text())["finished"]
    reports = {p.stem: json.loads(p.read_text())["prune"] for p in (lab / "pruned").glob("*.json")}
    assert set(reports) == {"lam0-p30", "lam0-p50", "lam0.01-p30", "lam0.01-p50"}
    sources = {json.loads(p.read_text())["source"] for p in (lab / "pruned").glob("*.json")}
    assert {Path(s).relative_to(lab).as_posix() for s in sources} == {
        "lam0/weights/last.pth",
        "lam0.01/weights/last.pth",
    }  # each run's final network
    from netslim.yolo.files import read_model

    final = netslim.load(lab / "lam0.01" / "weights" / "last.pth").state_dict()
    for name, value in read_model(lab / "lam0.01" / "weights" / "last.pt").state_dict().items():
        assert torch.equal(final[name].half(), value.half()), name  # last.pt's network, fp32
    assert (lab / "ft-lam0.01-p50" / "finetuned.pth").is_file()
    assert not (lab / "ft-lam0-p50").exists()  # only the --prune-lam run (the largest λ) is tuned
    markdown = (lab / "report.md").read_text()
    for report in reports.values():  # the table holds the prune reports' numbers
        assert f"| {report['pruned_share']:.1%} | {report['params_after'] / 1e6:.2f}M" in markdown
    for figure in ("fig1_training", "fig2_gamma_histograms", "fig3_prune_sweep", "fig4_finetuning"):
        assert (lab / "figures" / f"{figure}.png").stat().st_size > 1000
        assert f"figures/{figure}.png" in markdown
    assert "netslim yolo lab --model yolov8n.yaml" in markdown
    # 1 epoch at λ 0.01 leaves the γs dense: said atop the report and on the console
    dense = "sparsity training left the γs dense: at the end of the λ = 0.01 run"
    assert f"> **Warning:** {dense}" in markdown.split("## Sparsity training")[0]
    assert f"netslim: warning: {dense}" in err
    html = (lab / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    code, out, err = cli(capsys, "yolo", "report", lab)  # the report alone, from the folder
    assert code == 0, err
    assert out.strip() == f"report: {lab / 'report.html'}"
    assert (lab / "report.md").read_text() == markdown

    stamp = (lab / "report.md").stat().st_mtime_ns, (lab / "lam0" / "results.csv").read_text()
    code, _, err = cli(capsys, *argv)  # again: every step is done, only the report is rewritten
    assert code == 0, err
    assert (lab / "lam0" / "results.csv").read_text() == stamp[1]
    code, _, err = cli(capsys, *[a if a != "0.3" else "0.4" for a in argv])
    assert code == 2 and "holds another YOLO lab" in err
