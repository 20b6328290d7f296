"""``sparsevlm``: inside the LLM, in three stages: keep the image tokens the instruction attends to most, by the code's
fixed schedules, and recycle the best of the dropped ones as a few cluster means (density-peak clustering)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import top_k_in_order
from ..sieve import Selection, Sieve, VisualTokens, check_layers
from ..signals import Signal
from .pyramiddrop import POSITIONS

PAPER = "SparseVLM (arXiv 2410.04417)"
#: the attention each image token receives from the image's instruction, mean over its rows (the raters' stand-in)
ROWS = Signal("llm_attention", queries="instruction")
VERSIONS = ("1", "1.5", "2")
#: the code's top-k before the layers after 2, 6, 15 of 32 (``score.py``, ``sparse_token_list_*``), by setting
SCHEDULES = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "2": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
CODE_LAYERS, CODE_DEPTH, CODE_TOKENS = (3, 7, 16), 32, 576  # pruning_loc [2, 6, 15]: the stage is before the next layer
CODE_HEADS = (14, 32)  # v2 scores with the 14 of LLaVA-7B's 32 heads that give the image the most attention


@register
@dataclass
class SparseVLM(Sieve):
    """After each pruning layer, score the image tokens still there by the attention the instruction pays them in that
    layer (mean over heads and over the instruction's rows), keep the top ones and (v1.5) recycle the best 30% (+1) of
    the dropped ones: ``floor(m/10)+1`` density-peak clusters (DPC-KNN) of their hidden states, each a plain mean.

    Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference" (Zhang et al., ICML
    2025, arXiv 2410.04417; SparseVLM+ is its v2); code Gumpest/SparseVLMs, read at 26a5f48 (``main``: v1.5, and v2
    behind ``USE_VERSION=2_0``) and at its first commit 91fb6d9 (v1), ``llava/model/language_model/score.py``,
    ``modelling_sparse_llama.py`` and ``utils.py`` (``cluster_and_merge``).

    ``version="1.5"`` (default; the code's default ``USE_VERSION=1_0`` on ``main``): pruning layers 2, 6 and 15 of 32,
    each using its own attention and applied to its output (here stages before layers 3, 7, 16, with the attention
    inside layer K-1: ``llm_attention_at="previous"``); the fixed top-k schedules of ``score.py`` by ``setting``
    (192: 300, 200, 110; 128: 303, 110, 36; 96: 238, 48, 26; 64: 66, 30, 17); recycling on. ``version="2"``
    (SparseVLM+): its schedules (192: 300, 200, 118; 128: 238, 108, 60; 96: 246, 54, 28; 64: 66, 34, 20), the
    attention of the ``heads`` heads (None: 14 of 32, scaled to the model's heads) that give the image the most of
    it, no recycling. ``version="1"`` (91fb6d9: a count of ``min(int(rank·scale + bias), N-1)``, the rank of the
    rater x image attention matrix, ``scale=13.5, bias=0``, and a fourth layer, 19) is refused: the rank needs each
    rater's own row, and the engine gives their mean (``adaptive_count`` holds the rule).
    ``recycle=None``: the version's (v1.5 recycles, v2 not); True or False forces it.

    Budget: ``keep`` is what the last stage leaves, recycled tokens included (a count, or a share of the N tokens the
    image had at the first stage); an earlier stage keeps ``round(final·T_s/T_last)``, ``T`` the code's counts of
    ``setting`` with its recycled tokens added at 576 tokens (v1.5, 192: 309, 204, 113; 128: 312, 117, 39; 96: 249,
    55, 27; 64: 82, 32, 18; v2: the table itself). A stage's count holds its clusters: its top-k is the largest k
    with ``k + clusters(N-k) <= count``, which meets it exactly (309 = 300 + 9 at 576). ``keep=0.1962`` (113 of 576)
    is the code's 192 setting at v1.5; v2's is ``keep=0.2049`` (118). The paper's "192 tokens" is no count at any
    layer but a layer average on LLaVA-1.5 (the code's comment: (2·576 + 4·300 + 10·200 + 16·110)/32 = 191;
    counted as run, 3 layers at 576, 4 at 300, 9 at 200 and 16 at 110, it is 203, and 206 with the recycled
    tokens). ``layers=None``: the code's 3, 7, 16 of 32 scaled to the depth (1, 2, 3 of 4).

    Positions: v1/v1.5 renumber the kept tokens without gaps (``positions="repack"``, 1D rotary models); SparseVLM+
    keeps the original positions, the default here for every version (it also serves mrope families).

    Differences from the code: (1) raters: the code rates with the text tokens whose mean softmax relevance to the
    image at the LLM input, ``softmax_text(V·Tᵀ)`` averaged over the image tokens, is above the mean
    (``choose_raters``); the engine's ``llm_attention`` averages the rows of every instruction token, so all of
    them rate; (2) v2's positional-bias correction (each attention weight divided by the same layer's attention of
    all-ones q/k under the rotation) needs each rater's row and position, so it is left out; its heads are chosen
    from the instruction's mean rows (the ranking the code's sum over rows gives without the correction);
    (3) recycled clusters stand at their centre token's slot and position, in raster order, where the code appends
    them after the kept image tokens; (4) DPC-KNN breaks density ties by the lower index, where the code adds
    1e-6 noise (random); stable top-k ties toward the lower index; (5) any N: the counts scale with N (the code's
    are for 576); several images each their own budget (the code: batch size 1, one image).
    (1), (2) and v1 wait for the engine to choose the raters at the LLM input: each instruction token's own row
    exists (``llm_attention(queries="instruction", per_query=True)``, equal to eager), but which of them rate is
    decided from the input embeddings, which an in-LLM stage does not see.
    """

    name = "sparsevlm"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention",)
    llm_attention_at = "previous"

    keep: int | float = 0.1962
    version: str = "1.5"
    setting: int = 192
    layers: tuple[int, ...] | None = None
    recycle: bool | None = None
    heads: int | None = None
    positions: str = "original"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.version, (int, float)) and not isinstance(self.version, bool):
            self.version = format(self.version, "g")
        if self.version not in VERSIONS:
            raise ValueError(f"version={self.version!r}: choose '1.5' (the code's fixed schedules, recycling) or '2' "
                             f"(SparseVLM+: top heads, no recycling)")
        if self.version == "1":
            raise ValueError("version='1' sets each stage's count from the rank of the rater x image attention matrix, "
                             "which needs each rater's own attention row; llm_attention gives the mean of the "
                             "instruction's rows: use version='1.5' (fixed schedules) or '2'")
        if self.setting not in SCHEDULES[self.version]:
            raise ValueError(f"setting={self.setting!r}: choose the code's schedule 192, 128, 96 or 64 (its layer-average "
                             f"label on 576 tokens)")
        self.layers = check_layers(self.layers, "the code's (3, 7, 16): after layers 2, 6, 15")
        if self.layers is not None and len(self.layers) > len(CODE_LAYERS):
            raise ValueError(f"layers={self.layers!r}: at most {len(CODE_LAYERS)} stages, as the code's schedules")
        if self.recycle is not None and not isinstance(self.recycle, bool):
            raise ValueError(f"recycle={self.recycle!r}: pass True, False or None (the version's: v1.5 recycles, v2 not)")
        if self.heads is not None and (self.version != "2" or isinstance(self.heads, bool)
                                       or not isinstance(self.heads, int) or self.heads < 1):
            raise ValueError(f"heads={self.heads!r}: SparseVLM+'s (version='2') priority heads, an int >= 1, or None "
                             f"(14 of 32 scaled to the model's heads)")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}: choose 'original' (SparseVLM+'s) or 'repack' (v1.5's)")

    def requests(self) -> tuple[Signal, ...]:
        return (ROWS,)

    def select(self, tokens: VisualTokens) -> Selection:
        raise TypeError("sparsevlm runs as stages inside the LLM: apply it with ts.apply(model, ts.SparseVLM())")

    def schedule(self, n_layers: int) -> tuple[Sieve, ...]:
        layers = self.layers or default_layers(n_layers)
        recycle = self.version != "2" if self.recycle is None else self.recycle
        totals = code_totals(SCHEDULES[self.version][self.setting], recycle)
        shares = totals[: len(layers) - 1] + totals[-1:]
        return tuple(SparseVLMStage(self.keep, layer, shares[i] / shares[-1], recycle, self.version == "2", self.heads)
                     for i, layer in enumerate(layers))


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The code's stages (before layers 3, 7, 16 of 32) scaled to ``n_layers``, each after the one before, below the last."""
    layers: list[int] = []
    for layer in CODE_LAYERS:
        layer = max(round(n_layers * layer / CODE_DEPTH), layers[-1] + 1 if layers else 1)
        if layer < n_layers:
            layers.append(layer)
    return tuple(layers)


def recycled(dropped: int) -> tuple[int, int]:
    """(candidates, clusters) of a stage that dropped ``dropped`` tokens: the top 30% + 1 and ``floor(m/10) + 1``."""
    candidates = int(dropped * 0.3) + 1
    return candidates, candidates // 10 + 1


def code_totals(topk: tuple[int, ...], recycle: bool, n: int = CODE_TOKENS) -> tuple[int, ...]:
    """The tokens after each stage of the code on ``n`` image tokens: its top-k plus, recycling, its clusters."""
    totals = []
    for k in topk:
        k = min(k, n - 1)
        n = k + (recycled(n - k)[1] if recycle else 0)
        totals.append(n)
    return tuple(totals)


def split_count(count: int, n: int) -> tuple[int, int]:
    """(top-k, clusters) of a recycling stage that leaves ``count`` of ``n`` tokens: the largest k with
    ``k + clusters(n - k) <= count`` (steps of 0 or 1 in k, so it meets ``count``); (count, 0) when none fits."""
    fits = next((k for k in range(count, 0, -1) if k + recycled(n - k)[1] <= count), None)
    return (count, 0) if fits is None else (fits, count - fits)


def choose_raters(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(T,) bool: SparseVLM's raters among ``text`` (T, d) for ``image`` (N, d), hidden states at the LLM input: the
    text tokens whose relevance, ``softmax`` over the text of ``image @ text.T`` averaged over the image, is above
    its mean (for the engine's rater rows; the stages here average every instruction row)."""
    relevance = (image.float() @ text.float().T).softmax(dim=-1).mean(dim=0)
    return relevance > relevance.mean()


def adaptive_count(rows: torch.Tensor, scale: float = 13.5, bias: float = 0.0) -> int:
    """v1's count (91fb6d9, ``attn_postprocess_rank``) from the head-mean rater rows (R, N): ``min(int(rank·scale +
    bias), N - 1)``, at least 1; all N when the rank is N (the code then keeps every token)."""
    rank, n = int(torch.linalg.matrix_rank(rows.float())), rows.shape[-1]
    return n if rank == n else max(1, min(int(rank * scale + bias), n - 1))


def dpc_knn(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (the code's ``cluster_and_merge``, k = ``clusters``)
    of ``x`` (m, d): distances ``|x_i - x_j| / sqrt(d)``, density ``exp(-mean of the k nearest squared)`` (itself
    included), each token's distance to its nearest denser token (the largest distance for the densest), centres the
    ``clusters`` largest ``distance · density``, every token to its nearest centre. Returns (centres (clusters,)
    indices into x, assignment (m,) into centres); ties to the lower index."""
    x = x.float()
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / math.sqrt(x.shape[-1])
    density = (-(dist.topk(clusters, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()
    index = torch.arange(len(x), device=x.device)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))
    parent = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = torch.sort(parent * density, descending=True, stable=True).indices[:clusters]
    assignment = dist[centres].argmin(dim=0)
    assignment[centres] = torch.arange(clusters, device=x.device)
    return centres, assignment


@dataclass
class SparseVLMStage(Sieve):
    """One SparseVLM pruning layer, before decoder layer ``layer`` (made by SparseVLM.schedule): it keeps
    ``round(final · share)`` tokens (``final`` from ``keep``), clusters included."""

    name = "sparsevlm"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention",)
    llm_attention_at = "previous"

    keep: int | float = 0.1962
    layer: int = 3
    share: float = 1.0  # this stage's count over the last stage's
    recycle: bool = True
    top_heads: bool = False  # SparseVLM+: only the heads that give the image the most attention
    heads: int | None = None

    def requests(self) -> tuple[Signal, ...]:
        return (ROWS,)

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        final = self.budget.resolve(tokens.entered if tokens.entered is not None else n)
        count = min(max(round(final * self.share), final), n)
        if count >= n:
            return Selection.every(tokens)
        rows = tokens[ROWS].float()  # (heads, N)
        if self.top_heads:
            chosen = self.heads or max(1, round(len(rows) * CODE_HEADS[0] / CODE_HEADS[1]))
            rows = rows[torch.sort(rows.sum(dim=-1), descending=True, stable=True).indices[:chosen]]
        scores = rows.mean(dim=0)
        top, clusters = split_count(count, n) if self.recycle else (count, 0)
        kept = top_k_in_order(scores, top)
        if not clusters:
            return Selection(kept)
        device = scores.device
        dropped = torch.ones(n, dtype=torch.bool, device=device)
        dropped[kept] = False
        dropped = dropped.nonzero().squeeze(1)
        candidates = dropped[torch.sort(scores[dropped], descending=True, stable=True).indices[: recycled(len(dropped))[0]]]
        centres, joined = dpc_knn(tokens.features[candidates], clusters)
        everything = torch.cat([kept, candidates[centres]]).sort().values
        assignment = torch.full((n,), -1, dtype=torch.long, device=device)
        assignment[everything] = torch.arange(len(everything), device=device)
        assignment[candidates] = torch.searchsorted(everything, candidates[centres][joined])
        return Selection(everything, assignment=assignment)
