"""``skip_visual``: from a decoder layer on, image tokens are no longer updated, but every later layer still
attends to them."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .._lazy import torch
from ..registry import register
from ..selection import top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens


@register
@dataclass
class SkipVisual(Sieve):
    """From decoder layer ``layer`` on (None: half the depth), image tokens are frozen: no layer computes their
    queries, attention output or MLP any more, but each later layer still has them as keys and values, computed
    from their hidden states at ``layer`` with that layer's own norm, projections and rotation. Nothing is dropped
    from what the text sees; the image's share of the compute of the later layers is what goes (all but two
    projections per token and layer). ``keep=0`` (the default) freezes every image token; a positive ``keep``
    leaves that many updated, those the prompt's last token attends to most inside layer ``layer - 1`` (FastV's
    rule), and freezes the rest.

    The line of work: "Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer Efforts to See" (YOPO, Zhang et
    al., arXiv 2410.06169) skips the visual tokens' computation in later layers while text still attends to them,
    with trained parts and per-head sparsity; "Boosting Multimodal Large Language Models with Visual Tokens
    Withdrawal" (VTW, arXiv 2405.05803) goes further and withdraws them, keys and values too (that is
    ``todre_llm`` with ``tau=1``, or FastV with a budget of one). This method is the training-free core of the
    first: no per-head choice, no trained parts; ``layer=None`` (half the depth) is this library's choice, not a
    paper's. ``run.stats`` reports the frozen tokens as dropped (``after`` counts the tokens still updated), while
    the KV cache keeps them (``kv_bytes`` shows it). Needs SDPA or eager attention and must be the last in-LLM stage.
    ``keep=ts.Adaptive(mass=0.9, min=16, max=None)``: the fewest tokens holding 90% of that head-mean attention
    stay updated (clamped to ``[min, max]``), as FastV's adaptive count.
    """

    name = "skip_visual"
    paper = "YOPO (arXiv 2410.06169), training-free"
    stage = "in_llm"
    signals = ("llm_attention",)
    may_keep_none = True
    freezes = True
    adaptive_rules = ("mass",)  # keep=ts.Adaptive(mass=0.9): the tokens holding 90% of the attention stay updated

    keep: int | float = 0
    layer: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1):
            raise ValueError(f"layer={self.layer!r}: pass the decoder layer to freeze from, an int >= 1, or None for half the depth")

    def requests(self) -> tuple[str, ...]:
        return () if self.keeps_none else ("llm_attention",)

    def schedule(self, n_layers: int) -> tuple[Sieve, ...]:
        if self.layer is not None:
            return (self,)
        return (replace(self, keep=self.keep, layer=min(max(n_layers // 2, 1), n_layers - 1)),)

    def select(self, tokens: VisualTokens) -> Selection:
        if self.keeps_none:
            return Selection(torch.zeros(0, dtype=torch.long, device=tokens.features.device))
        n = len(tokens)
        scores = tokens["llm_attention"].mean(dim=0)
        k = self.budget.count(scores)
        return Selection.every(tokens) if k >= n else Selection(top_k_in_order(scores, k))
