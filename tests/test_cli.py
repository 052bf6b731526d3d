"""The netslim command end to end, and its error messages."""

from __future__ import annotations

import json

import pytest
import torch

import netslim
from netslim.cli import main
from netslim.runtime.device import pick_precision

SMALL = ["--dataset", "synthetic", "--train-size", "1024", "--test-size", "256", "--device", "cpu"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_prune_finetune_info(tmp_path, capsys):
    run_dir, pruned, tuned = tmp_path / "sparse", tmp_path / "pruned.pth", tmp_path / "tuned"
    code, out, _ = run(
        capsys,
        "train",
        "--arch",
        "vgg11-small",
        *SMALL,
        "--epochs",
        "2",
        "--lam",
        "1e-4",
        "--batch-size",
        "128",
        "--out",
        str(run_dir),
    )
    assert code == 0, out
    assert out.count("epoch ") >= 2 and (run_dir / "best.pth").exists()

    code, out, _ = run(
        capsys,
        "prune",
        str(run_dir / "last.pth"),
        "--ratio",
        "0.5",
        "--out",
        str(pruned),
        *SMALL,
        "--recalibrate",
        "4",
    )
    assert code == 0, out
    for words in ("official masking", "bias compensation", "BN recalibrated", "params", "MACs"):
        assert words in out
    model = netslim.load(pruned)
    report = torch.load(pruned, weights_only=True)["netslim"]["prune"]
    assert report["cfg"] == model.cfg and report["params_after"] == netslim.count_params(model)
    # the saved network is the recalibrated one: it scores what the report says (measured,
    # as prune measures, at the default precision: bf16 on some CPUs)
    data = netslim.load_dataset("synthetic", train_size=1024, test_size=256)
    dtype = pick_precision("auto", torch.device("cpu"))
    assert netslim.evaluate(model, data, dtype=dtype)[1] == pytest.approx(
        report["acc_recalibrated"]
    )

    code, out, _ = run(
        capsys,
        "finetune",
        str(pruned),
        *SMALL,
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--out",
        str(tuned),
    )
    assert code == 0, out
    assert netslim.load(tuned / "last.pth").cfg == model.cfg

    code, out, _ = run(capsys, "info", str(tuned / "last.pth"), "--json")
    info = json.loads(out)
    assert info["cfg"] == model.cfg and info["params"] == netslim.count_params(model)
    assert info["arch"] == "vgg11-small" and info["kind"] == "finetune"


def test_prune_without_data_is_pure_surgery(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pth"
    torch.save({"state_dict": netslim.build_model("vgg11-small").state_dict()}, ckpt)
    code, out, _ = run(
        capsys, "prune", str(ckpt), "--ratio", "0.3", "--out", str(tmp_path / "p.pth")
    )
    assert code == 0
    assert "params" in out and "test accuracy" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "{ckpt}", "--ratio", "1.0", "--out", "{tmp}/p.pth"], "ratio must be in [0, 1)"),
        (["prune", "{ckpt}", "--ratio", "-0.5", "--out", "{tmp}/p.pth"], "ratio must be in [0, 1)"),
        (
            ["prune", "{tmp}/missing.pth", "--ratio", "0.5", "--out", "{tmp}/p.pth"],
            "does not exist",
        ),
        (
            ["prune", "{junk}", "--ratio", "0.5", "--out", "{tmp}/p.pth"],
            "not a checkpoint written by torch.save",
        ),
        (["info", "{junk}"], "not a checkpoint written by torch.save"),
        (
            ["train", "--lam", "-1", "--dataset", "synthetic", "--out", "{tmp}/r"],
            "--lam must be >= 0",
        ),
        (
            [
                "train",
                "--dataset",
                "cifar10",
                "--data-root",
                "{tmp}/nodata",
                "--no-download",
                "--out",
                "{tmp}/r",
            ],
            "cifar-10-batches-py",
        ),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, capsys, argv, message):
    ckpt, junk = tmp_path / "m.pth", tmp_path / "junk.pth"
    torch.save({"state_dict": netslim.build_model("vgg11-small").state_dict()}, ckpt)
    junk.write_bytes(b"\x00garbage")
    argv = [a.format(tmp=tmp_path, ckpt=ckpt, junk=junk) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("netslim: error:") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "p.pth").exists() and not (tmp_path / "r" / "last.pth").exists()


def test_unknown_arch_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--arch", "vgg7", "--out", "x"])
    assert e.value.code == 2
    assert "invalid choice: 'vgg7'" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    for command in ("train", "prune", "finetune", "info"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert f"usage: netslim {command}" in capsys.readouterr().out


def test_resnet_train_prune_to_target_macs_finetune_info(tmp_path, capsys):
    tiny = [
        "--dataset",
        "synthetic",
        "--train-size",
        "256",
        "--test-size",
        "128",
        "--device",
        "cpu",
    ]
    run_dir, pruned, tuned = tmp_path / "sparse", tmp_path / "pruned.pth", tmp_path / "tuned"
    code, out, err = run(
        capsys,
        "train",
        "--arch",
        "resnet56",
        *tiny,
        "--epochs",
        "1",
        "--lam",
        "1e-4",
        "--out",
        str(run_dir),
    )
    assert code == 0, err
    code, out, err = run(
        capsys,
        "prune",
        str(run_dir / "last.pth"),
        "--target-macs",
        "0.5",
        "--out",
        str(pruned),
        *tiny,
        "--recalibrate",
        "2",
    )
    assert code == 0, err
    assert "residual path kept at full width" in out
    model, unpruned = netslim.load(pruned), netslim.load(run_dir / "last.pth")
    assert 0.47 <= netslim.count_macs(model) / netslim.count_macs(unpruned) <= 0.5
    code, out, err = run(
        capsys, "finetune", str(pruned), *tiny, "--epochs", "1", "--out", str(tuned)
    )
    assert code == 0, err
    tuned_model = netslim.load(tuned / "last.pth")
    assert netslim.count_params(tuned_model) == netslim.count_params(model)
    code, out, _ = run(capsys, "info", str(tuned / "last.pth"), "--json")
    info = json.loads(out)
    assert info["arch"] == "resnet56" and info["cfg"] is None
    assert info["macs"] == netslim.count_macs(model)


def test_prune_needs_exactly_one_of_ratio_and_target_macs(tmp_path, capsys):
    ckpt = tmp_path / "m.pth"
    torch.save({"state_dict": netslim.build_model("vgg11-small").state_dict()}, ckpt)
    with pytest.raises(SystemExit):
        main(["prune", str(ckpt), "--ratio", "0.3", "--target-macs", "0.5", "--out", "x.pth"])
    assert "not allowed with argument" in capsys.readouterr().err
    code, _, err = run(capsys, "prune", str(ckpt), "--target-macs", "1.5", "--out", "x.pth")
    assert code == 2 and "--target-macs must be a share in (0, 1]" in err


def test_multipass_caps_each_layer_and_shrinks_every_pass(tmp_path, capsys):
    out_dir = tmp_path / "mp"
    argv = [
        "multipass",
        "--arch",
        "vgg11-small",
        *SMALL,
        "--passes",
        "2",
        "--ratio",
        "0.6",
        "--layer-cap",
        "0.3",
        "--epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--lam",
        "1e-3",
        "--batch-size",
        "128",
        "--recalibrate",
        "2",
        "--out",
        str(out_dir),
    ]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [r["pass"] for r in summary] == [1, 2, "finetune"]
    assert summary[0]["macs"] > summary[1]["macs"] == summary[2]["macs"]
    for k in (1, 2):  # no pass removed more than 30% of any layer
        report = json.loads((out_dir / f"pass-{k}" / "prune.json").read_text())
        assert all(kept >= 0.7 * total for _, kept, total in report["layers"])
    cfg1 = netslim.load(out_dir / "pass-1" / "pruned.pth").cfg
    cfg2 = netslim.load(out_dir / "pass-2" / "pruned.pth").cfg
    assert all(b <= a for a, b in zip(cfg1, cfg2) if a != "M") and cfg1 != cfg2
    # running it again finds everything done and changes nothing
    before = (out_dir / "finetune" / "last.pth").stat().st_mtime_ns
    code, out, err = run(capsys, *argv)
    assert code == 0 and "done already" in out
    assert (out_dir / "finetune" / "last.pth").stat().st_mtime_ns == before


def test_the_ctrl_c_hint_names_only_flags_the_command_has():
    """Every command's interrupted hint names --resume exactly where the command has it."""
    import argparse

    from netslim.cli.commands import interrupted_text
    from netslim.cli.parser import build_parser

    def subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    nested = list(subcommands(sub, f"{prefix}{name} "))
                    yield from nested or [(f"{prefix}{name}", sub)]

    seen = 0
    for command, sub in subcommands(build_parser()):
        has_resume = any("--resume" in a.option_strings for a in sub._actions)
        first, _, second = command.partition(" ")
        args = argparse.Namespace(command=first, yolo_command=second or None, out="OUT")
        text = interrupted_text(args)
        assert ("--resume" in text) == has_resume, (command, text)
        assert text.startswith("netslim: interrupted")
        seen += 1
    assert seen >= 15  # every command and YOLO step was looked at
