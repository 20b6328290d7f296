"""`report.html`: one self-contained page (inline CSS, images as data: URIs, no scripts, no links)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import pandas as pd

from .gallery import GallerySample, file_data_uri
from .oracle import NEVER
from .summary import BASELINE
from .tables import CATEGORY_COLUMNS, SUMMARY_COLUMNS, formatted

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1, h2, h3 { font-weight: 600; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
tr.baseline td { background: #fafae6; }
.plots figure { display: inline-block; vertical-align: top; margin: .5em 1em .5em 0; max-width: 100%; }
.plots img { max-width: 100%; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: .5em 1em; margin: 1em 0; }
.strip { display: flex; flex-wrap: wrap; gap: .5em; align-items: flex-start; margin: .3em 0; }
.strip .method { width: 8em; font-weight: 600; align-self: center; }
.strip figure { margin: 0; width: 192px; } .strip img { width: 100%; image-rendering: pixelated; }
figcaption { font-size: 12px; word-wrap: break-word; }
.right { color: #176a1e; } .wrong { color: #a4161a; }
.same { color: #666; }
"""

PLOT_CAPTIONS = {
    "accuracy_vs_tokens": "Accuracy against the mean number of visual tokens kept, one line per method.",
    "accuracy_vs_latency": "Accuracy against median prefill latency (time to first token, after warm-up); "
                           "ringed points form the Pareto front.",
    "retention_heatmap": "Retention per category: the configuration's accuracy over the baseline's on the same samples.",
    "oracle_cdf": "Fraction of samples that each method answers as the baseline does from a given budget upwards.",
}


TEXT_COLUMNS = {"method", "keep", "category"}  # left-aligned; numbers align right


def html_table(table: pd.DataFrame, columns: dict, table_id: str) -> str:
    """`columns` as in tables.py; each row carries its configuration in data-config (the browser test reads it)."""
    headings, rows = formatted(table, columns)
    align = ["text" if name in TEXT_COLUMNS else "" for name in columns]
    head = "".join(f'<th class="{a}">{escape(h)}</th>' for a, h in zip(align, headings))
    body = []
    for config, row in zip(table["config"], rows):
        cells = "".join(f'<td class="{a}">{escape(v)}</td>' for a, v in zip(align, row))
        body.append(f'<tr class="{"baseline" if config == BASELINE else ""}" data-config="{escape(config)}">{cells}</tr>')
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def sweep_section(sweep: dict | None) -> str:
    if sweep is None:
        return "<p>No sweep.json was found beside the runs.</p>"
    rows = "".join(
        f'<tr><th class="text">{escape(str(key))}</th><td class="text">'
        f"{escape(value if isinstance(value, str) else json.dumps(value))}</td></tr>"
        for key, value in sweep.items())
    return f'<table id="sweep">{rows}</table>'


def plot_figure(plots: Path, name: str) -> str:
    return (f'<figure><img alt="{name}" src="{file_data_uri(plots / f"{name}.png")}">'
            f"<figcaption>{escape(PLOT_CAPTIONS[name])}</figcaption></figure>")


def gallery_section(samples: list[GallerySample]) -> str:
    if not samples:
        return "<p>The sweep saved no input images.</p>"
    parts = []
    for sample in samples:
        base = sample.baseline
        parts.append(f'<div class="sample"><h3>{escape(sample.sample)} <small>({escape(sample.category)})</small></h3>'
                     f"<p><b>Q:</b> {escape(sample.question)} &nbsp; <b>target:</b> {escape(sample.target)}</p>"
                     f'<div class="strip"><div class="method">baseline</div>{_cell_figure(base)}</div>')
        for method, cells in sample.rows.items():
            figures = "".join(_cell_figure(cell) for cell in cells)
            parts.append(f'<div class="strip"><div class="method">{escape(method)}</div>{figures}</div>')
        parts.append("</div>")
    return "".join(parts)


def _cell_figure(cell) -> str:
    verdict = '<span class="right">&#10003;</span>' if cell.correct else '<span class="wrong">&#10007;</span>'
    budget = f"keep {escape(cell.keep)}: " if cell.keep else ""
    same = "" if not cell.keep else ' <span class="same">(= baseline)</span>' if cell.agrees else " (&ne; baseline)"
    return (f'<figure><img alt="{escape(cell.config)}" src="{cell.image_uri}">'
            f"<figcaption>{budget}{cell.tokens_after}/{cell.tokens_before} tokens<br>"
            f"{verdict} {escape(cell.prediction)}{same}</figcaption></figure>")


def oracle_section(distribution: pd.DataFrame, plots: Path, plot_names: list[str]) -> str:
    if distribution.empty:
        return "<p>No reduced configuration answered every sample at all of its budgets.</p>"
    columns = {"method": ("method", "{}"), "keep": ("budget (keep)", "{}"), "tokens_kept": ("tokens kept", "{:.1f}"),
               "samples": ("samples needing it", "{}"), "fraction": ("fraction", "{:.1%}"),
               "cumulative_fraction": ("cumulative", "{:.1%}")}
    figure = plot_figure(plots, "oracle_cdf") if "oracle_cdf" in plot_names else ""
    return (f"<p>Per sample, the smallest swept budget from which the method answers as the baseline does at that "
            f"budget <em>and every larger one</em>; \"{NEVER}\" when it disagrees even at the largest. "
            f"Per-sample values are in <code>oracle.csv</code>.</p>"
            f'{html_table(distribution, columns, "oracle")}<div class="plots">{figure}</div>')


def write_report(out: Path, sweep: dict | None, summary: pd.DataFrame, categories: pd.DataFrame,
                 distribution: pd.DataFrame, plot_names: list[str], samples: list[GallerySample]) -> Path:
    plots = out / "plots"
    main_plots = "".join(plot_figure(plots, n) for n in ("accuracy_vs_tokens", "accuracy_vs_latency") if n in plot_names)
    heatmap = plot_figure(plots, "retention_heatmap") if "retention_heatmap" in plot_names else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tokensieve bench report</title><style>{STYLE}</style></head>
<body>
<h1>tokensieve bench report</h1>
<h2>Sweep</h2>{sweep_section(sweep)}
<h2>Summary</h2>
<p>Each configuration counts only the samples the baseline also answered; retention and agreement compare with
the baseline on those samples. Timings are medians over samples after warm-up; FLOPs are the LLM decoder's
prefill (vision tower and projector separately). Definitions: <code>docs/bench-outputs.md</code>.</p>
{html_table(summary, SUMMARY_COLUMNS, "summary")}
<div class="plots">{main_plots}</div>
<h2>Per category</h2><div class="plots">{heatmap}</div>
<details><summary>Table</summary>{html_table(categories, CATEGORY_COLUMNS, "per-category")}</details>
<h2>Oracle: how many tokens each question needs</h2>{oracle_section(distribution, plots, plot_names)}
<h2>Kept patches</h2><p>Greyed patches were dropped before the LLM; each caption gives the budget, the tokens
kept of the first image, the prediction (&#10003; correct) and whether it is the baseline's answer.</p>{gallery_section(samples)}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
