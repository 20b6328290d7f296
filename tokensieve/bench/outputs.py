"""Everything `tokensieve bench` writes after the sweep, from `OUT/runs/*.jsonl` and `OUT/sweep.json`.

Writes `summary.csv`, `summary.md`, `per_category.csv` (the video suite: `per_skill.csv` too), `oracle.csv`,
`oracle_distribution.csv`, `plots/*.png|svg` and `report.html` into OUT, and prints the summary table. It reads
only files, so it can be run again on a finished or partial sweep (docs/bench-outputs.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from . import plots
from .gallery import gallery
from .oracle import distribution, oracle
from .report import write_report
from .summary import (
    BASELINE,
    by_budget,
    chance_level,
    headline,
    is_video_suite,
    per_category,
    per_skill,
    read_runs,
    summarise,
)
from .tables import print_summary, write_tables


def write_outputs(out: Path, console: Console | None = None) -> None:
    out = Path(out)
    runs = read_runs(out)
    summary, categories = summarise(runs), per_category(runs)
    leaders = headline(summary)
    skills = per_skill(runs, summary) if is_video_suite(runs) else None
    write_tables(out, summary, categories, leaders, by_budget(summary), skills)
    print_summary(summary, console)

    oracle_table = oracle(runs)
    oracle_table.to_csv(out / "oracle.csv", index=False)
    oracle_distribution = distribution(oracle_table, summary)
    oracle_distribution.to_csv(out / "oracle_distribution.csv", index=False)

    chance, styles = chance_level(runs), plots.method_styles(summary)
    plot_names = [plots.accuracy_vs_tokens(summary, out / "plots", chance, styles),
                  plots.accuracy_vs_latency(summary, out / "plots", chance, styles)]
    if (summary["config"] != BASELINE).any():  # a baseline-only sweep has no retention or oracle to draw
        plot_names.append(plots.retention_heatmap(categories, out / "plots"))
    if not oracle_table.empty:
        plot_names.append(plots.oracle_cdf(oracle_distribution, out / "plots", styles))

    sweep_file = out / "sweep.json"
    sweep = json.loads(sweep_file.read_text()) if sweep_file.is_file() else None
    write_report(out, sweep, leaders, summary, categories, oracle_distribution, plot_names,
                 gallery(out, runs, summary), skills)
