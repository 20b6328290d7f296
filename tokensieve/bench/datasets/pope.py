"""POPE (Li et al., 2023): object-hallucination yes/no questions on COCO, `lmms-lab/POPE`.

Columns: id, question_id, question, answer ("yes"/"no"), image_source, image, category
(the negative-sampling setting: random / popular / adversarial). Split: test.

Official scoring (the POPE repository's evaluate.py, which LLaVA's eval_pope.py follows): keep
the first sentence of the reply, drop commas, and read it as "no" when one of its words is
"no", "not" or "No", otherwise as "yes". "yes" is the positive class: accuracy, precision,
recall, F1 and the yes-ratio (share of "yes" replies), overall and per setting.
lmms-eval instead counts only a reply that is exactly "yes"/"no"; replies from a model told to
answer in one word give the same numbers under both.
"""

from __future__ import annotations

from pathlib import Path

from .common import SHORT_ANSWER_PROMPT, Sample, check_lengths, decode_image, parquet_files, read_rows

REPO = "lmms-lab/POPE"


def load(data: Path | str | None, split: str = "test", limit: int | None = None) -> list[Sample]:
    rows = read_rows(parquet_files("POPE", REPO, data, split), limit)
    return [Sample(id=str(row["question_id"]), image=decode_image(row["image"]),
                   question=f"{row['question'].strip()}\n{SHORT_ANSWER_PROMPT}",
                   answers=[row["answer"].strip().lower()], category=row["category"],
                   meta={"image_source": row["image_source"]})
            for row in rows]


def yes_or_no(reply: str) -> str:
    """POPE's reading of a reply: "no" if its first sentence has the word no/not, else "yes"."""
    words = reply.split(".")[0].replace(",", "").split()
    return "no" if {"no", "not", "No"} & set(words) else "yes"


def _metrics(truths: list[str], replies: list[str]) -> dict[str, float]:
    pairs = list(zip(truths, replies))
    true_pos = sum(t == "yes" and r == "yes" for t, r in pairs)
    false_pos = sum(t == "no" and r == "yes" for t, r in pairs)
    false_neg = sum(t == "yes" and r == "no" for t, r in pairs)
    true_neg = sum(t == "no" and r == "no" for t, r in pairs)
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": len(pairs), "accuracy": (true_pos + true_neg) / len(pairs), "precision": precision,
            "recall": recall, "f1": f1, "yes_ratio": (true_pos + false_pos) / len(pairs)}


def score(samples: list[Sample], predictions: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio, overall and per category; per-sample 0/1."""
    check_lengths(samples, predictions)
    replies = [yes_or_no(p) for p in predictions]
    truths = [s.answers[0] for s in samples]
    by_category = {}
    for name in sorted({s.category for s in samples}):
        idx = [i for i, s in enumerate(samples) if s.category == name]
        by_category[name] = _metrics([truths[i] for i in idx], [replies[i] for i in idx])
    return {**_metrics(truths, replies), "by_category": by_category,
            "per_sample": [float(t == r) for t, r in zip(truths, replies)]}
