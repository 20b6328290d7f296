"""``llavolta``: inside the LLM, average-pool runs of consecutive image tokens (LLaVolta's visual context
compressor, used at test time)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..sieve import Selection, Sieve, VisualTokens

DEFAULT_KEEP = 0.125


def pooling_groups(n: int, groups: int, stride: int | None = None) -> torch.Tensor:
    """(n,) the group of each of ``n`` tokens in raster order: ``groups`` runs of consecutive tokens, as even as
    possible (token t in run ``t * groups // n``), or with ``stride`` runs of exactly ``stride`` tokens, the
    ``n % stride`` left over joining the last run."""
    index = torch.arange(n)
    if stride is None:
        return index * groups // n
    return (index // stride).clamp(max=groups - 1)


@register
@dataclass
class LLaVolta(Sieve):
    """At the input of decoder layer ``layer``, replace each run of consecutive image tokens (raster order, 1-D,
    not 2-D blocks) by its mean hidden state; layers ``layer``.. see one token per run. The budget: ``keep``
    runs as even as possible (each run ``N / keep`` tokens when that divides, which is the code's
    ``avg_pool1d`` with kernel = stride = ``N / keep``; the default ``keep=0.125`` is stride 8, 576 -> 72), or,
    with ``stride`` set, runs of exactly ``stride`` tokens, ``N // stride`` of them; ``stride`` fixes the budget,
    so it refuses a ``keep`` other than the default. A merge map (the engine averages each run and records
    the groups); each run is kept as its token ``start + (size - 1) // 2``.

    Paper: "Efficient Large Multi-modal Models via Visual Context Compression" (Chen et al., NeurIPS 2024,
    arXiv 2406.20092); code Beckschen/LLaVolta at 31ec151 (``LlavaLlamaModel.visual_avg_pool1d`` and
    ``visual_operating`` in llava/model/language_model/llava_llama.py; scripts/v1_5/eval/*_compression).
    LLaVolta is a training scheme: the model is trained with the compressor at stages of decreasing strength
    (layers 2, 2, 16, stride 8, 2, 2) and its final stage, like the released LLaVolta model, runs
    uncompressed. This is the compressor alone at test time, on a model not trained with it (the paper's
    training-free probe: removing up to 70% of the image tokens this way costs about 3% on GQA). Defaults:
    its "heavy compression" setting, ``layer=2`` with stride 8 (``keep=0.125``); "light compression" is
    ``layer=16`` (the code pools before the 0-based layer ``groupingLayer``, the same count as ``layer``).

    Positions: the code does not re-pack; it keeps the text's position ids and gives each pooled token the
    mean of its run's positions, cast down to an integer. For a run of consecutive positions p..p+s-1 that is
    p + (s - 1) // 2, the position of the token kept here, which keeps its original position (tokensieve's
    default): the same positions for every run whose tokens were consecutive in the prompt (in a chain, after
    an earlier stage dropped tokens, the kept token's position, not the mean). Other differences: the code
    pools exactly 576 tokens (``VISUAL_LENGTH``) of each image and drops the ``N % s`` left over by
    ``avg_pool1d``, here any count and the leftovers join the last run; the mean is taken in float32 (the
    code: in the model's dtype); the code's 1-D pool of the projector output (``layer=-1``) is not offered
    (``pool`` is a 2-D pool there).
    """

    name = "llavolta"
    paper = "LLaVolta (arXiv 2406.20092)"
    stage = "in_llm"
    signals = ()

    keep: int | float = DEFAULT_KEEP
    layer: int = 2
    stride: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer={self.layer!r}: pass the decoder layer to pool before, an int >= 1 (LLaVolta's heavy 2, light 16)")
        if self.stride is not None:
            if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
                raise ValueError(f"stride={self.stride!r}: pass the tokens per pooled run, an int >= 1 (LLaVolta's 8), or None to pool to keep")
            if self.keep != DEFAULT_KEEP:
                raise ValueError(f"llavolta got keep={self.keep} and stride={self.stride}: the stride sets the budget (N // stride); "
                                 f"pass one of them")

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        k = max(1, n // self.stride) if self.stride is not None else self.budget.resolve(n)
        device = tokens.features.device
        if k >= n:
            return Selection.every(tokens)
        groups = pooling_groups(n, k, self.stride)
        sizes = torch.bincount(groups, minlength=k)
        kept = sizes.cumsum(0) - sizes + (sizes - 1) // 2
        return Selection(kept.to(device), assignment=groups.to(device))
