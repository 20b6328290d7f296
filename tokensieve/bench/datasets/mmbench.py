"""MMBench (Liu et al., 2023): multiple-choice perception and reasoning questions, `lmms-lab/MMBench`.

Columns: index, question, hint, answer (a letter), A, B, C, D (unused options empty), category,
image, source, L2-category, comment, split. Config "en" (files en/dev-*.parquet, en/test-*.parquet;
`lmms-lab/MMBench_EN` has the same files without the en/ folder); the dev split has public answers.
Prompt (LLaVA / lmms-eval): the hint and a newline when there is a hint, the question, the options
as "A. text" lines, then the answer-with-a-letter instruction.

Official scoring: CircularEval. Each question is also asked with its options rotated; these
copies are stored with index = original index + k x 1,000,000, and a question counts as right only
when every copy of it is answered right. `score` reports that circular accuracy (overall and per
category) next to the plain per-row accuracy; when the files hold no rotated copies the two agree.
The letter is read by MMBench's rule-based matcher (options.option_letter); the evaluator's GPT
fallback for replies that name no option is not reproduced: such replies count as wrong.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .common import Sample, check_lengths, decode_image, parquet_files, read_rows
from .options import LETTERS, multiple_choice_prompt, option_letter

REPO = "lmms-lab/MMBench"
CIRCULAR_STRIDE = 1_000_000


def _present(value) -> bool:
    """MMBench marks absent hints and options as None, NaN or the string "nan"."""
    return value is not None and not (isinstance(value, float) and math.isnan(value)) \
        and str(value).strip().lower() not in ("", "nan", "none")


def load(data: Path | str | None, split: str = "dev", limit: int | None = None,
         language: str = "en") -> list[Sample]:
    samples = []
    language_folder = language if data is not None and (Path(data) / language).is_dir() else None
    for row in read_rows(parquet_files("MMBench", REPO, data, split, language_folder), limit):
        options = [str(row[letter]) for letter in LETTERS[:4] if _present(row.get(letter))]
        hint = f"{row['hint']}\n" if _present(row.get("hint")) else ""
        samples.append(Sample(
            id=str(row["index"]), image=decode_image(row["image"]),
            question=multiple_choice_prompt(f"{hint}{row['question']}", options),
            answers=[row["answer"]], category=row["category"],
            meta={"options": options, "circular_group": int(row["index"]) % CIRCULAR_STRIDE,
                  "l2_category": row.get("L2-category", row.get("l2-category")), "source": row.get("source")}))
    return samples


def score(samples: list[Sample], predictions: list[str]) -> dict:
    """Circular accuracy (all copies right), overall and per category; plain accuracy; per-sample 0/1."""
    check_lengths(samples, predictions)
    per_sample = [float(option_letter(p, s.meta["options"]) == s.answers[0])
                  for s, p in zip(samples, predictions)]
    groups: dict[int, list[float]] = defaultdict(list)
    group_category: dict[int, str] = {}
    for sample, right in zip(samples, per_sample):
        groups[sample.meta["circular_group"]].append(right)
        group_category[sample.meta["circular_group"]] = sample.category
    passed = {group: all(rights) for group, rights in groups.items()}
    by_category: dict[str, list[bool]] = defaultdict(list)
    for group, ok in passed.items():
        by_category[group_category[group]].append(ok)
    return {"n": len(samples), "questions": len(groups),
            "circular_accuracy": sum(passed.values()) / len(passed),
            "accuracy": sum(per_sample) / len(per_sample),
            "by_category": {name: sum(v) / len(v) for name, v in sorted(by_category.items())},
            "per_sample": per_sample}
