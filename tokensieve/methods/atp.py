"""``atp``: inside the LLM, in stages: keep the image tokens whose redundancy score clears a threshold taken from that
layer's own attention distribution, plus an even spatial lattice; the count is decided per image and per layer."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import grid_subsample, split_budget
from ..sieve import Selection, Sieve, VisualTokens, check_layers
from ..signals import Signal
from .pyramiddrop import default_layers

PAPER = "ATP-LLaVA (arXiv 2412.00447)"
#: redundancy score -> the llm_attention query sets it averages (the paper's self- and cross-modality importance)
REDUNDANCY = {"both": ("image", "instruction"), "self": ("image",), "cross": ("instruction",)}


@register
@dataclass
class ATP(Sieve):
    """Before each of ``layers`` (an ATP module between decoder layers K-1 and K), score each image token still
    there by its redundancy score, inside layer K-1: the mean of its self-modality importance (the attention it
    receives from the image's own tokens, averaged over those rows and the heads) and its cross-modality
    importance (the same from the image's instruction tokens). Keep the union of two tests: the *redundancy*
    test, a score above ``alpha`` times the mean over the image's tokens at that stage (a threshold drawn from
    this image's attention at this layer), and the *spatial* test, the ``spatial`` share of the stage's tokens on
    an even lattice. So each image keeps its own number of tokens at each stage, never fewer than ``keep`` of
    the tokens it had at the first stage (topped up by score); the last stage keeps exactly ``keep`` (the union
    first, each part by score), or with ``exact=False`` its own count too. A ``keep`` covering every token
    keeps every token (the stock model).

    Paper: "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models" (Ye, Gan, Ge, Zhang, Tang; CVPR
    2025, arXiv 2412.00447). No official code has been released (the authors' "code soon", Dec 2024, in
    daixiangzi/Awesome-Token-Compress issue #2); the paper's method section could not be read here in full, so
    what follows rests on its abstract and project page and on third-party summaries. The paper's ATP module
    scores image tokens from the preceding layer's attention: a redundancy score joining the self-modality
    importance (attention from image tokens) and the cross-modality importance (from text tokens), and a
    spatial score from uniform 2D sampling (Spatial Augmented Pruning); a *trained* head predicts per-instance
    thresholds for both, a token passing either is kept, and a budget loss (ATP-Loss) pulls the average count to
    a target during training; kept tokens keep their positions.

    Training-free, this differs as follows: (1) the thresholds are not learned: the redundancy threshold is
    ``alpha`` times the mean score (``alpha=1.0``, above the average token, by choice), the spatial sampling rate
    a fixed ``spatial=0.25`` (a stride-2 lattice on a full grid, by choice); (2) the two importances are joined
    by their plain mean (unverified: a third-party reading); ``redundancy="self"`` or ``"cross"`` keeps one (the
    paper's ablation); the rows are recomputed from layer K-1's projections, SDPA stays on; (3) the lattice is
    2D where the stage sees the image's whole grid (the first stage on single-grid families); after a stage has
    pruned, and on LLaVA-NeXT/OneVision (in-LLM stages get no 2D pieces), it spreads evenly along raster order;
    (4) ``layers=None`` places three stages at a quarter, half and three quarters of the depth (PyramidDrop's
    ``default_layers``: 8, 16, 24 of 32), the paper's insertion layers being unverified here; (5) in place of the
    training target, ``keep`` is met exactly at the last stage (default 0.125, PyramidDrop's final share, by
    choice), so that budgets compare; ``exact=False`` makes ``keep`` a floor at every stage instead (``keep=1``:
    the thresholds alone, as the paper at inference); (6) no training, so expect lower accuracy than the paper's
    75% reduction at 98.1%. Several images are pruned each on its own; original positions, as in the paper.
    """

    name = "atp"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention",)
    llm_attention_at = "previous"

    keep: int | float = 0.125
    layers: tuple[int, ...] | None = None
    alpha: float = 1.0
    spatial: float = 0.25
    redundancy: str = "both"
    exact: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_layers(self.layers, "e.g. (8, 16, 24)")
        check_rule(self.alpha, self.spatial, self.redundancy)
        if not isinstance(self.exact, bool):
            raise ValueError(f"exact={self.exact!r}: pass True (the last stage keeps exactly keep) or False (every stage "
                             f"keeps its thresholds' count, at least keep)")

    def requests(self):
        return requests_for(self.redundancy)

    def select(self, tokens: VisualTokens) -> Selection:
        raise TypeError("atp runs as stages inside the LLM: apply it with ts.apply(model, ts.ATP())")

    def schedule(self, n_layers: int) -> tuple[Sieve, ...]:
        layers = self.layers or default_layers(n_layers)
        return tuple(ATPStage(self.keep, layer, self.alpha, self.spatial, self.redundancy, self.exact and i == len(layers) - 1)
                     for i, layer in enumerate(layers))


def requests_for(redundancy: str) -> tuple[Signal, ...]:
    return tuple(Signal("llm_attention", queries=queries) for queries in REDUNDANCY[redundancy])


def check_rule(alpha, spatial, redundancy) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ValueError(f"alpha={alpha!r}: pass the redundancy threshold as a multiple of the mean score, a number > 0 "
                         f"(1.0: keep the tokens above the average)")
    if isinstance(spatial, bool) or not isinstance(spatial, (int, float)) or not 0 <= spatial <= 1:
        raise ValueError(f"spatial={spatial!r}: pass the share of each stage's tokens kept on an even lattice, in [0, 1] "
                         f"(0: the redundancy test alone)")
    if redundancy not in REDUNDANCY:
        raise ValueError(f"redundancy={redundancy!r}: choose 'both' (the paper's score), 'self' (attention from the image's "
                         f"tokens) or 'cross' (from its instruction's)")


def lattice(layout: tuple[torch.Tensor, ...], count: int) -> torch.Tensor:
    """``count`` token indices on even lattices over the pieces of ``layout``, shared by size (``uniform``'s rule)."""
    shares = split_budget([block.numel() for block in layout], count)
    return torch.cat([block.flatten()[grid_subsample(tuple(block.shape), share)] for block, share in zip(layout, shares) if share])


def atp_keep(scores: torch.Tensor, layout: tuple[torch.Tensor, ...], alpha: float, spatial: float, floor: int,
             exact: bool = False) -> torch.Tensor:
    """Kept indices (ascending) of one stage: the tokens scoring above ``alpha`` times the mean, or on a lattice of
    ``round(spatial * N)`` tokens, and at least ``floor`` (topped up by score); ``exact``: exactly ``floor``.
    Ranked by passing first, then by score (ties to the lower index)."""
    scores = scores.float()
    passing = scores > alpha * scores.mean()
    on_lattice = round(spatial * len(scores))
    if on_lattice:
        passing[lattice(layout, on_lattice).to(scores.device)] = True
    count = min(floor, len(scores)) if exact else max(int(passing.sum()), min(floor, len(scores)))
    by_score = torch.sort(scores, descending=True, stable=True).indices
    ranked = by_score[torch.sort(passing[by_score].int(), descending=True, stable=True).indices]
    return ranked[:count].sort().values


@dataclass
class ATPStage(Sieve):
    """One ATP module, before decoder layer ``layer`` (made by ATP.schedule)."""

    name = "atp"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention",)
    llm_attention_at = "previous"

    keep: int | float = 0.125
    layer: int = 8
    alpha: float = 1.0
    spatial: float = 0.25
    redundancy: str = "both"
    exact: bool = False  # the last stage of an exact schedule keeps exactly keep

    def requests(self):
        return requests_for(self.redundancy)

    def select(self, tokens: VisualTokens) -> Selection:
        floor = self.budget.resolve(tokens.entered if tokens.entered is not None else len(tokens))
        if floor >= len(tokens):
            return Selection.every(tokens)
        scores = torch.stack([tokens[request].float().mean(dim=0) for request in self.requests()]).mean(dim=0)
        return Selection(atp_keep(scores, tokens.layout(), self.alpha, self.spatial, floor, self.exact))
