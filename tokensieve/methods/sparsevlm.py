"""``sparsevlm``: inside the LLM, in three (v1: four) stages: keep the image tokens the text raters attend to most, by
the rank of their attention (v1) or the code's fixed schedules (v1.5, v2), and recycle the best of the dropped ones
as a few cluster means (density-peak clustering, sparsevlm_recycling.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..sieve import Selection, Sieve, VisualTokens, check_layers
from ..signals import Signal
from .pyramiddrop import POSITIONS
from .sparsevlm_recycling import keep_and_recycle, recycled, split_count

PAPER = "SparseVLM (arXiv 2410.04417)"
#: each instruction token's own attention row to the image (heads, Q, N); v2's each divided by the rotation's bias
ROWS = Signal("llm_attention", queries="instruction", per_query=True)
DEBIASED_ROWS = Signal("llm_attention", queries="instruction", per_query=True, debiased=True)
#: the decoder-input embeddings of every token of the image (N, d) and of its instruction tokens (Q, d): the raters' rule
IMAGE_INPUT, TEXT_INPUT = Signal("llm_input", tokens="whole_image"), Signal("llm_input", tokens="instruction")
VERSIONS = ("1", "1.5", "2")
#: the code's top-k before the layers after 2, 6, 15 of 32 (``score.py``, ``sparse_token_list_*``), by setting
SCHEDULES = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "2": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
# pruning_loc [2, 6, 15] (v1: [2, 6, 15, 19]): the stage is before the next layer
CODE_LAYERS = {"1": (3, 7, 16, 20), "1.5": (3, 7, 16), "2": (3, 7, 16)}
CODE_DEPTH, CODE_TOKENS = 32, 576
CODE_HEADS = (14, 32)  # v2 scores with the 14 of LLaVA-7B's 32 heads that give the image the most attention


@register
@dataclass
class SparseVLM(Sieve):
    """After each pruning layer, score the image tokens still there by the attention the text raters pay them in that
    layer (mean over heads, then over the raters' rows), keep the top ones and (v1, v1.5) recycle the best 30% (+1) of
    the dropped ones: ``floor(m/10)+1`` density-peak clusters (DPC-KNN) of their hidden states, each a plain mean.

    Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference" (Zhang et al., ICML
    2025, arXiv 2410.04417; SparseVLM+ is its v2); code Gumpest/SparseVLMs, read at 26a5f48 (``main``: v1.5, and v2
    behind ``USE_VERSION=2_0``) and at its first commit 91fb6d9 (v1), ``llava/model/language_model/score.py``,
    ``modelling_sparse_llama.py`` and ``utils.py`` (``cluster_and_merge``).

    Raters (every version): at the LLM input, the instruction tokens whose relevance to the image, ``softmax`` over
    the instruction of ``image @ textᵀ`` (decoder-input embeddings) averaged over the image's tokens, is above its
    mean (``choose_raters``; every instruction token when none is); each scores with its own attention row.

    ``version="1.5"`` (default; the code's default ``USE_VERSION=1_0`` on ``main``): pruning layers 2, 6 and 15 of 32,
    each using its own attention and applied to its output (here stages before layers 3, 7, 16, with the attention
    inside layer K-1: ``llm_attention_at="previous"``); the fixed top-k schedules of ``score.py`` by ``setting``
    (192: 300, 200, 110; 128: 303, 110, 36; 96: 238, 48, 26; 64: 66, 30, 17); recycling on. ``version="2"``
    (SparseVLM+): its schedules (192: 300, 200, 118; 128: 238, 108, 60; 96: 246, 54, 28; 64: 66, 34, 20); each
    attention weight divided by the rotation's own bias between the rater's and the image token's positions (the
    scaled dot product of all-ones q and k rotated at them, not its softmax, as the code's ``rope_weights``:
    ``llm_attention(debiased=True)``, any rotary family, mrope included); the ``heads`` heads (None: 14 of 32, scaled to the model's heads) with the largest sum of those
    weights; no recycling. ``version="1"`` (91fb6d9): layers 2, 6, 15 and 19 (stages before 3, 7, 16, 20 of 32),
    each a top-k of ``min(int(rank·rank_scale + rank_bias), N-1)`` (``adaptive_count``: the rank of the head-mean
    rater x image attention matrix, ``rank_scale=13.5, rank_bias=0``; every token when the rank is N), then recycling.
    ``recycle=None``: the version's (v1 and v1.5 recycle, v2 not); True or False forces it.

    Budget: ``keep`` is what the last stage leaves, recycled tokens included (a count, or a share of the N tokens the
    image had at the first stage); an earlier stage keeps ``round(final·T_s/T_last)``, ``T`` the code's counts of
    ``setting`` with its recycled tokens added at 576 tokens (v1.5, 192: 309, 204, 113; 128: 312, 117, 39; 96: 249,
    55, 27; 64: 82, 32, 18; v2: the table itself). A stage's count holds its clusters: its top-k is the largest k
    with ``k + clusters(N-k) <= count``, which meets it exactly (309 = 300 + 9 at 576). ``keep=0.1962`` (113 of 576)
    is the code's 192 setting at v1.5; v2's is ``keep=0.2049`` (118). v1 has no schedule: ``keep`` is a floor at
    every stage (a count or share of the N tokens the image had at the first stage, clusters included: the best by
    score top the rule's up), and with ``exact=True`` (default, as ``mustdrop_llm`` and ``atp``) the last stage keeps
    exactly ``keep``; ``keep=1, exact=False`` is the code's v1, the rank rule's count at every stage. The paper's "192 tokens" is no count at any layer but a layer average
    on LLaVA-1.5 (the code's comment: (2·576 + 4·300 + 10·200 + 16·110)/32 = 191; counted as run, 3 layers at 576,
    4 at 300, 9 at 200 and 16 at 110, it is 203, and 206 with the recycled tokens). ``layers=None``: the code's
    layers scaled to the depth (1, 2, 3 of 4; v1 too, its fourth then falls past the last layer).

    Positions: v1/v1.5 renumber the kept tokens without gaps (``positions="repack"``, 1D rotary models); SparseVLM+
    keeps the original positions, the default here for every version (it also serves mrope families).

    Differences from the code: (1) the raters are chosen anew at each stage from the same decoder-input embeddings
    (``llm_input``: the image's every token there and its instruction), the code's once: the same raters; (2) they
    are among the image's instruction tokens by the ``text_embeddings`` rule (its text after the image up to the
    prompt's end), the code's among every token after the image: the same tokens in a one-image prompt;
    (3) recycled clusters stand at their centre token's slot and position, in raster order, where the code appends
    them after the kept image tokens; (4) DPC-KNN breaks density ties by the lower index, where the code adds
    1e-6 noise (random); stable top-k ties toward the lower index; (5) any N: the counts scale with N (the code's
    are for 576); several images each their own budget and raters (the code: batch size 1, one image).
    """

    name = "sparsevlm"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention", "llm_input")
    llm_attention_at = "previous"

    keep: int | float = 0.1962
    version: str = "1.5"
    setting: int = 192
    layers: tuple[int, ...] | None = None
    recycle: bool | None = None
    heads: int | None = None
    rank_scale: float = 13.5
    rank_bias: float = 0.0
    exact: bool = True
    positions: str = "original"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.version, (int, float)) and not isinstance(self.version, bool):
            self.version = format(self.version, "g")
        if self.version not in VERSIONS:
            raise ValueError(f"version={self.version!r}: choose '1' (the rank's adaptive count), '1.5' (the code's fixed "
                             f"schedules, recycling) or '2' (SparseVLM+: debiased attention, top heads, no recycling)")
        if self.version != "1" and self.setting not in SCHEDULES[self.version]:
            raise ValueError(f"setting={self.setting!r}: choose the code's schedule 192, 128, 96 or 64 (its layer-average "
                             f"label on 576 tokens)")
        self.layers = check_layers(self.layers, "the code's (3, 7, 16): after layers 2, 6, 15")
        most = len(CODE_LAYERS[self.version])
        if self.layers is not None and len(self.layers) > most:
            raise ValueError(f"layers={self.layers!r}: at most {most} stages at version={self.version!r}, as the code's")
        if self.recycle is not None and not isinstance(self.recycle, bool):
            raise ValueError(f"recycle={self.recycle!r}: pass True, False or None (the version's: v1, v1.5 recycle, v2 not)")
        if self.heads is not None and (self.version != "2" or isinstance(self.heads, bool)
                                       or not isinstance(self.heads, int) or self.heads < 1):
            raise ValueError(f"heads={self.heads!r}: SparseVLM+'s (version='2') priority heads, an int >= 1, or None "
                             f"(14 of 32 scaled to the model's heads)")
        for name in ("rank_scale", "rank_bias"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (name == "rank_scale" and value <= 0):
                raise ValueError(f"{name}={value!r}: v1's count is int(rank·rank_scale + rank_bias), a number "
                                 f"(rank_scale > 0; the code's 13.5 and 0)")
        if not isinstance(self.exact, bool):
            raise ValueError(f"exact={self.exact!r}: True (v1's last stage keeps exactly keep) or False (the rank rule's count)")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}: choose 'original' (SparseVLM+'s) or 'repack' (v1's, v1.5's)")

    def requests(self) -> tuple[Signal, ...]:
        return (DEBIASED_ROWS if self.version == "2" else ROWS, IMAGE_INPUT, TEXT_INPUT)

    def select(self, tokens: VisualTokens) -> Selection:
        raise TypeError("sparsevlm runs as stages inside the LLM: apply it with ts.apply(model, ts.SparseVLM())")

    def schedule(self, n_layers: int) -> tuple[Sieve, ...]:
        layers = self.layers or default_layers(n_layers, CODE_LAYERS[self.version])
        recycle = self.version != "2" if self.recycle is None else self.recycle
        if self.version == "1":
            shares = (1.0,) * len(layers)
        else:
            totals = code_totals(SCHEDULES[self.version][self.setting], recycle)
            shares = tuple(t / totals[-1] for t in totals[: len(layers) - 1] + totals[-1:])
        return tuple(SparseVLMStage(self.keep, layer, share, recycle, self.version, self.heads, self.rank_scale,
                                    self.rank_bias, self.exact and number == len(layers) - 1)
                     for number, (layer, share) in enumerate(zip(layers, shares)))


def default_layers(n_layers: int, code_layers: tuple[int, ...] = CODE_LAYERS["1.5"]) -> tuple[int, ...]:
    """The code's stages (before layers 3, 7, 16 of 32) scaled to ``n_layers``, each after the one before, below the last."""
    layers: list[int] = []
    for layer in code_layers:
        layer = max(round(n_layers * layer / CODE_DEPTH), layers[-1] + 1 if layers else 1)
        if layer < n_layers:
            layers.append(layer)
    return tuple(layers)


def code_totals(topk: tuple[int, ...], recycle: bool, n: int = CODE_TOKENS) -> tuple[int, ...]:
    """The tokens after each stage of the code on ``n`` image tokens: its top-k plus, recycling, its clusters."""
    totals = []
    for k in topk:
        k = min(k, n - 1)
        n = k + (recycled(n - k)[1] if recycle else 0)
        totals.append(n)
    return tuple(totals)


def choose_raters(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(T,) bool: SparseVLM's raters among ``text`` (T, d) for ``image`` (N, d), decoder-input embeddings: the text
    tokens whose relevance, ``softmax`` over the text of ``image @ text.T`` averaged over the image, is above its
    mean; every text token when none is (one token, or all alike), where the code's mean of no rows is NaN."""
    relevance = (image.float() @ text.float().T).softmax(dim=-1).mean(dim=0)
    raters = relevance > relevance.mean()
    return raters if bool(raters.any()) else torch.ones_like(raters)


def adaptive_count(rows: torch.Tensor, scale: float = 13.5, bias: float = 0.0) -> int:
    """v1's count (91fb6d9, ``attn_postprocess_rank``) from the head-mean rater rows (R, N): ``min(int(rank·scale +
    bias), N - 1)``, at least 1; all N when the rank is N (the code then keeps every token)."""
    rank, n = int(torch.linalg.matrix_rank(rows.float())), rows.shape[-1]
    return n if rank == n else max(1, min(int(rank * scale + bias), n - 1))


@dataclass
class SparseVLMStage(Sieve):
    """One SparseVLM pruning layer, before decoder layer ``layer`` (made by SparseVLM.schedule): it keeps
    ``round(final · share)`` tokens (``final`` from ``keep``), clusters included; at version "1" at least ``final``
    (the rank rule's count above it), or exactly (``exact``)."""

    name = "sparsevlm"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention", "llm_input")
    llm_attention_at = "previous"

    keep: int | float = 0.1962
    layer: int = 3
    share: float = 1.0  # this stage's count over the last stage's
    recycle: bool = True
    version: str = "1.5"
    heads: int | None = None
    rank_scale: float = 13.5
    rank_bias: float = 0.0
    exact: bool = False  # v1: keep exactly final (the last stage of an exact schedule), not the rank rule's count

    def requests(self) -> tuple[Signal, ...]:
        return (self.rows, IMAGE_INPUT, TEXT_INPUT)

    @property
    def rows(self) -> Signal:
        return DEBIASED_ROWS if self.version == "2" else ROWS

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        final = self.budget.resolve(tokens.entered if tokens.entered is not None else n)
        count = final if self.version == "1" else max(round(final * self.share), final)
        if count >= n:
            return Selection.every(tokens)
        raters = choose_raters(tokens[IMAGE_INPUT], tokens[TEXT_INPUT])
        rows = tokens[self.rows].float()[:, raters]  # (heads, R, N)
        if self.version == "2":
            chosen = self.heads or max(1, round(len(rows) * CODE_HEADS[0] / CODE_HEADS[1]))
            rows = rows[torch.sort(rows.sum(dim=(1, 2)), descending=True, stable=True).indices[:chosen]]
        rows = rows.mean(dim=0)  # (R, N)
        top, clusters = split_count(count, n) if self.recycle else (count, 0)
        if self.version == "1" and not self.exact:
            top, clusters = self.rank_rule(rows, n, (top, clusters))
            if top >= n:
                return Selection.every(tokens)
        return keep_and_recycle(rows.mean(dim=0), tokens.features, top, clusters)

    def rank_rule(self, rows: torch.Tensor, n: int, floor: tuple[int, int]) -> tuple[int, int]:
        """v1's (top-k, clusters) from the head-mean rater rows (R, N): the rank rule's, clusters on top as the code,
        or ``floor`` (the budget's) where the rule keeps fewer tokens; (N, 0) when the rank is N."""
        top = adaptive_count(rows, self.rank_scale, self.rank_bias)
        if top >= n:
            return n, 0
        clusters = recycled(n - top)[1] if self.recycle else 0
        return (top, clusters) if top + clusters >= sum(floor) else floor
