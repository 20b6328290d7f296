"""``vflowopt_llm``: VFlowOpt's in-LLM stages: before a few decoder layers, drop the lowest-ranked image tokens
still there (by the attention the prompt's last token pays them), optionally merging them into the last kept one."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens, check_layers
from ..signals import QUERIES, Signal
from .vflowopt import importance

PAPER = "VFlowOpt (ICCV 2025, arXiv 2508.05211)"
MERGES = ("none", "tail")
SCORES = ("vision", "llm")
#: the vision stage's relevance: the attention each token receives at the tower's feature layer (vflowopt's default)
VISION_SCORE = Signal("vision_attention", layer=None, queries="mean")


@register
@dataclass
class VFlowOptLLM(Sieve):
    """Before each of ``layers`` drop the image tokens that rank lowest: by the vision stage's score of each token
    still there (``score="vision"``, default: the attention it receives at the tower's feature layer, head mean,
    the relevance ``vflowopt`` ranks by), or by the prompt's last token's attention (``score="llm"``: head mean,
    inside the layer before, ``llm_attention_at = "previous"``). Every stage but the last keeps ``n - round(n·(1 - r))`` of
    the ``n`` tokens it gets, ``r`` its entry of ``ratios`` (1.0: it keeps all and asks for no attention); the last
    keeps ``keep`` of the tokens the image had at the first stage (a count, or a share of them). ``merge="tail"``
    merges the dropped tokens into the lowest-ranked kept one (below); ``"none"`` drops them. Kept tokens keep their
    original positions, as the code (``position_ids[:, del_musk]``).

    Paper: "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization" (Yang et al.,
    ICCV 2025, arXiv 2508.05211); code sihany077/VFlowOpt (read at 129eeef: ``forward_illava`` in its patched
    ``transformers/models/qwen2/modeling_qwen2.py``, the configs in ``llava_onevision_training_free.py``, the search in
    ``llava_ov_opt_all.py``). The full method is the chain ``vflowopt+vflowopt_llm`` (``ts.build("vflowopt+vflowopt_llm")``):
    the vision stage (``vflowopt``) keeps ``r_v`` of the tokens and recycles the low ones into their cells, then these
    stages. Defaults: the shipped 10% config, ``illava_llm_k=9-18`` (the README's command) of LLaVA-OneVision-7B's 28
    Qwen2 layers and ``illava_llm_r=[1.0, 0.6011]``: ``ratios=(1.0,)``, ``keep=0.6011`` (= 1.0 × 0.6011 of what
    entered: with the vision stage's 0.1166, 7.0% of the image from layer 18 on). ``layers=None`` places stage s of S
    at ``floor(s·9/28)`` of the depth (9, 18 of 28; 10, 20 of 32; 1, 2 of the tiny models' 4); a decoder too shallow
    for distinct layers runs the last stages only. The other configs: 25%, ``keep=0.8627, ratios=(0.9833,)`` after
    ``vflowopt:0.2651,t=34.76,m=15.58``; 50%, ``keep=0.3646, ratios=(0.7487,)`` after ``vflowopt:0.7233,t=28.68,m=11.76``.

    The code's two paths. With the KV cache (how its evaluation and its hyper-parameter search run: lmms-eval's
    ``use_cache=True``), every stage ranks by the **vision stage's score** of each token still there (``VIT_ATTN_MAP``:
    the attention received at SigLIP layer 25 from the global tokens plus ``alpha_v``·softmax of the patch entropy, 0
    in every config; a recycled cell keeps its representative's own score), drops the lowest ``round(n·(1-r))``
    (``torch.sort``) and merges nothing. Without the cache (iLLaVA's path, left in the code) a stage ranks by the last
    token's head-mean attention inside layer K-1 and merges the ``r`` dropped tokens and the lowest-ranked kept one into
    that kept one, weighted 1 (the kept one), 2 (the best dropped), ..., r+1 (the lowest): ``merge="tail"`` (its
    weights as written; its comment reads "from r+1 to 1"). That path takes one scalar ratio (the shipped list fails
    its ``illava_llm_r > 0``) and reads attention only at the first stage's layer.

    Differences. The score: ``score="vision"`` is the KV path's map as ``vflowopt`` computes it (the attention
    every token receives, ``relevance="received"``, where the code averages the rows of its global tokens; see
    ``vflowopt``), at the tokens still there; ``score="llm"`` ranks by the LLM's own attention as the no-cache path
    does (``queries="last"``, or averaged over the image's instruction or own tokens, ``"instruction"``/``"image"``,
    not the code's). No entropy
    term (``alpha_v`` is 0 in every config and the vision stage refuses any other). Merges: ``"none"`` (default) is
    the KV path's; ``"tail"`` the no-cache path's, at every stage, as a merge map (the engine's float32 weighted mean;
    the code's float64 cast to float16). Counts: the last stage keeps ``keep`` of the count at the first stage
    (``round(keep·N)``), the code ``n - round(n·(1 - r))`` of its own input: equal with the shipped ``r = 1.0``
    first stage, within one token otherwise. LLaVA-NeXT/OneVision newline tokens rank by attention like the others
    (the code's map gives them 1, so they are never dropped). Stable ties (lower index kept); several images each get
    their own budget (the code: one image, its tokens at a fixed offset of 14).
    """

    name = "vflowopt_llm"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention", "vision_attention")
    llm_attention_at = "previous"

    keep: int | float = 0.6011
    ratios: tuple[float, ...] = (1.0,)
    layers: tuple[int, ...] | None = None
    merge: str = "none"
    queries: str = "last"
    score: str = "vision"

    def __post_init__(self) -> None:
        super().__post_init__()
        ratios = tuple(self.ratios) if isinstance(self.ratios, (list, tuple)) else (self.ratios,)
        if any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1 for r in ratios):
            raise ValueError(f"ratios={self.ratios!r}: pass the keep ratio of each stage before the last, numbers in "
                             f"(0, 1] (the code's illava_llm_r without its last entry; the shipped 10%: (1.0,))")
        self.ratios = tuple(float(r) for r in ratios)
        self.layers = check_layers(self.layers, "the code's 9-18: (9, 18)")
        if self.layers is not None and len(self.layers) != len(self.ratios) + 1:
            raise ValueError(f"layers={self.layers!r} has {len(self.layers)} stages but ratios={self.ratios!r} gives "
                             f"{len(self.ratios) + 1} (one ratio per stage before the last): pass one layer more than ratios")
        if self.merge not in MERGES:
            raise ValueError(f"merge={self.merge!r}: choose 'none' (drop, the code's KV-cache path) or 'tail' (merge "
                             f"the dropped tokens into the lowest-ranked kept one, its no-cache path)")
        if self.queries not in QUERIES["llm_attention"]:
            raise ValueError(f"queries={self.queries!r}: choose one of {QUERIES['llm_attention']} (the code's: 'last')")
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r}: choose 'vision' (the vision stage's map, the code's KV-cache path) "
                             f"or 'llm' (the prompt's attention, its no-cache path)")

    def select(self, tokens: VisualTokens) -> Selection:
        raise TypeError("vflowopt_llm runs as stages inside the LLM: apply it with ts.apply(model, ts.VFlowOptLLM()), "
                        "or after its vision stage, ts.build('vflowopt+vflowopt_llm')")

    def schedule(self, n_layers: int) -> tuple[Sieve, ...]:
        layers = self.layers or default_layers(n_layers, len(self.ratios) + 1)
        ratios = self.ratios[len(self.ratios) + 1 - len(layers):] + (None,)  # a shallow decoder: the last stages
        return tuple(VFlowOptLLMStage(self.keep, layer, ratio, self.merge, self.queries, self.score)
                     for layer, ratio in zip(layers, ratios))


def default_layers(n_layers: int, stages: int) -> tuple[int, ...]:
    """Stage s of ``stages`` at ``floor(s·9/28)`` of the depth (the code's 9, 18 of 28), within 1..n_layers-1."""
    return tuple(sorted({min(max(n_layers * 9 * s // 28, 1), n_layers - 1) for s in range(1, stages + 1)}))


def tail_merge(scores: torch.Tensor, count: int) -> Selection:
    """Keep the ``count`` best of ``scores`` (ties: the lower index); the ``r`` others merge into the lowest-ranked
    kept token with weights 1 (it), 2 (the best dropped) .. r+1 (the lowest), the code's no-cache merge."""
    n, device = len(scores), scores.device
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[order] = torch.arange(n, device=device)
    kept = order[:count].sort().values
    slot = torch.full((n,), -1, dtype=torch.long, device=device)
    slot[kept] = torch.arange(count, device=device)
    dropped = rank >= count
    assignment = torch.where(dropped, slot[order[count - 1]], slot)
    weights = torch.where(dropped, (rank - count + 2).float(), torch.ones(n, device=device))
    return Selection(kept, assignment=assignment, weights=weights)


@dataclass
class VFlowOptLLMStage(Sieve):
    """One stage of VFlowOpt's in-LLM pruning, before decoder layer ``layer`` (made by VFlowOptLLM.schedule):
    ``ratio`` of the tokens it gets, or (None, the last stage) ``keep`` of the tokens the image had at the first."""

    name = "vflowopt_llm"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention", "vision_attention")
    llm_attention_at = "previous"

    keep: int | float = 0.6011
    layer: int = 9
    ratio: float | None = None
    merge: str = "none"
    queries: str = "last"
    score: str = "vision"

    def requests(self) -> tuple[Signal, ...]:
        if self.ratio == 1.0:
            return ()
        return (VISION_SCORE,) if self.score == "vision" else (Signal("llm_attention", queries=self.queries),)

    def count(self, n: int, entered: int) -> int:
        final = self.budget.resolve(entered)
        if self.ratio is None:
            return min(final, n)
        return min(n, max(final, n - round(n * (1 - self.ratio))))

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        count = self.count(n, tokens.entered if tokens.entered is not None else n)
        if count >= n:
            return Selection.every(tokens)
        scores = tokens[self.requests()[0]].float().mean(dim=0)
        if self.score == "vision":
            scores = importance(scores)
        if self.merge == "tail":
            return tail_merge(scores, count)
        return Selection(top_k_in_order(scores, count))

