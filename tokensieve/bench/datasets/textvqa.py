"""TextVQA (Singh et al., 2019): questions that need reading text in the image, `lmms-lab/textvqa`.

Columns: image_id, question_id, question, question_tokens, image, image_width, image_height,
flickr_original_url, flickr_300k_url, answers (ten human answers), image_classes, set_name,
ocr_tokens. Split: validation (the test answers are hidden).

Official scoring (the TextVQA / EvalAI evaluator that LLaVA uses): normalise the prediction and
the ten human answers (vqa_normalise), then VQA accuracy = the mean, over the ten ways of leaving
one human out, of min(#remaining humans who gave the prediction / 3, 1). So 1 matching human
gives 0.3, 2 give 0.6, 3 give 0.9 and 4 or more give 1.
"""

from __future__ import annotations

from pathlib import Path

from .common import SHORT_ANSWER_PROMPT, Sample, check_lengths, decode_image, parquet_files, read_rows
from .vqa_normalise import normalise_vqa_answer

REPO = "lmms-lab/textvqa"


def load(data: Path | str | None, split: str = "validation", limit: int | None = None,
         with_ocr: bool = False) -> list[Sample]:
    """`with_ocr` adds the dataset's OCR tokens to the prompt as LLaVA-1.5's TextVQA eval does."""
    samples = []
    for row in read_rows(parquet_files("TextVQA", REPO, data, split), limit):
        ocr = f"\nReference OCR token: {', '.join(row['ocr_tokens'])}" if with_ocr else ""
        samples.append(Sample(
            id=str(row["question_id"]), image=decode_image(row["image"]),
            question=f"{row['question'].strip()}{ocr}\n{SHORT_ANSWER_PROMPT}",
            answers=list(row["answers"]), category="all",
            meta={"image_id": row["image_id"], "ocr_tokens": list(row["ocr_tokens"])}))
    return samples


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """min(#humans that said it / 3, 1), averaged over the leave-one-human-out subsets."""
    prediction = normalise_vqa_answer(prediction)
    humans = [normalise_vqa_answer(a) for a in human_answers]
    matches = sum(h == prediction for h in humans)
    # Leaving out a matching human leaves matches - 1; leaving out any other leaves matches.
    left_out_match = min((matches - 1) / 3, 1.0) * matches if matches else 0.0
    left_out_other = min(matches / 3, 1.0) * (len(humans) - matches)
    return (left_out_match + left_out_other) / len(humans)


def score(samples: list[Sample], predictions: list[str]) -> dict:
    """VQA accuracy, overall; per-sample soft scores."""
    check_lengths(samples, predictions)
    per_sample = [vqa_accuracy(p, s.answers) for s, p in zip(samples, predictions)]
    return {"n": len(samples), "accuracy": sum(per_sample) / len(per_sample), "per_sample": per_sample}
