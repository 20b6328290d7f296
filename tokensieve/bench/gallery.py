"""The report's gallery: for a few samples, each method's kept patches (merging methods: its merge groups,
each painted its mean colour) at each budget, side by side."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from tokensieve.draw import grey_out, merge_groups

from .summary import BASELINE

GALLERY_SAMPLES = 6
THUMBNAIL_PIXELS = 192  # longest side; a 24x24 grid still shows 8-pixel patches
MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}


def file_data_uri(path: Path) -> str:
    """The file as a data: URI, so the report needs nothing beside it."""
    return f"data:{MIME[path.suffix]};base64,{base64.b64encode(path.read_bytes()).decode()}"


def thumbnail_data_uri(image: Image.Image) -> str:
    small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=88)  # JPEG: a gallery of PNGs would make the report tens of MB
    return f"data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}"


@dataclass
class Cell:
    """One configuration's view of one sample."""

    config: str
    keep: str
    tokens_after: int
    tokens_before: int
    prediction: str
    correct: bool
    agrees: bool  # the same answer as the baseline's (after normalisation)
    image_uri: str


@dataclass
class GallerySample:
    sample: str
    category: str
    question: str
    target: str
    baseline: Cell
    rows: dict[str, list[Cell]]  # method -> its cells from the smallest budget up


def _cell(record: pd.Series, baseline_answer: str, image: Image.Image) -> Cell:
    groups = record.get("groups")
    if record["config"] == BASELINE:
        shown = image
    elif isinstance(groups, list):  # a merging method: each group painted its mean colour
        shown = merge_groups(image, tuple(record["grid"]), groups)
    else:
        shown = grey_out(image, tuple(record["grid"]), record["kept"])
    return Cell(config=record["config"], keep=record["keep_label"], tokens_after=int(record["tokens_after"]),
                tokens_before=int(record["tokens_before"]), prediction=str(record["prediction"]),
                correct=bool(record["correct"]), agrees=record["answer"] == baseline_answer,
                image_uri=thumbnail_data_uri(shown))


def gallery(out: Path, runs: pd.DataFrame, summary: pd.DataFrame) -> list[GallerySample]:
    """The first few baseline samples with a saved image, each with every configuration that answered it."""
    baseline = runs[runs["config"] == BASELINE]
    with_image = [s for s in baseline["sample"] if (out / "images" / f"{s}.png").is_file()][:GALLERY_SAMPLES]
    samples = []
    for sample in with_image:
        image = Image.open(out / "images" / f"{sample}.png").convert("RGB")
        records = {record["config"]: record for _, record in runs[runs["sample"] == sample].iterrows()}
        base = records[BASELINE]
        rows: dict[str, list[Cell]] = {}
        for config, method in zip(summary["config"], summary["method"]):  # summary order: fewest tokens first
            if config != BASELINE and config in records:
                rows.setdefault(method, []).append(_cell(records[config], base["answer"], image))
        samples.append(GallerySample(sample=sample, category=str(base["category"]), question=str(base["question"]),
                                     target=str(base["target"]), baseline=_cell(base, base["answer"], image),
                                     rows=rows))
    return samples
