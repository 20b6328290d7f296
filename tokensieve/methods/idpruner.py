"""``idpruner``: important and diverse tokens by maximal marginal relevance (MMR)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import mmr_greedy
from ..sieve import Selection, Sieve, VisualTokens, check_fraction
from ..signals import Signal

IMPORTANCE = ("cls", "received")


@register
@dataclass
class IDPruner(Sieve):
    """Keep ``keep`` tokens chosen greedily by maximal marginal relevance: first the most important token,
    then each step the token with the highest ``mmr_lambda * imp - (1 - mmr_lambda) * max_{chosen} cos``
    (``selection.mmr_greedy``); kept indices in raster order (no merging).

    Paper: "IDPruner: Harmonizing Importance and Diversity in Visual Token Pruning for MLLMs" (Tan et al.,
    arXiv 2602.13315); code Tencent/AngelSlim (67394ce: ``idpruner`` in
    angelslim/compressor/token_compressor/algorithm/idpruner.py, configs/llava/pruning/idpruner_r0.75.yaml,
    configs/qwen2_5_vl/pruning/idpruner_r0.9.yaml). As the code:

    - similarity: cosine between the projected tokens (the image's rows of ``inputs_embeds``, i.e.
      ``VisualTokens.features``), ``x / (|x| + 1e-8)``, float32;
    - importance min-max normalised, ``(s - min) / (max - min + 1e-6)``;
    - ``mmr_lambda=0.5`` (the code's default and every shipped config); ``parallel_k=1`` (picks per greedy
      step, the code's default and configs: each step takes the ``parallel_k`` best scores);
    - the first step ranks by importance alone (the code's ``mmr_score = importance`` before any pick);
    - ``keep=0.25``: the LLaVA config's ``ratio: 0.75`` (pruned), the paper's 25%-kept setting; the code keeps
      ``round(N·(1 - ratio))``, at least 1, as a ratio budget here does.

    Difference: the code's importance is a trained scorer, the "Vision Selector" (a small transformer over the
    projected tokens, weights ``AngelSlim/Qwen2.5-VL-7B-Instruct-Selector`` and ``-3B-``, raw logits, no
    text), which tokensieve does not ship or download. It is replaced by a training-free signal:
    ``importance="cls"`` (default), the head-mean [CLS] attention at the feature layer (FasterVLM's score);
    ``"received"``, the attention each token receives at the feature layer, mean over heads and query rows
    (HiPrune/FoPru's signal), which needs no [CLS] and so serves every family (Qwen2.5-VL, the paper's main
    model, included). Expect accuracy below the paper's. Ties go to the lower index (the code's ``topk``
    breaks them arbitrarily). The code keeps each image's tokens with one budget per sequence; here one budget
    per image. Towers without [CLS] (SigLIP, Qwen, Idefics3) refuse ``importance="cls"``.
    """

    name = "idpruner"
    paper = "IDPruner (arXiv 2602.13315)"
    signals = ("cls_attention", "vision_attention")

    keep: int | float = 0.25
    mmr_lambda: float = 0.5
    parallel_k: int = 1
    importance: str = "cls"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("mmr_lambda", self.mmr_lambda, "the weight of importance against diversity (0.5 in the code)")
        if isinstance(self.parallel_k, bool) or not isinstance(self.parallel_k, int) or self.parallel_k < 1:
            raise ValueError(f"parallel_k must be a whole number of tokens per greedy step, at least 1 (the code's "
                             f"default 1), not {self.parallel_k!r}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE} ([CLS] attention, or the attention each token "
                             f"receives, which needs no [CLS]), not {self.importance!r}")

    def requests(self) -> tuple[Signal | str, ...]:
        if self.importance == "cls":
            return ("cls_attention",)
        return (Signal("vision_attention", queries="mean"),)

    def scores(self, tokens: VisualTokens) -> torch.Tensor:
        """(N,) importance, min-max normalised to [0, 1)."""
        raw = tokens[self.requests()[0]].float().mean(dim=0)
        return (raw - raw.min()) / (raw.max() - raw.min() + 1e-6)

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        k = self.budget.resolve(n)
        if k >= n:
            return Selection.every(tokens)
        features = tokens.features.float()
        unit = features / (features.norm(dim=-1, keepdim=True) + 1e-8)
        chosen = mmr_greedy(self.scores(tokens), unit @ unit.T, k, self.mmr_lambda, self.parallel_k)
        return Selection(chosen.sort().values)
