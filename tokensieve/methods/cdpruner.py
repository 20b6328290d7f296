"""``cdpruner``: a conditional determinantal point process over the projected tokens, weighted by their
relevance to the instruction."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import dpp_map
from ..sieve import Selection, Sieve, VisualTokens, check_fraction


@register
@dataclass
class CDPruner(Sieve):
    """Keep the ``keep`` tokens that greedily maximise the determinant of the conditional DPP kernel
    ``L = diag(q) S diag(q)``: ``S`` the cosine similarity of the projected tokens, ``q_i`` token i's
    relevance to the instruction. Relevance is the negated mean cosine similarity of the token to the
    instruction's tokens (``text_embeddings``: the LLM's own input embeddings of the prompt's text after
    the image, see docs/methods.md), min-max normalised over the image's tokens, then sharpened to
    ``exp(theta / (2 (1 - theta)) * r)`` (``theta=1``: ``r`` itself). Fast greedy MAP inference
    (``selection.dpp_map``), then the kept indices in raster order.

    Paper: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs"
    (Zhang et al., NeurIPS 2025, arXiv 2506.10967); code Theia-4869/CDPruner (``encode_images`` in
    llava/model/llava_arch.py). Defaults: ``theta=0.5`` (the value the official code's theta block names
    and OpenVINO GenAI's ``build_conditional_kernel_matrix`` defaults to; the released code leaves that
    block commented out, so its kernel uses ``r`` itself, which is ``theta=1`` here); ``keep=64`` (the
    code's budgets are 64/128/192). The relevance sign (negated similarity) and the min-max normalisation are
    the code's.

    Differences: the official code scores relevance in CLIP's joint space (the tower's projected patch
    embeddings against the CLIP text encoder's embedding of the question), which HF models do not carry;
    this follows OpenVINO GenAI's port (openvino_contrib genai_opt/visual_token_pruning.py), which scores
    the projected image tokens against the LLM's own input embeddings of the text, with the similarity
    on the projected tokens as the official code does (OpenVINO uses the pre-projector features there).
    The instruction is the prompt's text after the image (OpenVINO: every text token of the prompt). With
    no text tokens every relevance is equal and the selection is a plain DPP over similarity. Greedy ties
    go to the lower index; a gain that reaches zero (rank below the budget) is floored, not divided by.
    """

    name = "cdpruner"
    paper = "CDPruner (arXiv 2506.10967)"
    signals = ("text_embeddings",)

    theta: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("theta", self.theta, "the weight of relevance against diversity")

    def relevance(self, tokens: VisualTokens) -> torch.Tensor:
        """(N,) each token's weight ``q_i`` in the kernel."""
        unit = F.normalize(tokens.features.float(), dim=-1)
        text = tokens["text_embeddings"]
        if len(text) == 0:
            return unit.new_ones(len(unit))
        relevance = -(unit @ F.normalize(text.float(), dim=-1).T).mean(dim=1)
        relevance = (relevance - relevance.min()) / (relevance.max() - relevance.min() + 1e-6)
        if self.theta == 1:
            return relevance
        return torch.exp(self.theta / (2 * (1 - self.theta)) * relevance)

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        k = self.budget.resolve(n)
        if k >= n:
            return Selection.every(tokens)
        unit = F.normalize(tokens.features.float(), dim=-1)
        relevance = self.relevance(tokens)
        kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
        return Selection(dpp_map(kernel, k).sort().values)
