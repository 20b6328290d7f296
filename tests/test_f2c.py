"""f2c: anchors at the most relevant local maxima of k-means groups over time, widened to clips, pooled to the budget."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS
from test_quota import QUESTION, video
from tiny_qwen2_vl import QWEN2_VL_VIDEO
from tokensieve.methods.f2c import kmeans_1d
from tokensieve.sieve import VisualTokens

# six frames of 2x2 with relevance 1/4, 3/4, 0, 1/2, 1, 1/4: local maxima at frames 1 and 4
RELEVANT = [1, 3, 0, 2, 4, 1]


def test_one_anchor_widened_to_a_clip_and_pooled_to_the_budget():
    # one k-means group {1, 4}: its most relevant frame, 4, is the anchor; its clip of 3 is frames 3, 4, 5; the 6 tokens
    # are shared 2, 2, 2, so each frame pools to 1x2, its columns' means at its top row
    tokens = video(RELEVANT)
    selection = ts.load("f2c", keep=6, anchors=1, clip_frames=3).select(tokens)
    assert selection.kept.tolist() == [12, 13, 16, 17, 20, 21]
    frames = tokens.features.view(6, 2, 2, 2)
    assert torch.allclose(selection.features, torch.cat([frames[f].mean(0) for f in (3, 4, 5)]))


def test_more_anchors_spread_the_clips_and_lower_the_resolution():
    # two groups, {1} and {4}: clips 0-2 and 3-5, every frame at 1 token (its mean at its first token)
    selection = ts.load("f2c", keep=6, anchors=2, clip_frames=3).select(video(RELEVANT))
    assert selection.kept.tolist() == [0, 4, 8, 12, 16, 20]


def test_a_clip_at_the_end_is_shifted_inside_the_video_and_a_large_share_keeps_frames_whole():
    # anchor 4, clip of 4 frames: 3..6 does not fit six frames, so 2..5; 16 tokens are 4 a frame: whole frames
    selection = ts.load("f2c", keep=16, anchors=1, clip_frames=4).select(video(RELEVANT))
    assert selection.kept.tolist() == list(range(8, 24))


def test_the_question_moves_the_anchor():
    # asked along y, relevance is 3/4, 1/4, 1, 1/2, 0, 3/4: local maxima 0, 2, 5; one group, anchor 2, clip 1..3
    kept = ts.load("f2c", keep=12, anchors=1, clip_frames=3).select(video(RELEVANT, torch.tensor([[0.0, 1.0]]))).kept
    assert kept.tolist() == list(range(4, 16))


@pytest.mark.parametrize("points, groups, expected", [
    ([0, 1, 2, 10, 11, 30], 3, [[0, 1, 2], [10, 11], [30]]),
    ([0, 1, 2, 3, 4, 5, 6, 7], 2, [[0, 1, 2, 3, 4], [5, 6, 7]]),  # 4 is as near to 2 as to 6: the earlier centre
    ([3, 9], 4, [[3], [9]]),                                         # no more points than groups
    ([0, 1, 20, 21, 22, 23], 2, [[0, 1], [20, 21, 22, 23]]),        # centres start at 1 and 22
])
def test_kmeans_groups_the_frame_indices(points, groups, expected):
    assert kmeans_1d(points, groups) == expected


def test_on_a_tiny_qwen2_vl_video_the_clip_frames_share_the_budget():
    model = build_model(QWEN2_VL_VIDEO)
    with ts.apply(model, ts.load("f2c", keep=16, anchors=1, clip_frames=2)) as run:  # four frames of 4x4
        model(**QWEN2_VL_VIDEO.make_inputs(TEXTS))
    for record in run.stats.images:
        counts = record.frame_counts.tolist()
        kept = [frame for frame, count in enumerate(counts) if count]
        assert len(kept) == 2 and kept[1] == kept[0] + 1 and counts[kept[0]] == counts[kept[1]] == 6  # 8 each: pool's 2x3


@pytest.mark.parametrize("argument", [dict(anchors=0), dict(anchors=2.0), dict(clip_frames=0), dict(clip_frames=True)])
def test_refuses_bad_arguments(argument):
    with pytest.raises(ValueError, match=f"{next(iter(argument))}=.*pass"):
        ts.load("f2c", **argument)


def test_refuses_a_still_image():
    image = VisualTokens(torch.randn(16, 2), (4, 4), {"text_embeddings": QUESTION})
    with pytest.raises(ValueError, match="f2c acts on videos.*still image"):
        ts.load("f2c").select(image)


def test_refuses_a_prompt_without_text():
    with pytest.raises(ValueError, match="f2c ranks a video's frames by their relevance to the question.*no text"):
        ts.load("f2c", keep=6).select(video(RELEVANT, torch.zeros(0, 2)))
