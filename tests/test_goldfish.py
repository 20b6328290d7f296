"""goldfish: the clips most relevant to the question kept whole, then frames, then tokens, to exactly keep."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS
from test_quota import QUESTION
from tiny_qwen2_vl import QWEN2_VL_VIDEO
from tokensieve.sieve import VisualTokens


def video(relevant: list[list[int]], question: torch.Tensor = QUESTION) -> VisualTokens:
    """Frames of 2x2 tokens in 2-D: the tokens listed for frame f lie along x (cosine 1 to the question), the others
    along y (cosine 0)."""
    t = len(relevant)
    features = torch.zeros(t * 4, 2)
    features[:, 1] = 1
    for frame, places in enumerate(relevant):
        features[[frame * 4 + place for place in places]] = torch.tensor([1.0, 0.0])
    return VisualTokens(features, (1, t * 4), {"text_embeddings": question},
                        blocks=tuple(torch.arange(t * 4).view(t, 2, 2)), frames=(t, 2, 2))


# six frames, relevance 0, 1/4, 1, 1/4, 3/4, 3/4; clips of two frames: 1/8, 5/8, 3/4, so clip 2 (frames 4, 5) first,
# then clip 1, in it frame 2 (1) before frame 3 (1/4, its one relevant token the last, 15)
FRAMES = [[], [0], [0, 1, 2, 3], [3], [0, 1, 2], [1, 2, 3]]


@pytest.mark.parametrize("keep, kept", [
    (8, list(range(16, 24))),                       # the best clip whole
    (12, list(range(8, 12)) + list(range(16, 24))),  # and the next clip's most relevant frame whole
    (13, list(range(8, 12)) + [15] + list(range(16, 24))),  # and its other frame's most relevant token
    (2, [16, 17]),                                  # a budget inside the best clip: its best frame (4, tied with 5),
])                                                  # its most relevant tokens (0, 1, 2 tie: the first two)
def test_the_best_clips_are_kept_whole_then_frames_then_tokens(keep, kept):
    assert ts.load("goldfish", keep=keep, clip_frames=2).select(video(FRAMES)).kept.tolist() == kept


def test_the_question_decides_which_clip_is_kept():
    # asked along y, the clips rank 7/8, 3/8, 1/4: clip 0 (frames 0, 1) first
    kept = ts.load("goldfish", keep=8, clip_frames=2).select(video(FRAMES, torch.tensor([[0.0, 1.0]]))).kept
    assert kept.tolist() == list(range(8))


def test_a_shorter_last_clip_is_ranked_by_its_own_frames():
    # clips of four frames: 0-3 (mean 3/8) and 4-5 (3/4): the short last clip first
    kept = ts.load("goldfish", keep=8, clip_frames=4).select(video(FRAMES)).kept
    assert kept.tolist() == list(range(16, 24))


def test_on_a_tiny_qwen2_vl_video_one_clip_is_kept_whole():
    model = build_model(QWEN2_VL_VIDEO)
    with ts.apply(model, ts.load("goldfish", keep=32, clip_frames=2)) as run:  # four frames of 4x4: two clips
        model(**QWEN2_VL_VIDEO.make_inputs(TEXTS))
    for record in run.stats.images:
        assert record.frame_counts.tolist() in ([16, 16, 0, 0], [0, 0, 16, 16])


@pytest.mark.parametrize("argument", [dict(clip_frames=0), dict(clip_frames=2.0), dict(clip_frames=False)])
def test_refuses_bad_arguments(argument):
    with pytest.raises(ValueError, match="clip_frames=.*pass"):
        ts.load("goldfish", **argument)


def test_refuses_a_still_image():
    image = VisualTokens(torch.randn(16, 2), (4, 4), {"text_embeddings": QUESTION})
    with pytest.raises(ValueError, match="goldfish acts on videos.*still image"):
        ts.load("goldfish").select(image)


def test_refuses_a_prompt_without_text():
    with pytest.raises(ValueError, match="goldfish ranks a video's frames by their relevance to the question.*no text"):
        ts.load("goldfish", keep=8).select(video(FRAMES, torch.zeros(0, 2)))
