"""``mmtok``: the visual tokens that best cover both the instruction's tokens and the image's own tokens
(greedy maximum coverage)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import coverage_greedy
from ..sieve import Selection, Sieve, VisualTokens

SPACES = ("vision", "projected")


@register
@dataclass
class MMTok(Sieve):
    """Keep the ``keep`` tokens that greedily maximise the multimodal coverage
    ``f(S) = sum_rows max_{j in S} C[row, j]`` with ``C = [P ; alpha * Q]`` (``selection.coverage_greedy``,
    within ``1 - 1/e`` of the optimum: ``f`` is monotone submodular), kept indices in raster order.

    - Text coverage ``P`` (m, N): ``P[t, j] = softmax_j(cos(z_t, x_j) / tv_temperature) / m``, ``z_t`` the
      instruction's tokens (``text_embeddings``: the LLM's own input embeddings of the prompt's text after
      the image, see docs/methods.md), ``x_j`` the projected visual tokens (LLM input space).
    - Vision coverage ``Q`` (N, N): ``Q[i, j] = softmax_j(cos(c_i, c_j) / vv_temperature) / N``, ``c`` the
      vision features before the projector (``vision_space="vision"``, the code's) or the projected
      tokens (``"projected"``, for towers that give no vision features: LLaVA-NeXT/OneVision).

    Paper: "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs" (Dong et al., arXiv
    2508.18264); code Ironieser/MMTok (``mm_coverage_selection`` and ``greedy_merged_jit_kernel`` in
    mmtok/core/semantic_selector.py, ``MMTokCore`` in mmtok/core/mmtok_core.py, the LLaVA hook in
    mmtok/llava/clip_encoder_mmtok.py). Defaults as ``mmtok()`` for LLaVA (mmtok/llava/llava_inject.py):
    ``alpha=0.5``, ``tv_temperature=0.02``, ``vv_temperature=0.2``, ``keep=64``; the code's Qwen2.5-VL
    entry uses ``tv_temperature=0.01`` (pass it there). Temperatures multiply by their inverse and ``Q``
    is divided by N before ``alpha``, as the code; cosines in float32.

    Feature spaces: the code needs no CLIP joint space. It compares the LLM's input-embedding-table
    embeddings of the question's words with the projector's outputs, and the tower's feature-layer patch
    features (``hidden_states[-2]``, [CLS] dropped) with each other; this reads the same spaces from the HF
    model (``text_embeddings`` and ``vision_features``), so nothing is mapped. Differences: the text is
    the instruction's tokens as the prompt holds them (template tokens such as ``ASSISTANT:`` and fixed
    prompts included); the code drops the two fixed LLaVA eval prompts and a stop-word list from the
    question and embeds the remaining words with the LLM's tokenizer, BOS dropped. LLaVA-1.5 padding patches are not
    excluded (the code excludes the pad-to-square patches for llava-v1.5 checkpoints). With no instruction
    tokens only ``Q`` is covered. The optional scout-model answer text is not supported. Works per image
    and in batches (the code: batch size 1). LLaVA-NeXT/OneVision (``vision_space="projected"``): one
    budget per image over every crop and newline token; the code's LLaVA-NeXT path selects in each crop
    on its own (``encode_images_mmtok_multi``, the budget per crop).

    Adaptive budget (not in the paper): ``keep=ts.Adaptive(coverage=0.9, min=16, max=None)`` keeps the fewest
    greedy tokens whose ``f(S)`` reaches 90% of ``f`` of every token, clamped to [min, max].
    """

    name = "mmtok"
    paper = "MMTok (arXiv 2508.18264)"
    signals = ("text_embeddings", "vision_features")
    adaptive_rules = ("coverage",)  # keep=ts.Adaptive(coverage=0.9): the fewest greedy tokens reaching 90% of f(all)

    alpha: float = 0.5
    tv_temperature: float = 0.02
    vv_temperature: float = 0.2
    vision_space: str = "vision"

    def __post_init__(self) -> None:
        super().__post_init__()
        for what in ("alpha", "tv_temperature", "vv_temperature"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and what != "alpha"):
                bound = ">= 0" if what == "alpha" else "> 0"
                raise ValueError(f"{what} must be a number {bound}, not {value!r}")
        if self.vision_space not in SPACES:
            raise ValueError(f"vision_space must be one of {SPACES} (vision features before the projector, or "
                             f"the projected tokens), not {self.vision_space!r}")

    def requests(self) -> tuple[str, ...]:
        return ("text_embeddings", "vision_features") if self.vision_space == "vision" else ("text_embeddings",)

    def coverage(self, tokens: VisualTokens) -> torch.Tensor:
        """(m + N, N) the matrix ``[P ; alpha * Q]``: what each row (instruction token, then visual token)
        gains from each candidate token."""
        visual = F.normalize(tokens.features.float(), dim=-1)
        text = F.normalize(tokens["text_embeddings"].float(), dim=-1)
        vision = F.normalize(tokens["vision_features"].float(), dim=-1) if self.vision_space == "vision" else visual
        n, m = len(visual), len(text)
        text_cover = ((text @ visual.T) * (1.0 / self.tv_temperature)).softmax(dim=1) / max(m, 1)
        vision_cover = ((vision @ vision.T) * (1.0 / self.vv_temperature)).softmax(dim=1) / n
        return torch.cat([text_cover, vision_cover * self.alpha])

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        low, k, fraction = self.budget.coverage_steps(n)
        if k >= n and fraction is None:
            return Selection.every(tokens)
        return Selection(coverage_greedy(self.coverage(tokens), k, fraction, low).sort().values)
