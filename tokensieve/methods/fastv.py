"""``fastv``: inside the LLM, drop the image tokens the prompt's last token attends to least."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..sieve import ScoringSieve, VisualTokens


@register
@dataclass
class FastV(ScoringSieve):
    """After decoder layer ``layer - 1``, score each image token by the attention the prompt's last token
    pays it in that layer, averaged over heads; layers ``layer``.. keep the top ``keep`` in order.

    Paper: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024, arXiv 2403.06764);
    reference code pkunlp-icler/FastV. Defaults ``layer=2`` (K) and ``keep=0.5`` (R = 50% pruned), the
    paper's main setting. Differences from the reference: it turns on eager attention to read the
    attention map, where here the one row needed is recomputed from layer K-1's q/k projections and
    rotary embedding (SDPA/FlashAttention stay on); several images are pruned each to its own budget
    rather than as one span; and a generate loop without a KV cache keeps the prompt's selection
    instead of re-scoring with each new token, so cached and uncached generation agree.
    """

    name = "fastv"
    paper = "FastV (arXiv 2403.06764)"
    stage = "in_llm"
    signals = ("llm_attention",)

    keep: int | float = 0.5
    layer: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer={self.layer!r}: pass the decoder layer to prune before, an int >= 1 (FastV's K, e.g. 2)")

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        return tokens["llm_attention"].mean(dim=0)
