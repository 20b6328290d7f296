"""``pyramiddrop``: inside the LLM, in stages: at each stage keep the image tokens the last instruction token
attends to most, a fixed fraction of those still there."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens, check_layers

PAPER = "PyramidDrop (arXiv 2410.17247)"
POSITIONS = ("original", "repack")


@register
@dataclass
class PyramidDrop(Sieve):
    """Before each of ``layers``, rank the image tokens still there by the attention the prompt's last token
    pays them, as that layer computes it on its input (its own input norm, q/k projections and rotation,
    averaged over heads), and keep the top ones in order; stage s of S keeps ``floor(N * lambda**s)`` of the N
    tokens the image had at the first stage, with ``lambda = (keep / N) ** (1 / S)`` so the last keeps ``keep``.

    Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
    Reduction" (Xing et al., CVPR 2025, arXiv 2410.17247); reference code Cooperx521/PyramidDrop
    (``pdrop_rank_drop``). Defaults from it: layers 8, 16, 24 of a 32-layer decoder and ratios 0.5, 0.25,
    0.125 of N (lambda = 0.5: 576 -> 288 -> 144 -> 72), so ``keep=0.125``; ``layers=None`` places the stages at
    a quarter, half and three quarters of any decoder's depth (8, 16, 24 of 32; 7, 15, 22 of 30), fewer on
    decoders too shallow for three. The budget ``keep`` is what the last stage leaves (a count, or a share of
    N); the layer average the paper quotes is about 270 tokens for LLaVA-1.5's 576.

    Positions: the reference code renumbers the kept tokens without gaps after each drop and shifts decode
    positions by the number dropped (``positions="repack"``, for models with 1D rotary positions). The
    default here, ``"original"``, keeps each token's original position, as FastV and every other method in
    this library do, which also serves the mrope families (Qwen2-VL). Other differences: the query row is
    recomputed under SDPA/FlashAttention rather than read from an eager layer, several images are each
    pruned to their own budget, and no training-mode variant (the reference uses each answer's preceding
    tokens as queries when training).
    """

    name = "pyramiddrop"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention",)

    keep: int | float = 0.125
    layers: tuple[int, ...] | None = None
    positions: str = "original"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_layers(self.layers, "the reference: (8, 16, 24)")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}: choose 'original' (keep each token's position) or 'repack' (the reference's)")

    def select(self, tokens: VisualTokens) -> Selection:
        raise TypeError("pyramiddrop runs as stages inside the LLM: apply it with ts.apply(model, ts.PyramidDrop())")

    def schedule(self, n_layers: int) -> tuple[Sieve, ...]:
        layers = self.layers or default_layers(n_layers)
        return tuple(PyramidStage(self.keep, layer, index, len(layers)) for index, layer in enumerate(layers, start=1))


def default_layers(n_layers: int) -> tuple[int, ...]:
    """A quarter, half and three quarters of the depth (the reference's 8, 16, 24 of 32), within 1..n_layers-1."""
    return tuple(sorted({min(max(n_layers * s // 4, 1), n_layers - 1) for s in (1, 2, 3)}))


def stage_count(entered: int, final: int, index: int, stages: int) -> int:
    """Tokens stage ``index`` of ``stages`` keeps of an image that had ``entered`` at the first: floor(N * lambda**s)
    with lambda**stages = final / N (the reference's int(N * ratio)); the last stage keeps ``final`` exactly."""
    if index == stages:
        return final
    share = (final / entered) ** (index / stages)
    return max(final, math.floor(entered * share + 1e-6))


@dataclass
class PyramidStage(Sieve):
    """Stage ``index`` of ``stages`` of PyramidDrop, before decoder layer ``layer`` (made by PyramidDrop.schedule)."""

    name = "pyramiddrop"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention",)
    llm_attention_at = "input"

    keep: int | float = 0.125
    layer: int = 8
    index: int = 1
    stages: int = 3

    def select(self, tokens: VisualTokens) -> Selection:
        entered = tokens.entered if tokens.entered is not None else len(tokens)
        count = min(stage_count(entered, self.budget.resolve(entered), self.index, self.stages), len(tokens))
        scores: torch.Tensor = tokens["llm_attention"].mean(dim=0)
        return Selection(top_k_in_order(scores, count))
