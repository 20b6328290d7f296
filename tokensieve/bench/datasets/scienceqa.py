"""ScienceQA-IMG (Lu et al., 2022): the test questions of ScienceQA that come with an image,
`derek-thomas/ScienceQA` (files data/<split>-*.parquet), or `lmms-lab/ScienceQA`, whose
ScienceQA-IMG/ folder has the same columns and is read in preference to its ScienceQA-FULL/.

Columns: image (None for text-only questions, which are skipped), question, choices, answer (the
index of the right choice), hint, task, grade, subject, topic, category, skill, lecture, solution.
Split: test (2017 questions with images).

Prompt (LLaVA / lmms-eval): a "Context: <hint>" line when there is a hint, the question, the options as
"A. text" lines, then the answer-with-a-letter instruction. Official scoring: accuracy of the option
letter read from the reply (options.option_letter); per-category accuracy by subject (natural,
social, language science), as the ScienceQA paper reports it.
"""

from __future__ import annotations

from pathlib import Path

from .common import Sample, check_lengths, decode_image, parquet_files, per_category_mean, read_rows
from .options import LETTERS, multiple_choice_prompt, option_letter

REPO = "derek-thomas/ScienceQA"


def load(data: Path | str | None, split: str = "test", limit: int | None = None) -> list[Sample]:
    samples = []
    img_folder = "ScienceQA-IMG" if data is not None and (Path(data) / "ScienceQA-IMG").is_dir() else None
    for index, row in enumerate(read_rows(parquet_files("ScienceQA", REPO, data, split, img_folder))):
        if row["image"] is None:
            continue
        context = f"Context: {row['hint']}\n" if row["hint"] else ""
        choices = list(row["choices"])
        samples.append(Sample(
            id=f"{split}-{index}", image=decode_image(row["image"]),
            question=multiple_choice_prompt(f"{context}{row['question']}", choices),
            answers=[LETTERS[row["answer"]]], category=row["subject"],
            meta={"options": choices, "grade": row["grade"], "topic": row["topic"]}))
        if limit is not None and len(samples) == limit:
            break
    return samples


def score(samples: list[Sample], predictions: list[str]) -> dict:
    """Option-letter accuracy, overall and per subject; per-sample 0/1."""
    check_lengths(samples, predictions)
    per_sample = [float(option_letter(p, s.meta["options"]) == s.answers[0])
                  for s, p in zip(samples, predictions)]
    return {"n": len(samples), "accuracy": sum(per_sample) / len(per_sample),
            "by_category": per_category_mean(samples, per_sample), "per_sample": per_sample}
