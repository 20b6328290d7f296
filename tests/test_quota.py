"""quota: each frame's budget in proportion to its squared, min-max normalised relevance to the question."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS
from tiny_qwen2_vl import QWEN2_VL_VIDEO
from tokensieve.methods.quota import frame_shares
from tokensieve.sieve import VisualTokens

QUESTION = torch.tensor([[1.0, 0.0]])


def video(relevant: list[int], question: torch.Tensor = QUESTION) -> VisualTokens:
    """Frames of 2x2 tokens in 2-D: frame f's first ``relevant[f]`` tokens along x (cosine 1 to the question), the
    others along y (cosine 0), so frame f's relevance is ``relevant[f] / 4``."""
    t = len(relevant)
    features = torch.zeros(t * 4, 2)
    for frame, count in enumerate(relevant):
        features[frame * 4 : frame * 4 + count, 0] = 1
        features[frame * 4 + count : frame * 4 + 4, 1] = 1
    return VisualTokens(features, (1, t * 4), {"text_embeddings": question},
                        blocks=tuple(torch.arange(t * 4).view(t, 2, 2)), frames=(t, 2, 2))


def test_budgets_follow_squared_relevance_and_each_frame_is_merged_to_its_own():
    # relevance 0, 1/4, 1/2, 1 -> p = 0, 1/4, 1/2, 1 -> weights 0, 1, 4, 16 (/21): shares of 8 are 0, 0.38, 1.52, 6.10;
    # frame 3 is capped at its 4 tokens, its 2.10 more go to frames 1 and 2 as 1 : 4 -> 0, 0.8, 3.2, 4; largest
    # remainder: 0, 1, 3, 4. Frame 0 is dropped; frame 1 (x y / y y) merges whole: A = {0, 2} both join B token 1,
    # then 1 joins 3; frame 2 (x x / y y) loses one token: A 0 -> B 1 and A 2 -> B 3 tie at cosine 1, the earlier
    # merges; frame 3 stays whole
    selection = ts.load("quota", keep=8).select(video([0, 1, 2, 4]))
    assert selection.kept.tolist() == [7, 9, 10, 11, 12, 13, 14, 15]
    assert selection.assignment.tolist() == [-1, -1, -1, -1, 0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7]


def test_pooled_each_frame_is_pooled_to_its_own_share():
    # the shares above, 0, 1, 3, 4: frame 1 pools to 1x1 (its mean at token 0 of the frame), frame 2 to 1x2 (its
    # columns' means at its top row; pool's grid of at most 3), frame 3 stays whole: 7 tokens
    tokens = video([0, 1, 2, 4])
    selection = ts.load("quota", keep=8, reduce="pool").select(tokens)
    assert selection.kept.tolist() == [4, 8, 9, 12, 13, 14, 15]
    frames = tokens.features.view(4, 2, 2, 2)
    expected = torch.cat([frames[1].reshape(4, 2).mean(0, keepdim=True), frames[2].mean(0), frames[3].reshape(4, 2)])
    assert torch.allclose(selection.features, expected)


def test_the_question_decides_which_frames_get_the_budget():
    # the same video asked along y: frame 0 (all y) is now the most relevant and frame 3 (all x) gets nothing
    kept = ts.load("quota", keep=8).select(video([0, 1, 2, 4], torch.tensor([[0.0, 1.0]]))).kept
    assert kept.tolist()[:4] == [0, 1, 2, 3] and not (kept >= 12).any()


def test_equally_relevant_frames_are_pool_per_frame():
    tokens = video([2, 2, 2])
    quota, pool = ts.load("quota", keep=6, reduce="pool").select(tokens), ts.load("pool", keep=6).select(tokens)
    assert torch.equal(quota.kept, pool.kept) and torch.allclose(quota.features, pool.features)


@pytest.mark.parametrize("weights, k, cap, shares", [
    ([0, 1, 4, 16], 8, 4, [0, 1, 3, 4]),    # the hand-worked case above
    ([1, 1, 1], 5, 4, [2, 2, 1]),           # 5/3 each: the remainders tie, the earlier frames first
    ([0, 0, 1], 10, 4, [3, 3, 4]),          # the weighted frame full: the weightless ones share the 6 left equally
    ([1, 2, 3], 6, 3, [1, 2, 3]),           # exact
    ([9, 1], 4, 2, [2, 2]),                 # 3.6 capped at 2, its 1.6 to the other frame
])
def test_shares_are_capped_proportional_and_sum_to_the_budget(weights, k, cap, shares):
    assert frame_shares(weights, k, cap) == shares


@pytest.mark.parametrize("seed", range(6))
def test_shares_match_the_proportional_rule_where_no_frame_is_full(seed):
    generator = torch.Generator().manual_seed(seed)
    weights = (torch.rand(7, generator=generator) + 0.1).tolist()
    shares = frame_shares(weights, 20, 100)
    exact = [20 * weight / sum(weights) for weight in weights]
    assert sum(shares) == 20 and all(abs(share - x) < 1 for share, x in zip(shares, exact))


def test_on_a_tiny_qwen2_vl_video_the_budget_follows_the_frames():
    model = build_model(QWEN2_VL_VIDEO)
    with ts.apply(model, ts.load("quota", keep=24)) as run:  # four frames of 4x4
        model(**QWEN2_VL_VIDEO.make_inputs(TEXTS))
    for record in run.stats.images:
        counts = record.frame_counts.tolist()
        assert sum(counts) == 24 and max(counts) <= 16 and len(set(counts)) > 1


@pytest.mark.parametrize("argument", [dict(power=0), dict(power=-1.0), dict(power=True), dict(power=float("inf")),
                                      dict(reduce="bilinear"), dict(reduce=None)])
def test_refuses_bad_arguments(argument):
    with pytest.raises(ValueError, match=f"{next(iter(argument))}=.*pass"):
        ts.load("quota", **argument)


def test_refuses_a_still_image():
    image = VisualTokens(torch.randn(16, 2), (4, 4), {"text_embeddings": QUESTION})
    with pytest.raises(ValueError, match="quota acts on videos.*still image"):
        ts.load("quota").select(image)


def test_refuses_a_prompt_without_text():
    tokens = video([0, 1, 2, 4], torch.zeros(0, 2))
    with pytest.raises(ValueError, match="quota ranks a video's frames by their relevance to the question.*no text"):
        ts.load("quota", keep=8).select(tokens)


@pytest.mark.parametrize("seed", range(8))
def test_shares_fill_the_budget_within_the_caps_and_follow_the_weights(seed):
    generator = torch.Generator().manual_seed(seed)
    t, cap = 9, int(torch.randint(2, 10, (1,), generator=generator))
    weights = (torch.rand(t, generator=generator) * (torch.rand(t, generator=generator) > 0.3)).tolist()  # some zero
    k = int(torch.randint(1, t * cap + 1, (1,), generator=generator))
    shares = frame_shares(weights, k, cap)
    assert sum(shares) == k and max(shares) <= cap
    assert all(shares[i] >= shares[j] for i in range(t) for j in range(t) if weights[i] > weights[j])
