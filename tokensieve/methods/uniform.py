"""``uniform``: keep tokens on an even 2D lattice over the image grid (a baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import grid_subsample, split_budget
from ..sieve import Selection, Sieve, VisualTokens


@register
@dataclass
class Uniform(Sieve):
    """Spatially even subsample: the cell centres of a rows×cols lattice spread over the grid,
    trimmed evenly to exactly ``keep`` tokens. Default ``keep=64`` (an 8×8 lattice on 24×24).
    An image of several 2D pieces (``VisualTokens.layout``) shares the budget among them in
    proportion to their sizes, one lattice per piece."""

    name = "uniform"
    paper = "baseline"

    def select(self, tokens: VisualTokens) -> Selection:
        k = self.budget.resolve(len(tokens))
        layout = tokens.layout()
        shares = split_budget([block.numel() for block in layout], k)
        kept = [block.flatten()[grid_subsample(tuple(block.shape), share)] for block, share in zip(layout, shares) if share]
        return Selection(torch.cat(kept).sort().values.to(tokens.features.device))
