"""``prumerge`` / ``prumerge_plus``: [CLS]-attention outliers (IQR), each merged with its key-nearest tokens."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..sieve import Selection, Sieve, VisualTokens
from ..selection import single_head_attention
from ..signals import Signal


@register
@dataclass
class PruMerge(Sieve):
    """Keep the patches the [CLS] token attends to most; each kept patch then absorbs its ``neighbours``
    nearest patches by key cosine: ``x_i + sum_j a_j x_j`` (``a`` the [CLS] attention, an unnormalised
    sum as in the code), in vision space before the projector, then projected.

    Paper: "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models" (Shang et al.,
    ICCV 2025, arXiv 2403.15388); code 42Shawn/LLaVA-PruMerge at 9d6586e3 (``token_prune_merge_advanced``
    and ``outlier_dectection`` in llava/model/multimodal_encoder/clip_encoder.py).

    The count: the paper keeps the IQR outliers of the [CLS] attention (``a_j > Q3 + 1.5·(Q3 - Q1)``,
    quantiles interpolated linearly as numpy's), so the image decides how many (5.5% of 576 on average in
    the paper); the outliers are always the top of the attention ranking, so the rule only sets the
    count. ``adaptive=False`` (default) keeps exactly ``keep``, the top ``keep`` by attention (the code's
    ``if_adaptive=False`` path): the library's way, so methods compare at one budget, a sweep over ``keep``
    means something and ``keep=1.0`` is the stock model. ``adaptive=True`` is the paper's count, at
    least 1 and at most ``keep`` (``keep=1.0``: no cap, as the paper).

    Adaptive budget (this library's, not the paper's): ``keep=ts.Adaptive(mass=0.9, min=16, max=None)`` keeps
    the fewest top patches whose [CLS] attention (the one-head ``a`` below) holds 90% of its mass, clamped to
    ``[min, max]``; each then merges as above. It replaces the IQR as the rule that sets the count, so it is
    refused with ``adaptive=True``.

    Defaults: ``keep=64`` (this library's budget), ``neighbours=32`` (the code's ``topk(k=32)``),
    ``attention_layer=-1``: the [CLS] attention of the last vision block (the code's ``layers[23]`` of
    CLIP-L's 24; ``None``: the feature layer). The code's attention is one head over the whole q/k,
    ``softmax(q·k/sqrt(d_model))``; it is recovered exactly from the per-head rows as
    ``softmax_j(sum_h log p_h[j] / sqrt(heads))`` (tested). Neighbours are found among every other
    patch, kept ones included, as the code does.

    Differences: the keys are the feature layer's (``vision_keys`` has no layer parameter; the code's are
    the last block's, whose input is the feature layer's output); the weights are the [CLS] attention
    renormalised over the patches (the signal drops the [CLS] column, so they are ``1/(1 - a_cls)``
    times the code's); the code's extra token, the attention-weighted sum of every pruned patch appended
    after the kept ones, is left out (every token here stands at a patch's position); kept tokens stay in
    raster order (the code: by attention); ties go to the lower raster index (stable sorts); the IQR is per
    image (the code pools the batch). LLaVA-NeXT is refused (its newline tokens have no vision features),
    as is every tower without [CLS] (SigLIP, Qwen, Idefics3).
    """

    name = "prumerge"
    paper = "LLaVA-PruMerge (arXiv 2403.15388)"
    signals = ("cls_attention", "vision_keys", "vision_features", "project")
    adaptive_rules = ("mass",)  # keep=ts.Adaptive(mass=0.9): the fewest top patches holding 90% of the [CLS] attention

    adaptive: bool = False
    neighbours: int = 32
    attention_layer: int | None = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive must be True (the paper's IQR count, at most keep) or False (exactly keep), not {self.adaptive!r}")
        if self.adaptive and self.budget.adaptive is not None:
            raise ValueError(f"{self.name}: adaptive=True (the paper's IQR count) and keep={self.budget!r} (the mass "
                             f"count) are two rules for one count; pass adaptive=False with the adaptive budget, or "
                             f"a count (keep=64) as the IQR count's cap")
        count = self.neighbours
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"neighbours must be a count >= 0 (0: no merging), not {count!r}")
        layer = self.attention_layer
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer == 0):
            raise ValueError(f"attention_layer must be a vision layer (1..n, or -1..-n from the last) or None for the feature layer, not {layer!r}")

    def _attention_request(self) -> Signal:
        layers = None if self.attention_layer is None else (self.attention_layer,)
        return Signal("cls_attention", layers=layers)

    def requests(self) -> tuple:
        return (self._attention_request(), "vision_keys", "vision_features", "project")

    def pick(self, attention: torch.Tensor, k: int) -> torch.Tensor:
        """The kept patches (any order): the top of the attention ranking, ``k`` or the IQR's count."""
        count = min(iqr_outliers(attention), k) if self.adaptive else k
        return torch.sort(attention, descending=True, stable=True).indices[:count]

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        rows = tokens[self._attention_request()]
        attention = single_head_attention(rows if self.attention_layer is None else rows[0])
        k = self.budget.count(attention)
        if k >= n and not self.adaptive:
            return Selection.every(tokens)
        kept = self.pick(attention, k).sort().values
        keys = tokens["vision_keys"]
        keys = keys.transpose(0, 1).reshape(keys.shape[1], -1)  # heads concatenated, as k_proj's output
        merged = merge_neighbours(tokens["vision_features"], keys, attention, kept, min(self.neighbours, n - 1))
        projected = tokens["project"](merged.unsqueeze(0)).squeeze(0)
        return Selection(kept, projected.to(tokens.features.dtype))


@register
@dataclass
class PruMergePlus(PruMerge):
    """PruMerge with spatially uniform samples added to the attention picks, then the same merge.

    Paper: PruMerge+ in arXiv 2403.15388 (about 25% of the tokens); code ``token_prune_merge_advanced_plus``
    (same file and commit as :class:`PruMerge`; same defaults and differences). ``adaptive=True`` is the
    code's inference path: the ``c`` IQR outliers (at least 1) plus the raster indices
    ``range(s // 6, N - 1, s // 3)`` with ``s = N // c`` (the code's ``int(1 / ratio)``; on 576 patches
    with 32 outliers every 6th from 3) that are not outliers; over ``keep``, the outliers are cut to
    ``keep`` first and the samples thinned evenly. ``adaptive=False`` (default) keeps exactly ``keep``, as
    the code's fixed-ratio path: half (rounded up) by attention, half spatial, the samples at the
    centres of ``keep // 2`` even raster strides. Difference there: the code strides over every patch
    (``range(s // 2, N - 1, s)``, which is ``floor((i + 1/2)·N/m)`` when ``m`` divides ``N``) and lets a
    sample repeat an attention pick; here the strides run over the patches attention did not pick, so
    the count is exact. ``keep=ts.Adaptive(mass=...)``: the mass count of the [CLS] attention (as
    :class:`PruMerge`'s) is the total kept, split half by attention, half spatial as a fixed ``keep`` is.
    """

    name = "prumerge_plus"
    paper = "LLaVA-PruMerge+ (arXiv 2403.15388)"

    def pick(self, attention: torch.Tensor, k: int) -> torch.Tensor:
        n = len(attention)
        order = torch.sort(attention, descending=True, stable=True).indices
        if self.adaptive:
            count = iqr_outliers(attention)
            step = n // count
            grid = torch.arange(step // 6, n - 1, max(1, step // 3), device=attention.device)
            samples = grid[~torch.isin(grid, order[:count])]
            top = order[: min(count, k)]
            if len(top) + len(samples) > k:
                samples = samples[even_picks(len(samples), k - len(top)).to(attention.device)]
            return torch.cat([top, samples])
        top = order[: k - k // 2]
        rest = torch.ones(n, dtype=torch.bool, device=attention.device)
        rest[top] = False
        rest = rest.nonzero_static(size=n - len(top)).squeeze(1)
        return torch.cat([top, rest[even_picks(len(rest), k // 2).to(attention.device)]])


def iqr_outliers(attention: torch.Tensor) -> int:
    """How many values lie strictly above ``Q3 + 1.5·(Q3 - Q1)`` (at least 1; read back to the host)."""
    values = attention.double()
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=values.dtype, device=values.device))
    return max(1, int((values > q3 + 1.5 * (q3 - q1)).sum()))


def even_picks(n: int, m: int) -> torch.Tensor:
    """``m`` of ``range(n)`` at the centres of ``m`` equal strides: ``floor((i + 1/2)·n/m)``."""
    return (2 * torch.arange(m) + 1) * n // (2 * m) if m > 0 else torch.zeros(0, dtype=torch.long)


def merge_neighbours(features: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor, kept: torch.Tensor,
                     count: int) -> torch.Tensor:
    """PruMerge's merge: each kept token ``i`` becomes ``x_i + sum_j a_j x_j`` over the ``count`` other tokens
    (kept or not) whose keys are most cosine-similar to its own (ties to the lower index); in
    ``features``' dtype."""
    unit = F.normalize(keys.float(), dim=-1)
    similarity = (unit[kept] @ unit.T).scatter_(1, kept[:, None], -float("inf"))
    nearest = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :count]
    weights = torch.zeros_like(similarity).scatter_(1, nearest, attention.float()[nearest])
    values = features.float()
    return (values[kept] + weights @ values).to(features.dtype)
