"""Hostile YOLO files and runs (issue 27): one test per case, named for what netslim promises.

No YOLO file runs code or exhausts the machine when netslim reads it, whatever it names;
no run overwrites another or its input; an interrupted fine-tune of a pruned network
resumes; every command says in one line what went wrong and how to go on. The files are
tiny and made here, the way the reported ones were made (../shared/repro/yolo_hostile_files.py).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from test_yolo import QUICK, RUN, cli, write_data

import netslim
from netslim.engine.surgery import channel_counts
from netslim.errors import NetslimError
from netslim.train import runlock

YAML = "ultralytics:yolov8n.yaml"


def payload(marker: Path) -> str:
    """An activation string that, evaluated, leaves ``marker`` behind: proof that it ran."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch() or __import__('torch').nn.SiLU()"


@pytest.fixture(scope="module")
def yolo():
    torch.manual_seed(0)
    return netslim.build_model(YAML, 2).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, yolo):
    """A netslim .pth of a YOLO, and an Ultralytics .pt of it (as netslim writes them)."""
    from netslim.yolo.files import write_model

    folder = tmp_path_factory.mktemp("saved")
    netslim.save(yolo, folder / "y.pth", arch=YAML, image_size=64)
    write_model(yolo, folder / "y.pt")
    return folder


def edited_pth(saved: Path, target: Path, edit) -> Path:
    """A copy of the saved .pth whose stored model YAML ``edit`` changed."""
    checkpoint = torch.load(saved / "y.pth", weights_only=True)
    edit(checkpoint["netslim"]["yaml"])
    torch.save(checkpoint, target)
    return target


class _Build:
    """Pickled as a call of ``cls(*args)``: how a hostile .pt builds a model of its choosing."""

    def __init__(self, cls, *args):
        self.cls, self.args = cls, args

    def __reduce__(self):
        return (self.cls, self.args)


# --------------------------------------------------------------------------------------
# 1. No YOLO file runs code
# --------------------------------------------------------------------------------------


def evil_pt(source: Path, path: Path) -> dict:
    """Write ``path``: ``source`` with its model replaced by a call of DetectionModel(cfg),
    cfg's activation a payload that creates ``path.parent / "ran"``; returns cfg."""
    from ultralytics.nn.tasks import DetectionModel

    checkpoint = torch.load(source, weights_only=False)
    cfg = copy.deepcopy(checkpoint["ema"].yaml)
    cfg["activation"] = payload(path.parent / "ran")
    checkpoint.update(ema=None, model=_Build(DetectionModel, cfg))
    torch.save(checkpoint, path)
    return cfg


def test_a_pt_that_calls_a_model_class_with_an_evaluated_activation_runs_no_code(
    tmp_path, saved, capsys
):

    from netslim.yolo.files import read_model

    marker = tmp_path / "ran"
    evil_pt(saved / "y.pt", tmp_path / "evil.pt")
    with pytest.raises(NetslimError, match=r"calls ultralytics\.nn\.tasks\.DetectionModel"):
        read_model(tmp_path / "evil.pt")
    for argv in (
        ["yolo", "prune", tmp_path / "evil.pt", "--ratio", "0.5", "--out", tmp_path / "p.pth"],
        ["yolo", "val", tmp_path / "evil.pt", "--data", tmp_path / "d.yaml"],
        ["export", tmp_path / "evil.pt", "--out", tmp_path / "e.onnx"],
    ):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "calls ultralytics.nn.tasks.DetectionModel" in err, err
        assert len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "p.pth").exists()


def test_a_pt_read_after_ultralytics_allowed_its_classes_still_runs_no_code(tmp_path, saved):
    """Ultralytics' restricted loading adds its real layer classes to torch's process-wide
    allow-list for good; netslim reads with its own list, so a file cannot reach them."""
    from ultralytics.nn.tasks import DetectionModel, torch_safe_load

    from netslim.yolo.files import read_model

    def allowed() -> bool:
        entries = torch.serialization.get_safe_globals()
        return any(DetectionModel in (e if isinstance(e, tuple) else (e,)) for e in entries)

    torch_safe_load(str(saved / "y.pt"), safe_only=True)  # as Ultralytics' trainer loads
    assert allowed()
    marker, cfg = tmp_path / "ran", evil_pt(saved / "y.pt", tmp_path / "evil.pt")
    with pytest.raises(NetslimError, match="calls ultralytics.nn.tasks.DetectionModel"):
        read_model(tmp_path / "evil.pt")
    torch.save({"state_dict": {}, "x": _Build(DetectionModel, cfg)}, tmp_path / "evil.pth")
    with pytest.raises(NetslimError, match="is an Ultralytics checkpoint"):
        netslim.load(tmp_path / "evil.pth")  # netslim's own reader allows no class at all
    assert not marker.exists()
    assert allowed()  # Ultralytics' own list is left as it was


def test_a_pth_whose_stored_yaml_evaluates_its_activation_runs_no_code_anywhere(
    tmp_path, saved, capsys
):
    marker = tmp_path / "ran"
    evil = edited_pth(
        saved, tmp_path / "evil.pth", lambda y: y.__setitem__("activation", payload(marker))
    )
    data = write_data(tmp_path / "data", n_train=2, n_val=2)
    with pytest.raises(NetslimError, match="asks for the activation"):
        netslim.load(evil)
    for argv in (
        ["info", evil],
        ["yolo", "prune", evil, "--ratio", "0.5", "--out", tmp_path / "p.pth"],
        ["yolo", "val", evil, "--data", data],
        ["export", evil, "--out", tmp_path / "e.onnx"],
        ["yolo", "finetune", evil, "--data", data, "--out", tmp_path / "ft"],
    ):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "asks for the activation" in err, (argv, err)
    assert not marker.exists()


def test_a_torch_activation_with_literal_arguments_is_still_allowed(tmp_path, saved):
    fine = edited_pth(
        saved,
        tmp_path / "relu.pth",
        lambda y: y.__setitem__("activation", "torch.nn.LeakyReLU(0.1)"),
    )
    model = netslim.load(fine)
    assert {type(m).__name__ for m in model.modules()} >= {"LeakyReLU"}


def test_a_stored_yaml_naming_a_function_of_ultralytics_is_refused(tmp_path, saved, capsys):
    evil = edited_pth(
        saved,
        tmp_path / "load.pth",
        lambda y: y["backbone"].__setitem__(
            0, [-1, 1, "torch_safe_load", [str(tmp_path / "other.pt")]]
        ),
    )
    code, _, err = cli(capsys, "info", evil)
    assert code == 2 and "'torch_safe_load', which is not a layer class" in err


def test_a_stored_yaml_string_argument_naming_a_builder_variable_is_refused(tmp_path, saved):
    evil = edited_pth(
        saved, tmp_path / "arg.pth", lambda y: y["head"][0][3].__setitem__(0, "layers")
    )
    with pytest.raises(NetslimError, match="'layers', a variable of Ultralytics' model builder"):
        netslim.load(evil)


def test_a_pt_naming_code_outside_the_layers_is_refused_naming_it(tmp_path, saved):
    from netslim.yolo.files import read_model

    checkpoint = torch.load(saved / "y.pt", weights_only=False)
    checkpoint["train_args"] = {"note": _Build(print, "hello")}
    torch.save(checkpoint, tmp_path / "print.pt")
    with pytest.raises(NetslimError, match=r"names builtins\.print, which is not a layer"):
        read_model(tmp_path / "print.pt")


def test_trusting_a_pickle_reads_it_whole_and_says_so(tmp_path, saved):
    from netslim.yolo.files import read_model

    with pytest.warns(UserWarning, match="trusting .*y.pt: reading it with the full unpickler"):
        model = read_model(saved / "y.pt", trust_pickle=True)
    assert type(model).__name__ == "DetectionModel"


# --------------------------------------------------------------------------------------
# 3. Sizes checked before anything is built
# --------------------------------------------------------------------------------------


def test_a_stored_yaml_widened_past_the_bounds_is_refused_before_it_is_built(tmp_path, saved):
    wide = edited_pth(
        saved, tmp_path / "w100.pth", lambda y: y["scales"].__setitem__("n", [0.33, 100.0, 10**6])
    )
    with pytest.raises(NetslimError, match=r"the scale \[0\.33, 100\.0, 1000000\]"):
        netslim.load(wide)


def test_a_stored_yaml_within_the_bounds_but_too_large_is_sized_without_memory(tmp_path, saved):
    """Width 4 and 8192 channels pass the per-number bounds, but the network they make would
    hold billions of parameters: counted on the meta device, refused before it is built."""
    import resource

    wide = edited_pth(
        saved, tmp_path / "w4.pth", lambda y: y["scales"].__setitem__("n", [0.33, 4.0, 8192])
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(NetslimError, match=r"describes a network of [\d,]+ parameters"):
        netslim.load(wide)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 1024 * 1024  # far below the ~10 GB the network would take


def test_a_stored_yaml_repeating_a_block_a_billion_times_is_refused_at_once(tmp_path, saved):
    huge = edited_pth(
        saved,
        tmp_path / "n.pth",
        lambda y: y["backbone"].__setitem__(2, [-1, 10**9, "C2f", [128, True]]),
    )
    with pytest.raises(NetslimError, match="layer 2 repeated 1000000000 times"):
        netslim.load(huge)


def test_weights_of_other_layers_than_the_stored_yaml_builds_are_refused(tmp_path, saved):
    """More repeats in the YAML than the weights hold: the file's layers are not its YAML's."""
    more = edited_pth(
        saved,
        tmp_path / "more.pth",
        lambda y: y["backbone"].__setitem__(2, [-1, 6, "C2f", [128, True]]),
    )
    assert not any(
        n.startswith("model.2.m.1.") for n in torch.load(more, weights_only=True)["channels"]
    )
    with pytest.raises(NetslimError, match=r"other layers than its YAML builds \(model\.2\.m\.1"):
        netslim.load(more)


# --------------------------------------------------------------------------------------
# Files read back as Ultralytics writes and reads them
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "yolov8n.yaml",
        "yolo11n-seg.yaml",
        "yolov8n-cls.yaml",
        "yolov8n-pose.yaml",
        "yolo11n-obb.yaml",
        "yolov10n.yaml",
    ],
)
def test_a_pt_is_rebuilt_with_the_weights_and_outputs_the_full_unpickler_gives(tmp_path, name):
    from netslim.yolo.files import read_model, write_model

    torch.manual_seed(0)
    model = netslim.build_model(f"ultralytics:{name}", 3).eval()
    write_model(model, tmp_path / "m.pt")
    plain = torch.load(tmp_path / "m.pt", weights_only=False)["ema"].eval()
    rebuilt = read_model(tmp_path / "m.pt")
    assert type(rebuilt) is type(plain)
    assert plain.state_dict().keys() == rebuilt.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key]), key
    x = torch.rand(1, 3, 64, 64)
    first = lambda out: out[0] if isinstance(out, (list, tuple)) else out  # noqa: E731
    torch.testing.assert_close(first(rebuilt(x)), first(plain(x)))


def test_a_pruned_pt_is_rebuilt_at_its_pruned_widths(tmp_path, yolo):
    from conftest import make_sparse

    from netslim.yolo.files import read_model, write_model

    sparse, _ = make_sparse(copy.deepcopy(yolo), (1, 3, 64, 64))
    pruned, _ = netslim.prune_model(sparse, 0.5, input_size=(3, 64, 64))
    write_model(pruned, tmp_path / "p.pt")
    rebuilt = read_model(tmp_path / "p.pt")
    assert channel_counts(rebuilt) == channel_counts(pruned)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(rebuilt(x)[0], pruned(x)[0])


# --------------------------------------------------------------------------------------
# 2. No run overwrites another, or its input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, out", [("y.pth", "y.pth"), ("y.pt", "y.pth")])
def test_yolo_prune_never_replaces_its_input_unless_forced(tmp_path, saved, capsys, source, out):
    import shutil

    shutil.copy(saved / source, tmp_path / source)
    before = (tmp_path / source).read_bytes()
    argv = [
        "yolo",
        "prune",
        tmp_path / source,
        "--ratio",
        "0.3",
        "--image-size",
        "64",
        "--out",
        tmp_path / out,
    ]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "is the checkpoint being pruned and would replace it" in err
    assert (tmp_path / source).read_bytes() == before
    code, _, err = cli(capsys, *argv, "--force")
    assert code == 0, err
    assert (tmp_path / source).read_bytes() != before


def test_a_yolo_run_folder_has_one_writer(tmp_path, capsys):
    data = write_data(tmp_path / "data", n_train=2, n_val=2)
    out = tmp_path / "run"
    argv = [
        "yolo",
        "train",
        "--model",
        "yolov8n.yaml",
        "--data",
        data,
        "--epochs",
        "1",
        *RUN,
        "--out",
        out,
        *QUICK,
    ]
    with runlock.hold(out):  # another run holds the folder
        code, _, err = cli(capsys, *argv)
    assert code == 2 and "is in use by another netslim run" in err
    (out / "weights").mkdir(parents=True)
    (out / "weights" / "last.pt").write_bytes(b"a run's epoch")
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "already holds a run; pass --resume" in err
    assert (out / "weights" / "last.pt").read_bytes() == b"a run's epoch"


def test_a_yolo_lab_folder_has_one_writer(tmp_path, capsys):
    data = write_data(tmp_path / "data", n_train=2, n_val=2)
    with runlock.hold(tmp_path / "lab"):
        code, _, err = cli(
            capsys,
            "yolo",
            "lab",
            "--model",
            "yolov8n.yaml",
            "--data",
            data,
            "--out",
            tmp_path / "lab",
            *RUN,
        )
    assert code == 2 and "is in use by another netslim run" in err


# --------------------------------------------------------------------------------------
# 4. An interrupted fine-tune of a pruned network resumes
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_killed_in_its_final_validation_resumes_to_its_end(tmp_path, capsys):
    """Ultralytics strips last.pt (epoch -1) before its final validation: a kill there left
    a run that --resume could not continue ("nothing to resume" as an AssertionError)."""
    data = write_data(tmp_path / "data", n_train=4, n_val=2)
    argv = [
        "yolo",
        "train",
        "--model",
        "yolov8n.yaml",
        "--data",
        data,
        "--lam",
        "0",
        "--epochs",
        "1",
        *RUN,
        "--out",
        tmp_path / "run",
        *QUICK,
    ]
    assert cli(capsys, *argv)[0] == 0
    info = tmp_path / "run" / "netslim.json"
    info.write_text(
        json.dumps({k: v for k, v in json.loads(info.read_text()).items() if k != "finished"})
    )
    code, out, err = cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert json.loads(info.read_text())["finished"]
    assert f"done: {tmp_path / 'run'}/weights/last.pt" in out


# --------------------------------------------------------------------------------------
# 5, 6. Clear lines, and what netslim says is true
# --------------------------------------------------------------------------------------


def test_a_damaged_lab_json_is_one_line(tmp_path, capsys):
    (tmp_path / "lab").mkdir()
    for text in ("{not json", "[1, 2]", '{"model": "y.yaml", "data": "d", "lams": []}'):
        (tmp_path / "lab" / "lab.json").write_text(text)
        code, _, err = cli(capsys, "yolo", "report", tmp_path / "lab")
        assert code == 2 and "lab.json is damaged" in err and len(err.strip().splitlines()) == 1


def test_yolo_prune_refuses_a_negative_recalibration(tmp_path, saved, capsys):
    code, _, err = cli(
        capsys,
        "yolo",
        "prune",
        saved / "y.pth",
        "--ratio",
        "0.5",
        "--recalibrate",
        "-1",
        "--out",
        tmp_path / "p.pth",
    )
    assert code == 2 and "--recalibrate must be >= 0 batches, got -1" in err


def test_info_calls_a_trained_yolo_trained_and_a_pruned_one_pruned(tmp_path, saved, yolo, capsys):
    netslim.save(yolo, tmp_path / "t.pth", arch=YAML, image_size=64, kind="train")
    pruned, report = netslim.prune_model(yolo, 0.3, input_size=(3, 64, 64))
    netslim.save(pruned, tmp_path / "p.pth", report, arch=YAML, image_size=64)
    kinds = {}
    for name in ("t", "p"):
        code, out, err = cli(capsys, "info", tmp_path / f"{name}.pth", "--json")
        assert code == 0, err
        kinds[name] = json.loads(out)["kind"]
    assert kinds == {"t": "train", "p": "pruned"}
    code, out, _ = cli(capsys, "info", saved / "y.pth", "--json")  # no kind recorded: not pruned
    assert json.loads(out)["kind"] == "network"


def test_a_checkpoint_of_the_wrong_kind_is_refused_by_kind_both_ways(tmp_path, saved, capsys):
    netslim.save(netslim.build_model("vgg11-small"), tmp_path / "vgg.pth", arch="vgg11-small")
    data = write_data(tmp_path / "data", n_train=2, n_val=2)
    code, _, err = cli(
        capsys,
        "yolo",
        "train",
        "--model",
        tmp_path / "vgg.pth",
        "--data",
        data,
        "--out",
        tmp_path / "r",
        *RUN,
    )
    assert code == 2 and "holds a VGG, not an Ultralytics YOLO" in err
    code, _, err = cli(
        capsys, "finetune", saved / "y.pth", "--dataset", "synthetic", "--out", tmp_path / "f"
    )
    assert code == 2 and "is an Ultralytics YOLO" in err and "netslim yolo finetune" in err
    code, _, err = cli(
        capsys, "train", "--arch", YAML, "--dataset", "synthetic", "--out", tmp_path / "t"
    )
    assert code == 2 and "netslim yolo train" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "f").exists()


@pytest.mark.parametrize(
    "argv, says",
    [
        (["prune", "x.pth", "--ratio", "0.5", "--out", "p.pth"], "nothing was written"),
        (["export", "x.pth", "--out", "x.onnx"], "nothing was written"),
        (["yolo", "prune", "x.pth", "--ratio", "0.5", "--out", "p.pth"], "nothing was written"),
        (
            ["yolo", "lab", "--model", "m.yaml", "--data", "d.yaml", "--out", "lab"],
            "run the same command again",
        ),
        (["yolo", "train", "--model", "m.yaml", "--data", "d.yaml", "--out", "r"], "plus --resume"),
        (["train", "--out", "r"], "plus --resume"),
        (["info", "x.pth"], "interrupted"),
    ],
)
def test_ctrl_c_advises_only_what_the_command_has(argv, says, capsys, monkeypatch):
    from netslim.cli import commands

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "_run", interrupt)
    code = commands.main(argv)
    err = capsys.readouterr().err
    assert code == 130 and says in err and len(err.strip().splitlines()) == 1
    assert ("--resume" in err) == (says == "plus --resume")


def test_ctrl_c_while_a_command_is_still_importing_is_one_line(capsys, monkeypatch):
    from netslim.cli import commands

    class InterruptImport:
        """A finder that stops the import of netslim.runtime.threads as Ctrl-C would."""

        def find_spec(self, name, path=None, target=None):
            if name == "netslim.runtime.threads":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "netslim.runtime.threads", raising=False)
    monkeypatch.setattr(sys, "meta_path", [InterruptImport(), *sys.meta_path])
    code = commands.main(["info", "x.pth"])
    err = capsys.readouterr().err
    assert code == 130 and err.strip() == "netslim: interrupted"
