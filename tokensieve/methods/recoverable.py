"""``recoverable``: Recoverable Compression, [CLS]-attention pruning, text-guided recovery and merging."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..sieve import Selection, Sieve, VisualTokens
from ..selection import single_head_attention
from ..signals import Signal

#: sklearn's ``LocalOutlierFactor(contamination="auto")``: a point is an outlier when its LOF exceeds 1.5
LOF_THRESHOLD = 1.5


@register
@dataclass
class RecoverableCompression(Sieve):
    """Keep the tokens the [CLS] attention singles out, recover those the question singles out, and merge
    the rest into centres.

    1. Visual filter: the ``n_a`` patches of highest [CLS] attention ``a``, ``n_a`` the number of outliers of
       ``a`` by the Local Outlier Factor (``neighbours`` neighbours, LOF > 1.5).
    2. Text recovery: with ``t`` each token's relevance to the question (set to its minimum at the visual
       filter's patches), ``n_t = floor((N - n_a) · outliers(t) / N)`` more tokens of highest ``t``.
    3. Centres: the tokens left of highest ``a``, as many as fill the budget (``adaptive=True``: the code's
       count, the LOF outliers of ``a`` among them with ``centre_neighbours`` neighbours; at most ``keep``,
       ``keep=1.0``: no cap, as the paper).
    4. Every other token joins the centre whose key (the feature layer's keys, heads concatenated) is most
       cosine-similar; a centre becomes the weighted mean of its group, itself at weight 1 and each member at its
       attention ``a`` (a merge map: ``Selection.assignment``/``weights``). Kept indices in raster order.

    ``a`` is the code's one-head attention ``softmax(q·k / sqrt(d_model))`` of the [CLS] query, recovered from the
    per-head rows as ``softmax(sum_h log p_h / sqrt(heads))`` (as ``prumerge``), at ``attention_layer``. The LOF
    is computed in tensors on the 1-D scores (``local_outlier_factor``): in sorted order a point's ``k``
    nearest neighbours lie within ``k`` places on either side, so it costs O(N·k), with sklearn's definitions
    (k-distance, reachability distance, ``lrd = 1 / (mean reach + 1e-10)``, ``k = min(k, N - 1)``). The counts
    are read back to the host (three small reads per image).

    Paper: "A Multimodal Vision Token Recovery Mechanism Guided by Text Information" (AAAI 2025, arXiv
    2409.01179). The official repository (banjiuyufen/RecoverableCompression) was not available; read from its
    public copy DamonZhao-sfu/RecoverableCompression at b53840fdca (``RCEncoder.py``: ``forward`` runs
    ``token_recycling_with_text_in_vision_and_clustring``). Defaults as that code: LOF ``neighbours=20`` for the
    visual filter and the text recovery, ``centre_neighbours=10`` for the centres, sklearn's
    ``contamination="auto"`` threshold, ``attention_layer=-1`` (its ``layers[23]`` of CLIP-L's 24). ``keep=64``
    and ``adaptive=False`` are this library's: the method's own count is adaptive (about 10% of the tokens by
    the README), while a budget here is kept exactly, so methods compare and ``keep=1.0`` is the stock model.

    Differences: the code scores the question in CLIP's joint space (the CLIP text encoder's embedding of the
    prompt's first line against the tower's projected patches, scaled by 768^-1/2); HF models carry no CLIP text
    encoder, so, as ``cdpruner``, the relevance here is the mean cosine similarity of each projected token to the
    LLM's own input embeddings of the instruction (``text_embeddings``); with no instruction tokens every
    relevance is equal and nothing is recovered by text. The keys are the feature layer's (``vision_keys`` has
    no layer; the code's are the last block's) and the attention is renormalised over the patches (no [CLS]
    column). The code lets each centre add its 32 most similar remaining tokens (key cosine + 50 · their text
    score), unnormalised and possibly shared with other centres, to its own features before the projector, and
    appends one extra token, the attention-weighted sum of every non-centre; here each token joins one centre
    (the text term is the same for every centre a token could join, so only the key cosine decides), the
    group's normalised weighted mean replaces the centre after the projector, and no token is appended (every
    token is in a group already). The code's centre count multiplies the LOF ratio by the feature width
    (``N = index.shape[-1]``, 1024) instead of the tokens left; here it is the count of outliers among them.
    Neighbours at equal distance go to the nearer in sorted order (sklearn's search may pick others); with
    ``adaptive=True`` an image where no score has outliers keeps its single highest-attention token. Towers
    without [CLS] (SigLIP, Qwen, Idefics3) and LLaVA-NeXT/OneVision (no keys for newline tokens, no [CLS]) are
    refused through their signals.

    Adaptive budget (this library's): ``keep=ts.Adaptive(mass=0.9, min=16, max=None)`` sets the count ``keep``
    to the fewest patches whose [CLS] attention ``a`` holds 90% of its mass, clamped to ``[min, max]``; steps
    1-4 then fill it as a fixed ``keep`` of that count. It replaces the code's LOF count of the centres, so it is
    refused with ``adaptive=True``.
    """

    name = "recoverable"
    paper = "Recoverable Compression (arXiv 2409.01179)"
    signals = ("cls_attention", "vision_keys", "text_embeddings")
    adaptive_rules = ("mass",)  # keep=ts.Adaptive(mass=0.9): the count holds 90% of the [CLS] attention

    adaptive: bool = False
    neighbours: int = 20
    centre_neighbours: int = 10
    attention_layer: int | None = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive must be True (the code's LOF count, at most keep) or False (exactly keep), not {self.adaptive!r}")
        if self.adaptive and self.budget.adaptive is not None:
            raise ValueError(f"recoverable: adaptive=True (the code's LOF count) and keep={self.budget!r} (the mass "
                             f"count) are two rules for one count; pass adaptive=False with the adaptive budget, or "
                             f"a count (keep=64) as the LOF count's cap")
        for field, value in (("neighbours", self.neighbours), ("centre_neighbours", self.centre_neighbours)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a count of LOF neighbours >= 1, not {value!r}")
        layer = self.attention_layer
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer == 0):
            raise ValueError(f"attention_layer must be a vision layer (1..n, or -1..-n from the last) or None for the feature layer, not {layer!r}")

    def _attention_request(self) -> Signal:
        return Signal("cls_attention", layers=None if self.attention_layer is None else (self.attention_layer,))

    def requests(self) -> tuple:
        return (self._attention_request(), "vision_keys", "text_embeddings")

    def attention(self, tokens: VisualTokens) -> torch.Tensor:
        """(N,) the code's one-head [CLS] attention at ``attention_layer``, over the patches."""
        rows = tokens[self._attention_request()]
        return single_head_attention(rows if self.attention_layer is None else rows[0])

    def relevance(self, tokens: VisualTokens) -> torch.Tensor:
        """(N,) mean cosine similarity of each projected token to the instruction's input embeddings."""
        unit = F.normalize(tokens.features.float(), dim=-1)
        text = tokens["text_embeddings"]
        if len(text) == 0:
            return unit.new_zeros(len(unit))
        return (unit @ F.normalize(text.float(), dim=-1).T).mean(dim=1)

    def groups(self, attention: torch.Tensor, relevance: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks (N,) of the tokens kept as they are (visual filter and text recovery) and of the centres."""
        n = len(attention)
        visual_count = min(outliers(attention, self.neighbours), k)
        visual = _top(attention, visual_count)
        text_count = outliers(torch.where(visual, relevance.min(), relevance), self.neighbours)
        text_count = min((n - visual_count) * text_count // n, k - visual_count)
        picked = visual | _top(relevance.masked_fill(visual, float("-inf")), text_count)
        left = k - visual_count - text_count
        if self.adaptive:
            left = min(outliers(attention[~picked], self.centre_neighbours), left)
            left = max(left, int(visual_count + text_count == 0))
        return picked, _top(attention.masked_fill(picked, float("-inf")), left)

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        attention = self.attention(tokens)
        k = self.budget.count(attention)
        device = tokens.features.device
        if k >= n and not self.adaptive:
            return Selection.every(tokens)
        picked, centre = self.groups(attention, self.relevance(tokens), k)
        kept_mask = picked | centre
        kept = kept_mask.nonzero().squeeze(1)
        slot = kept_mask.cumsum(0) - 1  # each kept token's place in ``kept``
        keys = tokens["vision_keys"].float()
        unit = F.normalize(keys.transpose(0, 1).reshape(n, -1), dim=-1)  # heads concatenated, as k_proj's output
        centres = centre.nonzero().squeeze(1)
        if len(centres):
            joins = slot[centres][(unit @ unit[centres].T).argmax(dim=1)]
        else:
            joins = torch.full((n,), -1, dtype=torch.long, device=device)
        assignment = torch.where(kept_mask, slot, joins)
        weights = torch.where(kept_mask, torch.ones_like(attention), attention)
        return Selection(kept, assignment=assignment, weights=weights)


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """(N,) mask of the ``count`` highest scores (stable: ties to the lower index)."""
    mask = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    return mask.index_fill_(0, torch.sort(scores.float(), descending=True, stable=True).indices[:count], True)


def outliers(values: torch.Tensor, neighbours: int) -> int:
    """How many of the 1-D ``values`` have a local outlier factor above 1.5 (sklearn's ``contamination="auto"``)."""
    if len(values) < 2:
        return 0
    return int((local_outlier_factor(values, neighbours) > LOF_THRESHOLD).sum())


def local_outlier_factor(values: torch.Tensor, neighbours: int) -> torch.Tensor:
    """(N,) the Local Outlier Factor of each of the 1-D ``values`` with ``min(neighbours, N - 1)`` neighbours, as
    sklearn defines it, in float64. Sorted, a point's nearest neighbours are among the ``k`` places on either
    side: the candidates are taken nearest place first (left before right), and a stable sort by distance keeps
    that order among equal distances."""
    n = len(values)
    k = max(1, min(neighbours, n - 1))
    ordered, order = torch.sort(values.double(), stable=True)
    places = torch.arange(1, k + 1, device=values.device)
    offsets = torch.stack([-places, places], dim=1).flatten()  # -1, 1, -2, 2, ...
    candidates = torch.arange(n, device=values.device)[:, None] + offsets[None, :]
    inside = (candidates >= 0) & (candidates < n)
    candidates = candidates.clamp(0, n - 1)
    distance = (ordered[candidates] - ordered[:, None]).abs().masked_fill(~inside, float("inf"))
    nearest = torch.sort(distance, dim=1, stable=True)
    distance, neighbour = nearest.values[:, :k], candidates.gather(1, nearest.indices[:, :k])
    reach = torch.maximum(distance, distance[:, -1][neighbour])  # max(d(p, o), k-distance(o))
    density = 1.0 / (reach.mean(dim=1) + 1e-10)
    factor = density[neighbour].mean(dim=1) / density
    return torch.empty_like(factor).scatter_(0, order, factor)
