"""`report.html`: one self-contained page (inline CSS, images as data: URIs, no scripts, no links)."""

from __future__ import annotations

from html import escape
from pathlib import Path

import pandas as pd

from .gallery import GallerySample, file_data_uri
from .oracle import NEVER
from .summary import BASELINE, CHANCE_ROW
from .tables import (
    CATEGORY_COLUMNS,
    HEADLINE_COLUMNS,
    HEADLINE_NOTE,
    SKILL_NOTE,
    SUMMARY_COLUMNS,
    VIDEO_TOKENS_COLUMNS,
    VIDEO_TOKENS_NOTE,
    formatted,
    skill_columns,
)

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1, h2, h3 { font-weight: 600; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25em .45em; text-align: right; }
.wide { overflow-x: auto; }  /* a table wider than the window scrolls by itself, not the page */
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
tr.baseline td { background: #fafae6; }
#headline { font-size: 15px; } #headline td:nth-child(2) { font-weight: 600; }
.lede { font-size: 16px; margin: 0 0 .4em; } .note { color: #555; max-width: 70em; }
.warning { color: #8a4b00; }
details > summary { cursor: pointer; }
.plots figure { display: inline-block; vertical-align: top; margin: .5em 1em .5em 0; max-width: 100%; }
.plots img { max-width: 100%; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: .5em 1em; margin: 1em 0; }
.strip { display: flex; flex-wrap: wrap; gap: .5em; align-items: flex-start; margin: .3em 0; }
.strip .method { width: 8em; font-weight: 600; align-self: center; overflow-wrap: anywhere; }
.strip figure { margin: 0; width: 192px; } .strip img { width: 100%; image-rendering: pixelated; }
figcaption { font-size: 12px; word-wrap: break-word; }
.right { color: #176a1e; } .wrong { color: #a4161a; }
.same { color: #666; }
.strip figure.clip { width: auto; max-width: 100%; }
.clip .frames { display: flex; flex-wrap: wrap; gap: 2px; }
.clip .frame { position: relative; width: 96px; } .clip .frame img { width: 96px; display: block; }
.clip .frame.dropped img { opacity: .45; }
.clip .frame.dropped b { position: absolute; left: 0; right: 0; top: 40%; text-align: center; font-size: 11px;
  color: #a4161a; background: rgba(255, 255, 255, .8); }
tr.chance td { background: #f3f3f3; font-style: italic; }
"""

PLOT_CAPTIONS = {
    "accuracy_vs_tokens": "Accuracy against the mean number of visual tokens kept, one line per method, with 95% "
                          "intervals; at each count the methods stand slightly apart, so that equal values stay visible.",
    "accuracy_vs_latency": "Accuracy against median prefill latency (time to first token, after warm-up), with 95% "
                           "intervals; ringed points form the Pareto front.",
    "retention_heatmap": "Retention per category: the configuration's accuracy over the baseline's on the same samples.",
    "oracle_cdf": "Fraction of samples that each method answers as the baseline does from a given budget upwards.",
}


TEXT_COLUMNS = {"method", "keep", "category", "budget", "leader"}  # left-aligned; numbers align right


def html_table(table: pd.DataFrame, columns: dict, table_id: str) -> str:
    """`columns` as in tables.py; each row carries its configuration in data-config (the browser test reads it)."""
    headings, rows = formatted(table, columns)
    align = ["text" if name in TEXT_COLUMNS else "" for name in columns]
    head = "".join(f'<th class="{a}">{escape(h)}</th>' for a, h in zip(align, headings))
    body = []
    for config, row in zip(table["config"], rows):
        cells = "".join(f'<td class="{a}">{escape(v)}</td>' for a, v in zip(align, row))
        kind = "baseline" if config == BASELINE else CHANCE_ROW if config == CHANCE_ROW else ""
        body.append(f'<tr class="{kind}" data-config="{escape(config)}">{cells}</tr>')
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def sweep_line(sweep: dict | None) -> str:
    """What was swept, in one sentence: model, suite, split and size, device and precision."""
    if sweep is None:
        return "No sweep.json was found beside the runs."
    extent = [f"{sweep['split']} split" if sweep.get("split") else "",
              f"{sweep['samples']} samples" if sweep.get("samples") is not None else "",
              f"{sweep['frames']} frames per clip" if sweep.get("frames") else ""]
    extent_text = f" ({', '.join(part for part in extent if part)})" if any(extent) else ""
    where = "".join(f", {sweep[key]}" for key in ("device", "dtype") if sweep.get(key))
    return escape(f"{sweep.get('model', '?')} on the {sweep.get('suite', '?')} suite{extent_text}{where}.")


def skipped_line(sweep: dict | None) -> str:
    """The configurations the model refused, which the tables lack, named where a reader looks first."""
    skipped = (sweep or {}).get("skipped") or {}
    reasons = "; ".join(f"{config}: {reason}" for config, reason in skipped.items())
    return f'<p class="warning">Not run (refused by the model): {escape(reasons)}</p>' if skipped else ""


def _setting(value) -> str:
    """A sweep.json value as text: a map as 'key: value; ...', a list comma-separated."""
    if isinstance(value, dict):
        return "; ".join(f"{key}: {item}" for key, item in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def settings_section(sweep: dict | None) -> str:
    """sweep.json's fields that say something (no nulls, no empty lists or maps), collapsed."""
    if sweep is None:
        return "<p>No sweep.json was found beside the runs.</p>"
    rows = "".join(f'<tr><th class="text">{escape(str(key))}</th><td class="text">{escape(_setting(value))}</td></tr>'
                   for key, value in sweep.items() if value not in (None, "", [], {}))
    return f'<details><summary>sweep.json</summary><table id="sweep">{rows}</table></details>'


def undefined_retention_note(categories: pd.DataFrame) -> str:
    """Why retention is '-' (and the heat map shows accuracy in brackets): the baseline got none of those right."""
    undefined = categories[categories["retention"].isna() & (categories["config"] != BASELINE)]
    if undefined.empty:
        return ""
    base = categories[categories["config"] == BASELINE].set_index("category")
    where = ", ".join(f"{escape(category)} (the baseline: {base.loc[category, 'baseline_correct']:g} of "
                      f"{base.loc[category, 'n']} right)" for category in dict.fromkeys(undefined["category"]))
    return (f'<p class="note">Retention is undefined (&ldquo;-&rdquo; in the table, the accuracy in brackets in '
            f"the heat map) where the baseline answered none of the same samples right, so there is no accuracy "
            f"to keep a share of: {where}.</p>")


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
    caption = (f"<figcaption>{budget}{cell.tokens_after}/{cell.tokens_before} tokens<br>"
               f"{verdict} {escape(cell.prediction)}{same}</figcaption>")
    if cell.frames is not None:
        return f'<figure class="clip"><div class="frames">{_frame_strip(cell)}</div>{caption}</figure>'
    return f'<figure><img alt="{escape(cell.config)}" src="{cell.image_uri}">{caption}</figure>'


def _frame_strip(cell) -> str:
    """A thumbnail per frame of the video; a frame that kept no token is faded and marked dropped."""
    parts = []
    for frame in cell.frames:
        dropped = frame.kept == 0
        parts.append(f'<span class="frame{" dropped" if dropped else ""}" title="frame {frame.index}: {frame.kept} '
                     f'tokens kept"><img alt="{escape(cell.config)} frame {frame.index}" src="{frame.image_uri}">'
                     f'{"<b>dropped</b>" if dropped else ""}</span>')
    return "".join(parts)


def video_section(summary: pd.DataFrame, skills: pd.DataFrame | None) -> str:
    """The video suite's tables: accuracy against the video's visual tokens, and accuracy per skill with chance."""
    if skills is None:
        return ""
    return (f'<h2>Video: accuracy against visual tokens</h2><p class="note">{escape(VIDEO_TOKENS_NOTE)}</p>'
            f'<div class="wide">{html_table(summary, VIDEO_TOKENS_COLUMNS, "video-tokens")}</div>'
            f'<h2>Accuracy per skill</h2><p class="note">{escape(SKILL_NOTE)}</p>'
            f'<div class="wide">{html_table(skills, skill_columns(skills), "per-skill")}</div>')


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


SUMMARY_NOTE = """Each configuration counts only the samples the baseline also answered; retention and agreement
compare with the baseline on those samples. Timings are medians over samples after warm-up; FLOPs are the LLM
decoder's prefill (vision tower and projector separately); peak added MiB is the most memory a sample's
<code>generate()</code> held above what the process held before it. A &ldquo;-&rdquo; is a value that does not
exist: no keep or selection time for the baseline, no decode time per token for one-token answers, no retention
where the baseline answered none of the samples right, no peak where none was measured. Definitions:
<code>docs/bench-outputs.md</code>."""


def write_report(out: Path, sweep: dict | None, headline: pd.DataFrame, summary: pd.DataFrame,
                 categories: pd.DataFrame, distribution: pd.DataFrame, plot_names: list[str],
                 samples: list[GallerySample], skills: pd.DataFrame | None = None) -> Path:
    """`skills`: the video suite's per-skill table (summary.per_skill), which adds the video tables."""
    plots = out / "plots"
    main_plots = "".join(plot_figure(plots, n) for n in ("accuracy_vs_tokens", "accuracy_vs_latency") if n in plot_names)
    heatmap = plot_figure(plots, "retention_heatmap") if "retention_heatmap" in plot_names else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tokensieve bench report</title><style>{STYLE}</style></head>
<body>
<h1>tokensieve bench report</h1>
<p class="lede">{sweep_line(sweep)}</p>
<h2>Most accurate per budget</h2>
{html_table(headline, HEADLINE_COLUMNS, "headline")}
<p class="note">{escape(HEADLINE_NOTE)}</p>{skipped_line(sweep)}
{video_section(summary, skills)}
<h2>Summary</h2>
<p class="note">{SUMMARY_NOTE}</p>
<div class="wide">{html_table(summary, SUMMARY_COLUMNS, "summary")}</div>
<div class="plots">{main_plots}</div>
<h2>Per category</h2><div class="plots">{heatmap}</div>{undefined_retention_note(categories)}
<details><summary>Table</summary><div class="wide">{html_table(categories, CATEGORY_COLUMNS, "per-category")}</div></details>
<h2>Oracle: how many tokens each question needs</h2>{oracle_section(distribution, plots, plot_names)}
<h2>Kept patches</h2><p>Greyed patches were dropped before the LLM; each caption gives the budget, the tokens
kept of the first image (of a video: of all its frames), the prediction (&#10003; correct) and whether it is the
baseline's answer. A video shows a strip of its frames, each with the patches it kept; a frame that kept none is
faded and marked &ldquo;dropped&rdquo;.</p>{gallery_section(samples)}
<h2>Sweep settings</h2>{settings_section(sweep)}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
