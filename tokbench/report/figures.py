"""The page's figures, drawn with matplotlib's Agg canvas (no pyplot state, no display).

Each ``draw_*`` function takes the report's tables (``ReportTables``) and returns a
``Figure``, or a sentence saying why there is nothing to draw yet. Which figures the page
shows, in what order, with what title and caption, is data: ``dashboards/figures.yaml``
names these functions by their ``draw`` key.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tokbench.fileio import atomic_path, write_atomic
from tokbench.report.stats import EFFECT_FACTORS
from tokbench.training.metrics import draw_confusion_matrix

# Colours: tokenizers blue, the logistic-regression baseline grey, ASHA stops red.
TOKENIZER_COLOUR = "#3a6ea5"
BASELINE_COLOUR = "#8c8c8c"
VAL_COLOUR = "#e08a1e"
STOPPED_COLOUR = "#c0392b"
PNG_DPI = 200
FACTOR_NAMES = {"fg": "Fg (gene identity)", "fe": "Fe (expression)", "fc": "Fc preset", "order": "Fc order",
                "select": "Fc select", "combine": "Fc combine"}


@dataclass
class ReportTables:
    """The tables the figures draw from (built by ``page.build_tables``)."""

    trials: pd.DataFrame
    curves: pd.DataFrame
    board: pd.DataFrame
    heatmap: pd.DataFrame
    effects: pd.DataFrame
    pairwise: pd.DataFrame
    compute: pd.DataFrame
    best: Optional[str]
    best_trial: Optional[pd.Series]
    confusion: Optional[pd.DataFrame]
    per_class: Optional[pd.DataFrame]


Drawn = Union[Figure, str]


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas, sized in inches."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label(value: float, digits: int = 3) -> str:
    return "missing" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def draw_leaderboard(t: ReportTables) -> Drawn:
    """Test MCC (mean ± sd over seeds) per tokenizer as bars, best validation MCC as a
    diamond beside each: the distance between them is the cross-tissue gap."""
    board = t.board
    if board.empty:
        return "No trial has finished yet."
    board = board.iloc[::-1]  # best on top
    fig = new_figure(8.0, 1.2 + 0.38 * len(board))
    ax = fig.add_subplot()
    y = np.arange(len(board))
    means = board["test_mcc_mean"].astype(float).to_numpy()
    colours = [BASELINE_COLOUR if b else TOKENIZER_COLOUR for b in board["baseline"]]
    ax.barh(y, np.nan_to_num(means, nan=0.0), xerr=board["test_mcc_sd"].astype(float).fillna(0).to_numpy(),
            color=colours, height=0.6, capsize=3, label="test MCC (held-out tissue)")
    ax.scatter(board["val_mcc_mean"].astype(float), y, marker="D", color=VAL_COLOUR, zorder=3,
               label="best validation MCC")
    for yi, mean in zip(y, means):
        if math.isnan(mean):
            ax.text(0, yi, " missing", va="center", fontsize=8, color=STOPPED_COLOUR)
    ax.set_yticks(y, labels=board["tokenizer"], fontsize=8)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("Matthews correlation (mean ± sd over seeds)")
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return fig


def draw_heatmap(t: ReportTables) -> Drawn:
    """Mean test MCC over Fg (rows) x Fc preset (columns), one panel per Fe, on one colour
    scale; cells the sweep did not run stay blank, missing scores are labelled."""
    grid = t.heatmap
    if grid.empty:
        return "No tokenizer (other than the baseline) has finished yet."
    fes = sorted(grid["fe"].unique())
    fgs = sorted(grid["fg"].unique())
    fcs = sorted(grid["fc"].unique())
    values = grid["test_mcc_mean"].astype(float)
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.05, vmax + 0.05
    fig = new_figure(1.2 + len(fes) * (1.0 + 1.1 * len(fcs)), 1.4 + 0.6 * len(fgs))
    axes = fig.subplots(1, len(fes), squeeze=False)[0]
    image = None
    for ax, fe in zip(axes, fes):
        panel = grid[grid["fe"] == fe].pivot_table(index="fg", columns="fc", values="test_mcc_mean", aggfunc="first", dropna=False)
        panel = panel.reindex(index=fgs, columns=fcs)
        ran = grid[grid["fe"] == fe].set_index(["fg", "fc"]).index
        image = ax.imshow(panel.to_numpy(dtype=float), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for i, fg in enumerate(fgs):
            for j, fc in enumerate(fcs):
                if (fg, fc) not in ran:
                    continue
                value = panel.loc[fg, fc]
                colour = "white" if not math.isnan(value) and value < (vmin + vmax) / 2 else "black"
                ax.text(j, i, _label(value), ha="center", va="center", fontsize=8,
                        color=STOPPED_COLOUR if math.isnan(value) else colour)
        ax.set_xticks(range(len(fcs)), labels=fcs, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(fgs)), labels=fgs, fontsize=8)
        ax.set_title(f"Fe = {fe}", fontsize=9)
        ax.set_xlabel("Fc preset", fontsize=8)
    axes[0].set_ylabel("Fg", fontsize=8)
    fig.colorbar(image, ax=list(axes), label="test MCC", shrink=0.9)
    return fig


def draw_main_effects(t: ReportTables) -> Drawn:
    """Mean test MCC per choice of each tokenizer part (± sd over the tokenizers using it),
    with the baseline's mean as a dashed reference line."""
    effects = t.effects
    if effects.empty:
        return "No tokenizer (other than the baseline) has finished yet."
    factors = [f for f in EFFECT_FACTORS if f in set(effects["factor"])]
    fig = new_figure(2.3 * len(factors) + 0.6, 3.2)
    axes = fig.subplots(1, len(factors), sharey=True, squeeze=False)[0]
    baseline = t.board[t.board["baseline"].astype(bool)]["test_mcc_mean"].astype(float)
    for ax, factor in zip(axes, factors):
        rows = effects[effects["factor"] == factor]
        x = np.arange(len(rows))
        ax.errorbar(x, rows["test_mcc_mean"].astype(float), yerr=rows["test_mcc_sd"].astype(float).fillna(0),
                    fmt="o", color=TOKENIZER_COLOUR, capsize=3)
        for xi, value in zip(x, rows["test_mcc_mean"].astype(float)):
            if math.isnan(value):
                ax.text(xi, 0, "missing", rotation=90, ha="center", fontsize=7, color=STOPPED_COLOUR)
        for value in baseline:
            if not math.isnan(value):
                ax.axhline(value, color=BASELINE_COLOUR, linestyle="--", linewidth=1)
        ax.set_xticks(x, labels=rows["level"], rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_title(FACTOR_NAMES.get(factor, factor), fontsize=9)
    axes[0].set_ylabel("mean test MCC")
    return fig


def draw_pairwise(t: ReportTables) -> Drawn:
    """The best tokenizer minus each other one in test MCC: mean over shared seeds with its
    95% bootstrap interval (none below three seeds); right of zero = the best is ahead."""
    pairs = t.pairwise
    if pairs.empty:
        return "Needs at least two tokenizers with finished trials."
    pairs = pairs.iloc[::-1]
    fig = new_figure(7.5, 1.2 + 0.38 * len(pairs))
    ax = fig.add_subplot()
    y = np.arange(len(pairs))
    mean = pairs["mean_diff"].astype(float).to_numpy()
    low, high = pairs["ci_low"].astype(float).to_numpy(), pairs["ci_high"].astype(float).to_numpy()
    # Below three seeds there is no interval: a bare point, never a range read as one.
    without = np.isnan(low) | np.isnan(high)
    xerr = np.vstack([np.where(without, 0.0, mean - low), np.where(without, 0.0, high - mean)])
    ax.errorbar(mean, y, xerr=xerr, fmt="o", color=TOKENIZER_COLOUR, capsize=3)
    for yi, value, no_interval in zip(y, mean, without):
        if math.isnan(value):
            ax.text(0, yi, " missing", va="center", fontsize=8, color=STOPPED_COLOUR)
        elif no_interval:
            ax.annotate("no interval (n < 3)", (value, yi), xytext=(6, 0), textcoords="offset points",
                        va="center", fontsize=7, color="#666666")
    labels = [f"{o} ({'paired' if p else 'unpaired'}, n={n}, p={_label(float(pv))})"
              for o, p, n, pv in zip(pairs["other"], pairs["paired"], pairs["n"], pairs["p_value"])]
    ax.set_yticks(y, labels=labels, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(f"test MCC difference: {t.best} minus the other")
    return fig


def draw_learning_curves(t: ReportTables) -> Drawn:
    """Validation MCC per epoch of every trial, one panel per tokenizer; a red cross ends a
    trial ASHA stopped, a dashed line a trial still running."""
    curves = t.curves
    if curves.empty:
        return "No epoch has been logged yet."
    tokenizers = sorted(curves["tokenizer"].unique())
    seeds = sorted(curves["seed"].dropna().unique())
    colour = {seed: f"C{i % 10}" for i, seed in enumerate(seeds)}
    cols = min(4, len(tokenizers))
    rows = math.ceil(len(tokenizers) / cols)
    fig = new_figure(2.6 * cols + 0.6, 2.1 * rows + 0.6)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, tokenizer in zip(axes, tokenizers):
        for run_id, trial in curves[curves["tokenizer"] == tokenizer].groupby("run_id", sort=False):
            trial = trial.sort_values("epoch")
            state = trial["end_state"].iloc[0]
            seed = trial["seed"].iloc[0]
            ax.plot(trial["epoch"], trial["val_mcc"], linewidth=1.2, marker=".", markersize=4,
                    color=colour.get(seed, "black"), linestyle="--" if state == "running" else "-")
            if state == "stopped_early":
                ax.plot(trial["epoch"].iloc[-1], trial["val_mcc"].iloc[-1], marker="x", markersize=8,
                        markeredgewidth=2, color=STOPPED_COLOUR, zorder=3)
        ax.set_title(tokenizer, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(tokenizers):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colour[s], label=f"seed {int(s)}") for s in seeds]
    handles.append(Line2D([], [], color=STOPPED_COLOUR, marker="x", linestyle="", markeredgewidth=2, label="stopped by ASHA"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 6), fontsize=8, frameon=False)
    fig.supxlabel("epoch", fontsize=9)
    fig.supylabel("validation MCC", fontsize=9)
    return fig


def draw_compute(t: ReportTables) -> Drawn:
    """Per tokenizer: epochs run and epochs ASHA saved (stacked: their sum is the budget of
    trials x max_epochs, less what early stopping on patience saved), and training seconds."""
    table = t.compute
    if table.empty:
        return "No trial has started yet."
    table = table.iloc[::-1]
    fig = new_figure(9.0, 1.2 + 0.38 * len(table))
    left, right = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(table))
    run = table["epochs_run"].astype(float).to_numpy()
    saved = table["epochs_saved_by_asha"].astype(float).fillna(0).to_numpy()
    left.barh(y, run, color=TOKENIZER_COLOUR, height=0.6, label="epochs run")
    left.barh(y, saved, left=run, color=STOPPED_COLOUR, alpha=0.45, height=0.6, label="epochs saved by ASHA")
    left.set_yticks(y, labels=table["tokenizer"], fontsize=8)
    left.set_xlabel("epochs (all seeds)")
    fig.legend(loc="outside upper center", ncols=2, fontsize=8, frameon=False)
    seconds = table["train_seconds"].astype(float).to_numpy()
    right.barh(y, np.nan_to_num(seconds), color=TOKENIZER_COLOUR, height=0.6)
    for yi, value in zip(y, seconds):
        if math.isnan(value):
            right.text(0, yi, " missing", va="center", fontsize=8, color=STOPPED_COLOUR)
    right.set_xlabel("training seconds (sum of epoch_seconds, all seeds)")
    return fig


def draw_confusion(t: ReportTables) -> Drawn:
    """The best trial's test confusion matrix, rows normalised by the true class's cells,
    and its per-class accuracy (recall) beside it; class names on the axes."""
    if t.best_trial is None:
        return "No finished trial with a test score yet."
    if t.confusion is None:
        return f"Run {t.best_trial['run_id']} has no test_confusion_matrix.csv artifact."
    counts = t.confusion.to_numpy(dtype=float)
    names = [str(n) for n in t.confusion.index]
    n = len(names)
    side = max(3.5, 0.42 * n + 2.0)
    fig = new_figure(side + 3.6, side)
    matrix_ax, bar_ax = fig.subplots(1, 2, width_ratios=[side, 2.4])
    draw_confusion_matrix(matrix_ax, counts, names, normalize=True)
    if t.per_class is not None:
        per_class = t.per_class.set_index("cell_type").reindex(names)
        accuracy = per_class["accuracy"].astype(float).to_numpy()
        bar_ax.barh(np.arange(n), np.nan_to_num(accuracy), color=TOKENIZER_COLOUR, height=0.6)
        for yi, (value, cells) in enumerate(zip(accuracy, per_class["cells"])):
            text = "no cells" if math.isnan(value) else f"{value:.2f} (n={int(cells)})"
            bar_ax.text(0.02 if math.isnan(value) else value, yi, " " + text, va="center", fontsize=7)
        bar_ax.set_yticks(np.arange(n), labels=names, fontsize=8)
        bar_ax.set_ylim(n - 0.5, -0.5)
        bar_ax.set_xlim(0, 1.35)
        bar_ax.set_xlabel("per-class accuracy")
    else:
        bar_ax.set_axis_off()
        bar_ax.text(0.5, 0.5, "no test_per_class.csv", ha="center")
    return fig


DRAW: dict[str, Callable[[ReportTables], Drawn]] = {
    "leaderboard": draw_leaderboard,
    "heatmap": draw_heatmap,
    "main_effects": draw_main_effects,
    "pairwise": draw_pairwise,
    "learning_curves": draw_learning_curves,
    "compute": draw_compute,
    "confusion": draw_confusion,
}


def scope_svg_ids(svg: str, prefix: str) -> str:
    """Prefix every id inside ``svg`` (and the references to them) with ``prefix``:
    matplotlib names its groups ``figure_1``, ``axes_1``... in every file, and ids must be
    unique on one HTML page holding several figures."""
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}-{m.group(1)})" if m.group(1) in ids else m.group(0), svg)
    return re.sub(r'((?:xlink:)?href)="#([^"]+)"',
                  lambda m: f'{m.group(1)}="#{prefix}-{m.group(2)}"' if m.group(2) in ids else m.group(0), svg)


def save_figure(fig: Figure, figure_id: str, out_dir: Path) -> str:
    """Write ``<figure_id>.png`` and ``<figure_id>.svg`` into ``out_dir``; return the SVG
    markup to inline in the page, its ids scoped to the figure. The SVG carries no date, so
    rebuilding an unchanged report gives identical files."""
    # Atomic: a browser reloading the page while the report is rebuilt reads whole files.
    with atomic_path(out_dir / f"{figure_id}.png") as tmp:
        fig.savefig(tmp, dpi=PNG_DPI)
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": figure_id, "svg.fonttype": "path"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    write_atomic(out_dir / f"{figure_id}.svg", svg)
    return scope_svg_ids(svg[svg.index("<svg"):], figure_id)
