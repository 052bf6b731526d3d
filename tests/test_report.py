"""The lab report: valid figures, tables that match the logs, a self-contained HTML page."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import matplotlib.image
import pytest

import netslim
from netslim.cli import main
from netslim.errors import NetslimError
from netslim.lab import run_lab
from netslim.labfolder import LabConfig
from netslim.report import FIGURES, render_report

CONFIG = LabConfig(arch="vgg11-small", dataset="synthetic", train_size=256, test_size=128,
                   epochs=2, finetune_epochs=1, batch_size=128, recalibrate=2, sweep=[0.3, 0.7],
                   precision="fp32", device="cpu")  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    """A finished micro lab (made through the Python API)."""
    out = tmp_path_factory.mktemp("report") / "lab"
    run_lab(CONFIG, out, log=lambda line: None)
    return out


def tables(markdown: str) -> list[list[list[str]]]:
    """The Markdown tables of a report as rows of cells, header row first, separator dropped."""
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("| "):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if set(cells) != {"---"}:
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def last_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_every_figure_is_a_readable_png(lab):
    for name in FIGURES.values():
        data = (lab / "figures" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
        height, width = pixels.shape[:2]
        assert width >= 600 and height >= 300, name  # readable at 110 dpi
        assert pixels.std() > 0.05, f"{name} is blank"


def test_markdown_shows_every_figure_beside_it(lab):
    text = (lab / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(linked) == sorted(f"figures/{name}" for name in FIGURES.values())
    assert all((lab / path).is_file() for path in linked)


def test_tables_equal_the_logged_metrics(lab):
    training, accuracy, size = tables((lab / "report.md").read_text())[:3]
    assert training[0][:3] == ["λ", "train acc (%)", "test acc (%)"]
    for row, lam in zip(training[1:], ("0", "1e-4", "1e-2")):
        last = last_record(lab / "train" / f"lam={lam}")
        assert row[:3] == [lam, f"{last['train_acc']:.2f}", f"{last['test_acc']:.2f}"]
        assert row[4] == f"{100 * last['sparsity']:.1f}"

    sparse_acc = last_record(lab / "train" / "lam=1e-4")["test_acc"]
    for row, ratio in zip(accuracy[1:], CONFIG.ratios):
        report = json.loads((lab / "prune" / f"lam=1e-4-ratio={ratio}.json").read_text())["prune"]
        tuned = last_record(lab / "finetune" / f"ratio={ratio}")
        # the prune stage measured the sparse model itself; it must agree with training's log
        assert row[3] == f"{sparse_acc:.2f}" == f"{report['acc_unpruned']:.2f}"
        expected = [report[k] for k in ("acc_masked", "acc_compensated", "acc_recalibrated")]
        assert row[4:8] == [f"{v:.2f}" for v in (*expected, tuned["test_acc"])]

    original = netslim.load(lab / "train" / "lam=1e-4" / "last.pth")
    assert size[1][2] == f"{netslim.count_params(original):,}"
    for row, ratio in zip(size[2:], CONFIG.ratios):
        pruned = netslim.load(lab / "prune" / f"lam=1e-4-ratio={ratio}.pth")
        params, macs = netslim.count_params(pruned), netslim.count_macs(pruned)
        fewer_params = 100 * (1 - params / netslim.count_params(original))
        fewer_macs = 100 * (1 - macs / netslim.count_macs(original))
        assert row[1:6] == [f"{ratio:g}", f"{params:,}", f"{fewer_params:.1f}", f"{macs:,}",
                            f"{fewer_macs:.1f}"]  # fmt: skip
        assert row[6] == str(pruned.cfg).replace("'", "")


def test_html_is_self_contained_and_embeds_every_figure(lab):
    page = (lab / "report.html").read_text()
    sources = re.findall(r"""\bsrc=['"]([^'"]*)['"]""", page)
    assert len(sources) == len(FIGURES)
    prefix = "data:image/png;base64,"
    assert all(s.startswith(prefix) for s in sources)
    embedded = sorted(base64.b64decode(s[len(prefix) :]) for s in sources)
    assert embedded == sorted((lab / "figures" / n).read_bytes() for n in FIGURES.values())
    for outside in ("href=", "<link", "<script", "url(", "http:", "https:", "figures/"):
        assert outside not in page
    assert page.count("<table>") == 4  # training, accuracy, size, software


def test_report_command_rerenders_the_same_report(lab, capsys, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(lab, copy)
    before = (copy / "report.md").read_text()
    for path in [copy / "report.md", copy / "report.html", *(copy / "figures").iterdir()]:
        path.unlink()
    assert main(["report", str(copy)]) == 0
    assert f"wrote {copy / 'report.html'}" in capsys.readouterr().out
    assert (copy / "report.md").read_text() == before
    assert sorted(p.name for p in (copy / "figures").iterdir()) == sorted(FIGURES.values())


def test_report_of_an_unfinished_lab_says_what_is_missing(lab, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(lab, copy)
    shutil.rmtree(copy / "finetune" / "ratio=0.9")
    with pytest.raises(NetslimError, match=r"not finished: .*ratio=0\.9 \(0 of 1 epochs\)"):
        render_report(copy)


def test_report_of_a_folder_without_a_lab_is_refused(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no lab" in capsys.readouterr().err
