"""``downsample``: resize the projected token grid to a smaller one (antialiased bilinear), the resize baseline."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import cell_centres, target_grid
from ..sieve import GridSieve


@register
@dataclass
class Downsample(GridSieve):
    """Resize each channel of the h×w token grid, as an image, to the largest h'×w' grid of at most ``keep``
    tokens with the grid's aspect (``selection.target_grid``: 64 -> 8×8, 128 -> 11×11, 192 -> 13×14 on 24×24,
    as ``pool`` and ``fourier``), by bilinear interpolation with antialiasing
    (``F.interpolate(mode="bilinear", antialias=True, align_corners=False)``, PIL's triangle filter: output
    token i of an axis scaled by s = h/h' weighs input token j by ``max(0, 1 - |j + 0.5 - s(i + 0.5)| / s)``,
    normalised over the tokens it reaches, so each output reads about 2s inputs per axis). Each new token
    stands at the position of its cell's centre token (``selection.cell_centres``, ``pool``'s placement).

    The baseline token-reduction benchmarks find hard to beat: "resize the image (or the feature grid) so the
    model makes only ``keep`` tokens". No paper and no official code; ``keep=64`` as ``pool``.

    How it differs from resizing the image: the vision tower still runs at full size (no tower compute is
    saved, only LLM tokens), and it is the tower's projected output that is resized, not the pixels; resizing
    pixels before the tower would need each family's processor and position-embedding interpolation, and
    would give the tower a smaller image to read. How it differs from ``pool``: ``pool`` averages each cell's
    tokens with equal weights (a box filter over exactly the cell), this weighs them by a triangle twice the
    cell's width, so neighbouring cells overlap and a token near a cell's centre counts more (on 4×4 -> 2×2,
    a row 0, 1, 2, 3 gives 5/7 and 16/7 instead of 0.5 and 2.5). Like ``fourier`` (a DCT low-pass) it keeps a
    constant grid constant and commutes with any per-token affine map of the channels.

    An image of several 2D pieces (LLaVA-NeXT's base view, high-res grid and newline column;
    ``VisualTokens.layout``) shares the budget among them in proportion to their sizes and resizes each
    piece on its own; a piece given its whole size is left unchanged. Computed in float32.
    """

    name = "downsample"
    paper = "resize baseline (no paper)"

    def resample(self, features: torch.Tensor, grid: tuple[int, int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The piece resized to at most ``k`` tokens at its lattice's cell centres (whole: unchanged)."""
        size = target_grid(grid, k)
        if size == grid:
            return torch.arange(features.shape[0]), features
        image = features.T.reshape(1, -1, *grid).float()
        resized = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
        return cell_centres(grid, size), resized.reshape(-1, size[0] * size[1]).T
