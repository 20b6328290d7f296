"""``dycoke``: DyCoke's temporal token merging (TTM), its pre-LLM stage: drop tokens a nearby frame already shows."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import split_budget
from ..sieve import Selection, Sieve, VisualTokens

#: TTM's window: frames 0 mod 4 are kept whole, the others compared with an earlier frame of their window
WINDOW = 4


@register
@dataclass
class DyCoke(Sieve):
    """In each window of four frames the first is kept whole; every other frame keeps the tokens least like the same
    place in its reference frame (an odd frame: the frame before it; the third: the first).

    Paper: "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models" (Tao et al., CVPR 2025,
    arXiv 2411.15024); official code KD-TAO/DyCoke, read at commit dd746349 (llava/model/llava_arch.py
    ``dycole_ttm``). Its first stage only, TTM, before the LLM: the second stage, dynamic pruning of the KV cache
    during decoding (``dycoke_pruning`` in its modeling_qwen2.py), is not done here.

    Rule: frames ``f ≡ 0 (mod 4)`` are anchors, kept whole. Frame ``f`` odd is compared with ``f - 1`` and frame
    ``f ≡ 2 (mod 4)`` with ``f - 2`` (the reference's first and second pass), token by token at the same place
    (cosine of the projected tokens); each compared frame keeps its least similar tokens (stable, ties to the lower
    index), kept tokens at their own positions, the others dropped (the reference drops them too: "merging" keeps
    one of two near-equal tokens). Budget: ``keep`` (never below the anchors' tokens, as EVS keeps its first frame)
    less the anchors' tokens is split evenly over the compared frames (remainders to the earlier ones). The
    reference sets each compared frame's count as ``int((1 - K) * tokens_per_frame)`` from its pruning ratio
    ``K``; its default ``K = 0.3`` (llava/model/builder.py ``dycoke_k``) is, on a video whose frame count is a
    multiple of 4, ``keep = 1/4 + 3/4 * 0.7 = 0.775``, the default here (pass the count to match it exactly).

    Deviations: the budget above instead of ``K``; the reference's second pass stops before the last window
    (``range(0, t - 4, 4)``: that window's third frame stays whole) and its first pass leaves out the last frame of an
    odd count (``range(0, t - 1, 2)``: that frame is dropped whole); here every window is alike and every frame is
    compared or kept. Videos only (``needs_video``).
    """

    name = "dycoke"
    paper = "DyCoke (arXiv 2411.15024)"
    needs_video = True

    keep: int | float = 0.775

    def select(self, tokens: VisualTokens) -> Selection:
        t, h, w = tokens.video(self.name)
        n, per_frame = len(tokens), h * w
        device = tokens.features.device
        frame = torch.arange(t, device=device)
        anchor = frame % WINDOW == 0
        anchors = int(anchor.sum())
        k = max(self.budget.resolve(n), anchors * per_frame)
        if k >= n:
            return Selection.every(tokens)
        reference = torch.where(frame % 2 == 1, frame - 1, torch.where(anchor, frame, frame - 2))
        frames = tokens.features.float().view(t, per_frame, -1)
        similarity = F.cosine_similarity(frames, frames[reference], dim=-1)
        counts = torch.full((t,), per_frame, device=device)
        shares = split_budget([per_frame] * (t - anchors), k - anchors * per_frame)
        counts[~anchor] = torch.tensor(shares, device=device)
        rank = torch.sort(similarity, dim=1, stable=True).indices.argsort(dim=1)
        return Selection((rank < counts[:, None]).flatten().nonzero().squeeze(1))
