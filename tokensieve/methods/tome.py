"""``tome``: merge the projected visual tokens by bipartite soft matching (Token Merging) to the budget."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from ..selection import bipartite_merge
from ..sieve import Selection, Sieve, VisualTokens


@register
@dataclass
class ToMe(Sieve):
    """Token Merging before the LLM: bipartite soft matching (alternate tokens into sets A and B, join each
    A token to its most similar B token, merge the most similar pairs) repeated until exactly ``keep``
    tokens are left; a merged token is the size-weighted mean of the tokens it holds and stands at its
    B token's position.

    Paper: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023, arXiv 2210.09461); official code
    facebookresearch/ToMe (``bipartite_soft_matching``, ``merge_wavg``). Default ``keep=64``, the budget
    the other pre-LLM methods default to. Differences: ToMe merges a fixed ``r`` tokens inside every ViT
    layer, with the layer's attention keys as the similarity and proportional attention (log token size
    added to the attention logits); here it runs once on the projected tokens, with the tokens
    themselves as the similarity, as many rounds as the budget needs, and the LLM attends to merged
    tokens without size weighting (``tome_vit`` is ToMe inside the tower, with it). ToMe's [CLS] protection
    does not arise: HF LLaVA drops [CLS]. The method returns its merge map; the engine averages each group.
    """

    name = "tome"
    paper = "ToMe (arXiv 2210.09461)"

    def select(self, tokens: VisualTokens) -> Selection:
        merge = bipartite_merge(tokens.features, tokens.features, self.budget.resolve(len(tokens)))
        return Selection(merge.kept, assignment=merge.assignment)  # the engine gives each kept token its group's mean
