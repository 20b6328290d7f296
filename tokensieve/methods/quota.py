"""``quota``: QuoTA, each frame's token budget in proportion to its relevance to the question, each frame pooled to it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import bipartite_merge
from ..sieve import Selection, VideoSieve, VisualTokens
from .pool import Pool
from .question_relevance import frame_relevance

#: how a frame is reduced to its share: the code's v4 (ToMe within the frame) or v2 (adaptive average pooling)
REDUCTIONS = ("merge", "pool")


@register
@dataclass
class QuoTA(VideoSieve, Pool):
    """Frames that matter to the question get more tokens: frame ``i`` gets ``k · w_i`` of the budget ``k`` with
    ``w_i ∝ p_i ** power``, ``p_i`` its relevance to the question, and is reduced to that share on its own: by token
    merging (``reduce="merge"``, ToMe's bipartite soft matching within the frame to exactly its share,
    ``selection.bipartite_merge``; a merge map) or by average pooling (``"pool"``: ``pool``'s rule, the largest grid
    of at most its share that keeps the frame's aspect, each cell at its centre token, so at most ``keep``). Frames
    whose share is zero are dropped.

    Paper: "QuoTA: Query-oriented Token Assignment via CoT Query Decouple for Long Video Comprehension" (Luo et al.,
    AAAI 2026, arXiv 2503.08689); code MAC-AutoML/QuoTA at ec194d7 (``quota_pipeline.py``; ``token_compress`` and
    ``scale_weights`` in core/llava_arch.py). From the code: the weights ``(100 · p_i) ** 2`` normalised (the 100
    cancels, so ``power=2``, its ``weight_scale``); a share of at most a frame's own tokens with the surplus passed
    on in proportion to the weights (its ``scale_weights``, versions v2 to v5); the reductions of its versions v4
    (ToMe within each frame to its share; the code first pools LLaVA-Video's 27×27 to 14×14, which Qwen's merged
    tokens do not need) and v2 (adaptive average pooling). ``reduce="merge"`` is the default because it keeps
    exactly ``keep`` tokens, so it compares with the other methods at equal count. ``keep=0.25`` is this library's
    video default (the code's budget is 64 · 196 = 12,544 tokens, LLaVA-Video's 14×14 of 27×27 on 64 frames: 0.27
    of 64 frames, 0.18 of its 96).

    **The scorer is replaced.** The code asks a separate Qwen2-VL-2B, frame by frame, whether the frame shows an
    object of a list the model first derives from the question (its CoT query decoupling, one more generation), and
    takes ``p_i`` = P("A. yes"). A method here cannot run a model; ``p_i`` is the model's own relevance instead: the
    frame's mean over its tokens of each projected token's mean cosine to the question's input embeddings
    (``text_embeddings``, as ``cdpruner``; methods/question_relevance.py), min-max normalised over the video's frames
    to [0, 1] as ``cdpruner`` normalises (``(r - min) / (max - min + 1e-6)``): the least relevant frame gets no
    tokens unless the others are full, and a video whose frames are equally relevant gets equal shares (with
    ``reduce="pool"``: ``pool`` per frame). No query decoupling: the question is the prompt's text as it is.

    Differences: the code's default v1 resizes each frame bilinearly and caps nothing (a frame may be upsampled past
    its own tokens, which a selection cannot do). The code floors each share (``int``) and spreads the capped
    surplus once over weights that still count the capped frames, so some budget goes unused; here the surplus is
    passed on until every frame is full or none is left (frames of weight zero share it equally once the others
    are full) and the shares are rounded by largest remainder (ties to the earlier frame), so they sum to ``keep``.
    The code's pooled grid is near-square (``⌊√n⌋`` a side, one row or column more where it fits); ``pool``'s keeps
    the frame's aspect (the same count on a square frame, perhaps transposed). A prompt without text tokens is
    refused; a still image too (``needs_video``).
    """

    name = "quota"
    paper = "QuoTA (arXiv 2503.08689)"
    signals = ("text_embeddings",)

    keep: int | float = 0.25
    power: float = 2.0
    reduce: str = "merge"

    def __post_init__(self) -> None:
        super().__post_init__()
        power = self.power
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power) or power <= 0:
            raise ValueError(f"power={power!r}: pass the exponent that sharpens each frame's relevance into its weight, "
                             f"a finite number > 0 (the code's 2)")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce={self.reduce!r}: pass how a frame is reduced to its share, one of {REDUCTIONS} "
                             f"(token merging to exactly the share, or average pooling to at most it)")

    def select_video(self, tokens: VisualTokens, k: int) -> Selection:
        t, h, w = tokens.frames
        per_frame = h * w
        shares = frame_shares(self.weights(frame_relevance(tokens, self.name)).tolist(), k, per_frame)
        if self.reduce == "merge":
            return self._merged(tokens.features.view(t, per_frame, -1), shares)
        device = tokens.features.device
        kept, features = [], []
        for frame, share in enumerate(shares):
            if share:
                where, values = self.resample(tokens.features[frame * per_frame : (frame + 1) * per_frame], (h, w), share)
                kept.append(frame * per_frame + where.to(device))
                features.append(values)
        return Selection(torch.cat(kept), torch.cat(features).to(tokens.features.dtype))

    @staticmethod
    def _merged(frames: torch.Tensor, shares: list[int]) -> Selection:
        """Each frame merged to its share by bipartite soft matching, as one merge map (dropped frames: -1)."""
        t, per_frame = frames.shape[:2]
        assignment = torch.full((t, per_frame), -1, dtype=torch.long, device=frames.device)
        kept, placed = [], 0
        for frame, share in enumerate(shares):
            if share:
                merge = bipartite_merge(frames[frame], frames[frame], share)
                kept.append(frame * per_frame + merge.kept)
                assignment[frame] = placed + merge.assignment
                placed += share
        return Selection(torch.cat(kept), assignment=assignment.flatten())

    def weights(self, relevance: torch.Tensor) -> torch.Tensor:
        """(t,) each frame's weight ``p ** power``, ``p`` the relevance min-max normalised over the frames."""
        low = relevance.min()
        return ((relevance - low) / (relevance.max() - low + 1e-6)) ** self.power


def frame_shares(weights: list[float], k: int, cap: int) -> list[int]:
    """Each frame's count of ``k`` (at most ``len(weights) * cap``): its share in proportion to ``weights``, at most
    ``cap``; a capped frame's surplus goes to the frames not yet full, in proportion to their weights (equally where
    those are all zero), until none is left; then largest remainder rounding (ties to the earlier frame)."""
    exact = [0.0] * len(weights)
    left = float(min(k, cap * len(weights)))
    open_frames = list(range(len(weights)))
    while left > 1e-9 and open_frames:  # rounds: each caps at least one frame or places everything left
        total = sum(weights[f] for f in open_frames)
        for f in open_frames:
            exact[f] += left * (weights[f] / total if total > 0 else 1 / len(open_frames))
        left = sum(max(0.0, exact[f] - cap) for f in open_frames)
        exact = [min(share, float(cap)) for share in exact]
        open_frames = [f for f in open_frames if exact[f] < cap]
    shares = [min(int(share + 1e-9), cap) for share in exact]
    short = min(k, cap * len(weights)) - sum(shares)
    for f in sorted((f for f in range(len(weights)) if shares[f] < cap), key=lambda f: shares[f] - exact[f])[:short]:
        shares[f] += 1
    return shares
