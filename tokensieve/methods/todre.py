"""``todre``: ToDRE's first stage, a greedy diverse subset of the projected tokens grown from a pivot token."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import k_center_greedy, max_sum_greedy
from ..sieve import Selection, Sieve, VisualTokens
from ..signals import Signal

DIVERSITY = ("max_sum", "k_center")
PIVOTS = ("cls", "isolated")


@register
@dataclass
class ToDRE(Sieve):
    """Keep ``keep`` projected tokens chosen greedily for diversity, starting from a pivot token; kept
    indices in raster order (no merging).

    Paper: "ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance" (Li, Yang, Zhang,
    Shao and Lu, arXiv 2505.18757). No official code was found. The two arXiv versions differ in this stage:

    - v1 (24 May 2025, then titled "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient
      Large Vision-Language Models"; 95.1% of performance) keeps the tokens by a greedy **k-center**
      algorithm: each step adds the token farthest (cosine distance) from its nearest chosen token, the
      max-min rule DivPrune uses. ``diversity="k_center"`` (``selection.k_center_greedy``).
    - v2 (19 Nov 2025, this title; 95.0%) replaces it by greedy **max-sum diversification**: each step adds
      the token whose summed cosine similarity to the chosen tokens is smallest (the largest summed cosine
      distance), with incremental sums, O(N·K·d). ``diversity="max_sum"`` (``selection.max_sum_greedy``),
      the default: the later version's.

    Both grow the set from a pivot: the token with the highest head-mean [CLS] attention in the last vision
    layer (``pivot="cls"``, ``pivot_layer=-1``), taken in the global thumbnail for AnyRes inputs (here the
    base view, the first of ``VisualTokens.layout()``'s pieces, on LLaVA-NeXT). Ties go to the lower index.
    The similarities are between the LLM-input embeddings, i.e. the projected tokens (``VisualTokens.features``),
    not the vision features before the projector. Pivot, layer and feature space come from a third-party
    analysis of v2 (notes: METHODS_SECOND_READING.md D3), not from the paper's text or code: the abstracts
    say only "after the vision encoder". ``pivot_layer=None`` reads the feature layer instead (LLaVA's -2);
    ``pivot="isolated"`` seeds with DivPrune's token (the one farthest from its nearest neighbour), needs no
    [CLS] and so serves every family; with ``diversity="k_center"`` it is exactly ``divprune``
    (``selection.farthest_point``). ``keep=0.1``: the paper prunes 90% after the encoder (K = 288 of 2880 on
    LLaVA-NeXT).

    ToDRE's second stage ("information migration": at a late decoder layer, about 7/8 of the depth, drop
    every visual token when the text-to-visual and visual-to-text attention shares fall below a threshold)
    is a later in-LLM stage and is not part of this method. Towers without [CLS] (SigLIP, Qwen, Idefics3)
    refuse the default pivot; the paper's pivot for Qwen2.5-VL is not known here.
    """

    name = "todre"
    paper = "ToDRE (arXiv 2505.18757)"
    signals = ("cls_attention",)

    keep: int | float = 0.1
    diversity: str = "max_sum"
    pivot: str = "cls"
    pivot_layer: int | None = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.diversity not in DIVERSITY:
            raise ValueError(f"diversity must be one of {DIVERSITY} (ToDRE v2's greedy max-sum diversification, "
                             f"or v1's greedy k-center), not {self.diversity!r}")
        if self.pivot not in PIVOTS:
            raise ValueError(f"pivot must be one of {PIVOTS} (the top [CLS]-attention token, or DivPrune's most "
                             f"isolated token, which needs no [CLS]), not {self.pivot!r}")
        layer = self.pivot_layer
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer == 0):
            raise ValueError(f"pivot_layer must be a vision layer (1..n, or -1..-n from the last; -1 the last) or "
                             f"None for the feature layer, not {layer!r}")

    def requests(self) -> tuple[Signal, ...]:
        if self.pivot != "cls":
            return ()
        return (Signal("cls_attention", layers=None if self.pivot_layer is None else (self.pivot_layer,)),)

    def first(self, tokens: VisualTokens, distance: torch.Tensor) -> torch.Tensor:
        """The pivot, as a one-element index tensor."""
        if self.pivot == "isolated":
            to_set = distance.clone().fill_diagonal_(float("inf"))
            return to_set.min(dim=1).values.argmax(dim=0, keepdim=True)
        attention = tokens[self.requests()[0]].float()
        scores = attention.reshape(-1, attention.shape[-1]).mean(dim=0)  # (heads, N) or (1, heads, N)
        base = tokens.layout()[0].flatten().to(scores.device)  # the base view (thumbnail), or the whole grid
        return base.index_select(0, scores.index_select(0, base).argmax(dim=0, keepdim=True))

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        k = self.budget.resolve(n)
        if k >= n:
            return Selection.every(tokens)
        unit = F.normalize(tokens.features.float(), dim=-1)
        similarity = unit @ unit.T
        distance = 1.0 - similarity
        first = self.first(tokens, distance)
        if self.diversity == "k_center":
            return Selection(k_center_greedy(distance, k, first).sort().values)
        return Selection(max_sum_greedy(similarity, k, first).sort().values)
