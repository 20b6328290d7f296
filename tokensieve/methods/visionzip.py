"""``visionzip``: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import contextual_targets, merge_into_targets, top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens


@register
@dataclass
class VisionZip(Sieve):
    """Keep ``dominant`` patches by head-summed [CLS] attention at the vision feature layer; merge
    the rest into ``contextual`` tokens: targets taken at a uniform stride over the remaining
    patches, every other remaining patch joins its most similar target by head-mean key (cosine),
    and a contextual token is ``target + mean(members)`` in vision space, then projected.

    Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (Yang et al.,
    CVPR 2025, arXiv 2412.04467); code dvlab-research/VisionZip. Default ``keep=64`` split as the
    README's 54 dominant + 10 contextual; other budgets keep that ratio (128 -> 108+20,
    192 -> 162+30), or pass ``contextual`` explicitly. Differences: stock HF LLaVA drops the
    [CLS] token before the projector, so all ``keep`` slots go to patches (the reference feeds
    [CLS] as one dominant token); contextual tokens sit at their target's grid position instead of
    being appended after the dominant ones, so every token keeps a real position.
    """

    name = "visionzip"
    paper = "VisionZip (arXiv 2412.04467)"
    signals = ("cls_attention", "vision_keys", "vision_features", "project")

    contextual: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        contextual = self.contextual
        if contextual is not None and (isinstance(contextual, bool) or not isinstance(contextual, int) or contextual < 0):
            raise ValueError(f"contextual must be a count >= 0 (or None for the paper's ratio), not {contextual!r}")

    def split(self, k: int) -> tuple[int, int]:
        """(dominant, contextual) counts for a budget of ``k`` tokens."""
        contextual = round(k * 10 / 64) if self.contextual is None else min(self.contextual, k - 1)
        return k - contextual, contextual

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        k = self.budget.resolve(n)
        if k >= n:
            return Selection.every(tokens)
        dominant_count, contextual_count = self.split(k)
        dominant = top_k_in_order(tokens["cls_attention"].sum(dim=0), dominant_count)
        if contextual_count == 0:
            return Selection(dominant)
        targets, members = contextual_targets(n, dominant, contextual_count)
        hidden = tokens["vision_features"]
        merged = merge_into_targets(hidden, tokens["vision_keys"].mean(dim=0), targets, members)
        projected = tokens["project"](merged.unsqueeze(0)).squeeze(0).to(tokens.features.dtype)
        kept = torch.cat([dominant, targets])
        order = kept.argsort()
        features = torch.cat([tokens.features[dominant], projected])
        return Selection(kept[order], features[order])
