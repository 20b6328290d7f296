"""``bvllm``: B-VLLM's training-free parts: the frames most relevant to the question, near-duplicate frames merged,
each frame merged spatially (ToMe) to its share of the budget."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import bipartite_merge, split_budget
from ..sieve import Selection, VideoSieve, VisualTokens, check_fraction


@register
@dataclass
class BVLLM(VideoSieve):
    """Choose the ``frames`` frames most relevant to the question, merge each chosen frame into an earlier chosen frame
    it nearly repeats, and merge each remaining frame's tokens by bipartite soft matching to its share of ``keep``.

    Paper: "B-VLLM: A Vision Large Language Model with Balanced Spatio-Temporal Tokens" (Lu et al., ICCV 2025, arXiv
    2412.09919); official code zhuqiangLu/B-VLLM, read at commit 51ccbf0 (``vlm_attention`` in bvlm/model/bvlm_arch.py,
    ``threshold_soft_matching`` and ``multi_layer_merge`` in bvlm/model/merge.py). B-VLLM is a trained model; this
    keeps the parts that need no weights. Rule, per video of t frames of h×w tokens:

    1. Frame choice: each frame's descriptor is the mean of its projected tokens (the code's ``cls_tokens`` for a
       tower without [CLS]); its relevance is the mean cosine of the descriptor to the instruction's tokens
       (``text_embeddings``: the LLM's own input embeddings of the prompt's text after the video, as ``cdpruner``).
       The ``frames`` most relevant frames are chosen (ties to the earlier frame), kept in temporal order.
    2. Temporal merging, ``threshold_soft_matching``: chosen frames compare as whole frames (their tokens flattened,
       the tensor the code merges), similarity ``(cos + 1) / 2``, each with the earlier chosen frames only (the
       code's lower triangle); a frame whose best earlier match exceeds ``threshold`` merges into it, token by token
       at the same place (a merge map: each place's group mean, every frame at weight 1 as the code's adjacency mean).
    3. Spatial merging, ``multi_layer_merge``: ``keep`` is split evenly over the frames left (remainders to the
       earlier ones, so a budget below one token per frame drops the later frames; the code gives each
       ``max(1, 576 / T')``), and each frame's tokens (after step 2) are merged by ToMe's bipartite soft matching,
       repeated, to its share (``selection.bipartite_merge``); a merged token stands at its B token's place and
       carries its group's mean. Frames not chosen are dropped. (In the code the 16 temporal
       queries leave at most 16 frames, whose target, at least 36, exceeds the spatial Q-Former's 32 tokens, so its
       merge does not act by default; here each frame holds the model's own h×w tokens and the merge brings them to
       ``keep``.)

    ``keep`` is a ceiling: when the frames left hold fewer tokens, all of them stay. Defaults: ``frames=16`` (the
    code's 16 temporal queries, ``vlm_att_query_temporal[:, :16]``), ``threshold=0.75`` (``merge_temporal``'s);
    ``keep=0.25`` is ours (the code's budget is 576 tokens per video).

    Left out (trained in B-VLLM): the temporal Q-Former (16 learned queries reading the question through BERT and
    attending to the frame descriptors) and its projector, replaced here by the relevance of step 1; the Gumbel-softmax
    (tau 0.5) soft frame choice, replaced by a deterministic top-``frames`` choice; the spatial Q-Former (32 learned
    queries per frame reading the question) and its key, value and output projectors, so the tokens here are the
    model's own projected tokens, not Q-Former outputs. Deviations: the code merges the selector vectors' soft frame
    choices, which here are one-hot (distinct frames never match), so step 2 compares the frames' own tokens; a frame
    whose match had itself merged joins that frame's group (the code drops its features); ToMe's rounds keep the
    tokens in place order (the code reorders unmerged A tokens before the B tokens between rounds). Needs the
    question: a prompt without text is refused. Videos only (``needs_video``).
    """

    name = "bvllm"
    paper = "B-VLLM (arXiv 2412.09919)"
    signals = ("text_embeddings",)

    keep: int | float = 0.25
    frames: int = 16
    threshold: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise ValueError(f"frames={self.frames!r}: pass how many frames to choose by their relevance to the "
                             f"question, an int >= 1 (the code's 16 temporal queries: 16)")
        check_fraction("threshold", self.threshold,
                       "the (cos + 1) / 2 similarity above which a chosen frame merges into an earlier one (1: never)")

    def select_video(self, tokens: VisualTokens, k: int) -> Selection:
        t, h, w = tokens.frames
        per_frame = h * w
        text = tokens["text_embeddings"]
        if len(text) == 0:
            raise ValueError("bvllm chooses frames by their relevance to the question, and this prompt has no text: "
                             "put the question in the prompt, or use a video method that needs none (e.g. evs)")
        frames = tokens.features.float().view(t, per_frame, -1)
        chosen = self._choose(frames, text)
        roots = self._roots(frames[chosen])
        return self._merge_spatially(frames, chosen, roots, k)

    def _choose(self, frames: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Ascending indices of the ``frames`` frames whose mean token is most like the instruction's tokens."""
        descriptors = F.normalize(frames.mean(dim=1), dim=-1)
        relevance = (descriptors @ F.normalize(text.float().to(frames.device), dim=-1).T).mean(dim=1)
        return torch.sort(relevance, descending=True, stable=True).indices[: self.frames].sort().values

    def _roots(self, chosen_frames: torch.Tensor) -> list[int]:
        """For each chosen frame, the chosen frame (an index into ``chosen_frames``) its group stands at: itself, or
        the earlier one it merges into (``threshold_soft_matching``), followed to a frame that did not merge."""
        unit = F.normalize(chosen_frames.flatten(1), dim=-1)
        similarity = (unit @ unit.T + 1) / 2
        earlier = torch.ones_like(similarity, dtype=torch.bool).tril(diagonal=-1)
        best, match = similarity.masked_fill(~earlier, -1.0).max(dim=1)
        merges = (best > self.threshold).tolist()
        roots: list[int] = []
        for frame, (merged, target) in enumerate(zip(merges, match.tolist())):  # a loop over frames, not tokens
            roots.append(roots[target] if merged else frame)
        return roots

    def _merge_spatially(self, frames: torch.Tensor, chosen: torch.Tensor, roots: list[int], k: int) -> Selection:
        """The merge map: each remaining frame's tokens ToMe-merged to its share of ``k``, every frame merged into it
        following it token by token, the frames not chosen dropped."""
        t, per_frame = frames.shape[:2]
        device = frames.device
        standing = sorted(set(roots))
        shares = split_budget([per_frame] * len(standing), k)
        kept, assignment, slots = [], torch.full((t, per_frame), -1, dtype=torch.long, device=device), 0
        for root, share in zip(standing, shares):
            if share == 0:
                continue
            members = chosen[[i for i, r in enumerate(roots) if r == root]]
            merged = frames[members].mean(dim=0)  # the temporal group's mean at each place
            if share >= per_frame:
                places, groups = torch.arange(per_frame, device=device), torch.arange(per_frame, device=device)
            else:
                merge = bipartite_merge(merged, merged, share)
                places, groups = merge.kept, merge.assignment
            kept.append(chosen[root] * per_frame + places)
            assignment[members] = slots + groups
            slots += len(places)
        return Selection(torch.cat(kept), assignment=assignment.flatten())
