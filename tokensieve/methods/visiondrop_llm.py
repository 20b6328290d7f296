"""``visiondrop_llm``: VisionDrop's stages inside the LLM: at each stage keep the image tokens that the image's own tokens
attend to most (dominant) and merge the rest into a few contextual tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import contextual_targets, merge_into_targets, top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens, check_fraction, check_layers
from ..signals import Signal
from .pyramiddrop import POSITIONS, default_layers

PAPER = "VisionDrop (arXiv 2506.22283)"
MERGES = ("mean", "sum")
#: the attention each image token receives from the image's own tokens (head and query-row means taken below)
IMAGE_ROWS = Signal("llm_attention", queries="image")


@register
@dataclass
class VisionDropLLM(Sieve):
    """Before each of ``layers``, score each image token still there by the attention it receives from the image's
    own tokens as that layer computes it on its input (its input norm, q/k, rotation, causal mask; mean over heads
    and over the image's query rows): no text. Stage s keeps ``count_s`` tokens: the top ``count_s - c_s`` by that
    score (dominant) and ``c_s = ceil(contextual_share * count_s)`` contextual tokens: targets at a uniform stride
    over the other tokens in order, every remaining token joins its most cosine-similar target, and the targets'
    hidden states take their members in (a target with no member keeps its own).

    Paper: "Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment" (Xu, Wang, Luo and Du, AAAI
    2026, arXiv 2506.22283); code Ruixxxx/VisionDrop at f7a9444 (``visiondrop_rank_drop`` in
    ``llava/model/modeling_llama_visiondrop.py``, ``scripts/v1_5/visiondrop_eval/*.sh``). The full method is the
    chain ``visiondrop+visiondrop_llm`` (``ts.Chain(ts.VisionDrop(), ts.VisionDropLLM())``): the vision stage keeps
    48 tokens (42 dominant + 6 contextual), these stages 35, 26 and 19 before layers 8, 16 and 24 of 32 (the
    scripts' ``--layer_list [8,16,24] --image_token_list [[30,5],[22,4],[16,3]]``, a layer average of 32).

    Budget: ``keep`` is what the last stage leaves, a count or a share of the N tokens the image had at the first
    stage (``VisualTokens.entered``), as PyramidDrop's. Stage s of S keeps ``round(N * (keep/N) ** (s/S))``, the last
    exactly ``keep``. The code fixes absolute counts per stage instead; ``keep=0.4`` (19 of 48, the code's 19/48 =
    0.396 rounded) gives them at 48 tokens: 48 * 0.734**s = 35.2, 25.9, 19 -> 35, 26, 19, and
    ``contextual_share=0.125`` gives their contextual counts ``ceil(count/8)`` = 5, 4, 3 (and the vision stage's 6
    of 48); other inputs keep that shape (576 -> 424, 312, 230). ``contextual_share=0``: dominant tokens only.
    ``layers=None``: a quarter, half and three quarters of the depth (8, 16, 24 of 32; 1, 2, 3 of a 4-layer decoder).

    Merging: the code's contextual token is ``target + mean(members)`` on the hidden states, which no weighted mean
    gives (its coefficients sum to 2). ``merge="mean"`` (default) returns a merge map with the target at weight 1 and
    each of its n members at 1/n, so the engine's weighted group mean is ``(target + mean(members)) / 2``: the code's
    direction at half its norm. Layer K's input norm makes its queries, keys and values the code's (up to the norm's
    epsilon); from then on the later layers' updates weigh twice as much against it in the residual stream as in the code. It is
    an ordinary merge map: the groups are recorded and the engine merges it (tests/test_in_llm.py checks every
    registered method's merges against the stock model). ``merge="sum"`` gives the code's value itself as the kept
    tokens' features (the map still returned, for the record); it is not the weighted mean that map describes, so
    the contract's check of merges does not cover it (tests/test_visiondrop_llm.py checks what layer K receives).

    Positions: the code renumbers the kept tokens without gaps after each drop (prefill ``position_ids = arange``)
    and shifts decode positions by the number dropped: ``positions="repack"`` (1D rotary models). The default,
    ``"original"``, keeps each token's position, as ``pyramiddrop`` and every other method here (it also serves
    mrope families).

    Differences from the code: (1) similarity: the code groups by the cosine of layer K's rotated keys averaged over
    the key heads; an in-LLM sieve sees only the hidden states at layer K's input, so the cosine is of those
    (no key signal exists inside the LLM); (2) by default the merged value is half the code's (above; ``merge="sum"``:
    the code's); (3) contextual tokens stay at their target's slot and position, in raster order (the code
    appends them after the dominant ones), so at stages 2 and 3 the code's stride runs over its sequence order
    (dominant first) and here over raster order; (4) stable ties towards the lower index (the code: ``topk``);
    (5) every image of a prompt is pruned on its own (the code: one image per prompt, batch size 1); (6) the
    counts follow ``keep`` for any N, the code's only for 48. As in the code, the causal mask lets early image
    tokens receive attention from more query rows, which favours them; no correction is made.
    """

    name = "visiondrop_llm"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention",)
    llm_attention_at = "input"

    keep: int | float = 0.4
    layers: tuple[int, ...] | None = None
    contextual_share: float = 0.125
    merge: str = "mean"
    positions: str = "original"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_layers(self.layers, "the code's (8, 16, 24)")
        check_fraction("contextual_share", self.contextual_share, "the share of each stage's tokens merged as contextual "
                       "tokens (the code's 0.125; 0: dominant only)")
        if self.merge not in MERGES:
            raise ValueError(f"merge={self.merge!r}: choose 'mean' (a merge map: the code's direction at half its norm) "
                             f"or 'sum' (the code's target + mean(members) as features)")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}: choose 'original' (keep each token's position) or 'repack' (the code's)")

    def requests(self) -> tuple[Signal, ...]:
        return (IMAGE_ROWS,)

    def select(self, tokens: VisualTokens) -> Selection:
        raise TypeError("visiondrop_llm runs as stages inside the LLM: apply it with ts.apply(model, ts.VisionDropLLM()), "
                        "after the vision stage with ts.Chain(ts.VisionDrop(), ts.VisionDropLLM())")

    def schedule(self, n_layers: int) -> tuple[Sieve, ...]:
        layers = self.layers or default_layers(n_layers)
        return tuple(VisionDropStage(self.keep, layer, index, len(layers), self.contextual_share, self.merge)
                     for index, layer in enumerate(layers, start=1))


def stage_count(entered: int, final: int, index: int, stages: int) -> int:
    """Tokens stage ``index`` of ``stages`` keeps of an image that had ``entered`` at the first: round(N * lambda**s)
    with lambda**stages = final / N (35, 26, 19 of 48 for a final 19); the last stage keeps ``final`` exactly."""
    if index == stages:
        return final
    return max(final, math.floor(entered * (final / entered) ** (index / stages) + 0.5))


def split(count: int, share: float) -> tuple[int, int]:
    """(dominant, contextual) of a stage keeping ``count``: ``ceil(share * count)`` contextual, at least one dominant."""
    contextual = min(math.ceil(share * count - 1e-9), count - 1)
    return count - contextual, max(contextual, 0)


@dataclass
class VisionDropStage(Sieve):
    """Stage ``index`` of ``stages`` of VisionDrop's in-LLM pruning, before decoder layer ``layer`` (made by
    VisionDropLLM.schedule)."""

    name = "visiondrop_llm"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention",)
    llm_attention_at = "input"

    keep: int | float = 0.4
    layer: int = 8
    index: int = 1
    stages: int = 3
    contextual_share: float = 0.125
    merge: str = "mean"

    def requests(self) -> tuple[Signal, ...]:
        return (IMAGE_ROWS,)

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        entered = tokens.entered if tokens.entered is not None else n
        count = min(stage_count(entered, self.budget.resolve(entered), self.index, self.stages), n)
        if count >= n:
            return Selection.every(tokens)
        dominant_count, contextual_count = split(count, self.contextual_share)
        dominant = top_k_in_order(tokens[IMAGE_ROWS].mean(dim=0), dominant_count)
        if contextual_count == 0:
            return Selection(dominant)
        device, hidden = tokens.features.device, tokens.features
        targets, members = contextual_targets(n, dominant, contextual_count)
        kept = torch.cat([dominant, targets]).sort().values
        unit = F.normalize(hidden.float(), dim=-1)
        joined = (unit[members] @ unit[targets].T).argmax(dim=1)  # the target each member joins, by cosine
        assignment = torch.empty(n, dtype=torch.long, device=device)
        assignment[kept] = torch.arange(len(kept), device=device)
        assignment[members] = torch.searchsorted(kept, targets[joined])
        if self.merge == "sum":  # the code's target + mean(members) as the kept tokens' features
            merged = merge_into_targets(hidden, hidden, targets, members)
            features = hidden[kept].clone()
            features[torch.searchsorted(kept, targets)] = merged
            return Selection(kept, features, assignment)
        # the target at weight 1, each of its n members at 1/n: the weighted mean is (target + mean(members)) / 2
        counts = torch.bincount(joined, minlength=len(targets)).clamp(min=1)
        weights = torch.ones(n, device=device)
        weights[members] = 1.0 / counts[joined].float()
        return Selection(kept, assignment=assignment, weights=weights)
