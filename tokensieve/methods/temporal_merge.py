"""``temporal_merge``: merge a video's tokens at one place across consecutive near-identical frames."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..sieve import Selection, VideoSieve, VisualTokens


@register
@dataclass
class TemporalMerge(VideoSieve):
    """Tokens at the same spatial place of consecutive frames that are near-identical merge into one, which stands at
    the first frame's slot and carries the run's mean.

    Rule: each token of frame f > 0 is paired with the token at the same (row, column) of frame f-1 and the pair
    scores their cosine similarity (projected tokens, as they come: not a growing group's mean). Pairs are merged,
    the most similar first (stable, ties to the lower index), until exactly ``keep`` tokens are left; a merged token
    joins its predecessor, so the merged pairs form runs of consecutive frames at one place, and each run becomes one
    token at its first frame's slot (its temporal, height and width positions) whose feature is the run's mean (a
    merge map: ``Selection.assignment``, the engine takes the group mean). A budget below one frame's tokens stops at
    one token per place (every pair merged). With ``threshold`` set, pairs below it never merge: ``keep`` is then a
    ceiling, and more tokens stay when fewer pairs reach it. A budget that covers the video, or a single frame, keeps
    every token as it is.

    A merged token holds several frames' content at one position; ``ts.apply(model, method, ppe=8)`` (Positional
    Preservation Embedding, docs/usage.md) lets it carry its members' temporal positions in its rotary frequencies.

    Baseline of issue 23 (no paper): the temporal merging the video methods share (DyCoke's TTM, FastVID's
    temporal segments), on its own. Defaults (ours): ``keep=0.25``; ``threshold=None`` (the budget alone decides, so
    the count is exact; 0.9 would merge only near-identical pairs). Videos only (``needs_video``).
    """

    name = "temporal_merge"
    paper = "baseline"

    keep: int | float = 0.25
    threshold: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        threshold = self.threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not -1 <= threshold <= 1):
            raise ValueError(f"threshold={threshold!r}: pass the cosine similarity at or above which two tokens at one "
                             f"place of consecutive frames may merge, a number in [-1, 1] (0.9: near-identical), or "
                             f"None to merge by the budget alone")

    def select_video(self, tokens: VisualTokens, k: int) -> Selection:
        t, h, w = tokens.frames
        n, per_frame = len(tokens), h * w
        if t == 1:
            return Selection.every(tokens)
        joins = self._joins(tokens.features.float().view(t, per_frame, -1), n - k)
        return self._runs(joins)

    def _joins(self, frames: torch.Tensor, most: int) -> torch.Tensor:
        """(t, per_frame) whether each token merges into the one at its place in the previous frame."""
        t, per_frame = frames.shape[:2]
        similarity = F.cosine_similarity(frames[1:], frames[:-1], dim=-1).flatten()  # token (f+1, p) to (f, p)
        if self.threshold is None:
            eligible, merges = torch.ones_like(similarity, dtype=torch.bool), min(most, len(similarity))
        else:
            eligible = similarity >= self.threshold
            merges = min(most, int(eligible.sum()))
        ranked = torch.sort(similarity.masked_fill(~eligible, -float("inf")), descending=True, stable=True).indices
        joins = torch.zeros(t * per_frame, dtype=torch.bool, device=frames.device)
        joins[per_frame + ranked[:merges]] = True
        return joins.view(t, per_frame)

    @staticmethod
    def _runs(joins: torch.Tensor) -> Selection:
        """The merge map of the runs ``joins`` forms: each token goes to the latest frame at its place, at or before
        its own, that did not join its predecessor."""
        t, per_frame = joins.shape
        device = joins.device
        frame = torch.arange(t, device=device)[:, None].expand(t, per_frame)
        first_frame = torch.where(joins, 0, frame).cummax(dim=0).values
        root = (first_frame * per_frame + torch.arange(per_frame, device=device)).flatten()
        kept = (~joins).flatten().nonzero().squeeze(1)
        slot = torch.full((t * per_frame,), -1, dtype=torch.long, device=device)
        slot[kept] = torch.arange(len(kept), device=device)
        return Selection(kept, assignment=slot[root])
