"""``holitom``: HoliTom's merging outside the LLM: global temporal segments, each segment's static tokens merged across
its frames and by density, each frame's other tokens pruned by attention."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import split_budget
from ..sieve import Selection, VideoSieve, VisualTokens, check_fraction
from ..signals import Signal
from .sparsevlm_recycling import dpc_knn

#: the reference's neighbours for the local density of DPC-kNN (its ``K``), never more than the clusters it asks for
NEIGHBOURS = 7
ATTENTION = Signal("vision_attention", queries="mean")


@register
@dataclass
class HoliTom(VideoSieve):
    """Cut the video into segments that save the most tokens, merge each segment's static tokens (one per place, then
    by density), and keep each frame's other tokens by attention.

    Paper: "HoliTom: Holistic Token Merging for Fast Video Large Language Models" (Shao et al., arXiv 2505.21334);
    official code cokeshao/HoliTom, read at commit e9b2972f (holitom/llava_arch.py, LLaVA-OneVision). Rule, per video
    of t frames of p places:

    1. Global temporal segmentation: a token is *similar* to the one at its place in the next frame when their cosine
       exceeds ``tau``; a segment of frames a..b (two or more) saves ``(b - a) * S(a, b)`` tokens, ``S`` the places
       similar through all its transitions. Dynamic programming over the frames picks the segments saving the most
       (the code's ``select_static_windows``: frame i alone, or the window ending at i that improves the best strictly,
       shortest first).
    2. A segment's static places become one token each, their mean over the segment's frames; the rest of each frame
       is its dynamic part. The budget ``keep`` is shared by the parts (each segment's static part, each frame's
       dynamic part) in proportion to their sizes (the code's retain ratio raised to ``keep / (N - saved)``).
    3. A static part keeps its share as DPC-kNN clusters of its static tokens (density over the ``min(7, share)``
       nearest, centres by ``distance to denser * density``, every token to its nearest centre), each cluster one token
       at its centre's place in the segment's first frame, ``beta * centre + (1 - beta) * mean(others)``.
    4. A dynamic part keeps its ``round(share * (1 - context))`` most attended tokens (``vision_attention(queries=
       "mean")`` at the feature layer, head mean: the code's last-layer attention averaged over heads and queries)
       and merges the rest into ``share - that`` DPC-kNN clusters as in 3 (the code's ``D``); other tokens are dropped.

    Merges are a merge map (``Selection.assignment`` with weights), so ``ppe=`` applies. Defaults from the code and
    its README's command (``RETAIN_RATIO=0.15 T=0.80``, code defaults ``BETA=0.6``, ``D=0``, ``K=7``): ``keep=0.15``,
    ``tau=0.8``, ``beta=0.6``, ``context=0.0`` (dynamic tokens pruned by attention alone). The inner-LLM merge of the
    full method (``HOLITOM_k=18 HOLITOM_r=0.5``) is ``holitom_llm``: the paper's method is ``holitom+holitom_llm``.

    Deviations: the parts share the budget by largest remainder, so the count is exact unless static merging alone
    goes below it (the code rounds each part's count, ``round`` for static and ``ceil`` for dynamic parts, and keeps
    about ``keep``); a part may get no token. The code's ``MAX_WINDOW_SIZE`` (1024 frames) is not applied. Density ties
    go to the lower index (the code adds noise of 1e-6). Kept tokens stay in the video's order at their own positions
    (the code's LLaVA-OneVision lays a segment's static tokens out before its dynamic ones, or sorts them into the
    first frame's grid with newline tokens); its 2D pooling is the model's. Videos only (``needs_video``).
    """

    name = "holitom"
    paper = "HoliTom (arXiv 2505.21334)"
    signals = ("vision_attention",)

    keep: int | float = 0.15
    tau: float = 0.8
    context: float = 0.0
    beta: float = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not -1 <= self.tau <= 1:
            raise ValueError(f"tau={self.tau!r}: pass the cosine above which a token counts as static between two "
                             f"frames, a number in [-1, 1] (the code's T, 0.8)")
        check_fraction("context", self.context, "the share of each frame's dynamic budget merged by density (the code's D)")
        check_fraction("beta", self.beta, "the weight of a cluster's centre in its merged token")

    def requests(self) -> tuple[Signal, ...]:
        return (ATTENTION,)

    def select_video(self, tokens: VisualTokens, k: int) -> Selection:
        t, h, w = tokens.frames
        per_frame = h * w
        frames = tokens.features.float().view(t, per_frame, -1)
        attention = tokens[ATTENTION].float().mean(dim=0).view(t, per_frame)
        dissimilar = F.cosine_similarity(frames[1:], frames[:-1], dim=-1) <= self.tau  # (t - 1, p): frame f+1 to f
        breaks = torch.cat([torch.zeros_like(dissimilar[:1]), dissimilar]).long().cumsum(dim=0)  # (t, p): up to each frame
        segments = self.segments(breaks)
        static = [breaks[b] == breaks[a] if b > a else torch.zeros_like(breaks[a], dtype=torch.bool) for a, b in segments]
        counts = [int(mask.sum()) for mask in static]
        sizes = [size for (a, b), c in zip(segments, counts) for size in [c] + [per_frame - c] * (b - a + 1)]
        shares = iter(split_budget(sizes, k))
        owner = torch.full((t, per_frame), -1, dtype=torch.long, device=frames.device)  # flat index of each token's kept one
        weight = frames.new_zeros(t, per_frame)
        for (a, b), mask in zip(segments, static):
            self._merge_static(frames, owner, weight, a, b, mask.nonzero().squeeze(1), next(shares))
            dynamic = (~mask).nonzero().squeeze(1)
            for f in range(a, b + 1):
                self._prune_dynamic(frames[f], attention[f], owner[f], weight[f], f * per_frame, dynamic, next(shares))
        return _merge_map(owner.flatten(), weight.flatten())

    @staticmethod
    def segments(breaks: torch.Tensor) -> list[tuple[int, int]]:
        """(first, last) frame of each segment: the code's dynamic programming over ``saved[s][e] = (e - s) * S(s, e)``."""
        t = breaks.shape[0]
        static = (breaks[None, :, :] == breaks[:, None, :]).sum(dim=-1).tolist()  # static[s][e]: places similar from s to e
        best, first = [0] * t, [0] * t
        for i in range(t):
            best[i], first[i] = (best[i - 1] if i else 0), i
            for start in range(i - 1, -1, -1):  # windows of 2, 3, ... frames ending at i
                value = (best[start - 1] if start else 0) + (i - start) * static[start][i]
                if value > best[i]:
                    best[i], first[i] = value, start
        cuts, i = [], t - 1
        while i >= 0:
            cuts.append((first[i], i))
            i = first[i] - 1
        return cuts[::-1]

    def _merge_static(self, frames, owner, weight, a, b, places, share) -> None:
        """A segment's static places as ``share`` density clusters of their means over its frames, each at its centre's
        place in frame ``a``."""
        if share == 0 or len(places) == 0:
            return
        centres, joined = dpc_knn(frames[a:b + 1, places].mean(dim=0), share, min(NEIGHBOURS, share))
        owner[a:b + 1, places] = a * frames.shape[1] + places[centres][joined]
        weight[a:b + 1, places] = _cluster_weights(joined, centres, self.beta)

    def _prune_dynamic(self, frame, attention, owner, weight, offset, places, share) -> None:
        """One frame's dynamic places: its most attended ``share * (1 - context)`` kept, the rest of ``share`` as density
        clusters of the others."""
        if share == 0:
            return
        dominant = round(share * (1 - self.context))
        ranked = places[torch.sort(attention[places], descending=True, stable=True).indices]
        owner[ranked[:dominant]] = offset + ranked[:dominant]
        weight[ranked[:dominant]] = 1.0
        rest, clusters = ranked[dominant:].sort().values, share - dominant
        if clusters:
            centres, joined = dpc_knn(frame[rest], clusters, min(NEIGHBOURS, clusters))
            owner[rest] = offset + rest[centres][joined]
            weight[rest] = _cluster_weights(joined, centres, self.beta)


def _cluster_weights(joined: torch.Tensor, centres: torch.Tensor, beta: float) -> torch.Tensor:
    """Each member's weight in its cluster's token ``beta * centre + (1 - beta) * mean(others)`` (a centre alone: 1)."""
    others = torch.bincount(joined, minlength=len(centres)).float()[joined] - 1
    is_centre = torch.zeros_like(joined, dtype=torch.bool)
    is_centre[centres] = True
    return torch.where(is_centre, torch.where(others > 0, beta, 1.0), (1 - beta) / others.clamp(min=1))


def _merge_map(owner: torch.Tensor, weight: torch.Tensor) -> Selection:
    """The merge map of ``owner`` (each token's kept token, a flat index; -1: dropped), weighted by ``weight``."""
    kept = (owner == torch.arange(len(owner), device=owner.device)).nonzero().squeeze(1)
    slot = torch.full_like(owner, -1)
    slot[kept] = torch.arange(len(kept), device=owner.device)
    return Selection(kept, assignment=torch.where(owner >= 0, slot[owner.clamp(min=0)], -1), weights=weight)
