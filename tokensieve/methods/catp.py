"""``catp``: CATP's first stage, each image's tokens chosen for feature diversity and for alignment with the
image's own paired text, for prompts with several images (multimodal in-context learning)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import coverage_greedy
from ..sieve import Selection, Sieve, VisualTokens, total_counts

#: whose text an image is aligned with: its paired text (the paper's), or all the text after it
TEXTS = ("paired", "instruction")


@register
@dataclass
class CATP(Sieve):
    """Keep the ``keep`` tokens of each image that greedily maximise ``F_div(Y) + alignment · F_align(Y)`` (the
    paper's Eq. 5-7), kept indices in raster order:

    - ``F_div(Y) = sum_{x in image} max_{y in Y} s(y, x)``: facility location, how well the kept tokens stand
      for every token of the image;
    - ``F_align(Y) = sum_{y in Y} s(y, v)``: each kept token's alignment with ``v``, the mean of the image's
      paired text's input embeddings;

    with ``s`` the cosine similarity rescaled to [0, 1], ``(cos + 1) / 2``, on the projected tokens (the LLM's
    input space, where the text embeddings are). ``F_div`` is monotone submodular and ``F_align`` modular, so
    the greedy is within ``1 - 1/e`` of the optimum. It is ``selection.coverage_greedy`` on ``S + alignment ·
    diag(a)``, ``S[x, y] = s(y, x)`` with its diagonal set to exactly 1: a kept token covers its own row with
    ``1 + alignment · a`` (every other entry of the row is at most 1) and every other row as ``S`` does, so the
    coverage is ``F`` exactly, at the cost of ``F_div`` alone.

    **The paired text** of an image is the text between it and the next image of its prompt (an in-context
    example's question and answer), or, for the prompt's last image (the query), the text after it. It is read
    from ``text_embeddings``, which gives each image the text after it up to the prompt's end: an image's
    paired text is the rows of its own that the next image of the prompt (``VisualTokens.prompt``, images in
    prompt order as the engine hands them) does not have. An image with no text before the next one (two
    adjacent images), and an image handed to :meth:`select` alone, take their whole ``text_embeddings``; with
    no text at all only ``F_div`` counts. ``text="instruction"``: every image takes its whole
    ``text_embeddings`` (all the text after it, as ``mmtok``); use it where the engine's images are crops of one
    picture (Idefics3/SmolVLM with image splitting give each crop as an image, so a crop's paired text would be
    the row/column marker tokens before the next crop).

    Paper: "CATP: Contextually Adaptive Token Pruning for Efficient and Enhanced Multimodal In-Context
    Learning" (Li et al., AAAI 2026, arXiv 2508.07871), Stage 1 (read in the AAAI proceedings text, Eq. 5-7).
    No official code was found. Defaults: ``alignment=0.7`` (the paper's ``lambda_1``, all models);
    ``keep=0.611``: the paper prunes a ratio ``R`` of all image tokens, ``R/2`` of each image in Stage 1, so at
    its main ``R = 77.8%`` Stage 1 keeps ``1 - R/2 = 0.611`` (the ratio rounds, 576 -> 352; the paper floors, 351).

    Stage 2 is not here. The paper prunes again inside shallow decoder layers (``K = 6``; 10 on 13B): at layer
    K the in-context examples' image tokens are ranked together across images by the rise of the attention
    the prompt's last token pays them from layer K-1 to K plus ``0.6 ×`` their cosine to the mean hidden state
    of the query's tokens (image and text), pruned until the overall ratio ``R`` is reached; at layer K+1 the
    query image keeps the tokens most similar to the mean hidden state of the kept context. An in-LLM stage here gets one attention map (inside
    layer K-1 or at layer K's input, not both), only image tokens' hidden states (not the query text's), and
    each image alone, so that stage would be another method, not CATP's. Chain this stage with any in-LLM
    method (``catp+fastv``) for a two-stage run.

    Differences: the paper's budget is ``⌊S·(1 - R/2)⌋`` per image; here it is any budget: a count or ratio
    per image, ``ts.Budget(total=...)`` over a prompt's images (shared by token count) or
    ``ts.Adaptive(coverage=...)`` (the fewest greedy tokens reaching that share of ``F`` of every token; not in
    the paper). The paper does not say how ``v`` treats template tokens: here the paired text is every text
    token of the segment as the prompt holds it (chat-template tokens included). LLaVA-NeXT/OneVision: one
    budget over each image's crops and newline tokens. Each greedy step costs O(N²), N the image's tokens.
    Greedy ties go to the lower index. Computed in float32.
    """

    name = "catp"
    paper = "CATP (AAAI 2026, arXiv 2508.07871)"
    signals = ("text_embeddings",)
    adaptive_rules = ("coverage",)  # keep=ts.Adaptive(coverage=0.9): the fewest greedy tokens reaching 90% of F(all)

    keep: int | float = 0.611
    alignment: float = 0.7
    text: str = "paired"

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.alignment
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"alignment must be the weight of the paired-text alignment against diversity (the "
                             f"paper's lambda_1 = 0.7), a finite number >= 0, not {value!r}")
        if self.text not in TEXTS:
            raise ValueError(f"text must be one of {TEXTS} (each image's own text up to the next image, the paper's; or "
                             f"all the text after it), not {self.text!r}")

    def objective(self, tokens: VisualTokens, text: torch.Tensor) -> torch.Tensor:
        """(N, N) the coverage ``S + alignment · diag(a)``: ``S[x, y] = s(y, x)`` (diagonal 1) and ``a[y] = s(y, v)``,
        ``v`` the mean of ``text`` (T, d), the image's paired text."""
        unit = F.normalize(tokens.features.float(), dim=-1)
        similar = ((unit @ unit.T + 1) / 2).fill_diagonal_(1.0)
        if len(text):
            mean = F.normalize(text.float().mean(dim=0).to(unit.device), dim=0)
            similar.diagonal().add_((unit @ mean + 1) / 2 * self.alignment)
        return similar

    def select(self, tokens: VisualTokens) -> Selection:
        """One image on its own: its paired text is its whole ``text_embeddings``."""
        return self._select(tokens, tokens["text_embeddings"], self._count(tokens))

    def select_all(self, images: list[VisualTokens]) -> list[Selection]:
        """Every image of the forward, each with its paired text (the rows of its ``text_embeddings`` that the next
        image of its prompt does not have) and its count (under a total budget, its share of its prompt's)."""
        if self.budget.total is not None:
            counts = total_counts(self.budget.total, images, [float(len(tokens)) for tokens in images])
        else:
            counts = [self._count(tokens) for tokens in images]
        texts = paired_texts(images) if self.text == "paired" else [tokens["text_embeddings"] for tokens in images]
        return [self._select(tokens, text, k) for tokens, text, k in zip(images, texts, counts)]

    def _count(self, tokens: VisualTokens):
        return None if self.budget.adaptive == "coverage" else self.budget.resolve(len(tokens))

    def _select(self, tokens: VisualTokens, text: torch.Tensor, k: int | None) -> Selection:
        n = len(tokens)
        if k is None:  # an adaptive coverage budget
            low, k, fraction = self.budget.coverage_steps(n)
        else:
            low, fraction = 1, None
        if k >= n and fraction is None:
            return Selection.every(tokens)
        return Selection(coverage_greedy(self.objective(tokens, text), k, fraction, low).sort().values)


def paired_texts(images: list[VisualTokens]) -> list[torch.Tensor]:
    """Each image's paired text: the first ``T_i - T_next`` rows of its ``text_embeddings`` (``T_i`` rows), the
    next image of the same prompt holding the last ``T_next`` of them; all ``T_i`` rows where that leaves none
    (the prompt's last image, adjacent images, an image alone)."""
    texts = [tokens["text_embeddings"] for tokens in images]
    following: dict = {}
    paired = list(texts)
    for index in reversed(range(len(images))):
        prompt = images[index].prompt
        if prompt is None:
            continue
        after = following.get(prompt)
        if after is not None and len(texts[index]) > len(texts[after]):
            paired[index] = texts[index][: len(texts[index]) - len(texts[after])]
        following[prompt] = index
    return paired
