"""``mustdrop``: MustDrop's vision stage: similar spatially adjacent tokens merged window by window, then
the key tokens by [CLS] attention fill the budget."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens
from ..signals import Signal

KEYS = ("cls", "received")


@register
@dataclass
class MustDrop(Sieve):
    """MustDrop's vision stage before the LLM, as a merge map.

    1. **Local spatial merging.** Each 2D piece of the image (``VisualTokens.layout()``) is tiled from
       its top-left corner by non-overlapping ``window``×``window`` windows (partial ones at the right and
       bottom edges). A window's similarity is the mean cosine over its ordered pairs of distinct tokens,
       ``(|Σ u_i|² - m) / (m(m - 1))`` for its m unit vectors (the code's masked ``sims.sum() / (m(m-1))``).
       Windows at or above ``threshold`` merge, the most similar first, into one token: the plain mean
       of the window, standing at the window's centre token (``(m_rows - 1) // 2``, ``(m_cols - 1) // 2``).
       Merging stops before it would leave fewer than ``keep`` tokens.
    2. **Key tokens.** Every token left (a merged window or an unmerged token) is scored by the head-mean
       [CLS] attention at vision layer ``key_layer`` (a merged window: the mean over its tokens), and the
       top ``keep`` stay, in raster order, ties to the lower index; the others are dropped (-1 in the map).

    Paper: "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model" (Liu et
    al., arXiv 2411.10803); code liuting20/MustDrop (read at 909afa5: ``conditional_pooling`` in
    ``llava/model/multimodal_encoder/local_merge.py``, ``CLIPVisionModelAcc`` in ``clip_encoder.py``).
    Defaults from the code: ``window=3`` and ``threshold=0.8`` (``conditional_pooling(hidden_states, 0.8,
    (3, 3))``: 24×24 → 64 windows of 9), the key score at the last block (``idx == 23`` of CLIP-L's 24,
    head mean of ``attn[:, :, 0, 1:]``: ``key_layer=-1``). ``keep=64``, the budget the other pre-LLM methods
    default to (the paper reports 192/128/64).

    The budget. The code's vision stage has none: it merges every window above the threshold (576 - 8r
    tokens) and marks the top ``ceil(0.08·N')`` by [CLS] attention as a key set that the LLM stages may
    never drop; the count the paper reports comes from its prefill stage (text-to-image attention
    filters at decoder layers 2, 6, 10, 14, ``--global_thr``/``--individual_thr``) and its decoding stage
    (the KV cache pruned to what prefill kept). Those run inside the LLM and are a later in-LLM method,
    not here. Before the LLM, the budget is met with what the vision stage has: merge by the threshold
    (never below ``keep``, so ``keep`` equal to the token count is the stock model), then the key-token
    score, the vision stage's own importance, chooses the ``keep`` survivors. Merging most-similar pairs
    until ``keep`` remain (ToMe's rule, ``tome``) was not chosen: it ignores the windows and the threshold,
    and window merging alone cannot go below one token a window. ``key="received"`` scores by the
    attention each token receives at ``key_layer`` (mean over heads and query rows), for towers without
    [CLS] (SigLIP, Qwen, Idefics3), which refuse ``"cls"``; it is not the paper's.

    Differences: the code merges after the tower's first block (its output, ``hidden_states[1]``) by
    that block's hidden states, and the later blocks run on the merged tokens; here the merge is on the
    projected tokens, by their cosine, so 0.8 is a cosine between projected tokens, not early-layer
    states (expect a different number of windows above it; tune ``threshold``). The key score is the
    unmerged tower's attention averaged over the window (the code's is the merged token's own, at the
    last block). The code puts merged windows first in the sequence (by similarity) and the rest after
    in raster order, each merged token held at its window's last (bottom-right) token; here tokens keep
    raster order and a window stands at its centre, where the mean of its position embeddings points.
    The code needs a square grid divisible by the window and one merge count for the whole batch (the
    smallest); here any grid (edge windows are partial), each image its own count. Pieces one token wide
    or tall (LLaVA-NeXT's newline column: no image patches) never merge; each 2D piece merges on its own.

    Adaptive budget (this library's): ``keep=ts.Adaptive(mass=0.9, min=16, max=None)`` sets the count ``keep``
    to the fewest tokens whose key score (before merging) holds 90% of its mass, clamped to ``[min, max]``;
    merging and the key-token fill then run as for a fixed ``keep`` of that count.
    """

    name = "mustdrop"
    paper = "MustDrop (arXiv 2411.10803)"
    signals = ("cls_attention", "vision_attention")
    adaptive_rules = ("mass",)  # keep=ts.Adaptive(mass=0.9): the count holds 90% of the key scores

    threshold: float = 0.8
    window: int = 3
    key: str = "cls"
    key_layer: int | None = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
            raise ValueError(f"threshold must be a cosine in [-1, 1] (a window merges when its tokens' mean pairwise "
                             f"cosine reaches it; the code's 0.8), not {value!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a side in tokens >= 1 (the code's 3: 3x3 windows; 1: no merging), not {self.window!r}")
        if self.key not in KEYS:
            raise ValueError(f"key must be one of {KEYS} ([CLS] attention, the paper's; or the attention each token "
                             f"receives, for towers without [CLS]), not {self.key!r}")
        layer = self.key_layer
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer == 0):
            raise ValueError(f"key_layer must be a vision layer (1..n, or -1..-n from the last; the code's last block is -1) "
                             f"or None for the feature layer, not {layer!r}")
        self.requests()  # checks the layer number

    def requests(self) -> tuple[Signal, ...]:
        if self.key == "cls":
            return (Signal("cls_attention", layers=None if self.key_layer is None else (self.key_layer,)),)
        return (Signal("vision_attention", layer=self.key_layer, queries="mean"),)

    def key_scores(self, tokens: VisualTokens) -> torch.Tensor:
        """(N,) each token's key score: head-mean attention at ``key_layer``."""
        rows = tokens[self.requests()[0]].float()
        if self.key == "cls" and self.key_layer is not None:
            rows = rows[0]
        return rows.mean(dim=0)

    def windows(self, tokens: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's window (N,) and each window's centre token (W,); tokens of a piece one token wide or
        tall get windows of their own (no merging)."""
        device, ws = tokens.features.device, self.window
        window = torch.empty(len(tokens), dtype=torch.long, device=device)
        centres, count = [], 0
        for block in tokens.layout():
            block = block.to(device)
            h, w = block.shape
            if h == 1 or w == 1:
                ids = count + torch.arange(block.numel(), device=device)
                window[block.flatten()] = ids
                centres.append(block.flatten())
                count += block.numel()
                continue
            ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
            across = -(-w // ws)
            ids = count + (ys // ws)[:, None] * across + (xs // ws)[None, :]
            # the centre row (column) of each window: its start + (its length - 1) // 2
            y0, x0 = (ys // ws) * ws, (xs // ws) * ws
            cy = y0 + ((y0 + ws).clamp(max=h) - y0 - 1) // 2
            cx = x0 + ((x0 + ws).clamp(max=w) - x0 - 1) // 2
            centre = (ys == cy)[:, None] & (xs == cx)[None, :]
            window[block.flatten()] = ids.flatten()
            order = ids[centre].argsort()
            centres.append(block[centre][order])
            count += -(-h // ws) * across
        return window, torch.cat(centres)

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        scores = self.key_scores(tokens)
        k = self.budget.count(scores)
        device = tokens.features.device
        if k >= n:
            return Selection.every(tokens)
        window, centre = self.windows(tokens)
        sizes = torch.bincount(window, minlength=len(centre))
        unit = F.normalize(tokens.features.float(), dim=-1)
        sums = torch.zeros(len(centre), unit.shape[-1], device=device).index_add_(0, window, unit)
        pairs = (sizes * (sizes - 1)).clamp(min=1)
        similarity = ((sums * sums).sum(dim=-1) - sizes) / pairs
        similarity = torch.where(sizes > 1, similarity, float("-inf"))
        # the most similar windows first (ties to the earlier window), while above the threshold and the
        # tokens they save leave at least ``keep``
        order = torch.sort(similarity, descending=True, stable=True).indices
        fits = (similarity[order] >= self.threshold) & ((sizes[order] - 1).cumsum(0) <= n - k)
        merged = torch.zeros(len(centre), dtype=torch.bool, device=device)
        merged[order[fits.long().cumprod(0).bool()]] = True
        arange = torch.arange(n, device=device)
        group = torch.where(merged[window], centre[window], arange)  # the token each token's unit stands at
        totals = torch.zeros(n, device=device).index_add_(0, group, scores)
        counts = torch.bincount(group, minlength=n)
        unit_scores = torch.where(group == arange, totals / counts.clamp(min=1), float("-inf"))
        kept = top_k_in_order(unit_scores, k)
        position = torch.full((n,), -1, dtype=torch.long, device=device)
        position[kept] = torch.arange(k, device=device)
        return Selection(kept, assignment=position[group])
