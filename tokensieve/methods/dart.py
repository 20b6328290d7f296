"""``dart`` (inside the LLM) and ``dart_pre`` (before it): keep a few pivot tokens and, for each pivot, the image
tokens least duplicated by it (lowest cosine similarity)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..sieve import Selection, Sieve, VisualTokens

PAPER = "DART (arXiv 2502.11494)"


def pivot_quotas(rest: int, pivots: int) -> list[int]:
    """``rest`` tokens shared among ``pivots`` pivots as evenly as possible, the earlier pivots taking one more."""
    base, extra = divmod(rest, pivots)
    return [base + (i < extra) for i in range(pivots)]


def by_l1_norm(vectors: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` rows of largest L1 norm, largest first (float32, ties to the lower index)."""
    return torch.sort(vectors.float().abs().sum(-1), descending=True, stable=True).indices[:count]


def least_duplicated(features: torch.Tensor, pivots: torch.Tensor, taken: torch.Tensor, quotas: list[int]) -> torch.Tensor:
    """For each pivot in turn (rows of ``pivots``), the ``quotas[i]`` tokens of ``features`` least cosine-similar
    to it among those not yet taken (``taken`` (N,) bool: the image pivots at the start; ties to the lower
    index); returns every taken index, ascending."""
    similarity = F.normalize(pivots.float(), dim=-1) @ F.normalize(features.float(), dim=-1).T
    taken = taken.clone()
    for row, quota in zip(similarity, quotas):
        if quota:
            order = torch.sort(row.masked_fill(taken, float("inf")), stable=True).indices
            taken[order[:quota]] = True
    return taken.nonzero().squeeze(1)


def _check_count(name: str, value, meaning: str, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}={value!r}: pass {meaning}, an int >= {least} (DART's default: 4)")


@register
@dataclass
class DART(Sieve):
    """At the input of decoder layer ``layer``, take the ``pivots`` image tokens of largest L1 norm as pivots; the
    rest of the budget is shared evenly among them (the earlier pivots one more), and each pivot in turn, by
    descending norm, keeps its share of the other image tokens least cosine-similar to it among those not yet
    kept. Kept: the pivots and what they chose, ``keep`` in all, in raster order; layers ``layer``.. see them.

    Paper: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More" (Wen et
    al., arXiv 2502.11494); official code ZichenWen1/DART, read at 5a19452 (through its fork xqy1111111/DART;
    ``DART.get_retained_image_token`` in llava/model/language_model/modeling_llama_self.py). Defaults from it:
    ``layer=2`` (its K, pruning before layer 2), ``pivots=4`` (``--pivot_image_token 4``), ``keep=128``
    (``--max_num_trunction 128``, the README's 77.8% reduction of 576).

    Differences, the first three because an in-LLM sieve sees only the image tokens' hidden states here: (1)
    the code ranks pivots by the L1 norm of layer K-1's rotated keys (every head), here the L1 norm of the
    hidden states at layer K's input; (2) the code also takes ``--pivot_text_token 4`` pivots among the text
    after the image (by the same key norm) and compares them with the image tokens: here there are no text
    pivots and their share of the budget goes to the image pivots (``dart_pre`` has them); (3) the code takes
    the cosine after the model's final RMSNorm (its per-channel weight changes cosines), here on the hidden
    states themselves. (4) The code keeps ``budget // 8`` per pivot plus the 4 image pivots (132 for 128) and
    visits the pivots in Python-set order; here exactly ``keep`` and pivots by descending norm. (5) Several
    images each get their own budget (the code: batch size 1, one image). Positions: the code gathers each
    kept token's original position id and does not re-pack, as here (``positions`` is not an argument).
    """

    name = "dart"
    paper = PAPER
    stage = "in_llm"
    signals = ()

    keep: int | float = 128
    layer: int = 2
    pivots: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer={self.layer!r}: pass the decoder layer to prune before, an int >= 1 (DART's K, e.g. 2)")
        _check_count("pivots", self.pivots, "the number of image pivot tokens")

    def select(self, tokens: VisualTokens) -> Selection:
        n, k = len(tokens), self.budget.resolve(len(tokens))
        if k >= n:
            return Selection.every(tokens)
        features = tokens.features
        chosen = by_l1_norm(features, min(self.pivots, k))
        taken = torch.zeros(n, dtype=torch.bool, device=features.device).index_fill_(0, chosen, True)
        return Selection(least_duplicated(features, features[chosen], taken, pivot_quotas(k - len(chosen), len(chosen))))


@register
@dataclass
class DARTPre(Sieve):
    """DART before the LLM, on the projected tokens: ``pivots`` image pivots of largest L1 norm and ``text_pivots``
    text pivots, the instruction's input embeddings (``text_embeddings``) of largest L1 norm; the budget left
    after the image pivots is shared evenly among all pivots (the earlier one more), and each in turn (image
    pivots, then text pivots, each by descending norm) keeps its share of the image tokens least
    cosine-similar to it among those not yet kept. ``keep`` in all, in raster order.

    Same paper and code as ``dart``, whose duplication rule (pivot shares, the text pivots' part in it) this
    follows with the LLM's input (layer 0) in place of layer K: there is no layer K-1 to take keys from, so
    pivots are ranked by the L1 norm of the vectors themselves (the code: of the rotated keys), and cosines
    are taken on the projected tokens and input embeddings (the code: after the final RMSNorm at layer K).
    Defaults ``keep=128``, ``pivots=4``, ``text_pivots=4`` (the code's); an instruction of fewer tokens gives
    fewer text pivots, ``text_pivots=0`` none (then no text signal is asked for). Exactly ``keep`` tokens (the
    code keeps ``budget // 8`` per pivot plus the image pivots); each image its own budget; kept tokens keep
    their original positions, as in the code.
    """

    name = "dart_pre"
    paper = PAPER
    signals = ("text_embeddings",)

    keep: int | float = 128
    pivots: int = 4
    text_pivots: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count("pivots", self.pivots, "the number of image pivot tokens")
        _check_count("text_pivots", self.text_pivots, "the number of text pivot tokens", least=0)

    def requests(self):
        return self.signals if self.text_pivots else ()

    def select(self, tokens: VisualTokens) -> Selection:
        n, k = len(tokens), self.budget.resolve(len(tokens))
        if k >= n:
            return Selection.every(tokens)
        features = tokens.features
        chosen = by_l1_norm(features, min(self.pivots, k))
        pivots = features[chosen].float()
        if self.text_pivots:
            text = tokens["text_embeddings"].to(features.device)
            pivots = torch.cat([pivots, text[by_l1_norm(text, min(self.text_pivots, len(text)))].float()])
        taken = torch.zeros(n, dtype=torch.bool, device=features.device).index_fill_(0, chosen, True)
        return Selection(least_duplicated(features, pivots, taken, pivot_quotas(k - len(chosen), len(pivots))))
