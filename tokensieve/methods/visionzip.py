"""``visionzip``: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity, crop by crop."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..budget import share_total
from ..registry import register
from ..selection import contextual_targets, merge_into_targets, split_budget, strided, top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens
from ..signals import Signal


def _signal(tokens: VisualTokens, name: str):
    """The signal ``name`` as given, whatever its parameters (``missing="zeros"`` where the model has tokens of no
    crop, the defaults when VisionDrop hands its own tokens over)."""
    return next(value for request, value in tokens.signals.items() if request.name == name)


def equal_shares(sizes: list[int], k: int) -> list[int]:
    """``k`` shared equally among crops of ``sizes`` tokens (the remainder to the earlier crops), a crop smaller
    than its share keeping all its tokens and the rest shared again among the others; ``k < len(sizes)``: one
    token to each of the first ``k`` crops."""
    if k < len(sizes):
        return split_budget([1] * len(sizes), k)
    return share_total(k, [1.0] * len(sizes), sizes)


@register
@dataclass
class VisionZip(Sieve):
    """Keep ``dominant`` patches by head-summed [CLS] attention at the vision feature layer; merge
    the rest into ``contextual`` tokens: targets taken at a uniform stride over the remaining
    patches, every other remaining patch joins its most similar target by head-mean key (cosine),
    and a contextual token is ``target + mean(members)`` in vision space, then projected.

    Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (Yang et al.,
    CVPR 2025, arXiv 2412.04467); code dvlab-research/VisionZip at 3151f6d (``visionzip/clip_encoder.py``,
    ``utils.py``, ``llava_arch.py``). Default ``keep=64`` split as the README's 54 dominant + 10 contextual;
    other budgets keep that ratio (128 -> 108+20, 192 -> 162+30), or pass ``contextual`` explicitly.
    Differences: stock HF LLaVA drops the [CLS] token before the projector, so all ``keep`` slots go to
    patches (the reference feeds [CLS] as one dominant token); contextual tokens sit at their target's grid
    position instead of being appended after the dominant ones, so every token keeps a real position.

    Images of several crops (LLaVA-NeXT, whose pieces name their crops: ``VisualTokens.blocks.crops``) are
    run as the code runs them there: the tower's batch of crops goes through the rule above crop by crop,
    each crop on its own [CLS] row and keys, before the newline tokens are placed. The budget covers the
    whole image and is split over the crops as the code splits it, equally (the code gives every crop the
    same ``dominant + contextual``; the remainder goes to the earlier crops, the base view first; a crop
    with fewer patches than its share keeps them all and the rest is shared again), each crop's share then
    split 54:10 (``contextual=None``; an explicit ``contextual`` counts the image and is shared over the crops
    in proportion to their shares). So ``keep=320`` on a base view and four crops is the code's 64 per crop,
    54+10. ``per_crop=True`` shares the budget as every method does (``ts.Budget(k, per_crop=True)``): over
    the image's pieces in proportion to their sizes, a piece's share over its crops by size, and a piece of no
    crop (the newline column) keeps that many of its tokens, evenly spread. Newline tokens are dropped by
    default, as the code drops them (its anyres path re-lays the kept patches without newline tokens), unless
    the budget exceeds the crops' patches, when the rest are newline tokens, evenly spread. Differences there:
    the code selects in each whole crop, padding included (it never unpads); here among the patches the model
    keeps after unpadding, a crop left with none getting no share; the code's order (base view, high-res
    dominant patches, the crops' [CLS], the crops' contextual tokens) is replaced by the tokens' own positions.
    It asks for ``vision_keys`` and ``vision_features`` with ``missing="zeros"``: LLaVA-NeXT's newline tokens
    have neither and get zero rows, which it never keeps or merges by.

    Adaptive budget (this library's): ``keep=ts.Adaptive(mass=0.9, min=16, max=None)`` sets the image's total
    ``dominant + contextual`` to the fewest patches whose head-summed [CLS] attention (the dominant tokens'
    ranking, every crop's row together) holds 90% of its mass, clamped to ``[min, max]``; that total is then
    split and shared over the crops as a fixed ``keep`` of that count is (54:10 by default).
    """

    name = "visionzip"
    paper = "VisionZip (arXiv 2412.04467)"
    signals = ("cls_attention", "vision_keys", "vision_features", "project")
    crop_split = True
    adaptive_rules = ("mass",)  # keep=ts.Adaptive(mass=0.9): the total holds 90% of the [CLS] attention

    contextual: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        contextual = self.contextual
        if contextual is not None and (isinstance(contextual, bool) or not isinstance(contextual, int) or contextual < 0):
            raise ValueError(f"contextual must be a count >= 0 (or None for the paper's ratio), not {contextual!r}")

    def requests(self) -> tuple:
        # zero rows for the tokens of no crop (LLaVA-NeXT's newline tokens): select() never keeps or merges them by these
        return ("cls_attention", Signal("vision_keys", missing="zeros"), Signal("vision_features", missing="zeros"), "project")

    def split(self, k: int) -> tuple[int, int]:
        """(dominant, contextual) counts for a budget of ``k`` tokens."""
        contextual = round(k * 10 / 64) if self.contextual is None else min(self.contextual, k - 1)
        return k - contextual, contextual

    def plan(self, tokens: VisualTokens, k: int) -> tuple[list[torch.Tensor], list[int], torch.Tensor, int]:
        """The image's crops (index tensors), each crop's share of ``k``, the tokens of no crop and how many of
        them are kept."""
        n = len(tokens)
        crops = [crop.flatten() for crop in getattr(tokens.blocks, "crops", ())] or [torch.arange(n, device=tokens.features.device)]
        sizes = [len(crop) for crop in crops]
        if not self.budget.per_crop:
            shares, rest = (sizes, k - sum(sizes)) if k >= sum(sizes) else (equal_shares(sizes, k), 0)
        else:
            shares, rest = [0] * len(crops), 0
            first = torch.stack([crop[0] for crop in crops])
            pieces = tokens.layout()
            for piece, share in zip(pieces, split_budget([piece.numel() for piece in pieces], k)):
                inside = [i for i, hit in enumerate(torch.isin(first, piece.flatten().to(first.device)).tolist()) if hit]
                parts = split_budget([sizes[i] for i in inside] + [piece.numel() - sum(sizes[i] for i in inside)], share)
                for i, part in zip(inside, parts):
                    shares[i] = part
                rest += parts[-1]
        others = torch.empty(0, dtype=torch.long)
        if rest:  # the tokens of no crop (newline tokens), read only when some are kept
            in_crop = torch.zeros(n, dtype=torch.bool, device=crops[0].device)
            in_crop[torch.cat(crops)] = True
            others = (~in_crop).nonzero().squeeze(1)
        return crops, shares, others, rest

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        scores = _signal(tokens, "cls_attention").sum(dim=0)
        k = self.budget.count(scores)
        if k >= n:
            return Selection.every(tokens)
        device = tokens.features.device
        crops, shares, others, rest = self.plan(tokens, k)
        if self.contextual is None:
            contextual = [self.split(share)[1] for share in shares]
        else:
            contextual = split_budget(shares, min(self.contextual, k - 1))
        own, targets, merged = [], [], []
        crops = torch.cat(crops).to(device).split([len(crop) for crop in crops])  # one copy to the device per image
        for crop, share, merging in zip(crops, shares, contextual):  # one pass per crop (a handful per image)
            if share >= len(crop) or share == 0:
                own.append(crop[:share])
                continue
            dominant = top_k_in_order(scores[crop], share - merging)
            own.append(crop[dominant])
            if merging:
                picked, members = contextual_targets(len(crop), dominant, merging)
                keys = _signal(tokens, "vision_keys")[:, crop].mean(dim=0)
                merged.append(merge_into_targets(_signal(tokens, "vision_features")[crop], keys, picked, members))
                targets.append(crop[picked])
        if rest:
            own.append(others.to(device)[strided(len(others), rest).to(device)])
        own = torch.cat(own)
        if not merged:
            return Selection(own.sort().values)
        projected = _signal(tokens, "project")(torch.cat(merged).unsqueeze(0)).squeeze(0).to(tokens.features.dtype)
        kept = torch.cat([own, *targets])
        order = kept.argsort()
        features = torch.cat([tokens.features[own], projected])
        return Selection(kept[order], features[order])
