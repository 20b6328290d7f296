"""``pool``: 2D average pooling of the visual tokens to a smaller grid (LLaVolta-style)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import split_budget
from ..sieve import Selection, Sieve, VisualTokens


def _target_grid(grid: tuple[int, int], k: int) -> tuple[int, int]:
    """The largest rows×cols <= k with cols within one of rows·w/h (64 -> 8×8, 192 -> 13×14 on 24×24)."""
    h, w = grid
    best = (1, 1)
    for rows in range(1, h + 1):
        for cols in {min(w, max(1, round(rows * w / h) + extra)) for extra in (0, 1)}:
            if rows * cols <= k and rows * cols > best[0] * best[1]:
                best = (rows, cols)
    return best


def _cell_bounds(size: int, cells: int) -> list[tuple[int, int]]:
    """The [start, end) spans adaptive average pooling uses for each output cell."""
    return [((i * size) // cells, -(-((i + 1) * size) // cells)) for i in range(cells)]


@register
@dataclass
class Pool(Sieve):
    """Average-pool the projected tokens to the largest grid of at most ``keep`` cells.

    Paper: LLaVolta / Visual Context Compressor (Chen et al., arXiv 2406.20092), which pools visual
    tokens inside the LLM (1-D, kernel = stride) during training. Differences: this pools in 2D on
    the image grid, at the LLM input, training-free; each pooled token sits at the position of its
    cell's centre token (LLaVolta averages the positions, which rounds to about the same place).
    The budget rounds down to a whole grid: keep=64 gives 8×8, 128 gives 11×11, 192 gives 13×14.
    An image of several 2D pieces (``VisualTokens.layout``) shares the budget among them in
    proportion to their sizes and pools each piece on its own.
    """

    name = "pool"
    paper = "LLaVolta (arXiv 2406.20092)"

    def select(self, tokens: VisualTokens) -> Selection:
        k = self.budget.resolve(len(tokens))
        device = tokens.features.device
        if k >= len(tokens):
            return Selection(torch.arange(len(tokens), device=device))
        layout = tokens.layout()
        kept, pooled = [], []
        for block, share in zip(layout, split_budget([block.numel() for block in layout], k)):
            if share:
                index = block.flatten().to(device)
                centres, features = _pool_block(tokens.features[index], tuple(block.shape), share)
                kept.append(index[centres])
                pooled.append(features)
        kept = torch.cat(kept)
        order = kept.argsort()
        return Selection(kept[order], torch.cat(pooled)[order].to(tokens.features.dtype))


def _pool_block(features: torch.Tensor, grid: tuple[int, int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool one h×w piece (its features in raster order) to at most ``k`` cells: the raster index of
    each cell's centre token within the piece, and the cell means in float32."""
    h, w = grid
    rows, cols = _target_grid((h, w), k)
    image = features.T.reshape(1, -1, h, w).float()
    pooled = F.adaptive_avg_pool2d(image, (rows, cols)).reshape(-1, rows * cols).T
    centres = [
        ((top + bottom - 1) // 2) * w + (left + right - 1) // 2
        for top, bottom in _cell_bounds(h, rows)
        for left, right in _cell_bounds(w, cols)
    ]
    return torch.tensor(centres, device=features.device), pooled
