"""``prunevid_llm``: PruneVid's question-guided pruning inside the LLM: keep the image tokens the question attends to
most, by the largest attention of any question token in any head."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..sieve import ScoringSieve, VisualTokens
from ..signals import Signal

#: every instruction token's row of every head, apart
QUESTION = Signal("llm_attention", queries="instruction", per_query=True)


@register
@dataclass
class PruneVidLLM(ScoringSieve):
    """Before decoder layer ``layer``, score each image token by the largest attention any instruction token pays it in
    layer ``layer - 1``, over every head, and keep the top ``keep``.

    Paper: "PruneVid: Visual Token Pruning for Efficient Video Large Language Models" (Huang et al., ACL 2025 Findings,
    arXiv 2412.16117), its pruning inside the LLM; official code Visual-AI/PruneVid, read at commit b12600c6
    (models/pllava/llama.py, ``LlamaModel.forward``; models/pllava/elastic_cache.py, ``VTPWindowCache``). The code
    takes the attention of the tokens after the video to its tokens at layer ``selected_layer`` (0-based), the max over
    heads and over those queries, and prunes the hidden states after that layer: here ``layer = selected_layer + 1``
    with ``llm_attention(queries="instruction", per_query=True)`` of layer ``layer - 1`` (the instruction: the tokens
    after the image up to the prompt's end).

    Defaults from the code's eval script (scripts/eval.sh, MVBench/VideoMME/EgoSchema): ``selected_layer=10`` so
    ``layer=11`` (of PLLaVA-7B's 32), ``alpha=0.4`` so ``keep=0.4`` (a share of the tokens the image enters with).
    The paper's method is the chain ``prunevid+prunevid_llm``.

    Deviations: (1) the code keeps ``int(alpha * size)`` of each segment's static tokens and of each frame's dynamic
    tokens; a stage here sees no frames or segments, so the top ``keep`` of the whole image are kept. (2) The code's
    attention leaves out the rotary positions and the causal mask (``attn_weights_wo_pos``, a softmax over every
    token); here it is the layer's own attention, normalised over the tokens it sees. (3) The code also cuts the
    dropped tokens from the cache of the layers up to ``selected_layer``, so later tokens never see them; here those
    layers keep them, as for FastV. Ties to the lower index. The rule reads no frames, so it serves images too.
    """

    name = "prunevid_llm"
    paper = "PruneVid (arXiv 2412.16117)"
    stage = "in_llm"
    signals = ("llm_attention",)

    keep: int | float = 0.4
    layer: int = 11

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer={self.layer!r}: pass the decoder layer to prune before, an int >= 1 (the code's "
                             f"selected_layer + 1, 11 on a 32-layer decoder)")

    def requests(self) -> tuple[Signal, ...]:
        return (QUESTION,)

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        return tokens[QUESTION].float().amax(dim=(0, 1))
