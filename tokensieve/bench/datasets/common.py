"""The common sample shape, reading a benchmark's Hugging Face parquet files, and the missing-data error.

Every loader reads the parquet layout that `hf download <repo> --repo-type dataset`
writes (the one lmms-eval loads): files named `<split>-NNNNN-of-NNNNN.parquet`, images stored as
`{"bytes", "path"}` structs. Nothing is downloaded here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
LETTER_ANSWER_PROMPT = "Answer with the option's letter from the given choices directly."


@dataclass
class Sample:
    """One benchmark question, as the model sees it and as the scorer needs it."""

    id: str
    image: Image.Image
    question: str  # the full prompt text of the benchmark's standard (LLaVA / lmms-eval) eval
    answers: list[str]  # reference answer(s): ten for TextVQA, one option letter for multiple choice
    category: str  # for per-category accuracy
    meta: dict = field(default_factory=dict)


class BenchmarkDataMissing(FileNotFoundError):
    """The benchmark's files are not on disk; the message says how to get them."""

    def __init__(self, benchmark: str, repo: str, data: Path | str | None, detail: str):
        where = f"{data}" if data is not None else "no --data path given"
        super().__init__(
            f"{benchmark} data not found ({where}: {detail}). It cannot be downloaded from here; on a "
            f"machine with network access run `hf download {repo} --repo-type dataset --local-dir DIR`, "
            f"then pass --data DIR (the folder, or one of its .parquet files).")


def parquet_files(benchmark: str, repo: str, data: Path | str | None, split: str,
                  subdir: str | None = None) -> list[Path]:
    """The parquet files of `split` under `data` (a downloaded dataset folder or one .parquet file)."""
    if data is None:
        raise BenchmarkDataMissing(benchmark, repo, data, "nothing to read")
    data = Path(data)
    if data.is_file() and data.suffix == ".parquet":
        return [data]
    if not data.is_dir():
        raise BenchmarkDataMissing(benchmark, repo, data, "no such file or folder")
    root = data / subdir if subdir else data
    files = sorted(root.rglob(f"{split}-*.parquet"))
    if not files:
        raise BenchmarkDataMissing(benchmark, repo, data,
                                   f"no {split}-*.parquet under {root}")
    return files


def read_rows(files: list[Path], limit: int | None = None) -> list[dict]:
    """The rows of the parquet files as dicts, at most `limit` of them (read no further)."""
    rows: list[dict] = []
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            rows.extend(batch.to_pylist())
            if limit is not None and len(rows) >= limit:
                return rows[:limit]
    return rows


def decode_image(cell: dict | None) -> Image.Image:
    """A `datasets.Image` cell ({"bytes", "path"}) as an RGB PIL image."""
    if cell is None:
        raise ValueError("row has no image")
    source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]
    return Image.open(source).convert("RGB")


def per_category_mean(samples: list[Sample], scores: list[float]) -> dict[str, float]:
    """The mean score of each category, categories sorted by name."""
    if len(samples) != len(scores):
        raise ValueError(f"{len(samples)} samples but {len(scores)} scores")
    by_category: dict[str, list[float]] = {}
    for sample, score in zip(samples, scores):
        by_category.setdefault(sample.category, []).append(score)
    return {name: sum(v) / len(v) for name, v in sorted(by_category.items())}


def check_lengths(samples: list[Sample], predictions: list[str]) -> None:
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    if not samples:
        raise ValueError("nothing to score")
