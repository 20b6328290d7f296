"""``goldfish``: Goldfish's retrieval, the video's clips most relevant to the question kept whole, the rest dropped."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..sieve import Selection, VideoSieve, VisualTokens
from .question_relevance import token_relevance


@register
@dataclass
class Goldfish(VideoSieve):
    """Split the video into clips of ``clip_frames`` consecutive frames (the last may be shorter), rank the clips by
    their relevance to the question, and keep the best clips whole until the budget is spent.

    Relevance is the model's own: each projected token's mean cosine to the question's input embeddings
    (``text_embeddings``, as ``cdpruner``; methods/question_relevance.py), a frame's the mean of its tokens', a clip's
    the mean of its frames'. Tokens are kept in the order: clips by relevance, within a clip its frames by relevance,
    within a frame its tokens by relevance (ties to the earlier), the first ``keep`` of them. So the best clips are
    kept whole, the next one in its most relevant whole frames, and only the last frame reached is cut, to its tokens
    most relevant to the question: exactly ``keep`` tokens, in raster order.

    Paper: "Goldfish: Vision-Language Understanding of Arbitrarily Long Videos" (Ataallah et al., ECCV 2024, arXiv
    2407.12679); code Vision-CAIR/MiniGPT4-video (``goldfish_lv.py`` at 1248c08, ``index.py`` at 6943d13). The code
    cuts a long video into 90-second clips, has MiniGPT4-Video describe each clip in text (with its subtitles),
    embeds those texts and the question (all-mpnet-base-v2 or OpenAI's text-embedding-3-small), retrieves the
    ``neighbours=3`` clips of highest cosine similarity, and has Llama-2 answer from their descriptions.

    **Replaced**: retrieval by text descriptions becomes retrieval by the clip's own projected tokens against the
    question's input embeddings (no description is generated, no text encoder is run), and the answer is the model's
    own on the retrieved clips' visual tokens (not on their descriptions). The budget ``keep`` decides how many
    clips are kept (the code's fixed 3), and a budget that ends inside a clip keeps that clip's most relevant frames
    and tokens. It acts before the LLM on frames the tower has already encoded (chain a ``frames`` stage first to
    bound the tower's work). Defaults (ours): ``keep=0.25``; ``clip_frames=4`` (the code's 90 s clips would be 90
    Qwen2-VL frames at 2 fps sampling, two input frames a frame: more than most sampled videos have). A prompt
    without text tokens is refused; a still image too (``needs_video``).
    """

    name = "goldfish"
    paper = "Goldfish (arXiv 2407.12679)"
    signals = ("text_embeddings",)

    keep: int | float = 0.25
    clip_frames: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.clip_frames
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"clip_frames={value!r}: pass the frames of each clip, an int >= 1")

    def select_video(self, tokens: VisualTokens, k: int) -> Selection:
        t, h, w = tokens.frames
        per_frame = h * w
        relevance = token_relevance(tokens, self.name).view(t, per_frame)
        frame = relevance.mean(dim=1)
        clip_of = torch.arange(t, device=frame.device) // self.clip_frames
        clips = (t + self.clip_frames - 1) // self.clip_frames
        clip = torch.zeros(clips, device=frame.device).index_add_(0, clip_of, frame) / torch.bincount(clip_of, minlength=clips)
        # one rank per token: clip rank, then frame rank, then token rank within the frame (0 first)
        order = (_ranks(clip)[clip_of] * t + _ranks(frame))[:, None] * per_frame + _ranks(relevance)
        return Selection(torch.sort(order.flatten(), stable=True).indices[:k].sort().values)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each score's place from the highest (0) along the last dimension, ties to the earlier."""
    return torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices.argsort(dim=-1)
