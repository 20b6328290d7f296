"""How many visual tokens each question really needs: the smallest sufficient budget per sample.

For one method and one sample, the budgets are the method's swept configurations, ordered by the
tokens that sample kept under each. The oracle budget is the smallest budget at which the method
answers as the baseline does *and keeps doing so at every larger swept budget*. Requiring the
larger budgets too makes the answer a threshold rather than a lucky draw: with a yes/no question a
method that guesses agrees with the baseline half the time at some tiny budget, and taking the
single smallest agreeing budget would report that guess as what the question needs. A sample
that disagrees at the largest swept budget gets "never". Answers are compared after
`tokensieve.qa.normalise`, as agreement in the summary is.

Only samples that the baseline and every configuration of the method answered count, since the
rule looks at all of the method's budgets.
"""

from __future__ import annotations

import pandas as pd

from .summary import BASELINE, paired

NEVER = "never"


def _smallest_sufficient(agrees: list[bool]) -> int | None:
    """Index of the first budget from which every budget agrees (budgets ascending), None if the last disagrees."""
    first = None
    for index in reversed(range(len(agrees))):
        if not agrees[index]:
            break
        first = index
    return first


def oracle(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, sample): the oracle configuration, its keep and the tokens it kept, or "never"."""
    reduced = paired(runs)
    reduced = reduced[reduced["config"] != BASELINE]
    rows = []
    for method, group in reduced.groupby("method"):
        budgets = group["config"].nunique()
        for sample, ladder in group.groupby("sample"):
            if len(ladder) < budgets:  # a partial sweep: the rule cannot be checked at the missing budgets
                continue
            ladder = ladder.sort_values(["tokens_after", "config"])
            first = _smallest_sufficient((ladder["answer"] == ladder["base_answer"]).tolist())
            chosen = None if first is None else ladder.iloc[first]
            rows.append({
                "method": method, "sample": sample, "category": ladder["category"].iloc[0],
                "tokens_before": ladder["tokens_before"].iloc[0], "budgets": budgets,
                "oracle_config": NEVER if chosen is None else chosen["config"],
                "oracle_keep": NEVER if chosen is None else chosen["keep_label"],
                "oracle_tokens": float("nan") if chosen is None else chosen["tokens_after"],
            })
    return pd.DataFrame(rows, columns=["method", "sample", "category", "tokens_before", "budgets",
                                       "oracle_config", "oracle_keep", "oracle_tokens"])


def distribution(oracle_table: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Per method and budget (ascending, then "never"): how many samples need exactly that budget, and cumulatively."""
    rows = []
    for method, group in oracle_table.groupby("method"):
        configs = summary[summary["method"] == method]  # the summary lists them from fewest tokens kept up
        cumulative = 0
        for _, config in configs.iterrows():
            count = int((group["oracle_config"] == config["config"]).sum())
            cumulative += count
            rows.append({"method": method, "config": config["config"], "keep": config["keep"],
                         "tokens_kept": config["tokens_kept"], "samples": count,
                         "fraction": count / len(group), "cumulative_fraction": cumulative / len(group)})
        never = int((group["oracle_config"] == NEVER).sum())
        rows.append({"method": method, "config": NEVER, "keep": NEVER, "tokens_kept": float("nan"),
                     "samples": never, "fraction": never / len(group), "cumulative_fraction": 1.0})
    return pd.DataFrame(rows, columns=["method", "config", "keep", "tokens_kept", "samples", "fraction",
                                       "cumulative_fraction"])

