"""The paper's ResNet-164 / DenseNet-40 files through netslim: info, prune, finetune, load, export.

Prints a markdown table: for each of the four files (../shared/official-checkpoints), the
largest |logit difference| from the paper's model (outputs.pt) when netslim reads it and
when netslim reads back its own export in the paper's layout; what `netslim prune --ratio
0.4` leaves (saved, then reloaded: difference from the in-memory pruned network); and one
tiny fine-tuning epoch on synthetic data. Also the paper's resprune.py result rebuilt by
netslim (`prune resnet164 --ratio 0.4 --no-compensate`) against the paper's logits.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/official.py [--files DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
import warnings
from pathlib import Path

import torch

import netslim
from netslim.cli.commands import main
from netslim.slim import prune_model

FILES = Path(__file__).resolve().parents[1] / ".." / "shared" / "official-checkpoints"
CASES = {
    "resnet164.pth.tar": "resnet164",
    "resnet164_pruned40.pth.tar": "resnet164_pruned",
    "densenet40.pth.tar": "densenet40",
    "densenet40_pruned40.pth.tar": "densenet40_pruned",
}
TINY = ["--dataset", "synthetic", "--train-size", "64", "--test-size", "32", "--device", "cpu"]


def cli(*argv: str) -> float:
    """Run one netslim command quietly; its seconds."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(list(argv))
    if code != 0:
        raise SystemExit(f"netslim {' '.join(argv)} failed with status {code}")
    return time.perf_counter() - start


def diff(model: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.eval()(x) - reference).abs().max().item()


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=Path, default=FILES)
    args = parser.parse_args()
    oracle = torch.load(args.files / "outputs.pt", map_location="cpu", weights_only=True)
    x = oracle["input"]
    print(
        "| file | params | MACs | read: max abs diff vs paper | info s | prune 0.4: removed, "
        "params, MACs | prune s | saved, reloaded: max abs diff | finetune 1 epoch s | "
        "export official, reread: max abs diff vs paper |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, key in CASES.items():
            path = str(args.files / name)
            model = netslim.load(path)
            t_info = cli("info", path)
            pruned_path = tmp / f"{name}.pruned.pth"
            t_prune = cli("prune", path, "--ratio", "0.4", "--out", str(pruned_path))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruned, report = prune_model(model, 0.4)
            t_ft = cli(
                "finetune",
                str(pruned_path),
                *TINY,
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--out",
                str(tmp / f"{name}.ft"),
            )
            netslim.load(tmp / f"{name}.ft" / "last.pth")
            cli("export", path, "--format", "official", "--out", str(tmp / f"{name}.paper.pth"))
            print(
                f"| {name} | {netslim.count_params(model):,} | {netslim.count_macs(model):,} "
                f"| {diff(model, x, oracle[key]):.1e} | {t_info:.1f} "
                f"| {100 * report.pruned_share:.1f}%, {report.params_after:,}, "
                f"{report.macs_after:,} | {t_prune:.1f} "
                f"| {diff(netslim.load(pruned_path), x, pruned(x).detach()):.1e} | {t_ft:.1f} "
                f"| {diff(netslim.load(tmp / f'{name}.paper.pth'), x, oracle[key]):.1e} |"
            )
        paper = tmp / "respruned.pth"
        cli(
            "prune",
            str(args.files / "resnet164.pth.tar"),
            "--ratio",
            "0.4",
            "--no-compensate",
            "--out",
            str(paper),
        )
        same = (
            netslim.read_checkpoint(paper)["channels"]
            == netslim.read_checkpoint(args.files / "resnet164_pruned40.pth.tar")["channels"]
        )
        print(
            f"\n`netslim prune resnet164.pth.tar --ratio 0.4 --no-compensate` against the paper's "
            f"resprune.py file: same channel counts: {same}; max abs logit difference "
            f"{diff(netslim.load(paper), x, oracle['resnet164_pruned']):.1e}"
        )


if __name__ == "__main__":
    main_bench()
