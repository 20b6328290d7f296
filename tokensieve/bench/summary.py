"""Aggregate a sweep's per-sample records into one row per configuration, and per category.

Every comparison with the baseline is paired: a configuration counts only the samples that the
baseline also answered, so a partial or resumed sweep summarises the same way a complete one does.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pandas as pd

from tokensieve.qa import CHANCE, SKILLS, VIDEO_CHANCE, VIDEO_SKILLS, accuracy_by_skill, normalise

BASELINE = "baseline"
MIB = 2**20
CONFIDENCE = 0.95
_Z = statistics.NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)  # 1.96


def wilson_interval(accuracy: float, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion `accuracy` observed on `n` samples; NaNs for none.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or 1. Partial credit
    (TextVQA's scores) goes in as the mean score, where the interval is an approximation."""
    if n == 0:
        return float("nan"), float("nan")
    z2_n = _Z**2 / n
    centre = (accuracy + z2_n / 2) / (1 + z2_n)
    half_width = _Z / (1 + z2_n) * math.sqrt(accuracy * (1 - accuracy) / n + z2_n / (4 * n))
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def read_runs(out: Path) -> pd.DataFrame:
    """Every record of `out/runs/*.jsonl`, one row each, with `keep_label` and `answer` columns added."""
    records = []
    for path in sorted((out / "runs").glob("*.jsonl")):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines) - 1:  # a sweep killed mid-write leaves a torn last line
                    continue
                raise ValueError(f"{path}:{number + 1}: not a JSON record") from None
    if not records:
        raise ValueError(f"no records in {out / 'runs'}")
    for record in records:  # before pandas turns the keeps 64 and 0.25 into floats: as the sweep spelt them
        record["keep_label"] = "" if record.get("keep") is None else str(record["keep"])
    runs = pd.DataFrame.from_records(records)
    if BASELINE not in set(runs["config"]):
        raise ValueError(f"no '{BASELINE}' records in {out / 'runs'}: nothing to compare with")
    # A resumed sweep may have written a sample twice; the later record wins.
    runs = runs.drop_duplicates(["config", "sample"], keep="last").reset_index(drop=True)
    runs["method"] = runs["method"].fillna(BASELINE)
    # Per-sample credit: a benchmark's partial score where it has one (TextVQA's VQA accuracy), else 0 or 1.
    correct = runs["correct"].astype(float)
    runs["score"] = runs["score"].astype(float).fillna(correct) if "score" in runs else correct
    runs["answer"] = runs["prediction"].map(normalise)
    return runs


def paired(runs: pd.DataFrame) -> pd.DataFrame:
    """The records whose sample the baseline also answered, each with the baseline's `base_*` columns."""
    base = runs[runs["config"] == BASELINE][["sample", "score", "answer", "prefill_flops"]]
    base = base.rename(columns={c: f"base_{c}" for c in ["score", "answer", "prefill_flops"]})
    return runs.merge(base, on="sample", how="inner")


def _median_ms(seconds: pd.Series) -> float:
    """Median in ms of the values present; NaN when none is (the baseline has no selection time)."""
    seconds = pd.to_numeric(seconds).dropna()
    return float(seconds.median() * 1e3) if len(seconds) else float("nan")


def _mean_or(rows: pd.DataFrame, column: str, fallback: pd.Series) -> float:
    values = rows[column].fillna(fallback) if column in rows else fallback
    return float(values.mean())


def _summarise_config(rows: pd.DataFrame) -> dict:
    timed = rows[~rows["warmup"].astype(bool)]  # warm-up samples pay one-off costs: no timings from them
    accuracy = rows["score"].mean()
    base_accuracy = rows["base_score"].mean()
    low, high = wilson_interval(accuracy, len(rows))
    # records written before the meter measured the added peak carry none (docs/results/README.md)
    peak = rows["peak_memory_added_bytes"].dropna() if "peak_memory_added_bytes" in rows else pd.Series(dtype=float)
    return {
        "config": rows["config"].iloc[0],
        "method": rows["method"].iloc[0],
        "keep": rows["keep_label"].iloc[0],
        "tokens_kept": rows["tokens_after"].mean(),
        "tokens_before": rows["tokens_before"].mean(),
        # records written before these were recorded: the tokens after every stage stand for both
        "tokens_llm_input": _mean_or(rows, "tokens_llm_input", rows["tokens_after"]),
        "tokens_per_layer": _mean_or(rows, "tokens_per_layer", rows["tokens_after"]),
        "accuracy": accuracy,
        "accuracy_low": low,
        "accuracy_high": high,
        "baseline_accuracy": base_accuracy,
        "retention": accuracy / base_accuracy if base_accuracy > 0 else float("nan"),
        "agreement": (rows["answer"] == rows["base_answer"]).mean(),
        "prefill_gflops": rows["prefill_flops"].mean() / 1e9,
        "prefill_flops_ratio": rows["prefill_flops"].sum() / rows["base_prefill_flops"].sum(),
        "vision_gflops": rows["vision_flops"].mean() / 1e9,
        "prefill_ms": _median_ms(timed["prefill_seconds"]),
        "decode_ms_per_token": _median_ms(timed["decode_seconds_per_token"]),
        "peak_memory_added_mib": float(peak.max()) / MIB if len(peak) else float("nan"),
        "kv_cache_mib": rows["kv_cache_bytes"].mean() / MIB,
        "selection_ms": _median_ms(timed["selection_seconds"]),
        "n": len(rows),
        "n_timed": len(timed),
        **(_frames_kept(rows) if "kept_frames" in rows else {}),
    }


def _frames_kept(rows: pd.DataFrame) -> dict:
    """A video's frames (of its grid, t) and those that kept any token, means over the samples."""
    videos = rows[rows["kept_frames"].notna()]
    return {"frames": videos["frames"].map(lambda thw: thw[0]).mean(),
            "frames_kept": videos["kept_frames"].map(len).mean()}


def config_rank(pairs: pd.DataFrame) -> dict[str, int]:
    """Baseline first, then methods by name, each from the fewest tokens kept to the most."""
    configs = pairs.groupby("config").agg(method=("method", "first"), tokens=("tokens_after", "mean")).reset_index()
    configs["is_method"] = configs["config"] != BASELINE
    configs = configs.sort_values(["is_method", "method", "tokens", "config"])
    return {config: rank for rank, config in enumerate(configs["config"])}


def category_rank(category: str) -> tuple:
    """The QA suites' skills in their own order (the image suite's, then the video suite's), any other category
    alphabetically after them."""
    skills = SKILLS + VIDEO_SKILLS
    return (skills.index(category), "") if category in skills else (len(skills), category)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (see docs/bench-outputs.md for each column's definition)."""
    pairs = paired(runs)
    rank = config_rank(pairs)
    rows = [_summarise_config(group) for _, group in pairs.groupby("config")]
    return pd.DataFrame(sorted(rows, key=lambda row: rank[row["config"]])).reset_index(drop=True)


def per_category(runs: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per (configuration, category), with the baseline's on the same samples and the retention."""
    pairs = paired(runs)
    rank = config_rank(pairs)
    chance = chance_table(runs)  # MME's "existence" is not the QA suite's
    rows = []
    for (config, category), group in pairs.groupby(["config", "category"]):
        accuracy, base_accuracy = group["score"].mean(), group["base_score"].mean()
        low, high = wilson_interval(accuracy, len(group))
        rows.append({
            "config": config, "method": group["method"].iloc[0], "keep": group["keep_label"].iloc[0],
            "category": category, "n": len(group), "accuracy": accuracy, "accuracy_low": low, "accuracy_high": high,
            "baseline_accuracy": base_accuracy, "baseline_correct": group["base_score"].sum(),
            "retention": accuracy / base_accuracy if base_accuracy > 0 else float("nan"),
            "chance": chance.get(category, float("nan")),
        })
    rows.sort(key=lambda row: (rank[row["config"]], category_rank(row["category"])))
    return pd.DataFrame(rows)


def chance_table(runs: pd.DataFrame) -> dict[str, float]:
    """The chance level per skill of the QA suite whose skills the categories all are (the image suite's or the
    video suite's); empty for other benchmarks."""
    for chance in (CHANCE, VIDEO_CHANCE):
        if runs["category"].isin(list(chance)).all():
            return chance
    return {}


def chance_level(runs: pd.DataFrame) -> float | None:
    """The QA suite's chance accuracy over the baseline's samples; None for other benchmarks."""
    chance = chance_table(runs)
    if not chance:
        return None
    return float(runs.loc[runs["config"] == BASELINE, "category"].map(chance).mean())


def is_video_suite(runs: pd.DataFrame) -> bool:
    """Whether the records are the built-in video suite's (every category one of its skills)."""
    return chance_table(runs) is VIDEO_CHANCE


CHANCE_ROW = "chance"


def per_skill(runs: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """The video suite's accuracy per skill (`accuracy_by_skill`): a row per configuration in the summary's order,
    with its visual tokens at the LLM input and per layer, a column per skill and "overall", then the chance row."""
    pairs = paired(runs)
    rows = []
    for config in summary["config"]:
        group = pairs[pairs["config"] == config]
        table = accuracy_by_skill(list(zip(group["category"], group["correct"].astype(bool))), VIDEO_CHANCE)
        row = summary[summary["config"] == config].iloc[0]
        rows.append({"config": config, "method": row["method"], "keep": row["keep"],
                     "tokens_llm_input": row["tokens_llm_input"], "tokens_per_layer": row["tokens_per_layer"],
                     **{skill: values["accuracy"] for skill, values in table.items()}})
    base_skills = pairs.loc[pairs["config"] == BASELINE, "category"]
    chance = accuracy_by_skill([(skill, False) for skill in base_skills], VIDEO_CHANCE)  # its chance column only
    rows.append({"config": CHANCE_ROW, "method": CHANCE_ROW, "keep": "",
                 **{skill: values["chance"] for skill, values in chance.items()}})
    return pd.DataFrame(rows)


def budget_label(keep: str, tokens_kept: float) -> str:
    """A configuration's budget: its keep as swept; a chain, whose methods each have one, by the tokens it kept."""
    return keep or f"{tokens_kept:.0f}"


def headline(summary: pd.DataFrame) -> pd.DataFrame:
    """The baseline, then per budget (largest first) its most accurate configuration, of equals the fastest.

    `leader` names it and any equally accurate method; `speedup` is the baseline's time to first token over its."""
    base = summary[summary["config"] == BASELINE].iloc[0]
    reduced = summary[summary["config"] != BASELINE]
    reduced = reduced.assign(budget=[budget_label(k, t) for k, t in zip(reduced["keep"], reduced["tokens_kept"])])
    budgets = sorted((group for _, group in reduced.groupby("budget")),
                     key=lambda group: (-group["tokens_kept"].mean(), group["budget"].iloc[0]))
    table = pd.DataFrame([{**base, "budget": "all", "leader": BASELINE}, *map(_leader, budgets)])
    table["speedup"] = base["prefill_ms"] / table["prefill_ms"]
    return table


def by_budget(summary: pd.DataFrame) -> pd.DataFrame:
    """Every method's accuracy at every budget in one table: a row per method (the most retained first, by mean
    retention over its budgets), a column per budget (the most tokens first), the baseline's accuracy above.

    A cell reads `accuracy (retention)`; where the budget is no token count (a ratio, an adaptive budget) it adds
    the tokens kept, and where an in-LLM method's layers saw a different number on average, the tokens per layer
    (the way those papers count)."""
    base = summary[summary["config"] == BASELINE]
    reduced = summary[summary["config"] != BASELINE]
    reduced = reduced.assign(budget=[budget_label(k, t) for k, t in zip(reduced["keep"], reduced["tokens_kept"])])
    budgets = (reduced.groupby("budget")["tokens_kept"].mean().reset_index()
               .sort_values(["tokens_kept", "budget"], ascending=[False, True])["budget"])
    methods = reduced.groupby("method")["retention"].mean().sort_values(ascending=False, kind="stable").index
    cells = {(row.method, row.budget): _budget_cell(row) for row in reduced.itertuples()}
    table = pd.DataFrame([[cells.get((method, budget), "") for budget in budgets] for method in methods],
                         index=pd.Index(methods, name="method"), columns=list(budgets))
    if len(base):
        table.loc[f"baseline ({base['tokens_kept'].iloc[0]:.0f} tokens)"] = f"{base['accuracy'].iloc[0]:.3f}"
        table = table.iloc[[-1, *range(len(table) - 1)]]
    return table.reset_index()


def _budget_cell(row) -> str:
    notes = [] if row.budget == f"{row.tokens_kept:.0f}" else [f"{row.tokens_kept:.1f} tokens"]
    if abs(row.tokens_per_layer - row.tokens_kept) >= 0.5:
        notes.append(f"{row.tokens_per_layer:.0f} per layer")
    return f"{row.accuracy:.3f} ({row.retention:.0%}" + "".join(f", {note}" for note in notes) + ")"


def _leader(budget: pd.DataFrame) -> dict:
    """The budget's most accurate configuration (ties: the lower time to first token), naming the other equals."""
    ranked = budget.sort_values(["accuracy", "prefill_ms", "config"], ascending=[False, True, True],
                                na_position="last")
    best = ranked.iloc[0]
    if len(budget) == 1:  # a budget swept for one method only (random:0.1): no contest to have won
        return {**best, "leader": f"{best['method']} (alone at this budget)"}
    equals = ranked[(ranked["accuracy"] == best["accuracy"]) & (ranked["config"] != best["config"])]["method"]
    return {**best, "leader": best["method"] + (f" (= {', '.join(equals)})" if len(equals) else "")}
