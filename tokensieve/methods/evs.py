"""``evs``: Efficient Video Sampling, vLLM's rule: drop the video tokens that barely change from the previous frame."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..sieve import Selection, Sieve, VisualTokens


@register
@dataclass
class EVS(Sieve):
    """Keep the video tokens that change most from the same place in the previous frame; the first frame is kept whole.

    Paper: "Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference" (Bagrov et al.,
    NVIDIA, arXiv 2510.14624). Rule as vLLM runs it (``--video-pruning-rate q``; vllm/multimodal/evs.py
    ``compute_retention_mask``, read at commit 926c71f6, the same in video_prune/evs.py at d750efb1): each token of
    frame t > 0 scores ``1 - cos(x[t, i, j], x[t-1, i, j])`` on the projected tokens (the LLM inputs), every token of
    frame 0 scores 255 (above any such score), and the top ``keep`` by a stable descending sort are kept, ascending.
    ``keep`` is never below one frame's tokens (vLLM: ``max(tokens_per_frame, int(N * (1 - q)))``); ``keep=0.25``
    is vLLM's ``q=0.75`` up to rounding (vLLM truncates, ``Budget`` rounds: pass the count to match it exactly).

    Deviations: the paper scores patches in RGB space before the tower (its plug-and-play variant); vLLM, and this,
    score the tower's output tokens. Videos only: an image is refused (``needs_video``). Default ``keep=0.25``.
    """

    name = "evs"
    paper = "EVS (arXiv 2510.14624)"
    needs_video = True

    keep: int | float = 0.25

    def select(self, tokens: VisualTokens) -> Selection:
        t, h, w = tokens.video(self.name)
        per_frame = h * w
        k = max(per_frame, self.budget.resolve(len(tokens)))
        frames = tokens.features.float().view(t, per_frame, -1)
        change = 1 - torch.nn.functional.cosine_similarity(frames[1:], frames[:-1], dim=-1)
        scores = torch.cat([torch.full_like(frames[:1, :, 0], 255.0), change]).flatten()
        order = torch.argsort(scores, descending=True, stable=True)
        return Selection(order[:k].sort().values)
