"""MME (Fu et al., 2023): yes/no questions, two per image, in 14 subtasks, `lmms-lab/MME`.

Columns: question_id (the image's path, e.g. "code_reasoning/0020.png", shared by the image's two
questions), image, question (ending in " Please answer yes or no."), answer ("Yes"/"No"), category
(the subtask). Split: test. The prompt swaps the yes/no suffix for LLaVA's short-answer
instruction, as LLaVA's and lmms-eval's MME evaluations do.

Official scoring (MME's calculation.py, as lmms-eval ports it): a reply is lower-cased, stripped
and its periods dropped; "yes"/"no" (or "y"/"n") is itself, otherwise it is "yes" if its first four
characters hold "yes", "no" if they hold "no", else "other" (wrong). Per subtask: acc = share of
questions right, acc+ = share of images with both questions right, score = (acc + acc+) x 100.
Perception = sum of the 10 perception subtask scores (max 2000), cognition = sum of the 4
cognition ones (max 800).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .common import SHORT_ANSWER_PROMPT, Sample, check_lengths, decode_image, parquet_files, read_rows

REPO = "lmms-lab/MME"
YES_NO_SUFFIX = " Please answer yes or no."
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def load(data: Path | str | None, split: str = "test", limit: int | None = None) -> list[Sample]:
    samples = []
    for index, row in enumerate(read_rows(parquet_files("MME", REPO, data, split), limit)):
        question = row["question"].strip().replace(YES_NO_SUFFIX.strip(), "").rstrip()
        samples.append(Sample(
            id=f"{row['question_id']}#{index}", image=decode_image(row["image"]),
            question=f"{question}\n{SHORT_ANSWER_PROMPT}",
            answers=[row["answer"].strip().lower().rstrip(".")], category=row["category"],
            meta={"image_key": row["question_id"]}))
    return samples


def yes_no_other(reply: str) -> str:
    """MME's reading of a reply: "yes", "no" or "other"."""
    reply = reply.lower().strip().replace(".", "")
    if reply in ("yes", "no"):
        return reply
    if len(reply) == 1:
        return {"y": "yes", "n": "no"}.get(reply, "other")
    if "yes" in reply[:4]:
        return "yes"
    return "no" if "no" in reply[:4] else "other"


def score(samples: list[Sample], predictions: list[str]) -> dict:
    """Per-subtask acc, acc+ and score; perception, cognition and total scores; per-sample 0/1."""
    check_lengths(samples, predictions)
    per_sample = [float(yes_no_other(p) == s.answers[0]) for s, p in zip(samples, predictions)]
    images: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for sample, right in zip(samples, per_sample):
        images[sample.category][sample.meta["image_key"]].append(right)
    by_category = {}
    for name, by_image in sorted(images.items()):
        answers = [right for rights in by_image.values() for right in rights]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(rights) for rights in by_image.values()) / len(by_image)
        by_category[name] = {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100}
    unknown = set(by_category) - set(PERCEPTION) - set(COGNITION)
    if unknown:
        raise ValueError(f"MME subtasks not in the benchmark: {sorted(unknown)}")
    perception = sum(v["score"] for k, v in by_category.items() if k in PERCEPTION)
    cognition = sum(v["score"] for k, v in by_category.items() if k in COGNITION)
    return {"n": len(samples), "perception": perception, "cognition": cognition,
            "total": perception + cognition, "accuracy": sum(per_sample) / len(per_sample),
            "by_category": by_category, "per_sample": per_sample}
