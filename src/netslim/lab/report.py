"""The lab report: five figures, three tables and how to reproduce the run.

:func:`render_report` reads a lab run folder (see :mod:`netslim.lab.folder`) -- metrics, prune
reports, the sweep, the trained checkpoints -- and writes ``figures/*.png``,
``report.md`` (figures beside it) and ``report.html`` (figures embedded as base64,
so the one file opens anywhere). Nothing is trained or measured here, which is what
``netslim report`` relies on to re-render a finished lab. Where the lab's numbers mean little
(:mod:`netslim.lab.health`), a warning stands at the report's top and goes to the console.

The document fills the skeleton every lab report shares (:mod:`netslim.lab.document`),
which writes it as Markdown and as HTML.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from netslim.checkpoint import read_checkpoint, stored_gammas
from netslim.config import LabConfig, TrainConfig, lam_name
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
from netslim.lab.folder import (
    finetune_dir,
    prune_path,
    read_json,
    read_lab,
    sweep_path,
    train_dir,
)
from netslim.models import VGG_CFGS
from netslim.recipes import warmup_epochs
from netslim.train.runfolder import read_metrics

FIGURES = {  # stable file names under figures/
    "training": "fig1_training.png",
    "gammas": "fig2_gamma_histograms.png",
    "finetune": "fig3_finetuning.png",
    "channels": "fig4_channels.png",
    "sweep": "fig5_prune_sweep.png",
}
# drawn only when the lab stopped its pruned run early or adapted its λ
OPTIONAL_FIGURES = {"control": "fig6_early_pruning_and_lam.png"}
FIGURE_FILES = {**FIGURES, **OPTIONAL_FIGURES}
MAX_LAYER_NAMES = 40  # figure 4 names at most this many groups; deeper nets every k-th
CLOSE = 1.0  # percentage points: "holds up" in the sweep summary means within this of unpruned
# One colour and dash pattern per lab ratio in figure 2 (C3 dotted is the sparsity threshold):
# two thresholds close together stay apart by pattern as well as colour.
THRESHOLD_STYLES = (
    ["C1", "C2", "C4", "C5", "C6"],
    ["--", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 1)), (0, (8, 3))],
)
METHODS = (  # the three ways of pruning without training, as the prune reports name them
    ("acc_masked", "official masking"),
    ("acc_compensated", "bias compensation"),
    ("acc_recalibrated", "BN recalibration"),
)


@dataclass
class LabResults:
    """Everything the report shows, read from a finished lab's run folder."""

    run: Path
    config: LabConfig
    info: dict[str, Any]
    train_config: TrainConfig  # the resolved settings of the first sparsity training
    num_classes: int
    train: dict[float, list[dict[str, Any]]]  # λ -> metrics records
    gammas: dict[float, np.ndarray]  # λ -> all BN γ at the end of training
    prune: dict[float, dict[str, Any]]  # ratio -> PruneReport dict
    sweep: dict[str, Any]
    finetune: dict[float, list[dict[str, Any]]]  # ratio -> metrics records

    @property
    def sparsity_threshold(self) -> float:
        return self.train_config.sparsity_threshold


def load_results(run: str | Path) -> LabResults:
    """Read a finished lab, or raise NetslimError saying what is missing and how to finish it."""
    run = Path(run)
    config, info = read_lab(run)
    missing: list[str] = []

    def metrics(run_dir: Path, epochs: int) -> list[dict[str, Any]]:
        try:
            records = read_metrics(run_dir)
        except ValueError:  # a damaged metrics.jsonl: last.pth holds the same history
            if not (run_dir / "last.pth").exists():
                raise NetslimError(
                    f"{run_dir / 'metrics.jsonl'} is damaged (not one JSON record per line) and "
                    f"{run_dir / 'last.pth'}, which holds the same history, is missing; run the "
                    "lab's command again to redo that stage"
                ) from None
            records = list(read_checkpoint(run_dir / "last.pth")["netslim"]["history"])
        stopped = bool(records) and records[-1].get("stopped_early", False)
        if (len(records) < epochs and not stopped) or not (run_dir / "last.pth").exists():
            missing.append(f"{run_dir} ({len(records)} of {epochs} epochs)")
        return records

    def json_file(path: Path) -> dict[str, Any]:
        if not path.is_file():
            missing.append(str(path))
            return {}
        return read_json(path)

    train = {lam: metrics(train_dir(run, lam), config.epochs) for lam in config.lams}
    prune = {
        r: json_file(prune_path(run, config.prune_lam, r, ".json")).get("prune", {})
        for r in config.ratios
    }
    sweep = json_file(sweep_path(run))
    finetune = {r: metrics(finetune_dir(run, r), config.finetune_epochs) for r in config.ratios}
    if missing:
        raise NetslimError(
            f"the lab in {run} is not finished: {', '.join(missing)} missing; run its command "
            f"again to complete it: {info.get('command', 'see lab.json')}"
        )
    # The γs are read off the tensors: the report builds no network (lab.json, which a
    # folder from elsewhere could fill with any module name, never chooses code to import).
    checkpoints = {lam: read_checkpoint(train_dir(run, lam) / "last.pth") for lam in config.lams}
    first_run = read_json(train_dir(run, config.lams[0]) / "config.json")
    train_config = TrainConfig.from_dict(first_run)
    first = next(iter(checkpoints.values()))
    return LabResults(
        run=run,
        config=config,
        info=info,
        train_config=train_config,
        num_classes=int(first["netslim"]["num_classes"]),
        train=train,
        gammas={lam: stored_gammas(c).numpy() for lam, c in checkpoints.items()},
        prune=prune,
        sweep=sweep,
        finetune=finetune,
    )


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def _column(records: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([r[key] for r in records], dtype=float)


def figure_training(res: LabResults) -> Figure:
    """Figure 1: per λ, accuracy (left axis) and sparsity (right axis) against epoch."""
    fig, axes = panels(len(res.config.lams))
    for i, (ax, lam) in enumerate(zip(axes, res.config.lams)):
        records = res.train[lam]
        epochs = _column(records, "epoch")
        ax.plot(epochs, _column(records, "train_acc"), "o-", color="C0", label="train accuracy")
        ax.plot(
            epochs,
            _column(records, "test_acc"),
            "s--",
            color="C0",
            alpha=0.7,
            label="test accuracy",
        )
        ax.set_ylim(-2, 102)
        epoch_axis(ax)
        right = ax.twinx()
        right.plot(
            epochs,
            100 * _column(records, "sparsity"),
            "^-",
            color="C3",
            label=f"sparsity (share of |γ| < {res.sparsity_threshold:g})",
        )
        right.set_ylim(-2, 102)
        if i == 0:  # the axes are the same in every panel: label them once, on the outside
            ax.set_ylabel("accuracy (%)", color="C0")
        if i == len(axes) - 1:
            right.set_ylabel(f"channels with |γ| < {res.sparsity_threshold:g} (%)", color="C3")
        ax.set_title(f"λ = {lam_name(lam)}")
    handles = axes[0].get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    return fig


def _stop_epoch(records: list[dict[str, Any]]) -> int | None:
    """The epoch after which early pruning stopped sparsity training, or None."""
    return next((r["epoch"] for r in records if r.get("stopped_early")), None)


def _controlled(res: LabResults) -> bool:
    """Whether the lab stopped its prune_lam training early or adapted its λ."""
    c = res.config
    return c.prune_when_stable is not None or c.target_ratio is not None


def figure_control(res: LabResults) -> Figure | None:
    """Figure 6: mask distance (early pruning) and λ per epoch of the pruned run."""
    if not _controlled(res):
        return None
    records = res.train[res.config.prune_lam]
    epochs = _column(records, "epoch")
    fig, (left, right) = panels(2)
    if res.config.prune_when_stable is not None:
        distance = [r.get("mask_distance") for r in records]
        left.plot(epochs, [np.nan if d is None else 100 * d for d in distance], "o-", color="C0")
        left.axhline(100 * res.config.stable_tol, color="grey", ls=":", label="--stable-tol")
        stop = _stop_epoch(records)
        if stop is not None:
            left.axvline(stop, color="C3", ls="--", label=f"stopped after epoch {stop}")
        left.legend(frameon=False)
    left.set_ylabel("channels whose decision changed (%)")
    left.set_title(f"Prune mask at ratio {res.config.prune_when_stable or 0:g}, epoch to epoch")
    epoch_axis(left)
    right.semilogy(epochs, _column(records, "lam"), "s-", color="C2", label="λ")
    right.set_ylabel("λ")
    right.set_title("λ used in each epoch")
    if "gamma_quantile" in records[0]:  # λ auto steered a quantile of |γ|
        twin = right.twinx()
        twin.semilogy(
            epochs,
            _column(records, "gamma_quantile"),
            "o-",
            color="C1",
            label=f"{res.config.target_ratio:g}-quantile of |γ|",
        )
        twin.semilogy(
            epochs,
            _column(records, "gamma_quantile_path"),
            ":",
            color="C1",
            label="its path to the threshold",
        )
        twin.set_ylabel("|γ|")
        right.set_title("λ of each epoch, and the quantile of |γ| it steers")
        handles = [*right.get_legend_handles_labels()[0], *twin.get_legend_handles_labels()[0]]
        twin.legend(handles=handles, frameon=False)
    epoch_axis(right)
    return fig


def figure_gammas(res: LabResults) -> Figure:
    """Figure 2: per λ, the histogram of |γ| on log-spaced bins, one x range for all."""

    def lines(lam: float) -> list[tuple]:
        drawn = [
            (
                res.sparsity_threshold,
                f"sparsity threshold {res.sparsity_threshold:g}",
                {"color": "C3", "linestyle": ":"},
            )
        ]
        if lam == res.config.prune_lam:
            for i, (ratio, report) in enumerate(res.prune.items()):
                color, style = (styles[i % len(styles)] for styles in THRESHOLD_STYLES)
                drawn.append(
                    (
                        report["threshold"],
                        f"prune threshold, ratio {ratio:g}: {report['threshold']:.2g}",
                        {"color": color, "linestyle": style, "linewidth": 1.6},
                    )
                )
        return drawn

    return gamma_panels(
        res.gammas, res.config.lams, lambda lam: f"λ = {lam_name(lam)}", lines, headroom=1.45
    )


def figure_finetune(res: LabResults) -> Figure:
    """Figure 3: per ratio, fine-tuning accuracy against epoch; epoch 0 is right after pruning.

    Epoch 0 is the network fine-tuning starts from (BN-recalibrated, or bias-compensated
    without recalibration), marked apart from the official masking's accuracy there.
    """
    start_label, _ = _start_accuracy(res.config, next(iter(res.prune.values())))
    fig, axes = panels(len(res.config.ratios))
    for ax, ratio in zip(axes, res.config.ratios):
        records, report = res.finetune[ratio], res.prune[ratio]
        epochs = _column(records, "epoch")
        _, start = _start_accuracy(res.config, report)
        ax.plot(epochs, _column(records, "train_acc"), "o-", color="C0", label="train accuracy")
        ax.plot(
            np.r_[0, epochs],
            np.r_[start, _column(records, "test_acc")],
            "s--",
            color="C1",
            label="test accuracy",
        )
        ax.plot(
            0,
            start,
            "*",
            color="C1",
            markersize=14,
            markeredgecolor="k",
            label=f"epoch 0: {start_label}, where fine-tuning starts",
        )
        ax.plot(
            0,
            report["acc_masked"],
            "X",
            color="C3",
            markersize=10,
            markeredgecolor="k",
            label="epoch 0: pruned, official masking",
        )
        ax.axhline(
            report["acc_unpruned"],
            color="k",
            linestyle=":",
            label="sparse model before pruning (test)",
        )
        ax.set_ylim(-2, 102)
        ax.set_ylabel("accuracy (%)")
        epoch_axis(ax)
        ticks = [int(e) for e in ax.get_xticks() if 0 <= e <= epochs.max()]
        ax.set_xticks(ticks, [f"{t}" if t else "0\n(pruned)" for t in ticks])
        ax.set_title(f"ratio {ratio:g}: {100 * report['pruned_share']:.0f}% of channels removed")
    fig.legend(
        handles=axes[0].get_legend_handles_labels()[0],
        loc="outside lower center",
        ncols=2,
        frameon=False,
        fontsize="small",
    )
    return fig


def _start_accuracy(config: LabConfig, report: dict[str, Any]) -> tuple[str, float]:
    """What fine-tuning starts from (the saved pruned network) and its test accuracy."""
    if report.get("acc_recalibrated") is None:
        return "pruned + bias compensation", report["acc_compensated"]
    return f"pruned + BN recalibration ({config.recalibrate} batches)", report["acc_recalibrated"]


def figure_channels(res: LabResults) -> Figure:
    """Figure 4: per ratio, channels kept in each channel group against the original count.

    Groups are named by the BatchNorm that scores them (in a VGG, one per conv layer; in a
    ResNet, a residual stream is one group); deep networks show every k-th name.
    """
    groups = len(next(iter(res.prune.values()))["layers"])
    fig, axes = panels(len(res.config.ratios), width=min(max(5.0, 0.14 * groups), 14.0), height=4.2)
    for ax, ratio in zip(axes, res.config.ratios):
        report = res.prune[ratio]
        names = [name for name, _, _ in report["layers"]]
        kept = np.array([k for _, k, _ in report["layers"]])
        total = np.array([t for _, _, t in report["layers"]])
        x = np.arange(len(kept))
        ax.bar(x, total, color="0.85", edgecolor="0.6", label="original")
        ax.bar(x, kept, color="C0", label="kept")
        if len(kept) <= 20:  # beyond that the numbers overlap; the bars still tell
            for xi, k in zip(x, kept):
                ax.annotate(
                    str(k),
                    (xi, k),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 1),
                    textcoords="offset points",
                )
        step = -(-len(x) // MAX_LAYER_NAMES)  # every step-th name: at most MAX_LAYER_NAMES
        ax.set_xticks(x[::step], names[::step], rotation=90, fontsize=7)
        ax.set_xlim(-0.7, len(x) - 0.3)
        ax.set_xlabel("channel group, named by its BatchNorm layer")
        ax.set_ylabel("channels")
        ax.set_title(f"ratio {ratio:g}: {kept.sum()} of {total.sum()} channels kept")
        ax.legend(fontsize="small", loc="upper left")
    return fig


def figure_sweep(res: LabResults) -> Figure:
    """Figure 5: test accuracy against prune ratio, without fine-tuning, three ways."""
    points = res.sweep["points"]
    ratios = np.array([p["ratio"] for p in points])
    fig = Figure(figsize=(8.5, 4.4), layout="constrained")
    ax = fig.subplots()
    for (key, label), marker in zip(METHODS, "os^"):
        if all(p[key] is not None for p in points):
            ax.plot(ratios, [p[key] for p in points], marker=marker, label=label)
    ax.axhline(points[0]["acc_unpruned"], color="k", linestyle=":", label="unpruned sparse model")
    ax.axhline(100 / res.num_classes, color="0.5", linestyle="--", label="chance")
    floored = [p["ratio"] for p in points if p["floored"]]
    if floored:
        ax.axvspan(
            min(floored) - 0.02,
            ratios.max() + 0.02,
            color="0.9",
            zorder=0,
            label="per-layer floor active",
        )
    ax.set_xlabel("prune ratio (share of all channels removed, by global |γ| threshold)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"Pruning the λ = {lam_name(res.config.prune_lam)} model without fine-tuning")
    ax.grid(alpha=0.3)
    # outside the axes: the curves can fill any corner of the plot
    fig.legend(
        handles=ax.get_legend_handles_labels()[0], loc="outside right upper", fontsize="small"
    )
    return fig


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def _acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def training_table(res: LabResults) -> tuple[list[str], list[list[str]]]:
    """One row per λ: the last epoch's accuracies and sparsity, and the best test accuracy."""
    header = [
        "λ",
        "train acc (%)",
        "test acc (%)",
        "best test acc (%)",
        f"sparsity (|γ| < {res.sparsity_threshold:g}, %)",
        "median |γ|",
    ]
    rows = []
    for lam in res.config.lams:
        last = res.train[lam][-1]
        best = max(r["test_acc"] for r in res.train[lam])
        median = np.median(np.abs(res.gammas[lam]))
        rows.append(
            [
                lam_name(lam),
                _acc(last["train_acc"]),
                _acc(last["test_acc"]),
                _acc(best),
                f"{100 * last['sparsity']:.1f}",
                f"{median:.3g}",
            ]
        )
    return header, rows


def accuracy_table(res: LabResults) -> tuple[list[str], list[list[str]]]:
    """One row per (λ, ratio): test accuracy before, right after pruning and after fine-tuning."""
    header = [
        "λ",
        "ratio",
        "channels removed (%)",
        "sparse model",
        "masked (official)",
        "compensated",
        "recalibrated",
        "fine-tuned (last epoch)",
        "fine-tuned (best)",
    ]
    rows = []
    for ratio in res.config.ratios:
        p, tuned = res.prune[ratio], res.finetune[ratio]
        rows.append(
            [
                lam_name(res.config.prune_lam),
                f"{ratio:g}",
                f"{100 * p['pruned_share']:.1f}",
                _acc(p["acc_unpruned"]),
                _acc(p["acc_masked"]),
                _acc(p["acc_compensated"]),
                _acc(p["acc_recalibrated"]),
                _acc(tuned[-1]["test_acc"]),
                _acc(max(r["test_acc"] for r in tuned)),
            ]
        )
    return header, rows


def size_table(res: LabResults) -> tuple[list[str], list[list[str]]]:
    """One row for the unpruned network, then one per (λ, ratio): params, MACs, cfg."""
    header = ["λ", "ratio", "params", "params removed (%)", "MACs", "MACs removed (%)", "cfg"]
    first = next(iter(res.prune.values()))
    original = str(VGG_CFGS.get(res.config.arch, "-")).replace("'", "")
    rows = [
        [
            "",
            "0 (unpruned)",
            f"{first['params_before']:,}",
            "0.0",
            f"{first['macs_before']:,}",
            "0.0",
            original,
        ]
    ]
    for ratio in res.config.ratios:
        p = res.prune[ratio]
        fewer_params = 100 * (1 - p["params_after"] / p["params_before"])
        fewer_macs = 100 * (1 - p["macs_after"] / p["macs_before"])
        rows.append(
            [
                lam_name(res.config.prune_lam),
                f"{ratio:g}",
                f"{p['params_after']:,}",
                f"{fewer_params:.1f}",
                f"{p['macs_after']:,}",
                f"{fewer_macs:.1f}",
                str(p["cfg"] or "-").replace("'", ""),
            ]
        )
    return header, rows


def sweep_summary(res: LabResults) -> str:
    """Where each way of pruning breaks: the largest ratio up to which accuracy holds up."""
    points = res.sweep["points"]
    unpruned = points[0]["acc_unpruned"]
    parts = []
    for key, label in METHODS:
        if any(p[key] is None for p in points):
            continue
        held = f"below {points[0]['ratio']:g}"
        for p in points:  # sorted by ratio
            if p[key] < unpruned - CLOSE:
                break
            held = f"{p['ratio']:g}"
        parts.append(f"{label}: {held}")
    return (
        f"Largest ratio up to which test accuracy stays within {CLOSE:g} point of the "
        f"unpruned model's {unpruned:.2f}%: {'; '.join(parts)}."
    )


# --------------------------------------------------------------------------------------
# The document, as blocks, and its Markdown and HTML forms
# --------------------------------------------------------------------------------------


def build_document(res: LabResults) -> list[Block]:
    """The report's content in order; figures are referred to by their key in FIGURES."""
    c = res.config
    lams = ", ".join(lam_name(x) for x in c.lams)
    ratios = ", ".join(f"{r:g}" for r in c.ratios)
    floored = [f"{p['ratio']:g}" for p in res.sweep["points"] if p["floored"]]
    return slimming_document(
        title=f"Network slimming lab: {c.arch} on {c.dataset}",
        summary=f"Sparsity training at λ = {lams} ({_epochs(c.epochs)} each, same initial weights, "
        f"recipe '{c.recipe}'), pruning of the λ = {lam_name(c.prune_lam)} model at "
        f"ratios {ratios}, and {_epochs(c.finetune_epochs)} of fine-tuning of each pruned "
        f"network.{_control_sentence(res)} Accuracies are in %, on the test set"
        f"{f' (its first {c.test_size} images)' if c.test_size else ''}.",
        warnings=run_warnings(res),
        training=[
            ("table", *training_table(res)),
            (
                "figure",
                "training",
                "Figure 1: accuracy and sparsity during sparsity training",
                f"Per λ: train and test accuracy (left axis) and the share of BN channels whose "
                f"scaling factor |γ| is below {res.sparsity_threshold:g} (right axis) after each "
                f"epoch. {_schedule_sentence(res.train_config)}",
            ),
            (
                "figure",
                "gammas",
                "Figure 2: BN scaling factors at the end of training",
                "Histogram of |γ| of all BN channels, on a logarithmic axis shared by all panels: a "
                "large λ pushes many γ down by orders of magnitude (to 1e-5 and below), which a "
                "linear axis would squeeze into one bar at 0, while the log axis shows every "
                "distribution's shape and lets the panels be compared directly. "
                "Values below 1e-8 (exact zeros included) are counted at 1e-8. Dotted: the sparsity "
                "threshold of figure 1; dashed and dash-dotted, one colour each: the global prune "
                "thresholds of the lab's ratios (channels left of a line are removed).",
            ),
            *(
                [
                    (
                        "figure",
                        "control",
                        "Figure 6: early pruning and λ of the pruned run",
                        "Left: the share of BN channels whose keep/remove decision at the early-pruning "
                        "ratio changed since the previous epoch; sparsity training stops once it stays at "
                        "most --stable-tol for --stable-epochs epochs in a row. Right: the λ of each "
                        "epoch (adapted by --target-ratio when set).",
                    )
                ]
                if _controlled(res)
                else []
            ),
        ],
        pruning_title=f"Pruning the λ = {lam_name(c.prune_lam)} model",
        pruning=[
            (
                "p",
                "Test accuracy (%) of the sparse model, right after pruning -- with the "
                "official masking (pruned γ and β zeroed), with the pruned channels' constant "
                "output folded into the next layer (bias compensation), and with compensation "
                f"plus BN statistics re-estimated on {c.recalibrate} batches of 128 training "
                "images (recalibration; n/a when off) -- and after fine-tuning the network "
                "saved by pruning (the recalibrated one, or the compensated one without "
                "recalibration).",
            ),
            ("table", *accuracy_table(res)),
            (
                "p",
                "Size of each network: parameters, multiply-accumulates per 32x32 image, and the "
                "pruned cfg of a VGG (channels per conv layer, M = max-pool; '-' for other "
                "networks).",
            ),
            ("table", *size_table(res)),
            (
                "figure",
                "finetune",
                "Figure 3: fine-tuning the pruned networks",
                "Per ratio: train and test accuracy after each fine-tuning epoch. Epoch 0 (star) is "
                "the network fine-tuning starts from, right after pruning: "
                + ("with BN recalibration, " if c.recalibrate else "with bias compensation, ")
                + "not the official masking's accuracy, which is marked apart (X). The dotted line "
                "is the sparse model's test accuracy before pruning, the level fine-tuning has to "
                "recover.",
            ),
            (
                "figure",
                "channels",
                "Figure 4: channels kept per layer",
                "Per ratio: channels of each channel group (a conv layer's outputs; in a residual "
                "network, a whole residual stream), named by the BatchNorm layer that scales it, "
                f"before pruning (grey) and kept (blue); a deep network names every k-th group (at "
                f"most {MAX_LAYER_NAMES}). One global threshold on |γ| decides, so layers are pruned "
                "unevenly.",
            ),
            (
                "figure",
                "sweep",
                "Figure 5: where pruning breaks the network",
                f"Test accuracy right after pruning the λ = {lam_name(c.prune_lam)} model at each "
                "ratio, without any fine-tuning. "
                + (
                    f"At ratio{'s' if len(floored) > 1 else ''} {', '.join(floored)} the per-layer floor (1% of each layer, at least "
                    "one channel) kept some layers alive, so slightly fewer channels than asked were "
                    "removed (shaded). "
                    if floored
                    else ""
                )
                + sweep_summary(res),
            ),
        ],
        reproduce=[
            ("p", "This command reproduces the lab (it continues the run folder if it exists):"),
            ("code", res.info.get("command", c.command(res.run))),
            ("p", "Its settings, as stored in `lab.json`:"),
            ("code", json.dumps(asdict(c), indent=2)),
            ("p", "Software and hardware that ran it (one row per environment that ran a part):"),
            ("table", *_software_table(res.info.get("software", []))),
            (
                "p",
                "Files: `train/lam=<λ>/` and `finetune/ratio=<r>/` hold each run's "
                "`metrics.jsonl`, `config.json`, `last.pth` and `best.pth`; `prune/` the pruned "
                "networks and their reports; `sweep.json` the data of figure 5. "
                "`netslim report <run folder>` re-renders this report from them.",
            ),
        ],
    )


def run_warnings(res: LabResults) -> list[str]:
    """What makes the lab's numbers mean little (:mod:`netslim.lab.health`): γs left dense
    at the largest ratio pruned, a prune threshold among tied γs, an unpruned model at
    chance."""
    c = res.config
    last = res.train[c.prune_lam][-1]
    total = len(res.gammas[c.prune_lam])
    first = next(iter(res.prune.values()))
    return health.found(
        [
            health.dense(
                last["sparsity"],
                max(c.ratios),
                res.sparsity_threshold,
                lam_name(c.prune_lam),
                auto="",  # the lab's --target-ratio alone turns λ auto on
            ),
            *(
                health.tied(
                    p.get("tie_break"), total, p["threshold"], ratio, res.sparsity_threshold
                )
                for ratio, p in res.prune.items()
            ),
            health.near_chance(first["acc_unpruned"], res.num_classes),
        ]
    )


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def _schedule_sentence(config: TrainConfig) -> str:
    if config.schedule == "step":
        return "The learning rate drops tenfold at 50% and 75% of the epochs."
    return (
        f"The learning rate rises linearly over the first {warmup_epochs(config):g} "
        "epochs, then falls linearly to 0 by the last epoch set."
    )


def _control_sentence(res: LabResults) -> str:
    """How λ auto and early pruning changed the pruned run ("" when neither was on)."""
    c = res.config
    parts = []
    if c.target_ratio is not None:
        parts.append(
            f"λ was adapted by λ auto toward a share of "
            f"{c.target_ratio:g} of |γ| below {res.sparsity_threshold:g}"
        )
    stop = _stop_epoch(res.train[c.prune_lam])
    if stop is not None:
        parts.append(
            f"training stopped after epoch {stop}, when the prune mask at ratio "
            f"{c.prune_when_stable:g} had settled"
        )
    return f" In the λ = {lam_name(c.prune_lam)} run, {' and '.join(parts)}." if parts else ""


def _software_table(envs: list[dict[str, str]]) -> tuple[list[str], list[list[str]]]:
    keys = ["python", "torch", "numpy", "matplotlib", "netslim", "device", "autocast", "platform"]
    return keys, [[env.get(k, "") for k in keys] for env in envs]


FIGURE_MAKERS = {
    "training": figure_training,
    "gammas": figure_gammas,
    "finetune": figure_finetune,
    "channels": figure_channels,
    "sweep": figure_sweep,
    "control": figure_control,
}


def render_report(run: str | Path) -> Path:
    """Write ``figures/*.png``, ``report.md`` and ``report.html`` for the lab in ``run``,
    and warn (:func:`run_warnings`) where its numbers mean little.

    Returns the path of ``report.html``. Raises NetslimError if the lab is not finished.
    """
    res = load_results(run)
    figures = {key: make(res) for key, make in FIGURE_MAKERS.items()}
    health.warn(run_warnings(res))  # on the console too, as the report's top says
    return write_report(res.run, build_document(res), figures, FIGURE_FILES)
