"""The lab report: valid figures, tables that match the logs, a self-contained HTML page."""

from __future__ import annotations

import ast
import base64
import importlib.util
import io
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import matplotlib.text
import pytest
from conftest import MICRO_LAB

import netslim
from netslim.cli import main
from netslim.errors import NetslimError
from netslim.lab.report import (
    FIGURES,
    figure_channels,
    figure_finetune,
    figure_gammas,
    load_results,
    render_report,
)

pytestmark = pytest.mark.slow  # not in make test-fast

CONFIG = MICRO_LAB
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def lab(micro_lab) -> Path:
    """A finished micro lab (made through the Python API, shared with other tests)."""
    return micro_lab


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
    # the paper recipe's step schedule, and no early stop or λ auto to tell of
    assert "drops tenfold" in text and "stopped after epoch" not in text
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
        assert row[1:6] == [
            f"{ratio:g}",
            f"{params:,}",
            f"{fewer_params:.1f}",
            f"{macs:,}",
            f"{fewer_macs:.1f}",
        ]
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


def figure_texts(fig) -> set[str]:
    """Every text the figure draws: titles, axis labels, tick labels, legend entries."""
    return {t.get_text() for t in fig.findobj(matplotlib.text.Text)}


def labelled_lines(ax, prefix: str) -> list:
    return [line for line in ax.get_lines() if line.get_label().startswith(prefix)]


def test_figure_3_marks_epoch_0_as_the_recalibrated_start_not_the_official(lab):
    res = load_results(lab)
    fig = figure_finetune(res)
    texts = figure_texts(fig)
    assert "0\n(pruned)" in texts
    start = "epoch 0: pruned + BN recalibration (2 batches), where fine-tuning starts"
    assert start in texts and "epoch 0: pruned, official masking" in texts
    for ax, ratio in zip(fig.axes, CONFIG.ratios):  # each marker sits at its logged accuracy
        (star,) = labelled_lines(ax, start)
        (official,) = labelled_lines(ax, "epoch 0: pruned, official masking")
        assert list(star.get_xydata()[0]) == [0, res.prune[ratio]["acc_recalibrated"]]
        assert list(official.get_xydata()[0]) == [0, res.prune[ratio]["acc_masked"]]
    # without recalibration, fine-tuning starts from the bias-compensated network
    plain = replace(
        res,
        config=replace(res.config, recalibrate=0),
        prune={r: {**p, "acc_recalibrated": None} for r, p in res.prune.items()},
    )
    fig = figure_finetune(plain)
    (star,) = labelled_lines(fig.axes[0], "epoch 0: pruned + bias compensation, where")
    assert star.get_xydata()[0][1] == res.prune[CONFIG.ratios[0]]["acc_compensated"]


def test_figure_4_names_the_layers_and_thins_the_names_of_deep_nets(lab):
    res = load_results(lab)
    fig = figure_channels(res)
    for ax, ratio in zip(fig.axes, CONFIG.ratios):
        names = [name for name, _, _ in res.prune[ratio]["layers"]]
        assert [t.get_text() for t in ax.get_xticklabels()] == names  # 8 groups: every one
    assert "channel group, named by its BatchNorm layer" in figure_texts(fig)
    # a deep net (here 130 groups, as in a ResNet-164): every 4th name, at most 40 of them
    layers = [(f"layers.{i}.bn", 1, 4) for i in range(130)]
    deep = replace(res, prune={r: {**p, "layers": layers} for r, p in res.prune.items()})
    labels = [t.get_text() for t in figure_channels(deep).axes[0].get_xticklabels()]
    assert labels == [f"layers.{i}.bn" for i in range(0, 130, 4)]


def test_figure_2_draws_each_prune_threshold_in_its_own_style(lab):
    res = load_results(lab)
    ax = figure_gammas(res).axes[CONFIG.lams.index(CONFIG.prune_lam)]
    lines = labelled_lines(ax, "prune threshold")
    assert [line.get_label() for line in lines] == [
        f"prune threshold, ratio {r:g}: {res.prune[r]['threshold']:.2g}" for r in CONFIG.ratios
    ]
    assert [line.get_xdata()[0] for line in lines] == [
        res.prune[r]["threshold"] for r in CONFIG.ratios
    ]
    styles = {(line.get_color(), str(line.get_linestyle())) for line in lines}
    assert len({c for c, _ in styles}) == len({s for _, s in styles}) == len(CONFIG.ratios)
    assert ax.get_legend() is not None


def netslim_imports(module: str) -> set[str]:
    """The netslim modules ``module``'s source imports, anywhere in the file (lazy ones too)."""
    found = set()
    for node in ast.walk(ast.parse(Path(importlib.util.find_spec(module).origin).read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("netslim.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("netslim"):
            # `from netslim import distributed` names a module; `from netslim.x import y`, x
            names = [f"netslim.{a.name}" for a in node.names] if node.module == "netslim" else []
            found |= {
                n for n in [node.module, *names] if importlib.util.find_spec(n) and n != "netslim"
            }
    return found


def test_report_does_not_depend_on_the_lab_runner():
    """lab runs the experiment and renders the report; report reads the folder, one way only."""
    assert "netslim.lab.report" in netslim_imports("netslim.lab.experiment")
    seen, todo = set(), ["netslim.lab.report"]
    while todo:  # every netslim module report imports, directly or through others
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += netslim_imports(module)
    assert "netslim.lab.folder" in seen and "netslim.lab.experiment" not in seen
