"""``vflowopt``: VFlowOpt's vision stage: rank tokens by vision-tower attention, keep the best, and recycle
the low-ranked ones into one kept token per spatial cell by an importance-weighted mean."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens
from ..signals import Signal

RELEVANCE = {"received": "mean", "cls": "cls"}


def patch_entropy(patches: torch.Tensor) -> torch.Tensor:
    """(N,) Shannon entropy in bits of each patch's 256-bin grey histogram; ``patches`` (N, 3, p, p) pixel
    values in 0..255. Grey = 0.3333 per channel, rounded (the official ``calculate_patch_entropy_vectorized``)."""
    grey = (patches.float() * 0.3333).sum(dim=1).flatten(1).round().clamp(0, 255).long()
    ones = torch.ones_like(grey, dtype=torch.float)
    hist = torch.zeros(len(grey), 256, device=grey.device).scatter_add_(1, grey, ones)
    prob = hist / grey.shape[1]
    return -torch.special.xlogy(prob, prob).sum(dim=1) / math.log(2)


def importance(relevance: torch.Tensor, entropy: torch.Tensor | None = None, alpha_v: float = 0.0) -> torch.Tensor:
    """The official score ``relevance + alpha_v · softmax(entropy)`` over the image's tokens."""
    if entropy is None or alpha_v == 0:
        return relevance.float()
    return relevance.float() + alpha_v * torch.softmax(entropy.float(), dim=0)


def cell_ids(layout: tuple[torch.Tensor, ...], n: int, m: float) -> torch.Tensor:
    """(n,) each token's m×m cell, ``(floor(row/m), floor(col/m))`` within its own 2D piece, numbered over the
    image from 0 without gaps."""
    cells, offset = torch.empty(n, dtype=torch.long), 0
    for piece in layout:
        h, w = piece.shape
        rows = (torch.arange(h, dtype=torch.float) / m).floor().long()
        cols = (torch.arange(w, dtype=torch.float) / m).floor().long()
        across = int(cols[-1]) + 1
        cells[piece.flatten()] = (offset + rows[:, None] * across + cols[None, :]).flatten()
        offset += (int(rows[-1]) + 1) * across
    return torch.unique(cells, return_inverse=True)[1]  # numbered 0.. without gaps (m < 1 skips numbers)


def recycle(scores: torch.Tensor, cells: torch.Tensor, k: int) -> Selection:
    """Keep ``k`` tokens: the lowest-scoring tokens L (the fewest from the bottom holding ``n - k`` tokens that
    are not their cell's first in L) each go into the highest-scoring L token of their cell, which is kept with
    the score-weighted mean of its group; the rest are kept as they are. If even L = every token leaves more
    than ``k`` cells (``k`` under the cell count), the ``k`` best cell representatives stay and the others'
    groups are dropped. Ties go to the lower index, as ``top_k_in_order``."""
    n, device = len(scores), scores.device
    scores, cells = scores.float(), cells.to(device)
    order = torch.sort(scores, descending=True, stable=True).indices.flip(0)  # lowest first; ties: higher index
    cell, position = cells[order], torch.arange(n, device=device)
    first = torch.full((n,), n, device=device).scatter_reduce(0, cell, position, "amin")
    absorbed = (first[cell] != position).cumsum(0)
    stop = torch.searchsorted(absorbed, torch.tensor([n - k], device=device))  # n: every token is in L
    low_sorted = position <= stop
    last = torch.full((n,), -1, device=device).scatter_reduce(0, cell[low_sorted], position[low_sorted], "amax")
    representative = order[last.clamp(min=0)]  # per cell: its best L token (unused cells never read)
    low = torch.zeros(n, dtype=torch.bool, device=device)
    low[order] = low_sorted
    target = torch.where(low, representative[cells], torch.arange(n, device=device))
    candidate = torch.zeros(n, dtype=torch.bool, device=device)
    candidate[target] = True
    kept = top_k_in_order(torch.where(candidate, scores, float("-inf")), k)
    slot = torch.full((n,), -1, device=device)
    slot[kept] = torch.arange(k, device=device)
    assignment = slot[target]
    grouped = assignment.clamp(min=0)
    sizes = torch.zeros(k, dtype=torch.long, device=device).index_add_(0, grouped, (assignment >= 0).long())
    tiny = torch.finfo(torch.float32).tiny  # an all-zero group becomes a plain mean instead of 0/0
    weights = torch.where(sizes[grouped] > 1, scores.clamp(min=tiny), torch.ones_like(scores))
    return Selection(kept, assignment=assignment, weights=weights)


@register
@dataclass
class VFlowOpt(Sieve):
    """VFlowOpt's vision stage. Score each token by the head-mean attention it gets at one vision layer; keep
    the best; the low-ranked tokens are grouped into ``m``×``m`` cells of the image's 2D pieces and each cell's
    group merges, weighted by score, into its best member, which is kept (recycling, a merge map). Exactly
    ``keep`` tokens stay: the low set grows from the bottom until ``N - keep`` tokens went into a cell
    representative (:func:`recycle`).

    Paper: "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization"
    (Yang et al., ICCV 2025, arXiv 2508.05211); code sihany077/VFlowOpt (read at 129eeef:
    ``siglip_encoder.py`` scores, ``llava_qwen_training_free.py`` recycles, ``llava_onevision_training_free.py``
    configs, ``llava_ov_opt_all.py`` search). Official rule: ``r_j`` = attention token j receives (head mean,
    then mean over query rows) at ``illava_vit_k=[25]``, the last block of LLaVA-OneVision's 26-layer SigLIP,
    whose output the model projects (``vision_layer=None``); global tokens ``G = {i: r_i > t·mean(r)}``;
    relevance ``a_j = mean_{i∈G} A[i, j]``; score ``a + alpha_v·softmax(H)``, ``H`` each 14×14 pixel patch's
    grey-level entropy (:func:`patch_entropy`); the lowest ``round(N(1-r_v)) + int(N/m²)`` tokens are grouped
    by ``floor(row/m), floor(col/m)`` separately in the base view and the high-res grid, each group merged by
    ``score/sum`` into its highest-scoring member, which is kept (projected features, before the LLM).
    Defaults: the shipped 10% config, ``r_v=0.11661529508161146`` (``keep=0.1166``), ``t=39.26492840997221``
    (``t=39.265``), ``m=17.386981849158786`` (``m=17.387``), ``alpha_v=0``. ``tokensieve calibrate``
    (tokensieve/bench/calibrate.py) runs the code's search, maximising the last prompt token's final hidden-state
    cosine to the unpruned model's at a layer-averaged budget (300 calls, 27 initial points; optuna's GP sampler
    where the code uses scikit-optimize): it tunes ``keep``, ``m`` and ``vflowopt_llm``'s ratios and keep; ``t``
    and ``alpha_v`` are not searched (the code's ranges: r_v 0.25..0.375, t 0..50, m 3..24, alpha_v -1..1). The in-LLM stages (layers 9 and 18,
    ratios ``[1.0, 0.6011]``, ranked by this same vision score) are ``vflowopt_llm``; the full method is the chain
    ``vflowopt+vflowopt_llm``. Budgets: a count, a
    ratio or ``ts.Adaptive(mass=...)`` on the scores (not ``per_crop``).

    Differences. Relevance: no signal gives the attention rows of the global tokens, so ``relevance="received"``
    (default) takes every token as global, ``a = r``: the official rule at ``t=0`` exactly (``t`` is unused until a
    ``vision_attention(queries="global", t=...)`` signal exists); ``relevance="cls"`` takes the [CLS] row as the one
    global query ([CLS] towers only). Entropy: no signal gives the pixels, so ``alpha_v`` other than 0 is refused
    (every shipped config has 0); the code's histogram runs on SigLIP-normalised pixels (-1..1) ×255 cast to uint8
    (negatives out of range), :func:`patch_entropy` takes 0..255 pixels. Count: the official drops ``int(N/m²)``
    extra tokens and keeps one per touched cell, so its count drifts from ``r_v·N``; here the low set is sized so
    exactly ``keep`` stay (the same result whenever the official count comes out at ``keep``, tested); with ``keep``
    under the number of cells (or ``m <= 1``: plain top-k) the best representatives stay. Cells never cross a piece
    of the image; the newline column of LLaVA-NeXT/OneVision is its own piece and scores 0 (the code appends it to
    the high-res grid at score 1, so it is never dropped). The code's single-crop path is a plain top-k; here every
    image recycles. Stable ties (lower index kept); weights of a group are its scores (at least the smallest
    positive float), a kept token alone in its group weight 1.
    """

    name = "vflowopt"
    paper = "VFlowOpt (ICCV 2025, arXiv 2508.05211)"
    signals = ("vision_attention",)
    adaptive_rules = ("mass",)

    keep: int | float = 0.1166
    t: float = 39.265
    m: float = 17.387
    alpha_v: float = 0.0
    vision_layer: int | None = None
    relevance: str = "received"

    def __post_init__(self) -> None:
        super().__post_init__()
        for field, value in (("t", self.t), ("m", self.m), ("alpha_v", self.alpha_v)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{field} must be a finite number, not {value!r}")
        if self.t < 0:
            raise ValueError(f"t must be >= 0 (global tokens receive more than t times the mean), not {self.t!r}")
        if self.m <= 0:
            raise ValueError(f"m must be > 0 (the side of a recycling cell in tokens; the code's 3..24), "
                             f"not {self.m!r}")
        if self.alpha_v != 0:
            raise ValueError(f"alpha_v={self.alpha_v!r}: the entropy term needs each patch's pixels, which no "
                             f"tokensieve signal gives yet; pass alpha_v=0 (every shipped VFlowOpt config has "
                             f"0)")
        if self.relevance not in RELEVANCE:
            hint = (" (the official global-token rows need a signal tokensieve does not have yet)"
                    if self.relevance == "global" else "")
            raise ValueError(f"relevance must be one of {tuple(RELEVANCE)}, not {self.relevance!r}{hint}")
        self.requests()  # checks the layer number

    def requests(self) -> tuple[Signal, ...]:
        return (Signal("vision_attention", layer=self.vision_layer, queries=RELEVANCE[self.relevance]),)

    def select(self, tokens: VisualTokens) -> Selection:
        scores = importance(tokens[self.requests()[0]].float().mean(dim=0))
        n, k = len(tokens), self.budget.count(scores)
        if k >= n:
            return Selection(torch.arange(n, device=tokens.features.device))
        return recycle(scores, cell_ids(tokens.layout(), n, self.m), k)
