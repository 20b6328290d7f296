"""The relevance of a video's tokens and frames to the question, from the model's own embeddings: the signal the
question-guided video methods (``quota``, ``f2c``, ``goldfish``) rank frames and clips by."""

from __future__ import annotations

from .._lazy import F, torch
from ..sieve import VisualTokens


def token_relevance(tokens: VisualTokens, method: str) -> torch.Tensor:
    """(N,) each projected token's mean cosine similarity to the instruction's input embeddings (``text_embeddings``:
    the prompt's text after the video), the relevance ``cdpruner``, ``recoverable`` and ``ppllava`` use. A prompt
    without text tokens is refused, naming ``method``: these methods have no question to rank by."""
    text = tokens["text_embeddings"]
    if len(text) == 0:
        raise ValueError(f"{method} ranks a video's frames by their relevance to the question, and this prompt has no "
                         f"text tokens: put the question in the prompt (after the video), or use a method that needs "
                         f"no question (e.g. uniform_frames, vidcom2)")
    unit = F.normalize(tokens.features.float(), dim=-1)
    return (unit @ F.normalize(text.float().to(unit.device), dim=-1).T).mean(dim=1)


def frame_relevance(tokens: VisualTokens, method: str) -> torch.Tensor:
    """(t,) each frame's relevance to the question: the mean of its tokens' :func:`token_relevance` (a still image is
    refused first, naming ``method``)."""
    t, h, w = tokens.video(method)
    return token_relevance(tokens, method).view(t, h * w).mean(dim=1)
