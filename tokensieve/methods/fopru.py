"""``fopru``: keep the tokens (``rank``) or the whole image rows (``row``) that receive the most attention in
the vision tower."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens
from ..signals import Signal

STRATEGIES = ("rank", "row")


def focal_rows(significance: torch.Tensor, layout: tuple[torch.Tensor, ...], k: int) -> torch.Tensor:
    """FoPru's row strategy: ``k`` token indices, ascending, made of whole rows of the image's 2D pieces
    (``VisualTokens.layout()``), the rows with the highest mean significance first (stable: ties to the
    earlier row); the first row that no longer fits whole gives its highest-significance tokens to fill
    the budget exactly."""
    device = significance.device
    rows = [row for piece in layout for row in piece.to(device)]
    means = torch.cat([significance[piece.to(device)].float().mean(dim=1) for piece in layout])
    kept, left = [], k
    for index in torch.sort(means, descending=True, stable=True).indices.tolist():
        row = rows[index]
        if len(row) >= left:  # the last row: whole if it fits exactly, else its best tokens
            kept.append(row[torch.sort(significance[row].float(), descending=True, stable=True).indices[:left]])
            break
        kept.append(row)
        left -= len(row)
    return torch.cat(kept).sort().values


@register
@dataclass
class FoPru(Sieve):
    """Score each token by the attention it receives in the vision tower (the head-mean attention map of
    one layer, averaged over every query row: ``vision_attention(queries="mean")``) and keep either the
    ``keep`` highest-scoring tokens (``strategy="rank"``, the global view) or whole image rows, those with
    the highest row score (``strategy="row"``, local continuity); kept tokens in raster order.

    Paper: "FoPru: Focal Pruning for Efficient Large Vision-Language Models" (Jiang et al., arXiv
    2411.14164). There is no official code; the third-party implementation checked is HydraInfer's
    ``focal_prunning`` (dongxianzhe/hydrainfer, ``hydrainfer/layer/token_prunning.py``, wired into its LLaVA
    model in commit d357ace). Defaults: the attention of the vision feature layer (``vision_layer=None``:
    the block whose output the model projects; HydraInfer takes the scores of block
    ``vision_feature_layer``, LLaVA's penultimate, which is the same block), ``keep=64``, and
    ``strategy="rank"``. The paper offers the two strategies as alternatives and names no default that
    could be checked here (only its abstract was readable); ``rank`` is the strategy HydraInfer wires into
    LLaVA, so it is the default by choice.

    Row strategy: a row's score is its tokens' mean significance (the paper and HydraInfer sum a row of a
    square grid; on one grid the ranking is the same, and the mean also ranks rows of different widths,
    as LLaVA-NeXT's base view, high-res grid and newline column). Rows are kept whole while they fit the
    budget; the first row that does not fit gives its highest-scoring tokens, so exactly ``keep`` tokens
    stay (HydraInfer's ``FocalPrunning`` class keeps ``floor(ratio * rows)`` whole rows, so the count is a
    multiple of the width; its batched ``focal_prunning`` takes the token budget as the number of rows, a
    bug not copied here).

    Differences from HydraInfer: the score is the softmax attention received, averaged over every query
    row of the tower's sequence ([CLS] included where the tower has one) and over heads; HydraInfer averages
    the pre-softmax logits ``q k^T / sqrt(d)`` of the patch-to-patch block ([CLS] row and column removed)
    and takes the column mean or the row mean of that block, whichever has the larger variance (the
    paper's significance is attention received, the column mean). Attention rows are recomputed from
    hooked q/k in chunks (HydraInfer runs that layer eagerly); sorts are stable (ties to the lower index).
    Serves every family (no [CLS] needed); LLaVA-NeXT/OneVision get one budget per image over all crops.

    Adaptive budget (this library's): ``keep=ts.Adaptive(mass=0.9, min=16, max=None)`` keeps the fewest tokens
    whose significance holds 90% of its mass (clamped to ``[min, max]``): with ``strategy="rank"`` exactly those
    tokens; with ``"row"`` that many tokens, filled by rows as a fixed ``keep`` is.
    """

    name = "fopru"
    paper = "FoPru (arXiv 2411.14164)"
    signals = ("vision_attention",)
    adaptive_rules = ("mass",)  # keep=ts.Adaptive(mass=0.9): the count holds 90% of the significance

    strategy: str = "rank"
    vision_layer: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES} (FoPru's global or row strategy), not {self.strategy!r}")
        self.requests()  # checks the layer number

    def requests(self) -> tuple[Signal, ...]:
        return (Signal("vision_attention", layer=self.vision_layer, queries="mean"),)

    def significance(self, tokens: VisualTokens) -> torch.Tensor:
        """(N,) the attention each token receives, averaged over heads."""
        return tokens[self.requests()[0]].float().mean(dim=0)

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        significance = self.significance(tokens)
        k = self.budget.count(significance)
        if k >= n:
            return Selection.every(tokens)
        if self.strategy == "rank":
            return Selection(top_k_in_order(significance, k))
        return Selection(focal_rows(significance, tokens.layout(), k))
