"""``dycoke``: DyCoke's temporal token merging (TTM), its pre-LLM stage: drop tokens a nearby frame already shows."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import split_budget, top_k_in_order
from ..sieve import DecodeRule, Selection, Sieve, VisualTokens

#: TTM's window: frames 0 mod 4 are kept whole, the others compared with an earlier frame of their window
WINDOW = 4


@register
@dataclass
class DyCoke(Sieve):
    """In each window of four frames the first is kept whole; every other frame keeps the tokens least like the same
    place in its reference frame (an odd frame: the frame before it; the third: the first).

    Paper: "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models" (Tao et al., CVPR 2025,
    arXiv 2411.15024); official code KD-TAO/DyCoke, read at commit dd746349 (llava/model/llava_arch.py
    ``dycole_ttm``). Its first stage, TTM, before the LLM; its second, dynamic pruning of the KV cache during
    decoding (``dycoke_pruning`` in its modeling_qwen2.py), with ``kv_keep`` (below): the paper's method is
    ``dycoke:kv_keep=0.2``.

    Rule: frames ``f ≡ 0 (mod 4)`` are anchors, kept whole. Frame ``f`` odd is compared with ``f - 1`` and frame
    ``f ≡ 2 (mod 4)`` with ``f - 2`` (the reference's first and second pass), token by token at the same place
    (cosine of the projected tokens); each compared frame keeps its least similar tokens (stable, ties to the lower
    index), kept tokens at their own positions, the others dropped (the reference drops them too: "merging" keeps
    one of two near-equal tokens). Budget: ``keep`` (never below the anchors' tokens, as EVS keeps its first frame)
    less the anchors' tokens is split evenly over the compared frames (remainders to the earlier ones). The
    reference sets each compared frame's count as ``int((1 - K) * tokens_per_frame)`` from its pruning ratio
    ``K``; its default ``K = 0.3`` (llava/model/builder.py ``dycoke_k``) is, on a video whose frame count is a
    multiple of 4, ``keep = 1/4 + 3/4 * 0.7 = 0.775``, the default here (pass the count to match it exactly).

    Dynamic KV cache pruning (``kv_keep``, off by default: None), its second stage: at each decode step the step's
    token attends, in layers ``kv_layer`` on, to the ``int(kv_keep * N)`` image tokens it attends to most in layer
    ``kv_layer - 1`` (head mean), and to every other token; the cache keeps every token, so one left out may come back
    at a later step. The code (modeling_qwen2.py, ``PrunableDynamicCache.dycoke_pruning`` and the layer loop of
    ``Qwen2Model.forward``) re-selects when that attention's cosine similarity to the previous step's is below
    ``kv_threshold`` (0.9; the first step always), and a step above it attends to every token (its selection is
    cleared at every step's first layers). Defaults: ``kv_layer=3`` and ``p = 0.8`` (``kv_keep = 1 - p = 0.2``) of
    builder.py and lmms_eval/models/llava_onevision.py (the README's command passes ``dycoke_p=0.7``). The rows are
    recomputed under SDPA (tokensieve/engine/decode_stage.py); every token after the prompt counts as a decode step
    (the code: one-token forwards), so a later turn and a no-cache loop give the cached run's tokens; a video's
    own tokens are ranked alone (several in a row: each its own); the similarity starts anew at each prefill (the
    code keeps the last step's across samples). A ``keep`` that covers the video turns it off too.

    Deviations: the budget above instead of ``K``; the reference's second pass stops before the last window
    (``range(0, t - 4, 4)``: that window's third frame stays whole) and its first pass leaves out the last frame of an
    odd count (``range(0, t - 1, 2)``: that frame is dropped whole); here every window is alike and every frame is
    compared or kept. Videos only (``needs_video``).
    """

    name = "dycoke"
    paper = "DyCoke (arXiv 2411.15024)"
    needs_video = True

    keep: int | float = 0.775
    kv_keep: float | None = None
    kv_layer: int = 3
    kv_threshold: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("kv_keep", "kv_threshold"):
            value = getattr(self, name)
            if value is None and name == "kv_keep":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name}={value!r}: pass a share between 0 and 1" + (" (or None: no KV pruning)" if name == "kv_keep" else ""))
        if isinstance(self.kv_layer, bool) or not isinstance(self.kv_layer, int) or self.kv_layer < 1:
            raise ValueError(f"kv_layer={self.kv_layer!r}: pass the decoder layer the KV pruning starts at, 1 or more (the code's: 3)")

    def decode_rule(self, n_layers: int) -> DecodeRule | None:
        keeps_all = isinstance(self.keep, float) and self.keep >= 1  # a ratio of 1 keeps every token: no pruning
        return DecodeRule("per_step", self.kv_layer) if self.kv_keep is not None and not keeps_all else None

    def decode_step(self, now: torch.Tensor, before: torch.Tensor | None, total: int) -> torch.Tensor | None:
        if self.budget.resolve(total) >= total:  # a budget that covers the video turns the KV pruning off too
            return None
        if before is not None and float(F.cosine_similarity(now.float(), before.float(), dim=0)) >= self.kv_threshold:
            return None
        return top_k_in_order(now, int(len(now) * self.kv_keep))

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
