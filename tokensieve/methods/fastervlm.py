"""``fastervlm``: keep the patches the vision [CLS] token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..sieve import ScoringSieve, VisualTokens


@register
@dataclass
class FasterVLM(ScoringSieve):
    """Score each patch by the [CLS] query's attention to it at the vision feature layer, averaged
    over heads; keep the top ``keep`` in raster order (no merging).

    Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning" (Zhang et al.,
    arXiv 2412.01818); reference code Theia-4869/FasterVLM. Default ``keep=64``. The reference
    turns on eager attention for the whole tower; here the [CLS] row is recomputed from the feature
    layer's hooked q/k projections, so SDPA/FlashAttention stay on. Needs a [CLS] token: SigLIP
    and Qwen vision towers have none, and the method refuses them.
    """

    name = "fastervlm"
    paper = "FasterVLM (arXiv 2412.01818)"
    signals = ("cls_attention",)

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        return tokens["cls_attention"].mean(dim=0)
