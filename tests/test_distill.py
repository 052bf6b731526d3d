"""Distillation from the unpruned network while fine-tuning (issue 30): the classifiers' KL
term against its formula, a teacher that never learns, --no-distill as the plain loop bit
for bit, the teacher recorded by pruning, bad teachers refused in one line; and YOLO
fine-tuning through Ultralytics' own distillation, detect and segment, resumed, leaving a
clean student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TRAIN_CFG, randomize_bn, tiny_config
from torch import nn

import netslim
from netslim.checkpoint import read_checkpoint
from netslim.cli import main
from netslim.errors import NetslimError
from netslim.models import VGG
from netslim.train.distill import Teacher, distill_loss, load_teacher, teacher_path
from netslim.train.loop import fit


def _formula(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T² * KL(p_t || p_s) written out: sum p_t (log p_t - log p_s), averaged over rows."""
    p_t = torch.exp(teacher / t) / torch.exp(teacher / t).sum(1, keepdim=True)
    p_s = torch.exp(student / t) / torch.exp(student / t).sum(1, keepdim=True)
    return t * t * (p_t * (p_t.log() - p_s.log())).sum(1).mean()


def test_the_term_equals_its_formula_and_its_gradient_survives_the_grad_scaler():
    torch.manual_seed(0)
    student_net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    teacher_net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    x, y = torch.randn(8, 3, 2, 2, dtype=torch.float64), torch.randint(0, 5, (8,))
    s, t = student_net(x), teacher_net(x).detach()
    for temperature in (1.0, 4.0):
        torch.testing.assert_close(
            distill_loss(s, t, temperature).double(),
            _formula(s, t, temperature),
            rtol=1e-5,
            atol=1e-7,
        )

    # one step as the loop takes it: label loss + weight * term, scaled, unscaled
    teacher = Teacher(teacher_net.float(), weight=0.7, temperature=3.0)
    student_net = student_net.float()
    optimizer = torch.optim.SGD(student_net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    out = student_net(x.float())
    loss = F.cross_entropy(out, y) + teacher.loss(x.float(), out)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    by_hand = F.cross_entropy(student_net(x.float()).double(), y) + 0.7 * _formula(
        student_net(x.float()).double(), teacher_net(x.float()).double().detach(), 3.0
    )
    expected = torch.autograd.grad(by_hand, list(student_net.parameters()))
    for p, g in zip(student_net.parameters(), expected):
        torch.testing.assert_close(p.grad.double(), g.double(), rtol=1e-4, atol=1e-6)


def _pruned_checkpoint(tmp_path: Path, tiny_data) -> tuple[Path, Path]:
    """A tiny VGG (the teacher) saved, and its 50% pruning saved with the teacher recorded."""
    torch.manual_seed(0)
    model = randomize_bn(VGG(TRAIN_CFG, num_classes=tiny_data.num_classes))
    teacher = tmp_path / "teacher.pth"
    netslim.save(model, teacher, arch="tiny")
    pruned, report = netslim.prune_model(model, 0.5)
    path = tmp_path / "pruned.pth"
    netslim.save(pruned, path, report, arch="tiny", teacher=teacher)
    return teacher, path


def test_the_teacher_never_learns_and_no_distill_is_the_plain_loop_bit_for_bit(tmp_path, tiny_data):
    teacher_file, pruned_file = _pruned_checkpoint(tmp_path, tiny_data)
    meta = read_checkpoint(pruned_file)["netslim"]
    assert teacher_path(meta, None, True, "p") == str(teacher_file.resolve())  # recorded
    assert teacher_path(meta, None, False, "p") is None  # --no-distill

    config = tiny_config(lam=0.0, epochs=1, train_size=512)
    runs = {}
    for name, teacher in (("plain", None), ("off", None), ("distilled", str(teacher_file))):
        torch.manual_seed(0)
        student = netslim.load(pruned_file, builder=lambda: VGG(TRAIN_CFG, tiny_data.num_classes))
        config.teacher = teacher
        fit(config, tiny_data, student, tmp_path / name, log=lambda s: None)
        runs[name] = torch.load(tmp_path / name / "last.pth", weights_only=True)["state_dict"]
    for key, value in runs["plain"].items():
        assert torch.equal(runs["off"][key], value), key  # the same loop, bit for bit
    assert any(not torch.equal(runs["distilled"][k], v) for k, v in runs["plain"].items())

    # the teacher: eval mode, no gradient, weights and BN statistics untouched by a step
    def build() -> nn.Module:
        return VGG(TRAIN_CFG, tiny_data.num_classes)

    student = netslim.load(pruned_file, builder=build)
    teacher = Teacher(netslim.load(teacher_file, builder=build))
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    x = tiny_data.train_images[:16].float() / 255
    student.train()
    loss = teacher.loss(x, student(x))
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_finetune_distils_from_the_recorded_network_and_refuses_bad_teachers(tmp_path, capsys):
    run = ["--dataset", "synthetic", "--train-size", "256", "--test-size", "128"]
    assert (
        main(["train", "--arch", "vgg5-small", *run, "--epochs", "1", "--out", str(tmp_path / "t")])
        == 0
    )
    pruned = tmp_path / "p.pth"
    assert (
        main(["prune", str(tmp_path / "t" / "last.pth"), "--ratio", "0.5", "--out", str(pruned)])
        == 0
    )
    recorded = read_checkpoint(pruned)["netslim"]["teacher"]
    assert recorded == str((tmp_path / "t" / "last.pth").resolve())
    capsys.readouterr()
    assert main(["info", str(pruned)]) == 0
    assert f"teacher  {recorded}" in capsys.readouterr().out

    tune = [*run, "--epochs", "1", "--precision", "fp32"]
    assert main(["finetune", str(pruned), *tune, "--out", str(tmp_path / "ft")]) == 0
    config = read_checkpoint(tmp_path / "ft" / "last.pth")["netslim"]["config"]
    assert config["teacher"] == recorded and config["distill_weight"] == 1.0

    # a teacher whose outputs are not the student's classes: one line
    with pytest.raises(NetslimError, match="has 10 classes but the network being fine-tuned has 3"):
        load_teacher(recorded, nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))

    # the recorded teacher gone: one line naming --teacher and --no-distill
    (tmp_path / "t" / "last.pth").rename(tmp_path / "moved.pth")
    code = main(["finetune", str(pruned), *tune, "--out", str(tmp_path / "ft2")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--teacher" in err and "--no-distill" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ft2" / "last.pth").exists()
    assert (
        main(
            [
                "finetune",
                str(pruned),
                *tune,
                "--teacher",
                str(tmp_path / "moved.pth"),
                "--out",
                str(tmp_path / "ft3"),
            ]
        )
        == 0
    )
    code = main(
        [
            "finetune",
            str(pruned),
            *tune,
            "--teacher",
            str(tmp_path / "nope.pth"),
            "--out",
            str(tmp_path / "ft4"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code != 0 and "nope.pth does not exist" in err and len(err.splitlines()) == 1
    assert (
        main(["finetune", str(pruned), *tune, "--no-distill", "--out", str(tmp_path / "ft5")]) == 0
    )
    assert read_checkpoint(tmp_path / "ft5" / "last.pth")["netslim"]["config"]["teacher"] is None
    for bad, value in (("--distill-weight", "-1"), ("--distill-temperature", "0")):
        code = main(["finetune", str(pruned), *tune, bad, value, "--out", str(tmp_path / "x")])
        assert code != 0 and bad in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# YOLO: Ultralytics' distillation inside its trainer
# --------------------------------------------------------------------------------------

YOLO_RUN = ["--image-size", "64", "--batch-size", "8", "--device", "cpu"]
YOLO_QUICK = ["workers=0", "nbs=8", "amp=False", "warmup_epochs=0", "mosaic=0"]


def _yolo_pruned(tmp_path: Path, yaml: str, segments: bool) -> tuple[Path, Path, Path]:
    """Tiny data, an unpruned YOLO (.pt) and its 50% pruning (.pth, the teacher recorded)."""
    from test_yolo import write_data

    from netslim.yolo.files import write_model

    data = write_data(tmp_path / "data", segments=segments)
    torch.manual_seed(0)
    write_model(randomize_bn(netslim.build_model(f"ultralytics:{yaml}", 2)), tmp_path / "u.pt")
    pruned = tmp_path / "p.pth"
    assert main(["yolo", "prune", str(tmp_path / "u.pt"), "--ratio", "0.5", *YOLO_RUN,
                 "--out", str(pruned)]) == 0  # fmt: skip
    return data, tmp_path / "u.pt", pruned


def _columns(run: Path) -> dict[str, list[float]]:
    lines = (run / "results.csv").read_text().splitlines()
    names = [n.strip() for n in lines[0].split(",")]
    rows = [[float(v) for v in line.split(",")] for line in lines[1:]]
    return {n: [r[i] for r in rows] for i, n in enumerate(names)}


@pytest.mark.slow
@pytest.mark.parametrize("yaml, segments", [("yolov8n.yaml", False), ("yolov8n-seg.yaml", True)])
def test_a_yolo_finetune_distils_by_ultralytics_and_leaves_a_clean_student(
    tmp_path, capsys, yaml, segments
):
    pytest.importorskip("ultralytics")
    import yaml as yamllib

    from netslim.engine.surgery import channel_counts
    from netslim.yolo.files import read_model

    data, unpruned, pruned = _yolo_pruned(tmp_path, yaml, segments)
    assert read_checkpoint(pruned)["netslim"]["teacher"] == str(unpruned.resolve())
    widths = channel_counts(netslim.load(pruned))
    runs = {"distilled": [], "plain": ["--no-distill"]}
    for name, extra in runs.items():
        argv = ["yolo", "finetune", pruned, "--data", data, "--epochs", "1", *YOLO_RUN,
                "--out", tmp_path / name, *extra, *YOLO_QUICK]  # fmt: skip
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    columns = _columns(tmp_path / "distilled")
    assert columns["train/dis_loss"][0] > 0  # Ultralytics' feature term was trained on
    assert "train/dis_loss" not in _columns(tmp_path / "plain")
    args = yamllib.safe_load((tmp_path / "distilled" / "args.yaml").read_text())
    assert args["distill_model"] == str(unpruned.resolve())
    # the student comes out clean: no projector, no teacher, the pruned widths
    student = netslim.load(tmp_path / "distilled" / "finetuned.pth")
    assert channel_counts(student) == widths
    assert not any(
        k.startswith(("projector", "student_model", "teacher")) for k in student.state_dict()
    )
    assert channel_counts(read_model(tmp_path / "distilled" / "weights" / "best.pt")) == widths


def test_the_yolo_outputs_term_equals_its_formula_and_is_flat_where_student_is_teacher():
    from netslim.yolo.distill import outputs_loss

    g = torch.Generator().manual_seed(0)
    b, nc, bins, anchors, masks = 2, 3, 4, 5, 2
    teacher = {
        "scores": torch.randn(b, nc, anchors, generator=g),
        "boxes": torch.randn(b, 4 * bins, anchors, generator=g),
        "mask_coefficient": torch.randn(b, masks, anchors, generator=g),
    }
    student = {
        k: (v + 0.3 * torch.randn(v.shape, generator=g)).requires_grad_()
        for k, v in teacher.items()
    }
    t = 2.0
    # by hand, in float64
    p_t = torch.sigmoid(teacher["scores"].double() / t)
    s_logit = student["scores"].double() / t
    bce = -(
        p_t * torch.log(torch.sigmoid(s_logit)) + (1 - p_t) * torch.log(1 - torch.sigmoid(s_logit))
    )
    weight = p_t.max(dim=1).values
    q_t = torch.softmax(teacher["boxes"].double().view(b, 4, bins, anchors) / t, dim=2)
    q_s = torch.softmax(student["boxes"].double().view(b, 4, bins, anchors) / t, dim=2)
    kl = (q_t * (q_t.log() - q_s.log())).sum(dim=(1, 2))
    error = (
        (student["mask_coefficient"].double() - teacher["mask_coefficient"].double()) ** 2
    ).mean(1)
    expected = (
        bce.sum() / p_t.sum()
        + (kl * weight).sum() * t * t / weight.sum().clamp(min=1)
        + (error * weight).sum() / weight.sum().clamp(min=1)
    )
    torch.testing.assert_close(
        outputs_loss(student, teacher, t).double(), expected, rtol=1e-5, atol=1e-6
    )
    # where the student outputs what the teacher does, the term pulls no further
    same = {k: v.clone().requires_grad_() for k, v in teacher.items()}
    grads = torch.autograd.grad(outputs_loss(same, teacher, t), list(same.values()))
    assert all(float(x.abs().max()) < 1e-6 for x in grads)


@pytest.mark.slow
@pytest.mark.parametrize("term", ["features", "outputs"])
def test_a_distilled_yolo_finetune_resumes(tmp_path, monkeypatch, term):
    pytest.importorskip("ultralytics")
    from test_yolo_resume_pruned import interrupted_after_epoch_1

    from netslim.engine.surgery import channel_counts
    from netslim.yolo import train as yolo_train
    from netslim.yolo.files import read_checkpoint as read_pt

    data, unpruned, pruned = _yolo_pruned(tmp_path, "yolov8n.yaml", False)
    settings = dict(imgsz=64, batch=8, nbs=8, workers=0, device="cpu", amp=False,
                    warmup_epochs=0, mosaic=0.0, close_mosaic=0, seed=0, deterministic=True)  # fmt: skip
    cut = tmp_path / "cut"
    with interrupted_after_epoch_1(monkeypatch), pytest.raises(KeyboardInterrupt):
        yolo_train.finetune(pruned, data, cut, epochs=2, distill_term={"term": term}, **settings)
    assert read_pt(cut / "weights" / "last.pt")["epoch"] == 0  # mid-run, a distillation's EMA
    yolo_train.finetune(pruned, data, cut, epochs=2, resume=True, **settings)
    assert json.loads((cut / "netslim.json").read_text())["distill"]["term"] == term
    assert all(v > 0 for v in _columns(cut)["train/dis_loss"])  # the teacher came back
    assert len(_columns(cut)["epoch"]) == 2
    student = netslim.load(cut / "finetuned.pth")
    assert channel_counts(student) == channel_counts(netslim.load(pruned))


@pytest.mark.slow
def test_bad_yolo_teachers_are_one_line(tmp_path, capsys):
    pytest.importorskip("ultralytics")
    from netslim.yolo.files import write_model

    data, unpruned, pruned = _yolo_pruned(tmp_path, "yolov8n.yaml", False)
    write_model(netslim.build_model("ultralytics:yolov8n.yaml", 3), tmp_path / "three.pt")
    write_model(netslim.build_model("ultralytics:yolov8n-seg.yaml", 2), tmp_path / "seg.pt")
    for teacher, said in (
        (tmp_path / "three.pt", "has 3 classes but the network trained has 2"),
        (tmp_path / "seg.pt", "is a segment model but the network trained is a detect one"),
        (tmp_path / "gone.pt", "gone.pt does not exist"),
    ):
        argv = ["yolo", "finetune", pruned, "--data", data, "--epochs", "1", *YOLO_RUN,
                "--teacher", teacher, "--out", tmp_path / "ft", *YOLO_QUICK]  # fmt: skip
        assert main([str(a) for a in argv]) != 0
        err = capsys.readouterr().err.strip()
        assert said in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "ft" / "weights").exists()


def test_info_shows_accuracy_after_pruning_with_or_without_a_recorded_teacher(
    tmp_path, tiny_data, capsys
):
    torch.manual_seed(0)
    model = randomize_bn(VGG(TRAIN_CFG, num_classes=tiny_data.num_classes))
    pruned, report = netslim.prune_model(model, 0.5, data=tiny_data, recalibrate=0)
    for name, teacher in (("alone.pth", None), ("taught.pth", tmp_path / "t.pth")):
        netslim.save(pruned, tmp_path / name, report, arch="vgg11", teacher=teacher)
        assert main(["info", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert "test acc right after pruning: unpruned" in out
        assert ("teacher  " in out) == (teacher is not None)
