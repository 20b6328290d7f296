"""``vispruner``: important tokens by [CLS] attention, then diverse ones by removing near-duplicates."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..sieve import Selection, Sieve, VisualTokens, check_fraction
from ..signals import Either, Signal

#: the importance signal of towers without [CLS]: the attention each patch receives at the last layer
RECEIVED_AT_LAST_LAYER = Signal("vision_attention", layer=-1, queries="mean")


@register
@dataclass
class VisPruner(Sieve):
    """Keep ``int(keep * important_ratio)`` important patches by head-mean [CLS] attention at the vision
    feature layer; fill the rest of the budget with diverse patches, left after repeatedly removing
    near-duplicates from the other patches.

    Duplicate removal works on the remaining patches listed by descending attention: each round splits
    the list alternately into A (even positions) and B (odd positions), scores every A patch by its
    highest cosine similarity to a B patch (vision features, before the projector), drops the
    ``removed_per_round`` most similar A patches (fewer in the last round, so exactly ``keep`` remain),
    and lists the surviving A patches, still by descending similarity, then B for the next round.

    Paper: "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs"
    (Zhang et al., ICCV 2025; a later version of arXiv 2412.01818, whose first is FasterVLM); code
    Theia-4869/VisPruner (``encode_images`` in llava/model/llava_arch.py, the [CLS] row of
    ``attentions[select_layer]`` in clip_encoder.py). Defaults as the code: ``important_ratio=0.5``
    (``--important_ratio`` in llava/eval/model_vqa*.py; the README also runs 0.75), 8 removed per
    round (a constant there), features of the feature layer; ``keep=64`` is this library's default
    budget (the code takes it as an argument).

    Differences: the code ranks with non-stable ``argsort``; here every sort is stable, so ties go
    to the lower raster index (importance) or the earlier list position (similarity) and the selection
    is deterministic. A list of odd length puts its extra patch in A, and a round removes at most all of
    A; the code's index shapes disagree in both cases and it fails (e.g. ``keep=58`` at ratio 0.5 on
    576 patches leaves 547). The [CLS] row is recomputed from the feature layer's hooked q/k
    (as ``fastervlm``), not read from eager attention. Towers without [CLS] (SigLIP, Qwen, Idefics3) use
    the code's fallback: each patch's attention received, averaged over every query row of the last
    layer (``vision_attention(layer=-1, queries="mean")``), then over heads. LLaVA-NeXT is refused, as its newline tokens have no vision features
    (the code runs each crop on its own with the full budget, keeping every newline).

    Adaptive budget (this library's): ``keep=ts.Adaptive(mass=0.9, min=16, max=None)`` sets the total ``keep``
    to the fewest patches whose head-mean attention (the important tokens' ranking) holds 90% of its mass,
    clamped to ``[min, max]``; that total is split into important and diverse ones by ``important_ratio`` as a
    fixed ``keep`` is.
    """

    name = "vispruner"
    paper = "VisPruner (arXiv 2412.01818)"
    signals = ("cls_attention", "vision_attention", "vision_features")
    adaptive_rules = ("mass",)  # keep=ts.Adaptive(mass=0.9): the total holds 90% of the attention

    important_ratio: float = 0.5
    removed_per_round: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("important_ratio", self.important_ratio, "a fraction of the budget")
        per_round = self.removed_per_round
        if isinstance(per_round, bool) or not isinstance(per_round, int) or per_round < 1:
            raise ValueError(f"removed_per_round must be a count >= 1, not {per_round!r}")

    def requests(self) -> tuple:
        return (Either("cls_attention", RECEIVED_AT_LAST_LAYER), "vision_features")

    def split(self, k: int) -> tuple[int, int]:
        """(important, diverse) counts for a budget of ``k`` tokens (the code's floor of ``k * ratio``)."""
        important = int(k * self.important_ratio)
        return important, k - important

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        attention = tokens["cls_attention"] if "cls_attention" in tokens else tokens[RECEIVED_AT_LAST_LAYER]
        attention = attention.float().mean(dim=0)
        k = self.budget.count(attention)
        if k >= n:
            return Selection.every(tokens)
        important_count, diverse_count = self.split(k)
        by_attention = torch.sort(attention, descending=True, stable=True).indices
        residual = by_attention[important_count:]
        if diverse_count > 0:
            residual = remove_duplicates(tokens["vision_features"], residual, diverse_count, self.removed_per_round)
            kept = torch.cat([by_attention[:important_count], residual])
        else:
            kept = by_attention[:important_count]
        return Selection(kept.sort().values)


def remove_duplicates(features: torch.Tensor, candidates: torch.Tensor, k: int, per_round: int) -> torch.Tensor:
    """VisPruner's duplicate removal: thin the ordered ``candidates`` down to ``k`` (see :class:`VisPruner`).

    One Python step per round (about ``N / per_round`` of them), tensor operations inside; the list
    lengths are known on the host, so nothing is read back from the device. The cosine matrix is
    computed once and each round gathers from it (rounds re-pair the same tokens).
    """
    unit = F.normalize(features.float(), dim=-1)
    cosine = unit @ unit.T
    while len(candidates) > k:
        a, b = candidates[0::2], candidates[1::2]
        removed = min(per_round, len(candidates) - k, len(a))
        closest = cosine.index_select(0, a).index_select(1, b).max(dim=1).values
        distinct = torch.sort(closest, descending=True, stable=True).indices[removed:]
        candidates = torch.cat([a[distinct], b])
    return candidates
