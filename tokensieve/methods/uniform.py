"""``uniform``: keep tokens on an even 2D lattice over the image grid (a baseline)."""

from __future__ import annotations

from ..registry import register
from ..selection import grid_subsample
from ..sieve import Selection, Sieve, VisualTokens


@register
class Uniform(Sieve):
    """Spatially even subsample: the cell centres of a rows×cols lattice spread over the grid,
    trimmed evenly to exactly ``keep`` tokens. Default ``keep=64`` (an 8×8 lattice on 24×24)."""

    name = "uniform"
    paper = "baseline"

    def select(self, tokens: VisualTokens) -> Selection:
        k = self.budget.resolve(len(tokens))
        return Selection(grid_subsample(tokens.grid, k).to(tokens.features.device))
