"""``vidcom2``: VidCom2, frame uniqueness sets per-frame budgets, then each frame keeps its most distinctive tokens."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..sieve import Selection, Sieve, VisualTokens

#: the reference's Gaussian bandwidths, its share of lowest-variance channels, and its softmax temperature
BANDWIDTHS = (0.125, 0.25, 0.5, 1.0, 2.0)
LOW_VARIANCE_SHARE = 0.5
TEMPERATURE = 0.01


@register
@dataclass
class VidCom2(Sieve):
    """Frames that stand out from the video get more tokens; within a frame, the tokens least like the video and the
    frame are kept.

    Paper: "Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large Language Models" (Liu et
    al., EMNLP 2025, arXiv 2505.14454); official code xuyang-liu16/VidCom2. Rule as vLLM runs it
    (vllm/multimodal/video_prune/vidcom2.py, read at commit 0f17ee06): on the half of the channels with the lowest
    variance over the video's tokens, L2-normalised, each token scores its similarity to the video's mean and to its
    frame's mean (each a sum of Gaussian kernels of bandwidths 2^-3..2^1 of the squared distance). A frame's share is
    ``r * (1 + p - mean(p))`` capped at 1, with ``r = keep / N`` and ``p`` the softmax (temperature 0.01) of minus its
    tokens' mean video similarity; it keeps ``round(share * tokens_per_frame)`` tokens (at least one) of lowest
    similarity, and the total is then brought to ``max(t, keep)`` by dropping the most similar kept tokens or adding
    the least similar dropped ones.

    Default ``keep=0.25``. Deviations: vLLM's pruning rate ``q`` is ``1 - keep / N`` here (pass the count
    ``int(N * (1 - q))`` to match it exactly); ties go to the lower index (vLLM's unsorted top-k leaves them open).
    Videos only: an image is refused (``needs_video``).
    """

    name = "vidcom2"
    paper = "VidCom2 (arXiv 2505.14454)"
    needs_video = True

    keep: int | float = 0.25

    def select(self, tokens: VisualTokens) -> Selection:
        t, h, w = tokens.video(self.name)
        per_frame, n = h * w, len(tokens)
        k = self.budget.resolve(n)
        similarity, frame_scores = self._similarities(tokens.features.float(), t, per_frame)
        counts = self._frame_counts(frame_scores, k / n, per_frame)
        kept = torch.zeros(t, per_frame, dtype=torch.bool, device=similarity.device)
        for frame, count in enumerate(counts.tolist()):
            kept[frame, _lowest(similarity[frame], count)] = True
        return Selection(_reconcile(kept.flatten(), similarity.flatten(), max(t, k)).nonzero().squeeze(1))

    @staticmethod
    def _similarities(features: torch.Tensor, t: int, per_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, per_frame) each token's similarity to the video and its frame, and (t,) each frame's uniqueness."""
        channels = max(1, int(features.shape[-1] * LOW_VARIANCE_SHARE))
        quiet = features.var(dim=0, unbiased=False).topk(channels, largest=False).indices
        frames = torch.nn.functional.normalize(features[:, quiet].view(t, per_frame, channels), dim=-1)
        to_video = _kernel(frames, frames.mean(dim=(0, 1), keepdim=True))
        to_frame = _kernel(frames, frames.mean(dim=1, keepdim=True))
        return to_video + to_frame, -to_video.mean(dim=-1)

    @staticmethod
    def _frame_counts(uniqueness: torch.Tensor, ratio: float, per_frame: int) -> torch.Tensor:
        """Each frame's token count: the ratio, raised for frames more unique than the average."""
        weights = torch.softmax((uniqueness - uniqueness.max()) / TEMPERATURE, dim=0)
        shares = (ratio * (1 + weights - weights.mean())).clamp(max=1.0)
        return (shares * per_frame).round().long().clamp(min=1, max=per_frame)


def _kernel(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Sum over the bandwidths of exp(-|x - center|^2 / (2 a)): (t, n, c) -> (t, n)."""
    distance = ((x - center) ** 2).sum(dim=-1)
    return sum(torch.exp(-distance / (2.0 * a)) for a in BANDWIDTHS)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` lowest scores, ties to the lower index."""
    return torch.argsort(scores, stable=True)[:k]


def _reconcile(kept: torch.Tensor, similarity: torch.Tensor, target: int) -> torch.Tensor:
    """``kept`` brought to ``target`` tokens: drop the most similar kept ones, or add the least similar dropped ones."""
    surplus = int(kept.sum()) - target
    if surplus > 0:
        members = kept.nonzero().squeeze(1)
        kept[members[_lowest(-similarity[members], surplus)]] = False
    elif surplus < 0:
        others = (~kept).nonzero().squeeze(1)
        kept[others[_lowest(similarity[others], -surplus)]] = True
    return kept
