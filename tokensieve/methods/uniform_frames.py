"""``uniform_frames``: every k-th frame of a video, dropped before the vision tower (a baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..sieve import Frames, Sieve


@register
@dataclass
class UniformFrames(Sieve):
    """Keep ``n`` frames evenly spaced, frame ``floor(i * t / n)`` for ``i < n`` (the first frame always), before the
    vision tower, so the tower encodes only those; the LLM gets all their tokens at the unpruned video's positions.

    ``n`` is ``frames`` when given, else the frames that fit the token budget ``keep`` (a count or a ratio of the
    video's tokens, whole frames: ``keep // tokens_per_frame``, at least one). For Qwen2-VL a frame is a temporal
    patch pair (two input frames). Baseline (issue 23); no paper. Default ``keep=0.25``. Videos only (``needs_video``).
    """

    name = "uniform_frames"
    paper = "baseline"
    stage = "frames"
    needs_video = True

    keep: int | float = 0.25
    frames: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.frames is not None and (isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1):
            raise ValueError(f"frames={self.frames!r}: pass the number of frames to keep, an int >= 1, or None to keep "
                             f"the frames that fit keep={self.keep}")

    def select_frames(self, frames: Frames) -> torch.Tensor:
        t, h, w = frames.grid
        n = self.frames if self.frames is not None else self.budget.resolve(t * h * w) // (h * w)
        n = max(1, min(t, n))
        return torch.arange(n) * t // n
