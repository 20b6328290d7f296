"""``prunevid``: PruneVid's merging before the LLM: frames clustered into segments, tokens that stay alike through a
segment merged into one, then every part merged by density-peak clustering."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import split_budget
from ..sieve import Selection, VideoSieve, VisualTokens, check_fraction
from .sparsevlm_recycling import dpc_knn

#: the code's neighbours for the local density of DPC-kNN (``k=7``), never more than the points clustered
NEIGHBOURS = 7


@register
@dataclass
class PruneVid(VideoSieve):
    """Cluster the frames into contiguous segments; in each, tokens whose place stays alike across the segment's frames
    merge into one (static), and each segment's static tokens and each frame's other (dynamic) tokens merge into
    density-peak clusters.

    Paper: "PruneVid: Visual Token Pruning for Efficient Video Large Language Models" (Huang et al., ACL 2025 Findings,
    arXiv 2412.16117); official code Visual-AI/PruneVid, read at commit b12600c6 (models/pllava/modeling_pllava.py
    ``merge_frames_dynamic``, ``cluster_dpc_knn``, ``refine_clusters``; PLLaVA). Rule, per video of t frames:

    1. Segments: the frames' mean tokens form ``max(1, int(t * segment_ratio))`` DPC-kNN clusters (density over the
       ``min(7, t)`` nearest; centres by ``distance to denser * density``; each frame to its nearest centre). Made
       contiguous as the code's ``refine_clusters``: each cluster keeps its longest runs (a cluster whose runs are all
       single frames loses them all), and each other run joins its longer neighbour run (equal: the left one; none:
       cluster 0); a segment is a run of one cluster.
    2. In a segment of two or more frames a place is static when the mean cosine over every pair of its frames' tokens
       exceeds ``tau``; its tokens become their mean. The rest of each frame is its dynamic part.
    3. The budget ``keep`` is shared by the parts (each segment's static tokens, each frame's dynamic tokens) in
       proportion to their sizes, and each part becomes that many DPC-kNN clusters (k = 7 nearest), each the plain mean
       of its tokens at its centre's slot (a static cluster in the segment's first frame): a merge map, so ``ppe=``
       applies.

    Defaults from the code's eval script (scripts/eval.sh): ``tau=0.8``, ``segment_ratio=0.25``
    (``temporal_segment_ratio``); ``keep=0.5`` is its ``cluster_ratio``. Its question-guided pruning inside the LLM
    (``selected_layer=10``, ``alpha=0.4``) is ``prunevid_llm``: the paper's method is ``prunevid+prunevid_llm``.

    Deviations: the code clusters each part to ``int(0.5 * size)`` tokens and leaves parts of 14 tokens or fewer whole,
    so its count is about half of what static merging leaves; here the parts share ``keep`` (largest remainder), so
    the count is exact unless static merging alone goes below it (pass ``int(0.5 * (N - merged))`` to match the code's
    count on a video). Kept tokens stay in the video's order at their own positions (the code's PLLaVA lays each
    segment's static tokens out before its dynamic ones, numbered on in one sequence). The code's ``k=7`` neighbours
    assume at least 7 frames and tokens; here fewer take them all. Density ties go to the lower index (the code adds
    noise of 1e-6). Videos only (``needs_video``).
    """

    name = "prunevid"
    paper = "PruneVid (arXiv 2412.16117)"

    keep: int | float = 0.5
    tau: float = 0.8
    segment_ratio: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not -1 <= self.tau <= 1:
            raise ValueError(f"tau={self.tau!r}: pass the mean cosine above which a place is static through a segment, "
                             f"a number in [-1, 1] (the code's 0.8)")
        check_fraction("segment_ratio", self.segment_ratio, "the frame clusters per frame (the code's temporal_segment_ratio)")

    def select_video(self, tokens: VisualTokens, k: int) -> Selection:
        t, h, w = tokens.frames
        n, per_frame = len(tokens), h * w
        frames = tokens.features.float().view(t, per_frame, -1)
        segments = self.segments(frames)
        static = [self._static(frames[a:b + 1]) for a, b in segments]
        counts = [int(mask.sum()) for mask in static]
        sizes = [size for (a, b), c in zip(segments, counts) for size in [c] + [per_frame - c] * (b - a + 1)]
        shares = iter(split_budget(sizes, k))
        owner = torch.full((t, per_frame), -1, dtype=torch.long, device=frames.device)  # flat index of each token's kept one
        for (a, b), mask in zip(segments, static):
            places = mask.nonzero().squeeze(1)  # a static place's tokens all join its cluster's slot in frame a
            owner[a:b + 1, places] = _cluster(frames[a:b + 1, places].mean(dim=0), next(shares), a * per_frame + places)
            dynamic = (~mask).nonzero().squeeze(1)
            for f in range(a, b + 1):
                owner[f, dynamic] = _cluster(frames[f, dynamic], next(shares), f * per_frame + dynamic)
        owner = owner.flatten()
        kept = (owner == torch.arange(n, device=owner.device)).nonzero().squeeze(1)
        slot = torch.full_like(owner, -1)
        slot[kept] = torch.arange(len(kept), device=owner.device)
        return Selection(kept, assignment=torch.where(owner >= 0, slot[owner.clamp(min=0)], -1))

    def segments(self, frames: torch.Tensor) -> list[tuple[int, int]]:
        """(first, last) frame of each segment: DPC-kNN clusters of the frames' means, made contiguous."""
        t = frames.shape[0]
        _, labels = dpc_knn(frames.mean(dim=1), max(1, int(t * self.segment_ratio)), min(NEIGHBOURS, t))
        runs = _runs(refine(labels.tolist()))
        return [(start, start + length - 1) for _, start, length in runs]

    def _static(self, window: torch.Tensor) -> torch.Tensor:
        """(p,) whether each place's mean cosine over every pair of the window's frames exceeds tau (one frame: none)."""
        size = window.shape[0]
        if size == 1:
            return torch.zeros(window.shape[1], dtype=torch.bool, device=window.device)
        unit = F.normalize(window, dim=-1)
        pairs = (unit.sum(dim=0) ** 2).sum(dim=-1) - size  # sum over ordered pairs w != v of cos, the code's diagonal 1 off
        return pairs / (size * (size - 1)) > self.tau


def _cluster(values: torch.Tensor, share: int, slots: torch.Tensor) -> torch.Tensor:
    """``values`` (m, d), at flat indices ``slots``, as ``share`` DPC-kNN clusters: (m,) the slot of each one's centre
    (-1 for all: no share)."""
    if share == 0:
        return torch.full_like(slots, -1)
    centres, joined = dpc_knn(values, share, min(NEIGHBOURS, len(values)))
    return slots[centres][joined]


def refine(labels: list[int]) -> list[int]:
    """The code's ``refine_clusters``: each cluster keeps its longest runs of frames (none if they are single frames),
    and each run left over joins the longer of its neighbour runs (equal: the left one; none: cluster 0)."""
    longest: dict[int, int] = {}
    for label, _, length in _runs(labels):
        longest[label] = max(longest.get(label, 0), length)
    refined: list[int | None] = list(labels)
    for label, start, length in _runs(labels):
        if longest[label] == 1 or length < longest[label]:
            refined[start:start + length] = [None] * length
    i, n = 0, len(refined)
    while i < n:
        if refined[i] is not None:
            i += 1
            continue
        start = i
        while i < n and refined[i] is None:
            i += 1
        left = refined[start - 1] if start > 0 else None
        right = refined[i] if i < n else None
        left_length = next((j for j in range(start) if refined[start - 1 - j] != left), start) if left is not None else 0
        right_length = next((j for j in range(n - i) if refined[i + j] != right), n - i) if right is not None else 0
        label = left if left_length >= right_length and left is not None else right
        refined[start:i] = [0 if label is None else label] * (i - start)
    return refined


def _runs(labels: list) -> list[tuple]:
    """(label, first index, length) of each maximal run of equal labels."""
    runs = []
    for i, label in enumerate(labels):
        if runs and runs[-1][0] == label:
            runs[-1] = (label, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((label, i, 1))
    return runs
