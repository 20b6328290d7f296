"""``f2c``: From Frames to Clips, key frames by relevance to the question, widened to clips, pooled to the budget."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import split_budget
from ..sieve import Selection, VideoSieve, VisualTokens
from .pool import Pool
from .question_relevance import frame_relevance

#: Lloyd's iterations of the 1-D k-means over the candidates' frame indices (it settles in a few on a video's frames)
KMEANS_ROUNDS = 100


@register
@dataclass
class F2C(VideoSieve, Pool):
    """Key clips instead of key frames: anchor frames chosen by relevance to the question and spread over time, each
    widened to a clip of ``clip_frames`` frames around it, and every frame of the clips pooled so that the total fits
    ``keep`` (more frames, each at a lower resolution, at the budget of fewer whole frames).

    1. Relevance ``r_i`` of each frame to the question (the model's own: the frame's mean over its tokens of each
       projected token's mean cosine to the question's input embeddings, ``text_embeddings``;
       methods/question_relevance.py).
    2. Candidates: the local maxima of ``r`` over time (``r_i`` at least its neighbours'; the ends against their one
       neighbour).
    3. Up to ``anchors`` anchors: the candidates' frame indices in ``anchors`` groups by 1-D k-means (Lloyd's,
       centres started at evenly spaced candidates, a candidate to the nearer centre, ties to the earlier), the most
       relevant candidate of each group (ties to the earlier frame); every candidate where there are no more.
    4. Each anchor widened to ``clip_frames`` consecutive frames, ``(clip_frames - 1) // 2`` before it, shifted to fit
       the video; the clips' union is kept.
    5. The budget ``k`` shared equally among the kept frames (``selection.split_budget``, the remainder to the
       earlier frames), each frame average-pooled to its share by ``pool``'s rule (the largest grid of at most its
       share that keeps the frame's aspect, each cell at its centre token), so the count is at most ``keep``.

    Paper: "From Frames to Clips: Training-free Adaptive Key Clip Selection for Long-Form Video Understanding" (arXiv
    2510.02262); no official code was found, and the paper's text was read only through its abstract and summaries
    (../shared/METHODS.md 6.2): the steps above follow that description, the constants are this library's. Defaults
    (ours): ``keep=0.25``, ``anchors=8``, ``clip_frames=4``.

    Differences: the paper scores frames with a contrastive encoder (CLIP/SigLIP image embedding against the text
    embedding of the question and options), which HF models do not carry; here the model's own projected tokens are
    scored against its input embeddings of the prompt's text after the video (as ``cdpruner``). It acts before the
    LLM on the tokens of frames the tower has already encoded (the paper chooses the clips with its separate encoder
    before the video LLM sees any frame): chain a ``frames`` stage (``uniform_frames``) first to bound the tower's
    work. The paper's adaptive module picks the clip length per video, trading length against resolution; here
    ``clip_frames`` is fixed and the resolution follows from the budget. A prompt without text tokens is refused; a
    still image too (``needs_video``).
    """

    name = "f2c"
    paper = "F2C (arXiv 2510.02262)"
    signals = ("text_embeddings",)

    keep: int | float = 0.25
    anchors: int = 8
    clip_frames: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        for field, meaning in (("anchors", "the number of key frames (one per temporal group)"),
                               ("clip_frames", "the frames of the clip around each key frame")):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r}: pass {meaning}, an int >= 1")

    def select_video(self, tokens: VisualTokens, k: int) -> Selection:
        t, h, w = tokens.frames
        per_frame = h * w
        device = tokens.features.device
        frames = tokens.features.view(t, per_frame, -1)
        chosen = self.kept_frames(frame_relevance(tokens, self.name).tolist())
        kept, features = [], []
        for frame, share in zip(chosen, split_budget([per_frame] * len(chosen), k)):
            if share:
                where, values = self.resample(frames[frame], (h, w), share)
                kept.append(frame * per_frame + where.to(device))
                features.append(values)
        return Selection(torch.cat(kept), torch.cat(features).to(tokens.features.dtype))

    def anchor_frames(self, relevance: list[float]) -> list[int]:
        """The anchors (ascending): the most relevant local maximum of each k-means group of the local maxima."""
        t = len(relevance)
        peaks = [i for i in range(t) if (i == 0 or relevance[i] >= relevance[i - 1])
                 and (i == t - 1 or relevance[i] >= relevance[i + 1])]
        return sorted(max(group, key=lambda i: (relevance[i], -i)) for group in kmeans_1d(peaks, self.anchors))

    def kept_frames(self, relevance: list[float]) -> list[int]:
        """The frames kept (ascending): the clip of ``clip_frames`` around each anchor, shifted to fit the video."""
        t, length = len(relevance), self.clip_frames
        kept = set()
        for anchor in self.anchor_frames(relevance):
            start = min(max(anchor - (length - 1) // 2, 0), max(t - length, 0))
            kept.update(range(start, min(start + length, t)))
        return sorted(kept)


def kmeans_1d(points: list[int], groups: int) -> list[list[int]]:
    """Ascending ``points`` in at most ``groups`` non-empty groups by Lloyd's k-means in 1-D: centres start at the
    points at ranks ``floor((j + 1/2) · m / groups)``, each point joins the nearest centre (ties to the earlier), each
    centre moves to its group's mean (an empty group keeps its centre), until the groups stop changing. With no more
    points than groups, each point is its own group."""
    if len(points) <= groups:
        return [[point] for point in points]
    centres = [float(points[(2 * j + 1) * len(points) // (2 * groups)]) for j in range(groups)]
    membership = None
    for _ in range(KMEANS_ROUNDS):
        joined = [min(range(groups), key=lambda j: (abs(point - centres[j]), j)) for point in points]
        if joined == membership:
            break
        membership = joined
        for j in range(groups):
            members = [point for point, group in zip(points, membership) if group == j]
            if members:
                centres[j] = sum(members) / len(members)
    return [group for group in ([p for p, g in zip(points, membership) if g == j] for j in range(groups)) if group]
