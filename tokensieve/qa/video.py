"""The video part of the built-in QA suite: short seeded clips whose questions need time to answer.

A clip is the image suite's shapes (its colours, shapes and renderer) on one of its background photos,
held still for the whole clip, with objects that appear one by one (order), move (motion), flash
(flashes), show in one frame only (needle) or change colour (change); video_questions.py makes them.
Clip `i` of a split is drawn from the seed (version seed, split seed, i) and its frame count alone, so
any clip can be rebuilt on its own; the splits use the image suite's split seeds under another version
seed, so they never share a clip with each other or with the image suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .backgrounds import random_background
from .dataset import SPLIT_SEEDS
from .scenes import COLOURS, outline
from .video_questions import MAKERS, VIDEO_CHANCE, VIDEO_SKILLS, Track, VideoQA, seen_answer

VIDEO_DATA_VERSION = "qa-video-v1"
_VERSION_SEED = 2  # the image suite's examples use 1
MIN_FRAMES, MAX_FRAMES, DEFAULT_FRAMES = 8, 32, 16


@dataclass
class Clip:
    """What is in each frame; `frames` draws them, the questions and `seen_answer` read the tracks."""

    seed: tuple[int, ...]
    tracks: list[Track]

    @property
    def n_frames(self) -> int:
        return len(self.tracks[0].poses)

    def frames(self, size: int = 224, indices: Sequence[int] | None = None) -> list[Image.Image]:
        """The frames (all, or those at `indices`) as RGB images of size x size pixels."""
        background = random_background(np.random.default_rng(self.seed), size)  # the same photo at every size
        frames = []
        for t in range(self.n_frames) if indices is None else indices:
            frame = background.copy()
            draw = ImageDraw.Draw(frame)
            for track in self.tracks:
                if (pose := track.poses[t]) is not None:
                    draw.polygon(outline(track.shape, pose.x * size, pose.y * size, track.r * size),
                                 fill=COLOURS[pose.colour], outline=(0, 0, 0), width=max(1, size // 112))
            frames.append(frame)
        return frames


@dataclass
class VideoExample:
    split: str
    index: int
    clip: Clip
    qa: VideoQA  # the example's skill: VIDEO_SKILLS[index % len(VIDEO_SKILLS)]

    def frames(self, size: int = 224) -> list[Image.Image]:
        return self.clip.frames(size)

    @property
    def skill(self) -> str:
        return self.qa.skill

    def seen_answer(self, frames: Sequence[int]) -> str | None:
        """The answer that only these frame indices determine, or None (see video_questions.seen_answer)."""
        return seen_answer(self.clip.tracks, frames, self.qa)


def video_example(split: str, index: int, frames: int = DEFAULT_FRAMES) -> VideoExample:
    """Clip `index` of `split` with `frames` frames (8 to 32) and its question."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    if index < 0:
        raise ValueError(f"example index must be >= 0, got {index}")
    if not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise ValueError(f"a clip has {MIN_FRAMES} to {MAX_FRAMES} frames, got frames={frames}")
    skill = VIDEO_SKILLS[index % len(VIDEO_SKILLS)]
    for attempt in range(100):
        seed = (_VERSION_SEED, SPLIT_SEEDS[split], index, attempt)
        try:
            tracks, qa = MAKERS[skill](np.random.default_rng((*seed, 1)), frames)  # stream 0 is the background
        except RuntimeError:  # crowded layout: try the next attempt
            continue
        return VideoExample(split, index, Clip(seed, tracks), qa)
    raise RuntimeError(f"no {skill} clip could be laid out for {split}[{index}]")


def video_examples(split: str, count: int, start: int = 0, frames: int = DEFAULT_FRAMES) -> list[VideoExample]:
    """Clips `start .. start+count-1` of a split; every skill appears equally often in blocks of 5."""
    return [video_example(split, i, frames) for i in range(start, start + count)]


__all__ = ["VIDEO_DATA_VERSION", "VIDEO_CHANCE", "VIDEO_SKILLS", "MIN_FRAMES", "MAX_FRAMES", "DEFAULT_FRAMES",
           "Clip", "VideoExample", "VideoQA", "video_example", "video_examples"]
