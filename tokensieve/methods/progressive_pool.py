"""``progressive_pool``: each frame average-pooled, finer at the first frame of each group and coarser after it."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..sieve import Selection, VideoSieve, VisualTokens
from .pool import Pool


@register
@dataclass
class ProgressivePool(VideoSieve, Pool):
    """Frames in groups of ``group``; a frame's pooled resolution falls with its distance ``d`` from its group's first
    frame: it gets a share of the budget proportional to ``decay ** d`` and is average-pooled to that share (``pool``'s
    rule: the largest grid of at most its share that keeps the frame's aspect, each cell at its centre token).

    Paper: "Visual Context Window Extension: A New Perspective for Long Video Understanding" (Wei and Chen, arXiv
    2409.20018), its training-free progressive pooling at inference: frames of a temporal group keep a fine pooling at
    intervals and their temporally redundant neighbours a coarser one, so the token count grows sub-linearly with
    the frames. No official code was found and the paper's exact grouping and strides were not available here: the
    schedule above (geometric shares by distance within a group) is ours, after that description. The paper's other
    part, a YaRN-style rescaling of the visual positions, is not done (kept tokens keep their own positions).

    Budget: shares ``k * decay^d / sum`` rounded by largest remainder (ties to the earlier frame), capped at a frame's
    tokens with the surplus passed on in proportion; each frame then rounds down to a whole grid, so the count is at
    most ``keep``. Defaults (ours): ``keep=0.25``, ``group=4``, ``decay=0.5`` (each frame of a group half the
    previous one's tokens); ``decay=1`` is ``pool`` per frame. Videos only (``needs_video``).
    """

    name = "progressive_pool"
    paper = "Visual Context Window Extension (arXiv 2409.20018)"

    keep: int | float = 0.25
    group: int = 4
    decay: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"group={self.group!r}: pass the frames per group, an int >= 1 (its first frame is the "
                             f"finest)")
        decay = self.decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ValueError(f"decay={decay!r}: pass each later frame's share relative to the one before, a number in "
                             f"(0, 1] (1: every frame alike)")

    def select_video(self, tokens: VisualTokens, k: int) -> Selection:
        t, h, w = tokens.frames
        per_frame = h * w
        device = tokens.features.device
        frames = tokens.features.view(t, per_frame, -1)
        kept, features = [], []
        for frame, share in enumerate(self.shares(t, per_frame, k)):
            if share:
                where, values = self.resample(frames[frame], (h, w), share)
                kept.append(frame * per_frame + where.to(device))
                features.append(values)
        return Selection(torch.cat(kept), torch.cat(features).to(tokens.features.dtype))

    def shares(self, t: int, per_frame: int, k: int) -> list[int]:
        """Each frame's token share of ``k``: proportional to ``decay ** (frame % group)``, at most ``per_frame``."""
        weights = [self.decay ** (frame % self.group) for frame in range(t)]
        shares = [0] * t
        open_frames = list(range(t))
        while k > 0 and open_frames:  # rounds: a frame that fills up passes its surplus to the others
            total = sum(weights[f] for f in open_frames)
            exact = {f: k * weights[f] / total for f in open_frames}
            part = {f: int(exact[f]) for f in open_frames}
            for f in sorted(open_frames, key=lambda f: part[f] - exact[f])[: k - sum(part.values())]:
                part[f] += 1
            k = 0
            for f in open_frames:
                shares[f] += part[f]
                k += max(0, shares[f] - per_frame)
                shares[f] = min(shares[f], per_frame)
            open_frames = [f for f in open_frames if shares[f] < per_frame]
        return shares
