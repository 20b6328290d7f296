"""``hiprune``: anchor tokens from an object-centric middle layer, their neighbours, and register tokens
from a deep layer, all by the attention each token receives in the vision tower."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import grid_neighbours
from ..sieve import Selection, Sieve, VisualTokens, check_fraction
from ..signals import Signal


@register
@dataclass
class HiPrune(Sieve):
    """Keep ``round(keep * alpha / 5)`` **anchor** tokens, those receiving the most attention at the
    object layer; their 4-neighbours on the image grid as **buffer** tokens; and fill the rest of the
    budget with **register** tokens, those receiving the most attention at the deep layer among the
    others. A token's score is the attention it receives: the mean over heads and over every query row
    (``vision_attention(queries="mean")``), so no [CLS] token is needed (SigLIP and Qwen towers work).

    Paper: "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language
    Models" (Liu et al., arXiv 2508.00553); code Danielement321/HiPrune (``encode_images`` in
    LLaVA/llava/model/llava_arch.py, ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py``). Defaults as its README and
    code for LLaVA-1.5: ``alpha=0.1`` (``HIPRUNE_ALPHA``), ``object_layer=9`` (``HIPRUNE_OBJECT_LAYER``,
    1-based: the code reads ``attentions[9 - 1]``, the block whose output is ``hidden_states[9]``, which is
    layer 9 in tokensieve's numbering), the deep layer = the feature layer (``attentions[-2]`` for LLaVA,
    the last block for Qwen2.5-VL: ``deep_layer=None``), ``keep=64`` (the README runs 192/128/64). The
    reference's Qwen2.5-VL setting is ``object_layer=16``; pass it there.

    Differences: buffers are the anchor's up/down/left/right neighbours on its 2D piece of the image
    (``VisualTokens.layout()``); the code adds indices ±1 and ±24, so its ±1 wraps across row ends (and
    clamping adds the first/last token). If anchors and buffers exceed the budget (large ``alpha``), the
    anchors come first, then buffers by object-layer score; the code fails there. Rankings use stable
    sorts (ties to the lower index); the code uses ``topk``. LLaVA-NeXT/OneVision images get one budget
    over every token (newline tokens score 0); the code splits the budget evenly over the crops. On
    Qwen2.5-VL the attention is what the tower computes, window by window at its windowed blocks; the
    code recomputes a dense softmax over the whole sequence at every block. Attention rows are recomputed
    from hooked q/k (the code switches the tower to eager attention).
    """

    name = "hiprune"
    paper = "HiPrune (arXiv 2508.00553)"
    signals = ("vision_attention",)

    alpha: float = 0.1
    object_layer: int = 9
    deep_layer: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("alpha", self.alpha, "the share of the budget for anchors and buffers")
        if self.object_layer is None:
            raise ValueError("object_layer must be a vision layer number (HiPrune's object layer; the paper's 9 for CLIP)")
        self.requests()  # checks both layer numbers

    def requests(self) -> tuple[Signal, ...]:
        return (Signal("vision_attention", layer=self.object_layer), Signal("vision_attention", layer=self.deep_layer))

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        k = self.budget.resolve(n)
        device = tokens.features.device
        if k >= n:
            return Selection.every(tokens)
        shallow, deep = (tokens[request].float().mean(dim=0) for request in self.requests())
        by_shallow = torch.sort(shallow, descending=True, stable=True).indices
        anchors = by_shallow[: round(k * self.alpha / 5)]
        chosen = torch.zeros(n, dtype=torch.bool, device=device)
        chosen[anchors] = True
        neighbours = grid_neighbours(tokens.layout(), n).to(device)[anchors].flatten()
        chosen[neighbours[neighbours >= 0]] = True
        # anchors first, then buffers by object-layer score, to at most the budget
        rank = torch.empty(n, dtype=torch.long, device=device)
        rank[by_shallow] = torch.arange(n, device=device)
        rank[anchors] = -1
        ordered = torch.sort(torch.where(chosen, rank, n), stable=True).indices
        count = min(int(chosen.sum()), k)
        picked = ordered[:count]
        registers = torch.where(chosen, float("-inf"), deep)
        picked = torch.cat([picked, torch.sort(registers, descending=True, stable=True).indices[: k - count]])
        return Selection(picked.sort().values)
