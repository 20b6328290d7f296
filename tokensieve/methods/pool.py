"""``pool``: 2D average pooling of the visual tokens to a smaller grid (LLaVolta-style)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import cell_centres, target_grid
from ..sieve import GridSieve


@register
@dataclass
class Pool(GridSieve):
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

    def resample(self, features: torch.Tensor, grid: tuple[int, int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The piece pooled to at most ``k`` cells: each cell's centre token and the cell means in float32."""
        h, w = grid
        rows, cols = target_grid((h, w), k)
        image = features.T.reshape(1, -1, h, w).float()
        pooled = F.adaptive_avg_pool2d(image, (rows, cols)).reshape(-1, rows * cols).T
        return cell_centres(grid, (rows, cols)), pooled
