"""``csp``: LVLM_CSP inside the LLM: a few representative image tokens in the early layers (clustering), every
image token again in the middle layers (scattering), the ones the query attends to most in the late layers
(pruning)."""

from __future__ import annotations

from dataclasses import dataclass

from ..budget import Budget, as_budget
from ..registry import register
from ..selection import strided, top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens, check_layers
from .pyramiddrop import POSITIONS, default_layers

PAPER = "LVLM_CSP (arXiv 2504.10854)"
PICKS = ("uniform", "cls")


@register
@dataclass
class CSP(Sieve):
    """Three stages before the decoder layers ``layers = (c, s, p)``: before layer ``c`` keep ``clusters``
    representatives of the N tokens the image has (clustering), before layer ``s`` bring all N back (scattering:
    a dropped token returns with the hidden state it had at layer ``c``'s input, since the layers between never
    saw it, at its own position and place in the sequence), before layer ``p`` keep the ``keep`` of them the
    prompt's last token attends to most, as layer ``p`` computes it (pruning; head mean, in order, ties to the
    lower index).

    Paper: "LVLM_CSP: Accelerating Large Vision Language Models via Clustering, Scattering, and Pruning for
    Reasoning Segmentation" (Chen, Ni, Huang, Oh, Liu, Das, Imani; UC Irvine; arXiv 2504.10854, April 2025),
    for LISA-style models whose [SEG] token prompts a mask decoder. No official code was found (GitHub
    repository and code searches by name, title and arXiv id, December 2026); the rules come from the abstract
    and third-party summaries of the method section, which give: representatives by uniform stride
    ``S[i] = i * floor(N / N_c)``, ``i < N_c`` (``pick="uniform"``, the default here) or ``TopK`` of the vision
    [CLS] attention ``softmax(q_cls K / sqrt(d))`` (``pick="cls"``: head mean as ``fastervlm``, at the feature
    layer; towers without [CLS] refuse it); the paper's random pick and its "Seg-First" pick (a small detector's
    instance masks, ``max(1, floor(N_c * area share))`` tokens per instance) are not offered (the detector is a
    separate model); pruning by the [SEG] token's attention; efficiency counted as tokens per attention layer
    and image-token FLOPs (-65% at no mIoU loss, -70% at about -1% on the 7B model; 2-4x speed-ups).

    Defaults, none read from the paper (its stage boundaries, N_c and pruned count could not be read):
    ``layers=None`` places the stages at a quarter, half and three quarters of the depth as ``pyramiddrop``
    (8, 16, 24 of 32; 1, 2, 3 of the tiny test models' 4); ``clusters=0.25`` and ``keep=0.125`` of the N
    tokens the image had at the first stage. On 576 tokens and 32 layers that is 342 image tokens per layer
    on average (-41%), far from the paper's -65% image-token FLOPs, so its boundaries or counts likely differ.
    A ``keep`` that covers the image turns every stage off (the clustering too), so keeping every token is the
    stock model. One third-party summary puts the -70% point "after fine-tuning"; the abstract says training-free.

    Differences: the paper clusters from the LLM input; in-LLM stages start at layer 1, so layer 0 sees every
    token. It scores the pruning stage with the [SEG] token, which a prompt does not hold at prefill: here the
    prompt's last token. Whether the paper's scattered tokens resume from their state when dropped (as here)
    or from their representative's could not be checked. Positions: every token keeps its original position
    (``positions="original"``, which serves mrope models); ``"repack"`` renumbers without gaps (1D rotary).
    """

    name = "csp"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention", "cls_attention")

    keep: int | float = 0.125
    clusters: int | float = 0.25
    pick: str = "uniform"
    layers: tuple[int, ...] | None = None
    positions: str = "original"

    def __post_init__(self) -> None:
        super().__post_init__()
        if type(self.budget) is not Budget or self.budget.total is not None or self.budget.per_crop:
            raise ValueError(f"keep={self.keep!r}: csp prunes to a count (keep=72) or a share (keep=0.125) of the image's tokens")
        cluster_budget(self.clusters)
        if self.pick not in PICKS:
            raise ValueError(f"pick={self.pick!r}: choose 'uniform' (stride floor(N / clusters)) or 'cls' (top [CLS] attention)")
        self.layers = check_layers(self.layers, "three of them, e.g. (8, 16, 24)")
        if self.layers is not None and len(self.layers) != 3:
            raise ValueError(f"layers={self.layers!r}: pass the three decoder layers the clustering, scattering and "
                             f"pruning stages start before, e.g. (8, 16, 24), or None to place them by the depth")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}: choose 'original' (keep each token's position) or 'repack'")

    def requests(self):
        return ("llm_attention", "cls_attention") if self.pick == "cls" else ("llm_attention",)

    def select(self, tokens: VisualTokens) -> Selection:
        raise TypeError("csp runs as stages inside the LLM: apply it with ts.apply(model, ts.CSP())")

    def schedule(self, n_layers: int) -> tuple[Sieve, ...]:
        layers = self.layers or default_layers(n_layers)
        if len(layers) != 3:
            raise ValueError(f"csp needs three stages, but a decoder of {n_layers} layers has room for {len(layers)}: "
                             f"use a model with at least 4 decoder layers")
        cluster, scatter, prune = layers
        return (CSPCluster(self.clusters, cluster, self.pick, self.keep), CSPScatter(1.0, scatter), CSPPrune(self.keep, prune))


def cluster_budget(clusters) -> Budget:
    """``clusters`` as a budget: a count of representatives or a share of the image's tokens."""
    if isinstance(clusters, bool) or not isinstance(clusters, (int, float)) or clusters <= 0 \
            or (isinstance(clusters, float) and clusters > 1):
        raise ValueError(f"clusters={clusters!r}: pass the representatives the early layers see, a count >= 1 (e.g. 144) "
                         f"or a share in (0, 1] of the image's tokens (e.g. 0.25)")
    return as_budget(clusters)


@dataclass
class CSPCluster(Sieve):
    """CSP's clustering stage (made by CSP.schedule): ``keep`` representatives in order, ``i * floor(N / keep)``
    (uniform) or the top head-mean [CLS] attention (ties to the lower index); every token when the method's final
    budget ``final`` covers the image (so that keeping every token is the stock model)."""

    name, paper, stage, signals = "csp", PAPER, "in_llm", ("cls_attention",)

    keep: int | float = 0.25
    layer: int = 8
    pick: str = "uniform"
    final: int | float = 0.125

    def requests(self):
        return ("cls_attention",) if self.pick == "cls" else ()

    def select(self, tokens: VisualTokens) -> Selection:
        entered = tokens.entered if tokens.entered is not None else len(tokens)
        count = min(cluster_budget(self.keep).resolve(entered), len(tokens))
        if count >= len(tokens) or as_budget(self.final).resolve(entered) >= entered:
            return Selection.every(tokens)
        if self.pick == "uniform":
            return Selection(strided(len(tokens), count).to(tokens.features.device))
        return Selection(top_k_in_order(tokens["cls_attention"].mean(dim=0), count))


@dataclass
class CSPScatter(Sieve):
    """CSP's scattering stage: every token the image entered the method with comes back (``restores``)."""

    name, paper, stage = "csp", PAPER, "in_llm"
    restores = True

    keep: int | float = 1.0
    layer: int = 16

    def select(self, tokens: VisualTokens) -> Selection:
        return Selection.every(tokens)


@dataclass
class CSPPrune(Sieve):
    """CSP's pruning stage: the ``keep`` tokens (of the ``entered`` the image had at the first stage) the prompt's
    last token attends to most, as layer ``layer`` computes it (head mean, in order, ties to the lower index)."""

    name, paper, stage, signals = "csp", PAPER, "in_llm", ("llm_attention",)
    llm_attention_at = "input"

    keep: int | float = 0.125
    layer: int = 24

    def select(self, tokens: VisualTokens) -> Selection:
        entered = tokens.entered if tokens.entered is not None else len(tokens)
        count = min(self.budget.resolve(entered), len(tokens))
        return Selection(top_k_in_order(tokens["llm_attention"].mean(dim=0), count))
