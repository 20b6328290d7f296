"""``divprune``: keep a maximally diverse subset of the projected visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from ..selection import farthest_point
from ..sieve import Selection, Sieve, VisualTokens


@register
@dataclass
class DivPrune(Sieve):
    """Greedy max-min diversity on cosine distance between the projected tokens (the LLM inputs).

    Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et
    al., CVPR 2025, arXiv 2503.02175); reference code vbdi/divprune. Default ``keep=0.098`` (the
    reference ``SUBSET_RATIO``, 56 of 576). Seed = the token farthest from its nearest neighbour,
    as in the code. Kept tokens are returned in raster order, as the public code does (its paper
    runs did not sort; divprune#8). A running minimum makes the greedy loop O(K·N) instead of the
    reference's O(K²·N); the selection is the same.
    """

    name = "divprune"
    paper = "DivPrune (arXiv 2503.02175)"

    keep: int | float = 0.098

    def select(self, tokens: VisualTokens) -> Selection:
        k = self.budget.resolve(len(tokens))
        return Selection(farthest_point(tokens.features, k))
