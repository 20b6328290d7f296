"""``fastvid``: FastVID, dynamic temporal segments, then salient tokens by attention and density-peak anchors merged."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import split_budget
from ..sieve import Selection, VideoSieve, VisualTokens
from ..signals import Signal

#: the reference's neighbours for the local density (DPC-kNN), its own token included
NEIGHBOURS = 4


@register
@dataclass
class FastVID(VideoSieve):
    """Cut the video where consecutive frames differ, keep each frame's most attended tokens, and in each segment merge
    the rest into density-peak anchors of every ``merge_every``-th frame.

    Paper: "FastVID: Dynamic Density Pruning for Fast Video Large Language Models" (Shen et al., arXiv 2503.11187);
    official code LunarShen/FastVID, read at commit a40a109c (fastvid_llavaonevision, modeling_qwen2.py, the
    "FastVID" block). Rule, per video of t frames:

    1. DySeg: frame features are the mean of each frame's tokens, cosine to the next frame; the video is cut after
       the ``segments - 1`` least similar transitions and after every one below ``tau``.
    2. STPrune: each frame keeps ``R`` tokens (the budget split evenly over frames); ``R - int(R * context)`` are
       its most attended tokens (ATS: ``vision_attention(queries="mean")`` at the tower's feature layer, averaged over
       heads; the reference averages the tower's attention the same way), kept as they are.
    3. DTM: the other ``int(R * context)`` per frame are pooled per segment and given to its anchor frames, every
       ``merge_every``-th frame counted back from the segment's last; an anchor frame picks its non-salient tokens of
       highest density-peak score (``exp(-mean d^2)`` over its 4 nearest, times the distance to the nearest denser
       token, distances ``/ sqrt(d)``). Every non-salient token of the segment joins its most cosine-similar anchor
       token; an anchor becomes ``w * itself + (1 - w) * mean(its group)``, ``w = max(1 / (size + 1), beta)``
       (a merge map with weights). Kept tokens stand at their own positions.

    Defaults from the official LLaVA-OneVision script (scripts/eval.sh at a40a109c): ``keep=0.1``
    (retention_ratio), ``segments=8`` (DySeg_c), ``tau=0.9`` (DySeg_tau), ``context=0.4`` (STPrune_d),
    ``merge_every=4`` (DTM_p), ``beta=0.6`` (DTM_beta). Its Qwen2.5-VL script uses ``keep=0.27, tau=0.84``.

    Deviations: the rule of the LLaVA-OneVision code (its Qwen2.5-VL code further splits segments at
    ``DySeg_ignore``; not done). There every anchor frame draws on all of its segment's tokens (a token feeds one
    anchor token in each anchor frame); here each token joins one anchor token of its segment (a merge map is a
    partition). The reference truncates the per-anchor share and may keep fewer tokens than its ratio; here the
    budget is split over frames (remainders to the earlier ones) and a segment's context over its anchors (to the
    earlier ones), so the count is exact unless an anchor frame runs out of non-salient tokens. Density ties go to
    the lower index (the reference adds uniform noise of 1e-6). Videos only (``needs_video``).
    """

    name = "fastvid"
    paper = "FastVID (arXiv 2503.11187)"
    signals = ("vision_attention",)

    keep: int | float = 0.1
    segments: int = 8
    tau: float = 0.9
    context: float = 0.4
    merge_every: int = 4
    beta: float = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("segments", "merge_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: pass an int >= 1")
        for name, low, high in (("tau", -1, 1), ("context", 0, 1), ("beta", 0, 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name}={value!r}: pass a number in [{low}, {high}]")

    def requests(self) -> tuple[Signal, ...]:
        return (Signal("vision_attention", queries="mean"),)

    def select_video(self, tokens: VisualTokens, k: int) -> Selection:
        t, h, w = tokens.frames
        per_frame = h * w
        frames = tokens.features.float().view(t, per_frame, -1)
        attention = tokens[self.requests()[0]].float().mean(dim=0).view(t, per_frame)
        device = frames.device
        retain = torch.tensor(split_budget([per_frame] * t, k), device=device)
        salient_counts = retain - (retain * self.context).long()
        context_counts = (retain - salient_counts).tolist()
        salient = self._salient(attention, salient_counts)
        density = self._density_scores(frames, salient)
        kept = salient.clone()
        groups = torch.full((t, per_frame), -1, dtype=torch.long, device=device)  # each token's anchor, a flat index
        for start, length in self._segments(frames):
            context = sum(context_counts[start:start + length])
            self._merge_segment(frames, salient, density, kept, groups, start, length, context)
        return self._selection(frames, kept.flatten(), groups.flatten())

    def _segments(self, frames: torch.Tensor) -> list[tuple[int, int]]:
        """DySeg: (first frame, length) of each segment."""
        t = frames.shape[0]
        if t == 1:
            return [(0, 1)]
        means = F.normalize(frames.mean(dim=1), dim=-1)
        similarity = (means[:-1] * means[1:]).sum(dim=-1)
        lowest = torch.sort(similarity, stable=True).indices[: self.segments - 1]
        cuts = torch.cat([lowest, (similarity < self.tau).nonzero().squeeze(1)]).unique().tolist()
        bounds = [0] + [c + 1 for c in cuts] + [t]
        return [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]

    @staticmethod
    def _salient(attention: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(t, per_frame) ATS: each frame's ``counts[f]`` most attended tokens (ties to the lower index)."""
        rank = torch.sort(attention, dim=1, descending=True, stable=True).indices.argsort(dim=1)
        return rank < counts[:, None]

    @staticmethod
    def _density_scores(frames: torch.Tensor, salient: torch.Tensor) -> torch.Tensor:
        """(t, per_frame) DPC-kNN score of each non-salient token among its frame's non-salient ones (-inf: salient)."""
        distance = torch.cdist(frames, frames) / frames.shape[-1] ** 0.5
        others = ~salient
        among = distance.masked_fill(~others[:, None, :], float("inf"))
        nearest = torch.sort(among, dim=-1).values[..., : min(NEIGHBOURS, among.shape[-1])]
        density = torch.exp(-(nearest.masked_fill(nearest.isinf(), 0) ** 2).mean(dim=-1))
        pairs = others[:, :, None] & others[:, None, :]
        farthest = distance.masked_fill(~pairs, 0).flatten(1).max(dim=1).values[:, None, None]
        denser = (density[:, None, :] > density[:, :, None]) & others[:, None, :]
        to_denser = torch.where(denser, distance, farthest).min(dim=-1).values
        return (to_denser * density).masked_fill(salient, -float("inf"))

    def _merge_segment(self, frames, salient, density, kept, groups, start, length, context) -> None:
        """DTM on one segment: its anchor frames pick their context tokens, every non-salient token joins the most
        similar one."""
        anchors = [f for f in range(start, start + length) if (start + length - 1 - f) % self.merge_every == 0]
        shares = [context // len(anchors) + (i < context % len(anchors)) for i in range(len(anchors))]
        for frame, share in zip(anchors, shares):
            share = min(share, int((~salient[frame]).sum()))
            picks = torch.sort(density[frame], descending=True, stable=True).indices[:share]
            kept[frame, picks] = True
        span = slice(start * frames.shape[1], (start + length) * frames.shape[1])
        contexts = ((kept & ~salient).flatten()[span]).nonzero().squeeze(1)
        members = (~salient.flatten()[span]).nonzero().squeeze(1)
        if len(contexts) == 0:
            return
        unit = F.normalize(frames.flatten(0, 1)[span], dim=-1)
        choice = contexts[(unit[members] @ unit[contexts].T).argmax(dim=1)]
        choice[kept.flatten()[span][members]] = members[kept.flatten()[span][members]]  # an anchor stays in its group
        groups.view(-1)[span][members] = choice + span.start

    def _selection(self, frames: torch.Tensor, kept: torch.Tensor, groups: torch.Tensor) -> Selection:
        """The merge map: salient tokens alone, every other token in its anchor's group, weighted so that an anchor
        becomes ``w * itself + (1 - w) * mean(group)``."""
        n, device = len(kept), kept.device
        indices = kept.nonzero().squeeze(1)
        slot = torch.full((n,), -1, dtype=torch.long, device=device)
        slot[indices] = torch.arange(len(indices), device=device)
        owner = torch.where(groups >= 0, groups, torch.where(kept, torch.arange(n, device=device), -1))
        assignment = torch.where(owner >= 0, slot[owner.clamp(min=0)], -1)
        size = torch.bincount(assignment[assignment >= 0], minlength=len(indices)).float()
        own = (1 / (size + 1)).clamp(min=self.beta)
        member_size = size[assignment.clamp(min=0)]
        weights = (1 - own[assignment.clamp(min=0)]) / member_size
        is_anchor = kept & (groups >= 0)
        weights = torch.where(is_anchor | ~(groups >= 0), weights + own[assignment.clamp(min=0)], weights)
        return Selection(indices, assignment=assignment, weights=weights)
