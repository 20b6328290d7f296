"""``holitom_llm``: HoliTom's inner-LLM merge: keep the image tokens the prompt's last token attends to most, and fold
every other one into its most similar kept token."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens


@register
@dataclass
class HoliTomLLM(Sieve):
    """Before decoder layer ``layer``, keep the ``keep`` image tokens the prompt's last token attends to most in layer
    ``layer - 1`` (head mean, as FastV) and merge each other token into the kept one whose hidden state is most
    cosine-similar, in the code's running pairwise average.

    Paper: "HoliTom: Holistic Token Merging for Fast Video Large Language Models" (Shao et al., arXiv 2505.21334),
    its inner-LLM merging; official code cokeshao/HoliTom, read at commit e9b2972f (holitom/modeling_qwen2.py,
    ``Qwen2Model_holitom.forward``). The code visits the dropped tokens in sequence order and sets their kept token to
    ``(kept + dropped) / 2`` each time, so a kept token with dropped tokens ``m_1 < ... < m_j`` ends as
    ``2^-j kept + sum_i 2^-(j - i + 1) m_i``: here a merge map with those weights (similarities taken once, before any
    merge, as in the code). Kept tokens keep their positions (the code's ``position_ids = keep_indexs``).

    Defaults from the code's scripts and README (``HOLITOM_k=18 HOLITOM_r=0.5``): ``layer=18`` (of Qwen2-7B's 28
    decoder layers; the attention is layer 17's) and ``keep=0.5`` (``round(N * (1 - r))``). The paper's method is the
    chain ``holitom+holitom_llm``. Deviations: the attention row is recomputed from layer ``layer - 1``'s q/k under
    SDPA (the code turns on eager attention there); each image of a prompt is merged on its own (the code: the
    prompt's first image span); ties to the lower index. The rule reads no frames, so it serves images too.
    """

    name = "holitom_llm"
    paper = "HoliTom (arXiv 2505.21334)"
    stage = "in_llm"
    signals = ("llm_attention",)

    keep: int | float = 0.5
    layer: int = 18

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer={self.layer!r}: pass the decoder layer to merge before, an int >= 1 (the code's "
                             f"HOLITOM_k, 18 on a 28-layer decoder)")

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        k = self.budget.resolve(n)
        if k >= n:
            return Selection.every(tokens)
        device = tokens.features.device
        kept = top_k_in_order(tokens["llm_attention"].mean(dim=0), k)
        dropped = torch.ones(n, dtype=torch.bool, device=device)
        dropped[kept] = False
        dropped = dropped.nonzero().squeeze(1)
        unit = F.normalize(tokens.features.float(), dim=-1)
        group = (unit[dropped] @ unit[kept].T).argmax(dim=1)
        assignment = torch.empty(n, dtype=torch.long, device=device)
        assignment[kept] = torch.arange(k, device=device)
        assignment[dropped] = group
        return Selection(kept, assignment=assignment, weights=running_average_weights(group, dropped, kept, n))


def running_average_weights(group: torch.Tensor, dropped: torch.Tensor, kept: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) each token's weight when every dropped token (ascending) halves its kept token's running value: a kept
    token with j members weighs 2^-j, a member followed by ``later`` members of its group 2^-(later + 1)."""
    sizes = torch.bincount(group, minlength=len(kept))
    order = torch.sort(group, stable=True).indices  # members grouped, each group in ascending token order
    starts = sizes.cumsum(dim=0) - sizes
    rank = torch.empty_like(group)
    rank[order] = torch.arange(len(group), device=group.device) - starts[group[order]]
    later = sizes[group] - 1 - rank
    weights = torch.empty(n, device=group.device)
    weights[kept] = 0.5 ** sizes.float()
    weights[dropped] = 0.5 ** (later + 1).float()
    return weights
