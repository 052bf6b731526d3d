"""The report of a YOLO lab (:mod:`netslim.yolo.lab`): the seed lab's figures, in mAP.

:func:`render_report` reads the lab folder -- ``sparsity.jsonl`` of every run, the prune
reports, the trained ``last.pt`` files -- and writes ``figures/*.png``, ``report.md`` and
``report.html``, filling the skeleton every lab report shares (:mod:`netslim.lab.document`). Nothing is trained or measured here.

"mAP" is Ultralytics' mAP50-95 on the data set's val split: of the boxes for a detector,
of the masks for a segmenter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from netslim.config import YoloLab
from netslim.engine.sparsity import bn_gammas
from netslim.errors import NetslimError
from netslim.lab import health
from netslim.lab.document import (
    Block,
    epoch_axis,
    gamma_panels,
    panels,
    slimming_document,
    write_report,
)
from netslim.yolo import seam
from netslim.yolo.files import read_model
from netslim.yolo.folder import finetune_dir, lam_text, pruned_path, read_lab, train_dir
from netslim.yolo.run import read_sparsity

FIGURES = {
    "training": "fig1_training.png",
    "gammas": "fig2_gamma_histograms.png",
    "sweep": "fig3_prune_sweep.png",
    "finetune": "fig4_finetuning.png",
}
# |γ| under it counts as sparse in sparsity.jsonl: netslim.yolo.train.train's default,
# which the lab trains with
SPARSITY_THRESHOLD = 0.01
METHODS = (
    ("official", "official (threshold and copy)"),
    ("compensated", "bias compensation"),
    ("recalibrated", "BN recalibration"),
)


@dataclass
class YoloResults:
    """What the report shows, read from a finished YOLO lab folder."""

    out: Path
    lab: YoloLab
    metric: str  # the prune reports' name of the mAP shown: "mAP50-95" or "mask mAP50-95"
    key: str  # Ultralytics' name of it in results.csv and sparsity.jsonl
    train: dict[float | str, list[dict[str, Any]]]  # λ (or "auto") -> per-epoch records
    gammas: dict[float | str, np.ndarray]  # λ -> |γ| of last.pt, the network pruned
    prune: dict[tuple[float | str, float], dict[str, Any]]  # (λ, ratio) -> prune report
    finetune: dict[float, list[dict[str, Any]]]  # ratio -> per-epoch records of prune_lam


def load_results(out: str | Path) -> YoloResults:
    out = Path(out)
    lab = read_lab(out)
    train, gammas, prune, finetune = {}, {}, {}, {}
    for lam in lab.lams:
        last = train_dir(out, lam) / "weights" / "last.pt"
        if not last.is_file():
            raise NetslimError(f"the lab in {out} is not finished: {last} is missing")
        train[lam] = read_sparsity(train_dir(out, lam))
        gammas[lam] = bn_gammas(read_model(last)).abs().numpy()
        for ratio in lab.all_ratios():
            report = pruned_path(out, lam, ratio).with_suffix(".json")
            if not report.is_file():
                raise NetslimError(f"the lab in {out} is not finished: {report} is missing")
            prune[lam, ratio] = json.loads(report.read_text())["prune"]
    for ratio in lab.ratios:
        finetune[ratio] = read_sparsity(finetune_dir(out, lab.prune_lam, ratio))
    first = next(iter(prune.values()))["measured"]["unpruned"]
    metric = "mask mAP50-95" if "mask mAP50-95" in first else "mAP50-95"
    key = seam.metric_key(metric)
    return YoloResults(out, lab, metric, key, train, gammas, prune, finetune)


def best_record(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch Ultralytics keeps as best.pt: the highest fitness."""
    if not records:
        return None
    return max(records, key=seam.fitness)


def _map(report: dict[str, Any], way: str, metric: str) -> float:
    return report["measured"][way][metric]


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def figure_training(res: YoloResults) -> Figure:
    """Per λ: mAP (left axis) and the share of sparse γ (right axis) against epoch."""
    fig, axes = panels(len(res.lab.lams))
    for ax, lam in zip(axes, res.lab.lams):
        records = res.train[lam]
        epochs = [r["epoch"] for r in records]
        ax.plot(epochs, [r.get(res.key, np.nan) for r in records], color="C0", marker=".")
        ax.set_ylabel(res.metric, color="C0")
        epoch_axis(ax)
        right = ax.twinx()
        right.plot(epochs, [100 * r["sparsity"] for r in records], color="C1", linestyle="--")
        right.set_ylabel("sparse γ (%)", color="C1")
        right.set_ylim(0, 100)
        ax.set_title(f"λ = {lam_text(lam)}")
    return fig


def figure_gammas(res: YoloResults) -> Figure:
    """Per λ: the histogram of |γ| of last.pt (log bins), with the prune thresholds."""

    def lines(lam: float) -> list[tuple]:
        return [
            (
                res.prune[lam, ratio]["threshold"],
                f"prune threshold at {ratio:g}: {res.prune[lam, ratio]['threshold']:.3g}",
                {"color": f"C{i + 1}", "linestyle": "--"},
            )
            for i, ratio in enumerate(res.lab.ratios)
        ]

    return gamma_panels(
        res.gammas, res.lab.lams, lambda lam: f"λ = {lam_text(lam)}", lines, headroom=1.3
    )


def figure_finetune(res: YoloResults) -> Figure:
    """Per fine-tuned ratio: mAP against epoch, with the unpruned run and right after pruning."""
    fig, axes = panels(len(res.lab.ratios))
    unpruned = best_record(res.train[res.lab.prune_lam]) or {}
    for ax, ratio in zip(axes, res.lab.ratios):
        records, report = res.finetune[ratio], res.prune[res.lab.prune_lam, ratio]
        ax.plot(
            [r["epoch"] for r in records],
            [r.get(res.key, np.nan) for r in records],
            color="C0",
            marker=".",
            label="fine-tuning",
        )
        ax.axhline(unpruned.get(res.key, np.nan), color="C2", linestyle="--", label="unpruned")
        for way, color in (("recalibrated", "C3"), ("official", "C4")):
            ax.axhline(
                _map(report, way, res.metric),
                color=color,
                linestyle=":",
                label=f"right after pruning, {way}",
            )
        ax.set_ylabel(res.metric)
        ax.set_title(f"λ = {lam_text(res.lab.prune_lam)}, {ratio:.0%} of BN channels pruned")
        epoch_axis(ax)
        ax.legend(fontsize="small")
    return fig


def figure_sweep(res: YoloResults) -> Figure:
    """Per λ: mAP right after pruning against the ratio, the three ways."""
    fig, axes = panels(len(res.lab.lams))
    ratios = res.lab.all_ratios()
    for ax, lam in zip(axes, res.lab.lams):
        for i, (way, label) in enumerate(METHODS):
            ax.plot(
                ratios,
                [_map(res.prune[lam, r], way, res.metric) for r in ratios],
                marker="o",
                color=f"C{i}",
                label=label,
            )
        unpruned = _map(res.prune[lam, ratios[0]], "unpruned", res.metric)
        ax.axhline(unpruned, color="k", linestyle="--", linewidth=1, label="unpruned")
        ax.set_xlabel("share of BN channels pruned")
        ax.set_ylabel(f"{res.metric}, no fine-tuning")
        ax.set_title(f"λ = {lam_text(lam)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


FIGURE_MAKERS = {
    "training": figure_training,
    "gammas": figure_gammas,
    "finetune": figure_finetune,
    "sweep": figure_sweep,
}


# --------------------------------------------------------------------------------------
# Tables and the document
# --------------------------------------------------------------------------------------


def wall_seconds(run: Path) -> float | None:
    """Training time of an Ultralytics run, from the cumulative ``time`` of its results.csv
    (which starts again from 0 when a run is resumed: each restart adds its own)."""
    times = seam.results_column(run, seam.TIME_COLUMN)
    if times is None:
        return None
    total, previous = 0.0, 0.0
    for now in times:
        total += now - previous if now >= previous else now
        previous = now
    return total


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def training_table(res: YoloResults) -> tuple[list[str], list[list[str]]]:
    header = [
        "λ",
        "epochs",
        f"best {res.metric} (epoch)",
        f"last {res.metric} (pruned)",
        "sparse γ (last)",
        "wall time",
    ]
    rows = []
    for lam in res.lab.lams:
        records, best = res.train[lam], best_record(res.train[lam]) or {}
        last = records[-1] if records else {}
        rows.append(
            [
                _lam_cell(lam, last),
                str(len(records)),
                f"{best.get(res.key, np.nan):.4f} ({best.get('epoch', '-')})",
                f"{last.get(res.key, np.nan):.4f}",
                f"{100 * last['sparsity']:.1f}%" if last else "n/a",
                _minutes(wall_seconds(train_dir(res.out, lam))),
            ]
        )
    return header, rows


def pruning_table(res: YoloResults) -> tuple[list[str], list[list[str]]]:
    header = [
        "λ",
        "ratio",
        "BN channels removed",
        "params",
        "MACs",
        "unpruned",
        "official",
        "compensated",
        "recalibrated",
        "fine-tuned",
    ]
    rows = []
    for (lam, ratio), report in res.prune.items():
        tuned = ""
        if lam == res.lab.prune_lam and ratio in res.lab.ratios:
            best = best_record(res.finetune[ratio]) or {}
            seconds = wall_seconds(finetune_dir(res.out, lam, ratio))
            tuned = (
                f"{best.get(res.key, np.nan):.4f} ({_epochs(len(res.finetune[ratio]))}, "
                f"{_minutes(seconds)})"
            )
        rows.append(
            [
                lam_text(lam),
                f"{ratio:g}",
                f"{report['pruned_share']:.1%}",
                f"{report['params_after'] / 1e6:.2f}M ({report['params_after'] / report['params_before']:.0%})",
                f"{report['macs_after'] / 1e9:.3f}G ({report['macs_after'] / report['macs_before']:.0%})",
                *(
                    f"{_map(report, w, res.metric):.4f}"
                    for w in ("unpruned", "official", "compensated", "recalibrated")
                ),
                tuned,
            ]
        )
    return header, rows


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' * (n != 1)}"


def _lam_cell(lam: float | str, last: dict[str, Any]) -> str:
    """λ in the training table; λ auto's with the λ of its last epoch."""
    if lam == "auto" and "lam" in last:
        return f"auto (last epoch {last['lam']:.3g})"
    return lam_text(lam)


def _control_sentence(res: YoloResults) -> str:
    """How λ auto and early stopping steered the runs ("" when neither was on)."""
    lab, text = res.lab, ""
    if lab.target_ratio is not None:
        text += (
            f"In the auto run, λ auto set each epoch's λ to bring {lab.target_ratio:g} of |γ| "
            f"under {SPARSITY_THRESHOLD:g}. "
        )
    stop = next((r["epoch"] for r in res.train[lab.prune_lam] if r.get("stopped_early")), None)
    if stop is not None:
        text += (
            f"The λ = {lam_text(lab.prune_lam)} run stopped after epoch {stop}, once its prune "
            f"mask at {lab.prune_when_stable:g} had settled. "
        )
    return text


def run_warnings(res: YoloResults) -> list[str]:
    """What makes the lab's numbers mean little (:mod:`netslim.lab.health`): γs left dense
    at the largest ratio fine-tuned, a prune threshold among tied γs, an unpruned mAP too
    low to compare."""
    lab = res.lab
    records = res.train[lab.prune_lam]
    sparsity = records[-1]["sparsity"] if records else 0.0
    total = len(res.gammas[lab.prune_lam])
    unpruned = {
        f"at λ = {lam_text(lam)}": _map(report, "unpruned", res.metric)
        for (lam, ratio), report in res.prune.items()
        if ratio == lab.all_ratios()[0]
    }
    return health.found(
        [
            health.dense(sparsity, max(lab.ratios), SPARSITY_THRESHOLD, lam_text(lab.prune_lam)),
            *(
                health.tied(report.get("tie_break"), total, report["threshold"], ratio)
                for (lam, ratio), report in res.prune.items()
                if lam == lab.prune_lam and ratio in lab.ratios
            ),
            health.low_map(unpruned, res.metric),
        ]
    )


def build_document(res: YoloResults) -> list[Block]:
    lab = res.lab
    return slimming_document(
        title=f"Network slimming of {lab.model} on {Path(lab.data).name}",
        summary=(
            f"Sparsity training at λ in {{{', '.join(map(lam_text, lab.lams))}}} for "
            f"{_epochs(lab.epochs)} by Ultralytics' trainer at {lab.image_size} pixels, pruning of each "
            f"run's final network at {', '.join(f'{r:g}' for r in lab.all_ratios())} of its BatchNorm "
            f"channels, and fine-tuning of the λ = {lam_text(lab.prune_lam)} run pruned at "
            f"{', '.join(f'{r:g}' for r in lab.ratios)} for {_epochs(lab.finetune_epochs)}. "
            f"{_control_sentence(res)}{res.metric} by Ultralytics' validator on the val split."
        ),
        warnings=run_warnings(res),
        training=[
            ("table", *training_table(res)),
            (
                "figure",
                "training",
                "Figure 1: training",
                f"{res.metric} of each epoch's EMA model "
                "(left axis) and the share of BN γ under the sparsity threshold (right axis).",
            ),
            (
                "figure",
                "gammas",
                "Figure 2: |γ| after training",
                "Histogram of |γ| of every "
                "run's final network (the one pruned) on a log scale, with the global prune thresholds.",
            ),
        ],
        pruning_title="Pruning and fine-tuning",
        pruning=[
            (
                "p",
                "Right after pruning, three ways: official (threshold and copy, what the public "
                "YOLO-slimming repositories do), with the pruned channels' constant output folded "
                f"into the next layers (compensated), and then BatchNorm statistics re-estimated on "
                f"{lab.recalibrate} batch{'es' * (lab.recalibrate != 1)} of {lab.batch_size} training images (recalibrated: the network saved).",
            ),
            ("table", *pruning_table(res)),
            (
                "figure",
                "sweep",
                "Figure 3: pruning without fine-tuning",
                f"{res.metric} right after pruning against the share of BN channels removed.",
            ),
            (
                "figure",
                "finetune",
                "Figure 4: fine-tuning",
                f"{res.metric} per fine-tuning epoch, against the unpruned run and right after pruning.",
            ),
        ],
        reproduce=[("code", lab.command or "(the lab was started from Python)")],
    )


def render_report(out: str | Path) -> Path:
    """Write ``figures/*.png``, ``report.md`` and ``report.html`` of the YOLO lab in ``out``,
    and warn (:func:`run_warnings`) where its numbers mean little; returns the path of
    ``report.html``."""
    res = load_results(out)
    figures = {key: make(res) for key, make in FIGURE_MAKERS.items()}
    health.warn(run_warnings(res))  # on the console too, as the report's top says
    return write_report(res.out, build_document(res), figures, FIGURES)
