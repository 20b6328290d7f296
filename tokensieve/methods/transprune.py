"""``transprune``: inside the LLM, in stages: rank the image tokens by how much the layers have been changing
them (token transition variation) plus the attention the instruction pays them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens, check_layers
from ..signals import Signal

PAPER = "TransPrune (arXiv 2507.20630)"
POSITIONS = ("original", "repack")
#: the reference's pruning layers on LLaVA-1.5's 32-layer decoder (pruning after 1-based layers 7, 9, 12)
REFERENCE_LAYERS = (7, 9, 12)
INSTRUCTION = Signal("llm_attention", queries="instruction")


@register
@dataclass
class TransPrune(Sieve):
    """Before each of ``layers``, score every image token still there by its token transition variation (TTV,
    ``llm_transition``: for each sublayer, attention and MLP, the norm of its output over the norm of its normalised
    input times the softmax over the sequence of one minus their cosine, summed from the layer before the first stage
    on) plus its instruction-guided attention (IGA: the head mean of the attention the image's instruction tokens
    pay it, as the stage's layer computes it on its input), each normalised to sum to one over the image's tokens;
    keep the top ones in order. Stage s keeps ``int(N * ratios[s])`` of the N tokens the image had at the first
    stage, the last ``keep``.

    Paper: "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model" (Li et al., arXiv
    2507.20630); code liaolea/TransPrune c9e8284 (``compute_transf_weight``, ``transprune_rank_drop``, the LLaVA-1.5
    scripts). Defaults from the scripts: TTV accumulated over 1-based layers 7-12, pruning after layers 7, 9 and 12
    of 32 (``layers=None``: before 0-based layers 7, 9, 12, scaled to the decoder's depth, fewer stages where
    they coincide on shallow decoders, which then use the last ratios), ratios 0.875 and 0.625 of N then
    ``keep=0.125`` (576 -> 504 -> 360 -> 72, about 236 tokens per layer on average). ``ttv_only=True`` ranks by TTV
    alone (the paper's ablation: competitive, and needs no attention row).

    Positions: the code, built on PyramidDrop's, renumbers kept tokens without gaps (``positions="repack"``, 1D
    rotary models); the default keeps original positions, as ``pyramiddrop``, which also serves mrope. Other
    differences: the softmax of a sublayer's direction change runs over each row's real tokens (the code's sums
    over the whole batch, equal at its batch size of one); the attention row is recomputed under SDPA; several
    images each get their own budget; ties go to the lower index.
    """

    name = "transprune"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_transition", "llm_attention")

    keep: int | float = 0.125
    layers: tuple[int, ...] | None = None
    ratios: tuple[float, ...] = (0.875, 0.625)
    ttv_only: bool = False
    positions: str = "original"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_layers(self.layers, "the reference: (7, 9, 12)")
        self.ratios = tuple(self.ratios)
        if not all(isinstance(r, (int, float)) and 0 < r <= 1 for r in self.ratios):
            raise ValueError(f"ratios={self.ratios!r}: each earlier stage keeps a share of the image's tokens in (0, 1]")
        if self.layers is not None and len(self.layers) != len(self.ratios) + 1:
            raise ValueError(f"layers={self.layers} needs {len(self.layers) - 1} ratios for the stages before the last, "
                             f"got ratios={self.ratios}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}: choose 'original' (keep each token's position) or 'repack' (the code's)")

    def select(self, tokens: VisualTokens) -> Selection:
        raise TypeError("transprune runs as stages inside the LLM: apply it with ts.apply(model, ts.TransPrune())")

    def schedule(self, n_layers: int) -> tuple[Sieve, ...]:
        layers = self.layers or default_layers(n_layers)
        ratios = self.ratios[len(self.ratios) + 1 - len(layers):] if len(layers) <= len(self.ratios) else self.ratios
        start = layers[0] - 1
        return tuple(TransPruneStage(self.keep, layer, ratio, start, self.ttv_only)
                     for layer, ratio in zip(layers, (*ratios, None)))


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The reference's 7, 9, 12 of 32, scaled to ``n_layers`` and kept within 1..n_layers-1."""
    return tuple(sorted({min(max(round(n_layers * layer / 32), 1), n_layers - 1) for layer in REFERENCE_LAYERS}))


@dataclass
class TransPruneStage(Sieve):
    """One stage of TransPrune (made by TransPrune.schedule): ``ratio`` of the image's first count, None: ``keep``."""

    name = "transprune"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_transition", "llm_attention")
    llm_attention_at = "input"

    keep: int | float = 0.125
    layer: int = 7
    ratio: float | None = None
    start: int = 6
    ttv_only: bool = False

    def requests(self) -> tuple[Signal, ...]:
        transition = Signal("llm_transition", start=self.start)
        return (transition,) if self.ttv_only else (transition, INSTRUCTION)

    def select(self, tokens: VisualTokens) -> Selection:
        entered = tokens.entered if tokens.entered is not None else len(tokens)
        final = self.budget.resolve(entered)
        count = final if self.ratio is None else max(final, math.floor(entered * self.ratio + 1e-6))
        count = min(count, len(tokens))
        if count >= len(tokens):
            return Selection.every(tokens)
        return Selection(top_k_in_order(score(tokens, self.start, self.ttv_only), count))


def score(tokens: VisualTokens, start: int, ttv_only: bool) -> torch.Tensor:
    """TTV, normalised over the image's tokens, plus (unless ``ttv_only``) IGA, normalised likewise."""
    ttv = tokens[Signal("llm_transition", start=start)].float()
    ttv = ttv / (ttv.sum() + 1e-8)
    if ttv_only:
        return ttv
    iga = tokens[INSTRUCTION].float().mean(dim=0)
    return ttv + iga / (iga.sum() + 1e-8)
