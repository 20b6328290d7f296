"""GQA (Hudson & Manning, 2019): compositional questions on Visual Genome images, `lmms-lab/GQA`.

Two configurations per split, as lmms-eval reads them: `<split>_balanced_instructions` (id,
imageId, question, answer, fullAnswer, isBalanced, groups, entailed, equivalent, types {structural,
semantic, detailed}, annotations, semantic, semanticStr) and `<split>_balanced_images` (id, image),
joined on imageId. The standard evaluation split is testdev (balanced).

Official scoring: exact match of the short answer (GQA's eval.py compares strings), after the
normalisation lmms-eval's GQA task applies to both sides: case and punctuation ignored, surrounding
whitespace dropped. Per-category accuracy uses the structural type (verify, query, choose, logical,
compare), the breakdown of the GQA paper.
"""

from __future__ import annotations

import string
from pathlib import Path

from .common import (SHORT_ANSWER_PROMPT, Sample, check_lengths, decode_image, parquet_files,
                     per_category_mean, read_rows)

REPO = "lmms-lab/GQA"
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def load(data: Path | str | None, split: str = "testdev", limit: int | None = None,
         subset: str = "balanced") -> list[Sample]:
    """`data`: the downloaded lmms-lab/GQA folder (holding `<split>_<subset>_instructions/` and
    `<split>_<subset>_images/`)."""
    questions = read_rows(parquet_files("GQA", REPO, data, split, f"{split}_{subset}_instructions"), limit)
    images = {row["id"]: row["image"]
              for row in read_rows(parquet_files("GQA", REPO, data, split, f"{split}_{subset}_images"))}
    samples = []
    for row in questions:
        if row["imageId"] not in images:
            raise ValueError(f"GQA question {row['id']}: image {row['imageId']} is not in the images files")
        types = row.get("types") or {}
        samples.append(Sample(
            id=str(row["id"]), image=decode_image(images[row["imageId"]]),
            question=f"{row['question'].strip()}\n{SHORT_ANSWER_PROMPT}", answers=[row["answer"]],
            category=types.get("structural") or "unknown",
            meta={"image_id": row["imageId"], "full_answer": row.get("fullAnswer"),
                  "semantic_type": types.get("semantic"), "detailed_type": types.get("detailed")}))
    return samples


def normalise_gqa_answer(text: str) -> str:
    """Case and punctuation ignored: " Yes." -> "yes"."""
    return " ".join(text.lower().translate(_NO_PUNCTUATION).split())


def score(samples: list[Sample], predictions: list[str]) -> dict:
    """Exact-match accuracy, overall and per structural type; per-sample 0/1."""
    check_lengths(samples, predictions)
    per_sample = [float(normalise_gqa_answer(p) == normalise_gqa_answer(s.answers[0]))
                  for s, p in zip(samples, predictions)]
    return {"n": len(samples), "accuracy": sum(per_sample) / len(per_sample),
            "by_category": per_category_mean(samples, per_sample), "per_sample": per_sample}
