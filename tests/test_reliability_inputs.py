"""Hostile and careless inputs (issue 10, items 5, 9 and 11): one test per input, each
named for the behaviour netslim promises. Every file here is tiny and generated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import netslim
from netslim.config import ARCHS
from netslim.models import _BUILDERS

SRC = Path(netslim.__file__).resolve().parents[1]


def imported_modules(*argv: str) -> set[str]:
    """The modules ``python -m netslim ARGV`` imports, from ``-X importtime``'s list."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "netslim", *argv],
                          capture_output=True, text=True, env={"PYTHONPATH": str(SRC)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [
        line.split("|") for line in done.stderr.splitlines() if line.startswith("import time:")
    ]
    return {parts[-1].strip() for parts in lines if len(parts) == 3}


# --------------------------------------------------------------------------------------
# Item 11: the command line
# --------------------------------------------------------------------------------------


def test_help_and_version_do_not_import_torch():
    """`netslim --help`, `netslim train --help` and `netslim --version` never import torch."""
    for argv in (["--help"], ["train", "--help"], ["lab", "--help"], ["--version"]):
        modules = imported_modules(*argv)
        assert "netslim.cli" in modules  # the list is real: it holds what was imported
        assert not {m for m in modules if m.split(".")[0] in ("torch", "numpy")}, argv


def test_version_prints_the_package_version(capsys):
    """`netslim --version` prints `netslim <version>` and exits 0."""
    done = subprocess.run([sys.executable, "-m", "netslim", "--version"], capture_output=True,
                          text=True, env={"PYTHONPATH": str(SRC)})  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == f"netslim {netslim.__version__}"


def test_parser_architectures_are_the_buildable_ones():
    """The --arch names the parser offers are exactly the networks build_model builds."""
    assert ARCHS == tuple(_BUILDERS)
