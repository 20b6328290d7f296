"""temporal_merge: runs of similar tokens at one place of consecutive frames merge into their first frame's slot."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS
from tiny_qwen2_vl import QWEN2_VL_VIDEO
from tokensieve.sieve import VisualTokens


def a_video() -> VisualTokens:
    """Three frames of one row of two places (token index = 2 * frame + place). Place 0 never changes (cosine 1, 1);
    place 1 turns a little from frame 0 to 1 (cosine 0.8) and a right angle from 1 to 2 (cosine 0)."""
    features = torch.tensor([
        [1.0, 0.0], [1.0, 0.0],   # frame 0
        [1.0, 0.0], [0.8, 0.6],   # frame 1
        [1.0, 0.0], [-0.6, 0.8],  # frame 2
    ])
    return VisualTokens(features, (1, 6), blocks=tuple(torch.arange(6).view(3, 1, 2)), frames=(3, 1, 2))


@pytest.mark.parametrize("keep, threshold, kept, assignment", [
    (5, 0.5, [0, 1, 3, 4, 5], [0, 1, 0, 2, 3, 4]),  # one merge: the first of the two pairs at cosine 1
    (4, 0.5, [0, 1, 3, 5], [0, 1, 0, 2, 0, 3]),     # both: place 0's three frames are one run at frame 0
    (3, 0.5, [0, 1, 5], [0, 1, 0, 1, 0, 2]),        # then place 1's frames 0 and 1 (cosine 0.8)
    (1, 0.5, [0, 1, 5], [0, 1, 0, 1, 0, 2]),        # keep is a ceiling: the right angle is below the threshold
    (1, 0.9, [0, 1, 3, 5], [0, 1, 0, 2, 0, 3]),     # 0.8 is below 0.9
    (1, -1.0, [0, 1], [0, 1, 0, 1, 0, 1]),          # every pair may merge: one token per place
    (3, None, [0, 1, 5], [0, 1, 0, 1, 0, 2]),       # no threshold: the budget alone, exact
    (2, None, [0, 1], [0, 1, 0, 1, 0, 1]),          # the right angle too
    (1, None, [0, 1], [0, 1, 0, 1, 0, 1]),          # below one frame: one token per place
])
def test_merges_the_most_similar_pairs_into_runs_at_their_first_frame(keep, threshold, kept, assignment):
    selection = ts.load("temporal_merge", keep=keep, threshold=threshold).select(a_video())
    assert selection.kept.tolist() == kept
    assert selection.assignment.tolist() == assignment
    assert selection.features is None and selection.weights is None


def test_a_kept_token_carries_its_run_mean():
    video = a_video()
    selection = ts.load("temporal_merge", keep=3, threshold=0.5).select(video)
    means = selection.group_means(video.features)
    x = video.features
    assert torch.allclose(means, torch.stack([x[[0, 2, 4]].mean(0), x[[1, 3]].mean(0), x[5]]))


def test_a_budget_that_covers_the_video_or_a_single_frame_keeps_every_token():
    video = a_video()
    for keep in (6, 1.0):
        selection = ts.load("temporal_merge", keep=keep, threshold=-1.0).select(video)
        assert selection.kept.tolist() == list(range(6)) and selection.assignment is None
    one_frame = VisualTokens(torch.randn(4, 3), (1, 4), frames=(1, 2, 2))
    assert ts.load("temporal_merge", keep=1, threshold=-1.0).select(one_frame).kept.tolist() == [0, 1, 2, 3]


def test_matches_a_plain_loop_over_the_merges():
    t, h, w, d = 5, 2, 3, 4
    base = torch.randn(h * w, d, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(t, h * w, d, generator=torch.Generator().manual_seed(1))
    frames = base + noise * torch.tensor([0.05, 0.3, 1.0, 0.05, 0.1, 2.0])[:, None]  # places drift at their own speed
    video = VisualTokens(frames.reshape(t * h * w, d), (1, t * h * w), frames=(t, h, w))
    for keep, threshold in ((10, 0.5), (20, 0.9), (3, 0.0), (12, None)):
        selection = ts.load("temporal_merge", keep=keep, threshold=threshold).select(video)
        similarity = torch.nn.functional.cosine_similarity(frames[1:], frames[:-1], dim=-1)
        pairs = sorted(((-float(similarity[f, p]), f + 1, p) for f in range(t - 1) for p in range(h * w)
                        if threshold is None or similarity[f, p] >= threshold))
        joined = {(f, p) for _, f, p in pairs[: t * h * w - keep]}
        expected_kept = [f * h * w + p for f in range(t) for p in range(h * w) if (f, p) not in joined]
        assert selection.kept.tolist() == expected_kept
        for f in range(t):
            for p in range(h * w):
                first = f
                while (first, p) in joined:
                    first -= 1
                assert expected_kept[selection.assignment[f * h * w + p]] == first * h * w + p


def test_on_a_tiny_qwen2_vl_video_merged_tokens_record_their_groups():
    model = build_model(QWEN2_VL_VIDEO)
    with ts.apply(model, ts.load("temporal_merge", keep=0.5)) as run:
        model(**QWEN2_VL_VIDEO.make_inputs(TEXTS))
    for record in run.stats.images:
        assert record.after == record.before // 2
        assert int(record.stages[0].sizes.sum()) == record.before


@pytest.mark.parametrize("threshold", [1.5, -2, "high", True])
def test_refuses_a_threshold_outside_the_cosine_range(threshold):
    with pytest.raises(ValueError, match="threshold=.*a number in \\[-1, 1\\]"):
        ts.load("temporal_merge", threshold=threshold)


def test_refuses_a_still_image():
    with pytest.raises(ValueError, match="temporal_merge acts on videos.*still image"):
        ts.load("temporal_merge").select(VisualTokens(torch.randn(16, 4), (4, 4)))
