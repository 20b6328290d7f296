"""The summary as text: CSV (full precision), Markdown and a rich terminal table (rounded)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table

# Column of the summary -> (heading, format) for the Markdown, terminal and HTML tables. A tuple of
# columns is one cell formatted from all of them (the accuracy's interval).
INTERVAL = ("accuracy_low", "accuracy_high")
INTERVAL_COLUMN = {INTERVAL: ("95% interval", "{:.3f}–{:.3f}")}
SUMMARY_COLUMNS = {
    "method": ("method", "{}"),
    "keep": ("keep", "{}"),
    "tokens_kept": ("tokens kept", "{:.1f}"),
    # in-LLM methods: tokens kept is what the last layers see; papers count the average over the layers
    "tokens_llm_input": ("at LLM input", "{:.1f}"),
    "tokens_per_layer": ("per layer", "{:.1f}"),
    "accuracy": ("accuracy", "{:.3f}"),
    **INTERVAL_COLUMN,
    "retention": ("retention", "{:.1%}"),
    "agreement": ("agreement", "{:.1%}"),
    "prefill_gflops": ("prefill GFLOPs", "{:.2f}"),
    "prefill_flops_ratio": ("FLOPs vs baseline", "{:.1%}"),
    "vision_gflops": ("vision GFLOPs", "{:.2f}"),
    "prefill_ms": ("prefill ms", "{:.1f}"),
    "decode_ms_per_token": ("decode ms/tok", "{:.2f}"),
    "peak_memory_added_mib": ("peak added MiB", "{:.1f}"),
    "kv_cache_mib": ("KV MiB", "{:.2f}"),
    "selection_ms": ("selection ms", "{:.2f}"),
    "n": ("n", "{}"),
}
# Two-line headings, one space between columns: twelve columns must fit an 80-column terminal.
TERMINAL_COLUMNS = {"method": "method", "keep": "keep", "tokens_kept": "tokens\nkept", "accuracy": "acc",
                    "retention": "retain", "agreement": "agree", "prefill_flops_ratio": "FLOPs\nvs base",
                    "prefill_ms": "prefill\nms", "decode_ms_per_token": "decode\nms/tok",
                    "peak_memory_added_mib": "peak\n+MiB", "selection_ms": "select\nms", "n": "n"}
CATEGORY_COLUMNS = {
    "method": ("method", "{}"),
    "keep": ("keep", "{}"),
    "category": ("category", "{}"),
    "n": ("n", "{}"),
    "accuracy": ("accuracy", "{:.3f}"),
    **INTERVAL_COLUMN,
    "baseline_accuracy": ("baseline", "{:.3f}"),
    "retention": ("retention", "{:.1%}"),
    "chance": ("chance", "{:.3f}"),
}
# The report's and summary.md's first table: the most accurate configuration per budget (summary.headline).
HEADLINE_COLUMNS = {
    "budget": ("budget (keep)", "{}"),
    "leader": ("most accurate", "{}"),
    "tokens_kept": ("tokens kept", "{:.1f}"),
    "accuracy": ("accuracy", "{:.3f}"),
    **INTERVAL_COLUMN,
    "retention": ("retention", "{:.1%}"),
    "prefill_ms": ("time to first token", "{:.0f} ms"),
    "speedup": ("speed-up", "{:.2f}×"),
    "n": ("n", "{}"),
}
HEADLINE_NOTE = ("Per budget, the configuration with the highest accuracy (of equals, the fastest; the others named "
                 "in brackets), against the unpruned baseline on the same samples. Retention is its share of the "
                 "baseline's accuracy; time to first token is the median after warm-up, and speed-up the baseline's "
                 "over it. The 95% interval is the Wilson score interval from the n samples: two accuracies inside "
                 "each other's intervals are not told apart by this sweep.")


def cell(value, fmt: str) -> str:
    """One formatted value, or a tuple of them for one cell; a missing one (no timings, no retention) as '-'."""
    values = value if isinstance(value, tuple) else (value,)
    if any(v is None or (isinstance(v, float) and math.isnan(v)) or v == "" for v in values):
        return "-"
    return fmt.format(*values)


def formatted(table: pd.DataFrame, columns: dict) -> tuple[list[str], list[list[str]]]:
    """Headings and rows of strings."""
    rows = [[cell(tuple(row[n] for n in name) if isinstance(name, tuple) else row[name], fmt)
             for name, (_, fmt) in columns.items()] for _, row in table.iterrows()]
    return [heading for heading, _ in columns.values()], rows


def markdown(table: pd.DataFrame, columns: dict) -> str:
    headings, rows = formatted(table, columns)
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# The video suite's: accuracy against the video's visual tokens (summary.summarise's columns).
VIDEO_TOKENS_COLUMNS = {
    "method": ("method", "{}"),
    "keep": ("keep", "{}"),
    "tokens_before": ("video tokens", "{:.1f}"),
    "tokens_llm_input": ("at LLM input", "{:.1f}"),
    "tokens_per_layer": ("per layer", "{:.1f}"),
    "frames_kept": ("frames kept", "{:.1f}"),
    "frames": ("of frames", "{:.0f}"),
    "accuracy": ("accuracy", "{:.3f}"),
    **INTERVAL_COLUMN,
    "retention": ("retention", "{:.1%}"),
    "n": ("n", "{}"),
}
VIDEO_TOKENS_NOTE = ("Accuracy against the visual tokens of the video: those that entered the LLM, and, for in-LLM "
                     "methods, those each decoder layer processed on average (as in-LLM papers count a budget); frames "
                     "kept counts the frames of the video's grid that kept any token (on Qwen2-VL a frame is a pair "
                     "of input frames). A ratio budget is a share of the video's tokens.")


def skill_columns(skills: pd.DataFrame) -> dict:
    """summary.per_skill's table: the configuration, its tokens, then a column per skill and overall."""
    columns = {"method": ("method", "{}"), "keep": ("keep", "{}"), "tokens_llm_input": ("at LLM input", "{:.1f}"),
               "tokens_per_layer": ("per layer", "{:.1f}")}
    fixed = {"config", *columns}
    return {**columns, **{skill: (skill, "{:.3f}") for skill in skills.columns if skill not in fixed}}


SKILL_NOTE = ("Accuracy per skill of the video suite (exact match), each configuration on the samples the baseline "
              "answered; the last row is each skill's chance level (a uniform guess among the answers a single frame "
              "leaves possible, docs/video-data.md).")
BY_BUDGET_NOTE = ("Accuracy (retention against the baseline) of each method at each budget, the most retained "
                  "methods first. A budget that is no token count adds the tokens kept; an in-LLM method whose layers "
                  "saw another number on average adds its tokens per layer, as those papers count them.")


def print_summary(summary: pd.DataFrame, console: Console | None = None) -> None:
    """The columns that fit a terminal; summary.md has them all."""
    columns = {name: (heading, SUMMARY_COLUMNS[name][1]) for name, heading in TERMINAL_COLUMNS.items()}
    headings, rows = formatted(summary, columns)
    table = Table(title="tokensieve bench", box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False,
                  caption="paired with the baseline; timings are medians after warm-up; every column: summary.md")
    for index, heading in enumerate(headings):
        table.add_column(heading, justify="left" if index < 2 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    (console or Console()).print(table)


def write_tables(out: Path, summary: pd.DataFrame, categories: pd.DataFrame, headline: pd.DataFrame,
                 budgets: pd.DataFrame, skills: pd.DataFrame | None = None) -> None:
    """`summary.csv`, `summary.md` and `per_category.csv` in `out`; `budgets` is summary.by_budget's table;
    `skills` (the video suite: summary.per_skill's) adds the video tables to summary.md and `per_skill.csv`."""
    summary.to_csv(out / "summary.csv", index=False)
    video = "" if skills is None else (
        "## Video: accuracy against visual tokens\n\n" + markdown(summary, VIDEO_TOKENS_COLUMNS)
        + f"\n{VIDEO_TOKENS_NOTE}\n\n## Accuracy per skill\n\n" + markdown(skills, skill_columns(skills))
        + f"\n{SKILL_NOTE}\n\n")
    (out / "summary.md").write_text(
        "## Most accurate per budget\n\n" + markdown(headline, HEADLINE_COLUMNS)
        + f"\n{HEADLINE_NOTE}\n\n{video}## Accuracy by budget\n\n"
        + markdown(budgets, {column: (column, "{}") for column in budgets.columns})
        + f"\n{BY_BUDGET_NOTE}\n\n## Summary\n\n" + markdown(summary, SUMMARY_COLUMNS)
        + "\n## Per category\n\n" + markdown(categories, CATEGORY_COLUMNS))
    categories.to_csv(out / "per_category.csv", index=False)
    if skills is not None:
        skills.to_csv(out / "per_skill.csv", index=False)
