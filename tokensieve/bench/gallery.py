"""The report's gallery: for a few samples, each method's kept patches (merging methods: its merge groups,
each painted its mean colour) at each budget, side by side; for a video, a strip of its frames, each with the
patches kept in it and the frames that kept none marked as dropped."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tokensieve.draw import grey_out, merge_groups

from .summary import BASELINE

GALLERY_SAMPLES = 6
THUMBNAIL_PIXELS = 192  # longest side; a 24x24 grid still shows 8-pixel patches
FRAME_THUMBNAIL_PIXELS = 96  # a video's frames: a strip of 8 to 16 of them fits a row
MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}


def file_data_uri(path: Path) -> str:
    """The file as a data: URI, so the report needs nothing beside it."""
    return f"data:{MIME[path.suffix]};base64,{base64.b64encode(path.read_bytes()).decode()}"


def thumbnail_data_uri(image: Image.Image, pixels: int = THUMBNAIL_PIXELS) -> str:
    small = image.convert("RGB")
    small.thumbnail((pixels, pixels))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=88)  # JPEG: a gallery of PNGs would make the report tens of MB
    return f"data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}"


@dataclass
class FrameThumb:
    """One frame of a video's grid as a configuration kept it."""

    index: int  # the frame's place in the video's (t, h, w) grid
    kept: int  # tokens it kept; 0: the frame was dropped
    image_uri: str


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
    image_uri: str  # "" for a video, whose pictures are `frames`
    frames: list[FrameThumb] | None = None  # a video's frames, in order


@dataclass
class GallerySample:
    sample: str
    category: str
    question: str
    target: str
    baseline: Cell
    rows: dict[str, list[Cell]]  # method -> its cells from the smallest budget up


def _cell(record: pd.Series, baseline_answer: str, image: Image.Image | list[Image.Image]) -> Cell:
    """`image`: the sample's picture, or a video's frames (as rendered, in order)."""
    cell = Cell(config=record["config"], keep=record["keep_label"], tokens_after=int(record["tokens_after"]),
                tokens_before=int(record["tokens_before"]), prediction=str(record["prediction"]),
                correct=bool(record["correct"]), agrees=record["answer"] == baseline_answer, image_uri="")
    if isinstance(image, list):
        cell.frames = _frame_strip(record, image)
    else:
        cell.image_uri = thumbnail_data_uri(_kept_view(record, image))
    return cell


def _kept_view(record: pd.Series, image: Image.Image) -> Image.Image:
    groups = record.get("groups")
    if record["config"] == BASELINE:
        shown = image
    elif isinstance(groups, list):  # a merging method: each group painted its mean colour
        shown = merge_groups(image, tuple(record["grid"]), groups)
    else:
        shown = grey_out(image, tuple(record["grid"]), record["kept"])
    return shown


def _frame_strip(record: pd.Series, frames: list[Image.Image]) -> list[FrameThumb]:
    """Each frame of the video's (t, h, w) grid with the patches not kept in it greyed out (a merging method: the
    slots its merged tokens kept). A grid frame may stand for several input frames (Qwen2-VL pairs them): it is
    shown as the first of them."""
    t, h, w = record["frames"]
    kept = np.asarray(record["kept"], dtype=np.int64)
    strip = []
    for index in range(t):
        in_frame = kept[(kept >= index * h * w) & (kept < (index + 1) * h * w)] - index * h * w  # raster order
        frame = frames[index * len(frames) // t]
        shown = frame if record["config"] == BASELINE else grey_out(frame, (h, w), in_frame)
        strip.append(FrameThumb(index, len(in_frame), thumbnail_data_uri(shown, FRAME_THUMBNAIL_PIXELS)))
    return strip


def saved_view(out: Path, sample: str) -> Image.Image | list[Image.Image] | None:
    """The picture the sweep saved for a sample (`images/<sample>.png`), or a video's frames
    (`images/<sample>/00.png`, ...); None where it saved none."""
    folder = out / "images" / sample
    if folder.is_dir():
        return [Image.open(path).convert("RGB") for path in sorted(folder.glob("*.png"))]
    path = out / "images" / f"{sample}.png"
    return Image.open(path).convert("RGB") if path.is_file() else None


def gallery(out: Path, runs: pd.DataFrame, summary: pd.DataFrame) -> list[GallerySample]:
    """The first few baseline samples with a saved image (or video), each with every configuration that answered it."""
    baseline = runs[runs["config"] == BASELINE]
    with_image = [s for s in baseline["sample"] if (out / "images" / f"{s}.png").is_file()
                  or (out / "images" / s).is_dir()][:GALLERY_SAMPLES]
    samples = []
    for sample in with_image:
        image = saved_view(out, sample)
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
