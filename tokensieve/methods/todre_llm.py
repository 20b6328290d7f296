"""``todre_llm``: ToDRE's second stage, "information migration": at a late decoder layer, drop an image's tokens
once the attention between it and the text has faded."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .._lazy import torch
from ..registry import register
from ..selection import top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens
from ..signals import Signal

TEXT_TO_IMAGE = Signal("llm_attention", queries="instruction")
IMAGE_TO_IMAGE = Signal("llm_attention", queries="image")


@register
@dataclass
class ToDREMigration(Sieve):
    """Before decoder layer ``layer`` (None: 7/8 of the depth, rounded), measure two attention shares of each
    image inside layer ``layer - 1``, averaged over heads: how much of its instruction tokens' attention goes to the
    image (text to visual), and how much of the image's own tokens' attention goes outside the image (visual to
    text). When both are below ``tau`` the image's information has migrated into the text, and the layers from
    ``layer`` on keep ``keep`` of its tokens: none by default (``keep=0``), the paper's rule; a positive ``keep``
    keeps that many, those the instruction attends to most, in order. Otherwise every token stays.

    Paper: "ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance" (Li et al., arXiv
    2505.18757), the second stage; the first is ``todre`` and the method as the paper runs it is the chain
    ``todre+todre_llm``. No official code was found and the paper's section on this stage was not read in full:
    the check layer (about 7/8 of the depth), the two shares and the rule "both below a threshold, drop every
    visual token and its KV for the remaining layers" come from a third-party analysis of v2 (notes:
    METHODS_SECOND_READING.md D3). ``tau=0.1`` is this library's choice, unverified. Visual-to-text share here is
    one minus the share the image's tokens pay to the image itself, so attention to another image of the same
    prompt counts as text. Each image of a prompt is checked on its own. Original positions are kept (nothing
    stays to renumber when the image is dropped).
    """

    name = "todre_llm"
    paper = "ToDRE (arXiv 2505.18757), stage 2"
    stage = "in_llm"
    signals = ("llm_attention",)
    may_keep_none = True

    keep: int | float = 0
    layer: int | None = None
    tau: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1):
            raise ValueError(f"layer={self.layer!r}: pass the decoder layer to check before, an int >= 1, or None for 7/8 of the depth")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 <= self.tau <= 1:
            raise ValueError(f"tau={self.tau!r}: pass the attention share below which an image is dropped, between 0 and 1")

    def requests(self) -> tuple[Signal, ...]:
        return (TEXT_TO_IMAGE, IMAGE_TO_IMAGE)

    def schedule(self, n_layers: int) -> tuple[Sieve, ...]:
        if self.layer is not None:
            return (self,)
        return (replace(self, keep=self.keep, layer=min(max(round(n_layers * 7 / 8), 1), n_layers - 1)),)

    def select(self, tokens: VisualTokens) -> Selection:
        text_to_image = tokens[TEXT_TO_IMAGE].mean(dim=0)
        text_share = text_to_image.sum()
        image_share = 1 - tokens[IMAGE_TO_IMAGE].mean(dim=0).sum()
        if bool((text_share >= self.tau) | (image_share >= self.tau)):
            return Selection.every(tokens)
        if self.keeps_none:
            return Selection(torch.zeros(0, dtype=torch.long, device=tokens.features.device))
        n = len(tokens)
        k = self.budget.resolve(n)
        return Selection.every(tokens) if k >= n else Selection(top_k_in_order(text_to_image, k))
