"""``random``: keep a uniformly random subset of the visual tokens (a baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..sieve import Selection, Sieve, VisualTokens


@register
@dataclass
class RandomPrune(Sieve):
    """Keep ``keep`` tokens drawn uniformly without replacement, in raster order.

    Defaults: ``keep=64``, ``seed=0``. The draw depends only on ``seed`` and the image's token
    count, so runs are reproducible and every row of a batch is treated as it would be alone.
    """

    name = "random"
    paper = "baseline"

    seed: int = 0

    def select(self, tokens: VisualTokens) -> Selection:
        k = self.budget.resolve(len(tokens))
        generator = torch.Generator().manual_seed(self.seed)
        kept = torch.randperm(len(tokens), generator=generator)[:k].sort().values
        return Selection(kept.to(tokens.features.device))

