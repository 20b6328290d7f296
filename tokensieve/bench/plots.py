"""The sweep's plots, each saved as `plots/<name>.png` and `.svg`.

Figures are built with matplotlib's object API (`Figure`, no pyplot), so no global backend or
figure state is touched: the PNG and SVG canvases are picked by file type.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from .oracle import NEVER
from .summary import BASELINE, category_rank

PNG_DPI = 120


def save(figure: Figure, plots: Path, name: str) -> str:
    plots.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    # bbox "tight": the canvas grows to hold a legend placed beside the axes
    figure.savefig(plots / f"{name}.png", dpi=PNG_DPI, bbox_inches="tight")
    figure.savefig(plots / f"{name}.svg", bbox_inches="tight", metadata={"Date": None})  # no timestamp: same sweep, same file
    return name


def accuracy_vs_tokens(summary: pd.DataFrame, plots: Path, chance: float | None) -> str:
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.add_subplot()
    for method, rows in summary[summary["config"] != BASELINE].groupby("method"):
        ax.plot(rows["tokens_kept"], rows["accuracy"], marker="o", label=method)
    base = summary[summary["config"] == BASELINE].iloc[0]
    ax.axhline(base["accuracy"], color="black", linestyle="--", linewidth=1,
               label=f"baseline ({base['tokens_kept']:.0f} tokens)")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    _token_axis(ax, summary["tokens_kept"])
    ax.set_xlabel("visual tokens kept (mean per sample)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs kept tokens")
    _legend_beside(ax)
    return save(figure, plots, "accuracy_vs_tokens")


def pareto_front(latency: list[float], accuracy: list[float]) -> list[int]:
    """Indices of the points no other point beats (as fast or faster and as accurate or more, one strictly)."""
    points = list(zip(latency, accuracy))
    return [i for i, (l, a) in enumerate(points)
            if not math.isnan(l) and not any(ol <= l and oa >= a and (ol < l or oa > a) for ol, oa in points)]


def accuracy_vs_latency(summary: pd.DataFrame, plots: Path, chance: float | None) -> str:
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.add_subplot()
    for method, rows in summary.groupby("method", sort=False):
        style = dict(marker="*", s=120, color="black") if method == BASELINE else dict(marker="o", s=36)
        ax.scatter(rows["prefill_ms"], rows["accuracy"], label=method, zorder=2, **style)
    front = summary.iloc[pareto_front(summary["prefill_ms"].tolist(), summary["accuracy"].tolist())]
    front = front.sort_values("prefill_ms")
    ax.step(front["prefill_ms"], front["accuracy"], where="post", color="crimson", linewidth=1.5,
            label="Pareto front", zorder=1)
    ax.scatter(front["prefill_ms"], front["accuracy"], s=140, facecolors="none", edgecolors="crimson", zorder=3)
    middle = (summary["prefill_ms"].min() + summary["prefill_ms"].max()) / 2
    for _, row in front.iterrows():
        right = row["prefill_ms"] > middle  # labelled leftwards there, so no label runs into the legend
        ax.annotate(row["config"], (row["prefill_ms"], row["accuracy"]), fontsize="x-small",
                    xytext=(-4 if right else 4, 4), textcoords="offset points", ha="right" if right else "left")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("prefill latency, ms (median after warm-up)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs prefill latency")
    _legend_beside(ax)
    return save(figure, plots, "accuracy_vs_latency")


def retention_heatmap(categories: pd.DataFrame, plots: Path) -> str:
    reduced = categories[categories["config"] != BASELINE]
    grid = reduced.pivot(index="config", columns="category", values="retention")
    grid = grid.reindex(index=list(dict.fromkeys(reduced["config"])),
                        columns=sorted(grid.columns, key=category_rank))
    values = grid.to_numpy(dtype=float)
    figure = Figure(figsize=(max(5.0, 2.5 + 0.8 * len(grid.columns)), 1.6 + 0.35 * len(grid.index)))
    ax = figure.add_subplot()
    top = max(1.5, float(np.nanmax(values)) if np.isfinite(values).any() else 1.5)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", norm=TwoSlopeNorm(1.0, 0.0, top), aspect="auto")
    for (row, column), value in np.ndenumerate(values):
        ax.text(column, row, "-" if math.isnan(value) else f"{value:.0%}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=45, ha="right")
    ax.set_yticks(range(len(grid.index)), grid.index)
    ax.set_title("Retention per category", fontsize="medium")
    figure.colorbar(image, ax=ax, label="retention")
    return save(figure, plots, "retention_heatmap")


def oracle_cdf(distribution: pd.DataFrame, plots: Path) -> str:
    """Per method, the fraction of samples whose oracle budget is at most x tokens; "never" never arrives."""
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.add_subplot()
    for method, rows in distribution.groupby("method"):
        budgets, never = rows[rows["config"] != NEVER], rows[rows["config"] == NEVER].iloc[0]
        ax.step(budgets["tokens_kept"], budgets["cumulative_fraction"], where="post", marker="o",
                label=f"{method} (never: {never['fraction']:.0%})")
    _token_axis(ax, distribution["tokens_kept"].dropna())
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("visual tokens kept (mean per sample)")
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
