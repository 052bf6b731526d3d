"""What every netslim lab report is made of: the skeleton both labs fill, and its writers.

A report is first built as a list of blocks (heading, warning, paragraph, table, figure, code) by
:func:`slimming_document`, whose sections are the same for the classifier lab
(:mod:`netslim.lab.report`) and the YOLO lab (:mod:`netslim.yolo.report`): what was run,
sparsity training, pruning (and fine-tuning), how to reproduce it. :func:`write_report`
then writes the figures and the document twice, as Markdown and as self-contained HTML,
so both always say the same. A section added here shows up in both reports.

Figures use matplotlib's object API (no pyplot), which renders PNGs with Agg and leaves no
global state behind.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from netslim.files import atomic_write, atomic_write_text

DPI = 110

Block = tuple[Union[str, list, tuple], ...]  # ("h2", text), ("table", header, rows), ...


def slimming_document(
    *,
    title: str,
    summary: str,
    warnings: Sequence[str] = (),
    training: list[Block],
    pruning_title: str,
    pruning: list[Block],
    reproduce: list[Block],
) -> list[Block]:
    """The report's sections, in the order every lab report has them: the title, the
    ``warnings`` that say the run means little (:mod:`netslim.lab.health`), what was run,
    sparsity training (its table and figures), pruning and fine-tuning, and how to
    reproduce the run."""
    return [
        ("h1", title),
        *(("warning", line) for line in warnings),
        ("p", summary),
        ("h2", "Sparsity training"),
        *training,
        ("h2", pruning_title),
        *pruning,
        ("h2", "Reproducing this run"),
        *reproduce,
    ]


def write_report(
    folder: Path, doc: list[Block], figures: dict[str, Figure | None], files: dict[str, str]
) -> Path:
    """Write ``figures/<files[key]>`` for every figure drawn (None: not drawn), then
    ``report.md`` and ``report.html``, each atomically; returns the path of the HTML."""
    images = {key: png_bytes(fig) for key, fig in figures.items() if fig is not None}
    for key, data in images.items():
        atomic_write(folder / "figures" / files[key], lambda f, d=data: f.write(d))
    atomic_write_text(folder / "report.md", to_markdown(doc, files))
    atomic_write_text(folder / "report.html", to_html(doc, images))
    return folder / "report.html"


def panels(n: int, width: float = 4.3, height: float = 3.5) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width * n, height), layout="constrained")
    return fig, list(fig.subplots(1, n, squeeze=False)[0])


def epoch_axis(ax: Any) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def gamma_panels(
    gammas: dict[float, np.ndarray],
    lams: list[float],
    title: Callable[[float], str],
    lines: Callable[[float], list[tuple]],
    headroom: float,
) -> Figure:
    """Per λ, the histogram of |γ| on log-spaced bins, one x range for all, with the vertical
    lines ``lines(lam)`` gives as ``(x, label, matplotlib style)``; the YOLO report's too."""
    floor = 1e-8  # exact zeros have no logarithm; they and anything smaller count here
    values = {lam: np.maximum(np.abs(g), floor) for lam, g in gammas.items()}
    low = np.floor(np.log10(min(v.min() for v in values.values())))
    high = np.ceil(np.log10(max(v.max() for v in values.values())))
    bins = np.logspace(low, high, int(20 * (high - low)) + 1)  # 20 per decade: peaks are narrow
    fig, axes = panels(len(lams))
    for ax, lam in zip(axes, lams):
        ax.hist(values[lam], bins=bins, color="C0")
        ax.set_xscale("log")
        for x, label, style in lines(lam):
            ax.axvline(x, label=label, **style)
        ax.set_title(f"{title(lam)}: median |γ| = {np.median(values[lam]):.2g}")
        ax.set_xlabel("|γ| (log scale)")
        ax.set_ylabel("BN channels")
        ax.set_ylim(0, headroom * ax.get_ylim()[1])  # headroom: the legend sits above the bars
        ax.legend(fontsize="small", loc="upper left")
    return fig


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def to_markdown(doc: list[Block], files: dict[str, str]) -> str:
    """The document as Markdown; figure ``key`` is the image ``figures/files[key]``."""
    out: list[str] = []
    for kind, *rest in doc:
        if kind in ("h1", "h2"):
            out.append(f"{'#' * int(kind[1])} {rest[0]}")
        elif kind == "p":
            out.append(rest[0])
        elif kind == "warning":
            out.append(f"> **Warning:** {rest[0]}")
        elif kind == "code":
            out.append(f"```\n{rest[0]}\n```")
        elif kind == "table":
            header, rows = rest
            lines = [header, ["---"] * len(header), *rows]
            cells = [[c.replace("|", "\\|") for c in line] for line in lines]  # |γ| in a cell
            out.append("\n".join("| " + " | ".join(line) + " |" for line in cells))
        elif kind == "figure":
            key, title, caption = rest
            out.append(f"![{title}](figures/{files[key]})\n\n*{title}.* {caption}")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escape text for HTML and turn `code` spans into <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1500px; margin: 2em auto; padding: 0 1em;
       line-height: 1.45; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:last-child { text-align: left; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; }
figure { margin: 2em 0; }
img { max-width: 100%; }
figcaption { max-width: 60em; }
.warning { background: #fff3cd; border-left: 4px solid #d39e00; padding: 0.5em 0.8em; }
"""


def to_html(doc: list[Block], images: dict[str, bytes]) -> str:
    """A self-contained page: every figure is a data URI, nothing refers outside the file."""
    title = next(rest[0] for kind, *rest in doc if kind == "h1")
    out = [
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
    ]
    for kind, *rest in doc:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(rest[0])}</p>")
        elif kind == "warning":
            out.append(f"<p class='warning'><strong>Warning:</strong> {_inline(rest[0])}</p>")
        elif kind == "code":
            out.append(f"<pre><code>{html.escape(rest[0])}</code></pre>")
        elif kind == "table":
            header, rows = rest
            cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in rows
            )
            out.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "figure":
            key, title, caption = rest
            data = base64.b64encode(images[key]).decode("ascii")
            img = f"<img src='data:image/png;base64,{data}' alt='{html.escape(title)}'>"
            out.append(
                f"<figure>{img}"
                f"<figcaption><b>{html.escape(title)}.</b> {_inline(caption)}</figcaption>"
                "</figure>"
            )
    out.append("</body></html>\n")
    return "\n".join(out)
