"""``fourier``: low-pass the token grid in the 2D DCT domain and emit the smaller grid it resamples to."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import cell_centres, dct_lowpass, target_grid
from ..sieve import GridSieve


@register
@dataclass
class Fourier(GridSieve):
    """Treat each feature channel of the h×w token grid as an image, take its 2D DCT-II (orthonormal,
    computed by FFT), keep the low-frequency h'×w' block and invert it at h'×w': the grid resampled to the
    largest h'×w' of at most ``keep`` tokens with the grid's aspect (64: 8×8, 128: 11×11, 192: 13×14 on
    24×24, as ``pool``). Each output token sits at the position of its cell's centre token on the even
    h'×w' lattice over the grid (``pool``'s placement), so the LLM keeps the layout.

    Paper: "Fourier-VLM: Compressing Vision Tokens in the Frequency Domain for Large Vision-Language
    Models" (Wang et al., arXiv 2508.06038; v3 "Fourier Compressor"). No official code was found, so the
    defaults are not checked against one: ``keep=64`` (the paper's 24×24 -> 8×8 example). **The paper's
    numbers come from models fine-tuned with the compressor** (to undo its JPEG-like distortion); used
    training-free, as here, expect lower accuracy than it reports.

    Decisions where the available text leaves it open: the kept coefficients go back through the inverse
    DCT at the reduced size (the h'×w' tokens are spatial features, not coefficients), scaled by
    ``sqrt(h'w'/hw)`` so the token scale the LLM expects is kept (a constant grid stays that constant; the
    orthonormal transforms alone would multiply it by ``sqrt(hw/h'w')``). It filters the projected tokens at
    the LLM input; the paper filters the vision encoder's output. The two agree for an affine projector
    (the filter commutes with any per-token affine map) but not for LLaVA's two-layer GELU MLP; filtering
    the LLM-side tokens serves every family. An image of several 2D pieces (LLaVA-NeXT's base view, high-res
    grid and newline column; ``VisualTokens.layout``) shares the budget among them in proportion to their
    sizes, as ``pool``, and filters each piece on its own; a piece given its whole size is left unchanged.
    Computed in float32 (``selection.dct``/``idct``/``dct_lowpass``, tested against the DCT matrix).
    """

    name = "fourier"
    paper = "Fourier-VLM (arXiv 2508.06038)"

    def resample(self, features: torch.Tensor, grid: tuple[int, int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The piece low-passed to at most ``k`` tokens at its lattice's cell centres (whole: unchanged)."""
        size = target_grid(grid, k)
        if size == grid:
            return torch.arange(features.shape[0]), features
        filtered = dct_lowpass(features.float().view(*grid, -1), size).reshape(size[0] * size[1], -1)
        return cell_centres(grid, size), filtered
