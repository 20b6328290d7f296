"""The sweep's plots, each saved as `plots/<name>.png` and `.svg`.

Figures are built with matplotlib's object API (`Figure`, no pyplot), so no global backend or
figure state is touched: the PNG and SVG canvases are picked by file type.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from matplotlib.transforms import Bbox

from .oracle import NEVER
from .summary import BASELINE, category_rank

PNG_DPI = 120


def save(figure: Figure, plots: Path, name: str) -> str:
    plots.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    # bbox "tight": the canvas grows to hold a legend placed beside the axes
    figure.savefig(plots / f"{name}.png", dpi=PNG_DPI, bbox_inches="tight")
    with rc_context({"svg.hashsalt": name}):  # with no timestamp and fixed clip-path ids: same sweep, same file
        figure.savefig(plots / f"{name}.svg", bbox_inches="tight", metadata={"Date": None})
    return name


# One look per method, the same in every plot: colour, marker and line style all differ between
# neighbours, so methods with equal values stay told apart where they overlap.
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
LINESTYLES = ["-", "--", "-.", ":"]
BASELINE_STYLE = {"color": "black", "marker": "*", "s": 120}
DODGE_OCTAVES = 0.04  # sideways step between methods on the log-2 token axis
MAX_DODGE_OCTAVES = 0.4  # the whole group's width at one token count: well under the octave between budgets


def method_styles(summary: pd.DataFrame) -> dict[str, dict]:
    """Method -> matplotlib style keywords (colour, marker, line style), by the method's place in name order."""
    methods = sorted(set(summary["method"]) - {BASELINE})
    return {method: {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)],
                     "linestyle": LINESTYLES[i % len(LINESTYLES)]} for i, method in enumerate(methods)}


def dodge_factors(methods: list[str]) -> dict[str, float]:
    """Method -> factor on its token counts: a small deterministic sideways shift, centred on the true count,
    so that equal values (DivPrune's and FasterVLM's) are drawn side by side instead of one under the other."""
    step = min(DODGE_OCTAVES, MAX_DODGE_OCTAVES / max(1, len(methods) - 1))
    middle = (len(methods) - 1) / 2
    return {method: 2 ** ((i - middle) * step) for i, method in enumerate(methods)}


def accuracy_vs_tokens(summary: pd.DataFrame, plots: Path, chance: float | None, styles: dict[str, dict]) -> str:
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.add_subplot()
    reduced = summary[summary["config"] != BASELINE]
    dodge = dodge_factors(list(styles))
    for method, rows in reduced.groupby("method"):
        ax.errorbar(rows["tokens_kept"] * dodge[method], rows["accuracy"], yerr=_interval_bars(rows),
                    capsize=2, elinewidth=0.8, markersize=5, label=method, **styles[method])
    base = summary[summary["config"] == BASELINE].iloc[0]
    ax.axhline(base["accuracy"], color="black", linestyle="--", linewidth=1,
               label=f"baseline ({base['tokens_kept']:.0f} tokens)")
    ax.axhspan(base["accuracy_low"], base["accuracy_high"], color="black", alpha=0.07, linewidth=0,
               label="baseline's 95% interval")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    _token_axis(ax, summary["tokens_kept"])
    ax.set_xlabel("visual tokens kept (mean per sample; methods side by side)")
    ax.set_ylabel("accuracy (bars: 95% interval)")
    ax.set_title("Accuracy vs kept tokens")
    _legend_beside(ax)
    return save(figure, plots, "accuracy_vs_tokens")


def pareto_front(latency: list[float], accuracy: list[float]) -> list[int]:
    """Indices of the points no other point beats (as fast or faster and as accurate or more, one strictly)."""
    points = list(zip(latency, accuracy))
    return [i for i, (l, a) in enumerate(points)
            if not math.isnan(l) and not any(ol <= l and oa >= a and (ol < l or oa > a) for ol, oa in points)]


def accuracy_vs_latency(summary: pd.DataFrame, plots: Path, chance: float | None, styles: dict[str, dict]) -> str:
    figure = Figure(figsize=(7.6, 5.0))  # larger than the others: room for the front's labels among the points
    ax = figure.add_subplot()
    for method, rows in summary.groupby("method", sort=False):
        style = BASELINE_STYLE if method == BASELINE else styles[method]
        ax.errorbar(rows["prefill_ms"], rows["accuracy"], yerr=_interval_bars(rows), fmt="none",
                    ecolor=style["color"], elinewidth=0.8, alpha=0.5, zorder=1)
        ax.scatter(rows["prefill_ms"], rows["accuracy"], label=method, zorder=2, color=style["color"],
                   marker=style["marker"], s=style.get("s", 36))
    front = summary.iloc[pareto_front(summary["prefill_ms"].tolist(), summary["accuracy"].tolist())]
    front = front.sort_values("prefill_ms")
    ax.step(front["prefill_ms"], front["accuracy"], where="post", color="crimson", linewidth=1.5,
            label="Pareto front", zorder=1)
    ax.scatter(front["prefill_ms"], front["accuracy"], s=140, facecolors="none", edgecolors="crimson", zorder=3)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("prefill latency, ms (median after warm-up)")
    ax.set_ylabel("accuracy (bars: 95% interval)")
    ax.set_title("Accuracy vs prefill latency")
    _legend_beside(ax)
    label_clear_of_markers(ax, front["config"].tolist(), list(zip(front["prefill_ms"], front["accuracy"])))
    return save(figure, plots, "accuracy_vs_latency")


# Where a label may go, nearest first: (dx, dy) in points from its point, and the text's alignment there.
# Past the first ring a grey leader line ties the label to its point.
LABEL_DIRECTIONS = [(1, 1, "left", "bottom"), (-1, 1, "right", "bottom"), (1, -1, "left", "top"),
                    (-1, -1, "right", "top"), (0, 1.3, "center", "bottom"), (0, -1.3, "center", "top"),
                    (1.3, 0, "left", "center_baseline"), (-1.3, 0, "right", "center_baseline")]
LABEL_SPOTS = [(reach, 7 * reach * dx, 7 * reach * dy, ha, va)
               for reach in (1, 2, 3, 4.5, 6) for dx, dy, ha, va in LABEL_DIRECTIONS]
LEADER = {"arrowstyle": "-", "color": "0.3", "linewidth": 0.8, "shrinkA": 1, "shrinkB": 4}
LABEL_BACKING = {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}  # over bars


def label_clear_of_markers(ax, labels: list[str], points: list[tuple[float, float]]) -> None:
    """Annotate each point at the nearest spot where its text covers no marker, no earlier label and stays in
    the axes, as matplotlib's renderer measures the text on the laid-out figure."""
    figure = ax.figure
    canvas = FigureCanvasAgg(figure)
    figure.tight_layout()  # save() lays the figure out the same way, so these extents hold in the files
    figure.draw_without_rendering()  # settles the axes' limits, which place the markers
    renderer = canvas.get_renderer()
    taken, inside = _marker_boxes(ax), ax.get_window_extent(renderer)
    for label, point in zip(labels, points):
        spot, box = _clearest_spot(ax, renderer, label, point, taken, inside)
        _annotate(ax, label, point, spot, leader=spot[0] > 1)
        taken.append(box)


def _clearest_spot(ax, renderer, label: str, point: tuple, taken: list[Bbox], inside: Bbox) -> tuple[tuple, Bbox]:
    """The nearest spot where the label's box covers nothing taken and lies inside, else the least covered one."""
    tried = []
    for spot in LABEL_SPOTS:
        trial = _annotate(ax, label, point, spot, leader=False)
        box = trial.get_window_extent(renderer)
        trial.remove()
        covered = sum(_overlap(box, other) for other in taken) + _area(box) - _overlap(box, inside)
        if covered == 0:
            return spot, box
        tried.append((covered, spot, box))
    _, spot, box = min(tried, key=lambda attempt: attempt[0])
    return spot, box


def _annotate(ax, label: str, point: tuple[float, float], spot: tuple, leader: bool):
    _, dx, dy, ha, va = spot
    return ax.annotate(label, point, xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize="x-small",
                       zorder=4, bbox=LABEL_BACKING, arrowprops=LEADER if leader else None)


def _marker_boxes(ax) -> list[Bbox]:
    """Display-space boxes of every scatter marker in the axes (a marker of size s is sqrt(s) points wide)."""
    boxes = []
    for collection in ax.collections:
        if isinstance(collection, PathCollection):
            centres = collection.get_offset_transform().transform(collection.get_offsets())
            for (x, y), size in zip(centres, np.broadcast_to(collection.get_sizes(), len(centres))):
                half = math.sqrt(size) / 2 * ax.figure.dpi / 72
                boxes.append(Bbox.from_extents(x - half, y - half, x + half, y + half))
    return boxes


def _area(box: Bbox) -> float:
    return box.width * box.height


def _overlap(a: Bbox, b: Bbox) -> float:
    """The area two boxes share."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _interval_bars(rows: pd.DataFrame) -> np.ndarray:
    """The accuracy's 95% interval as errorbar's (below, above) distances."""
    return np.array([rows["accuracy"] - rows["accuracy_low"], rows["accuracy_high"] - rows["accuracy"]])


def retention_heatmap(categories: pd.DataFrame, plots: Path) -> str:
    """Retention per configuration and category; where it is undefined (the baseline got none of those samples
    right) the uncoloured cell shows the configuration's own accuracy in brackets instead."""
    reduced = categories[categories["config"] != BASELINE]
    order = dict(index=list(dict.fromkeys(reduced["config"])),
                 columns=sorted(set(reduced["category"]), key=category_rank))
    grid = reduced.pivot(index="config", columns="category", values="retention").reindex(**order)
    accuracy = reduced.pivot(index="config", columns="category", values="accuracy").reindex(**order).to_numpy(float)
    values = grid.to_numpy(dtype=float)
    figure = Figure(figsize=(max(5.0, 2.5 + 0.8 * len(grid.columns)), 1.6 + 0.35 * len(grid.index)))
    ax = figure.add_subplot()
    top = max(1.5, float(np.nanmax(values)) if np.isfinite(values).any() else 1.5)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", norm=TwoSlopeNorm(1.0, 0.0, top), aspect="auto")
    for (row, column), value in np.ndenumerate(values):
        ax.text(column, row, _heatmap_cell(value, accuracy[row, column]), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=45, ha="right")
    ax.set_yticks(range(len(grid.index)), grid.index)
    ax.set_title("Retention per category (in brackets: accuracy, where retention is undefined)", fontsize="medium")
    figure.colorbar(image, ax=ax, label="retention")
    return save(figure, plots, "retention_heatmap")


def _heatmap_cell(retention: float, accuracy: float) -> str:
    """The retention; the accuracy in brackets where retention is undefined."""
    if not math.isnan(retention):
        return f"{retention:.0%}"
    return "" if math.isnan(accuracy) else f"({accuracy:.0%})"  # no record at all: an empty cell


def oracle_cdf(distribution: pd.DataFrame, plots: Path, styles: dict[str, dict]) -> str:
    """Per method, the fraction of samples whose oracle budget is at most x tokens; "never" never arrives."""
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.add_subplot()
    dodge = dodge_factors(list(styles))
    for method, rows in distribution.groupby("method"):
        budgets, never = rows[rows["config"] != NEVER], rows[rows["config"] == NEVER].iloc[0]
        ax.step(budgets["tokens_kept"] * dodge[method], budgets["cumulative_fraction"], where="post",
                label=f"{method} (never: {never['fraction']:.0%})", **styles[method])
    _token_axis(ax, distribution["tokens_kept"].dropna())
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("visual tokens kept (mean per sample; methods side by side)")
    ax.set_ylabel("fraction answered as the baseline from here up")
    ax.set_title("Smallest sufficient budget (oracle), cumulative")
    _legend_beside(ax)
    return save(figure, plots, "oracle_cdf")


def _legend_beside(ax) -> None:
    """The legend right of the axes: inside, it covered the lines (eight methods and two reference lines)."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _token_axis(ax, tokens: pd.Series) -> None:
    """A log-2 axis labelled with the swept token counts themselves, not powers of two.

    Counts within 15% of a larger one (pool's 121 beside 128) are left unlabelled so labels never overlap.
    """
    ax.set_xscale("log", base=2)
    ticks: list[float] = []
    for count in sorted(set(tokens.round(1)), reverse=True):
        if not ticks or ticks[-1] / count >= 1.15:
            ticks.append(count)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
