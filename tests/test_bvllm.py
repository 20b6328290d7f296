"""bvllm: B-VLLM's training-free parts: frames chosen by relevance to the question, near-duplicate frames merged,
each frame ToMe-merged to its share of the budget."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS
from tiny_qwen2_vl import QWEN2_VL_VIDEO
from tokensieve.sieve import VisualTokens

QUESTION = torch.tensor([[0.0, 0.0, 1.0, 0.0]])  # one instruction token along the third channel

# five frames of 2×2 places (token index = 4 * frame + place); relevance = cosine of the frame's mean token to QUESTION
FRAMES = torch.tensor([
    [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]],  # 0: mean (.5, .5, 0, 0), relevance 0
    [[2, 0, 1, 0], [0, 2, 1, 0], [0, 2, 1, 0], [2, 0, 1, 0]],  # 1: mean (1, 1, 1, 0), relevance 0.577
    [[2, 0, 1, 0], [0, 2, 1, 0], [0, 2, 1, 0], [2, 0, 1, 1]],  # 2: frame 1 but place 3; relevance 0.571
    [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1]],  # 3: relevance 0
    [[0, 0, 1, 2], [0, 0, 1, 2], [0, 0, 1, 2], [0, 0, 1, 2]],  # 4: relevance 0.447
], dtype=torch.float32)
# whole-frame similarity (cos + 1) / 2 of the flattened frames: 1 to 2 is 0.988 (> 0.75, merges); 1 to 4 is 0.6 and
# 2 to 4 is 0.646 (stay apart)


def a_video(question: torch.Tensor = QUESTION) -> VisualTokens:
    return VisualTokens(FRAMES.reshape(20, 4), (1, 20), signals={"text_embeddings": question}, frames=(5, 2, 2))


def test_chooses_relevant_frames_merges_the_repeat_and_merges_each_frame_to_its_share():
    video = a_video()
    selection = ts.load("bvllm", keep=3, frames=3).select(video)
    # chosen: frames 1, 2, 4; frame 2 merges into frame 1; shares of 3 over frames 1 and 4: 2 and 1. Frame 1 (with
    # frame 2 averaged in) by ToMe, A = places 0, 2, B = places 1, 3: place 0 joins place 3 (cos 0.976), place 2
    # joins place 1 (cos 1); frame 4 in two rounds to its place 3
    assert selection.kept.tolist() == [5, 7, 19]
    assert selection.assignment.tolist() == [-1] * 4 + [1, 0, 0, 1] * 2 + [-1] * 4 + [2] * 4
    means = selection.group_means(video.features)
    assert torch.allclose(means, torch.tensor([[0, 2, 1, 0], [2, 0, 1, 0.25], [0, 0, 1, 2]]))


def test_a_threshold_above_the_repeat_keeps_it_apart():
    selection = ts.load("bvllm", keep=3, frames=3, threshold=0.99).select(a_video())
    assert selection.kept.tolist() == [7, 11, 19]  # three frames, one token each, at their last B place
    assert selection.assignment.tolist() == [-1] * 4 + [0] * 4 + [1] * 4 + [-1] * 4 + [2] * 4


def test_the_frame_choice_follows_the_question():
    # asked along the fourth channel, frames 3 (mean (0, 0, 0, 1)) and 4 (mean (0, 0, 1, 2)) are the most relevant;
    # kept apart (their whole-frame similarity is 0.947), one token each
    question = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    selection = ts.load("bvllm", keep=2, frames=2, threshold=0.99).select(a_video(question))
    assert selection.kept.tolist() == [15, 19]
    assert (selection.assignment.view(5, 4)[:3] == -1).all()


def test_one_round_of_bipartite_matching_ties_go_to_the_earlier_a_token():
    # frame 1 alone: four tokens to three, one merge; places 0 and 2 both match a B token at cosine 1
    selection = ts.load("bvllm", keep=3, frames=1).select(a_video())
    assert selection.kept.tolist() == [5, 6, 7]
    assert selection.assignment.view(5, 4)[1].tolist() == [2, 0, 1, 2]


def test_keep_is_a_ceiling_and_a_budget_over_the_video_keeps_every_token():
    selection = ts.load("bvllm", keep=6, frames=1).select(a_video())  # frame 1 has only four tokens
    assert selection.kept.tolist() == [4, 5, 6, 7]
    assert selection.assignment.view(5, 4)[1].tolist() == [0, 1, 2, 3]
    every = ts.load("bvllm", keep=1.0).select(a_video())
    assert every.kept.tolist() == list(range(20)) and every.assignment is None


def test_refuses_a_prompt_without_a_question():
    with pytest.raises(ValueError, match="bvllm chooses frames by their relevance to the question.*no text"):
        ts.load("bvllm", keep=3).select(a_video(torch.zeros(0, 4)))


def test_refuses_a_still_image():
    image = VisualTokens(torch.randn(16, 4), (4, 4), signals={"text_embeddings": QUESTION})
    with pytest.raises(ValueError, match="bvllm acts on videos.*still image"):
        ts.load("bvllm").select(image)


@pytest.mark.parametrize("arguments, message", [
    ({"frames": 0}, "frames=0: pass how many frames"),
    ({"frames": True}, "frames=True"),
    ({"frames": 2.0}, "frames=2.0"),
    ({"threshold": 1.5}, "threshold must be"),
    ({"threshold": "high"}, "threshold must be"),
])
def test_bad_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        ts.load("bvllm", **arguments)


@pytest.mark.parametrize("ppe", [None, 8])  # merged tokens may carry their members' positions (a merge map)
def test_on_a_tiny_qwen2_vl_video_at_most_the_chosen_frames_keep_tokens(ppe):
    model = build_model(QWEN2_VL_VIDEO)
    with ts.apply(model, ts.load("bvllm", keep=0.25, frames=2), ppe=ppe) as run:  # four frames of 16: 16 over two
        model(**QWEN2_VL_VIDEO.make_inputs(TEXTS))
    for record in run.stats.images:
        assert len(record.kept_frames) <= 2
        assert int(record.frame_counts.sum()) == 16


def code_temporal_merge(frames: torch.Tensor, threshold: float) -> torch.Tensor:
    """The frames zhuqiangLu/B-VLLM's ``merge_temporal`` leaves (merge.py ``threshold_soft_matching`` at 51ccbf0, as
    read), written as plain loops: each frame's best earlier frame by ``(cos + 1) / 2`` of the flattened frames; a
    frame above the threshold goes into it; each frame that did not go is the mean of itself and the frames that went
    into it."""
    flat = frames.flatten(1)
    t = len(flat)
    target = [None] * t
    for i in range(1, t):
        scores = [(torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0) + 1) / 2 for j in range(i)]
        best = max(range(i), key=lambda j: scores[j])
        if scores[best] > threshold:
            target[i] = best
    return torch.stack([torch.stack([frames[i]] + [frames[j] for j in range(t) if target[j] == i]).mean(0)
                        for i in range(t) if target[i] is None])


def test_repeated_frames_merge_as_the_code_merges_them():
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(6, 4, 8, generator=generator)
    frames[2] = frames[0] + 0.1 * torch.randn(4, 8, generator=generator)  # two repeats, no chain
    frames[5] = frames[3] + 0.1 * torch.randn(4, 8, generator=generator)
    question = torch.randn(3, 8, generator=generator)
    video = VisualTokens(frames.reshape(24, 8), (1, 24), signals={"text_embeddings": question}, frames=(6, 2, 2))
    expected = code_temporal_merge(frames, 0.75)
    assert len(expected) == 4
    selection = ts.load("bvllm", keep=16, frames=6).select(video)  # every chosen frame's share is its four tokens
    assert selection.kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15, 16, 17, 18, 19]
    assert torch.allclose(selection.group_means(video.features).view(4, 4, 8), expected)
