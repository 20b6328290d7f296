"""``mustdrop_llm``: MustDrop's prefill stage: at a few decoder layers, drop the image tokens that no text token
attends to, neither in total nor any one of them, except the vision stage's key tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..selection import top_k_in_order
from ..sieve import DecodeRule, Selection, Sieve, VisualTokens, check_layers
from ..signals import Either, Signal

PAPER = "MustDrop (arXiv 2411.10803), prefill stage"
#: the code's pruning layers of LLaVA-1.5's 32: after 0-based layers 2, 6, 10, 14, so before 3, 7, 11, 15
REFERENCE_LAYERS = (3, 7, 11, 15)
TEXT_ROWS = Signal("llm_attention", queries="instruction", per_query=True)
KEY_SCORE = Either(Signal("cls_attention", layers=(-1,)), Signal("vision_attention", layer=-1))


@register
@dataclass
class MustDropLLM(Sieve):
    """Before each of ``layers`` (None: the code's 3, 7, 11, 15 of 32, scaled to the depth), read the attention
    inside the previous layer of every text token after the image (the instruction's rows, head mean). An image
    token is a candidate to drop when its attention summed over those rows is below ``global_thr`` times the
    image's total, and no single row gives it ``individual_thr`` or more (the code's dual-attention filter);
    candidates are dropped unless they are key tokens: the top ``ceil(key_share·N)`` of the N tokens the image had
    at the first stage by the vision tower's [CLS] attention at its last layer (the code's key set, from
    ``mustdrop``'s vision stage; towers without [CLS]: the attention each token receives there). Each image gets
    its own count at each stage. The last stage keeps exactly ``keep`` when ``exact=True`` (the default, so that a
    budget holds: topped up, or cut, by the summed attention, key tokens first); ``exact=False`` keeps what the
    filter leaves, as the code does. A ``keep`` that covers the image turns every stage off, the filter too, so that
    keeping every token is the stock model.

    Paper: "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model" (Liu et al.,
    arXiv 2411.10803); code liuting20/MustDrop 909afa5 (``dual_attention_filter`` and the prefill loop in
    ``llava/model/language_model/modelling_sparse_llama.py``; the key set in ``clip_encoder.py``, ``keep_rate =
    0.08`` of the tokens after merging). Thresholds: the README's 64-token setting (``global_thr=0.011``,
    ``individual_thr=0.01``; 192 tokens: 0.001/0.001, 128: 0.0012/0.001; the argparse defaults 1.0/0 drop
    nothing). The method as the paper runs it is the chain ``mustdrop+mustdrop_llm``. Positions: the code renumbers
    the kept tokens without gaps (``position_ids.narrow(1, 0, n)`` keeps the first n ids); here each keeps its
    original position, as ``fastv``; the code's renumbering is not offered as an option yet.

    ``decode=True`` adds the code's decoding stage ("output-aware cache policy", the end of ``LlamaDynamicvitModel
    .forward``): after the prefill, the KV cache of every layer from the first stage's scoring layer (``layer - 1``;
    the code's 0-based layer 2) up to the last stage's is cut to the image tokens the last stage kept (layers before it
    keep every token, later ones hold that set already), so decode steps attend those alone there; the cache's bytes
    (``run.stats.kv_bytes``) count what stays. Without a cache the tokens after the prompt are masked alike, so a
    no-cache loop and a fresh prefill of a longer conversation give the cached run's tokens
    (tokensieve/engine/decode_stage.py). It is off by default, so that ``mustdrop_llm`` stays the prefill stage alone.

    Differences: the rows are recomputed under SDPA
    (equal to eager's); the key score is read from the unmerged tower at each token still there (the code's, on the
    merged tokens at its last block); several images each get their own key set and counts. Decode steps keep their
    original positions (the code rotates a decode token at each layer by the length that layer's cache holds, so
    after its cut at a position that differs from layer to layer); every token after the prompt is treated as a
    decode step (the code cuts after each forward of more than one token that carries images).
    """

    name = "mustdrop_llm"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention", "cls_attention", "vision_attention")

    keep: int | float = 64
    layers: tuple[int, ...] | None = None
    global_thr: float = 0.011
    individual_thr: float = 0.01
    key_share: float = 0.08
    exact: bool = True
    decode: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_layers(self.layers, "the code's: (3, 7, 11, 15)")
        if not isinstance(self.decode, bool):
            raise ValueError(f"decode={self.decode!r}: pass True (evict after the prefill, the code's decoding stage) or False")
        for name in ("global_thr", "individual_thr", "key_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name}={value!r}: pass a share between 0 and 1")

    def select(self, tokens: VisualTokens) -> Selection:
        raise TypeError("mustdrop_llm runs as stages inside the LLM: apply it with ts.apply(model, ts.load('mustdrop_llm'))")

    def decode_rule(self, n_layers: int) -> DecodeRule | None:
        keeps_all = isinstance(self.keep, float) and self.keep >= 1  # a ratio of 1 keeps every token: nothing to evict
        return DecodeRule("last_stage") if self.decode and not keeps_all else None

    def schedule(self, n_layers: int) -> tuple[Sieve, ...]:
        layers = self.layers or tuple(sorted({min(max(round(n_layers * layer / 32), 1), n_layers - 1) for layer in REFERENCE_LAYERS}))
        return tuple(MustDropStage(self.keep, layer, self.global_thr, self.individual_thr, self.key_share,
                                   self.exact and number == len(layers)) for number, layer in enumerate(layers, start=1))


@dataclass
class MustDropStage(Sieve):
    """One stage of MustDrop's prefill filter (made by MustDropLLM.schedule); ``exact``: keep exactly ``keep``."""

    name = "mustdrop_llm"
    paper = PAPER
    stage = "in_llm"
    signals = ("llm_attention", "cls_attention", "vision_attention")

    keep: int | float = 64
    layer: int = 3
    global_thr: float = 0.011
    individual_thr: float = 0.01
    key_share: float = 0.08
    exact: bool = False

    def requests(self) -> tuple:
        return (TEXT_ROWS, KEY_SCORE)

    def select(self, tokens: VisualTokens) -> Selection:
        entered = tokens.entered if tokens.entered is not None else len(tokens)
        if self.budget.resolve(entered) >= entered:  # a budget that covers the image turns the filter off too
            return Selection.every(tokens)
        rows = tokens[TEXT_ROWS].float().mean(dim=0)  # (text rows, N), head mean
        summed = rows.sum(dim=0)
        dropped = (summed < summed.sum() * self.global_thr) & (rows.max(dim=0).values < self.individual_thr)
        key = key_tokens(tokens, math.ceil(self.key_share * entered))
        kept = ~dropped | key
        if self.exact:
            count = min(self.budget.resolve(entered), len(tokens))
            # key tokens first, then the filter's survivors, then the rest, each by summed attention
            rank = summed / (summed.max() + 1) + kept.float() + key.float()
            return Selection(top_k_in_order(rank, count))
        return Selection(kept.nonzero().squeeze(1))


def key_tokens(tokens: VisualTokens, count: int) -> torch.Tensor:
    """(N,) True at the ``count`` tokens the vision tower's key score ranks highest (the code's key set)."""
    score = tokens[next(request for request in KEY_SCORE.options if request in tokens)].float()
    score = score.reshape(-1, score.shape[-1]).mean(dim=0)
    key = torch.zeros(len(tokens), dtype=torch.bool, device=score.device)
    key[top_k_in_order(score, min(count, len(tokens)))] = True
    return key
