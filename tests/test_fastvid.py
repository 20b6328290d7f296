"""fastvid: DySeg segments, salient tokens by attention, the rest merged into density-peak anchors (FastVID)."""

from __future__ import annotations

import math

import pytest
import torch

import tokensieve as ts
from tokensieve.methods.fastvid import FastVID
from tokensieve.sieve import VisualTokens
from tokensieve.signals import Signal

ATTENTION = Signal("vision_attention", queries="mean")


def a_video(features: torch.Tensor, attention: torch.Tensor, t: int, h: int, w: int) -> VisualTokens:
    return VisualTokens(features, (1, t * h * w), signals={ATTENTION: attention}, frames=(t, h, w))


def test_salient_tokens_stay_and_the_rest_merge_into_the_anchor_frame():
    # two frames of three tokens; one segment (tau=-1, segments=1), frame 1 its only anchor frame (the last)
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1],     # frame 0: token 1 most attended
                             [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])   # frame 1: token 5 most attended
    attention = torch.tensor([[0.1, 0.9, 0.2, 0.1, 0.2, 0.9]])
    # keep 4: two per frame, one salient and one context each; the segment's two context tokens go to frame 1,
    # whose two non-salient tokens (3, 4) both become anchors; frame 0's tokens 0 and 2 join the nearer, token 3
    method = ts.load("fastvid", keep=4, segments=1, tau=-1.0, context=0.5)
    selection = method.select(a_video(features, attention, 2, 1, 3))
    assert selection.kept.tolist() == [1, 3, 4, 5]
    assert selection.assignment.tolist() == [1, 0, 1, 1, 2, 3]
    w = 0.6  # max(1 / (3 + 1), beta): token 3's group has three members
    merged = selection.group_means(features)
    assert torch.allclose(merged[1], w * features[3] + (1 - w) * features[[0, 2, 3]].mean(0))
    assert torch.allclose(merged[[0, 2, 3]], features[[1, 4, 5]])


def test_dyseg_cuts_at_the_least_similar_transitions_and_below_tau():
    # frame means along four directions: transitions 0-1 and 2-3 similar, 1-2 a right angle, 3-4 at 60 degrees
    angles = torch.tensor([0.0, 0.1, math.pi / 2 + 0.1, math.pi / 2 + 0.2, math.pi / 2 + 0.2 + math.pi / 3])
    frames = torch.stack([angles.cos(), angles.sin()], dim=-1)[:, None, :].expand(5, 2, 2)
    assert ts.load("fastvid", segments=1, tau=0.9)._segments(frames) == [(0, 2), (2, 2), (4, 1)]
    assert ts.load("fastvid", segments=2, tau=-1.0)._segments(frames) == [(0, 2), (2, 3)]
    assert ts.load("fastvid", segments=1, tau=-1.0)._segments(frames) == [(0, 5)]


def test_density_scores_match_a_plain_loop():
    t, per_frame, d = 2, 7, 3
    frames = torch.randn(t, per_frame, d, generator=torch.Generator().manual_seed(0))
    salient = torch.zeros(t, per_frame, dtype=torch.bool)
    salient[0, [1, 4]] = True
    salient[1, 0] = True
    scores = FastVID._density_scores(frames, salient)
    for f in range(t):
        others = [i for i in range(per_frame) if not salient[f, i]]
        dist = {(i, j): float((frames[f, i] - frames[f, j]).norm()) / d ** 0.5 for i in others for j in others}
        density = {i: math.exp(-sum(x ** 2 for x in sorted(dist[i, j] for j in others)[:4]) / 4) for i in others}
        farthest = max(dist.values())
        for i in others:
            to_denser = min([dist[i, j] for j in others if density[j] > density[i]], default=farthest)
            assert scores[f, i].item() == pytest.approx(to_denser * density[i], rel=1e-5)
        assert all(scores[f, i] == -float("inf") for i in range(per_frame) if salient[f, i])


def test_the_count_is_exact_and_every_dropped_token_joins_a_kept_one_of_its_segment():
    t, h, w, d = 6, 2, 4, 5
    features = torch.randn(t * h * w, d, generator=torch.Generator().manual_seed(1))
    attention = torch.rand(2, t * h * w, generator=torch.Generator().manual_seed(2))
    for keep in (6, 13, 20, 30):
        selection = ts.load("fastvid", keep=keep, segments=2, tau=-1.0).select(a_video(features, attention, t, h, w))
        # 30 of 48: the anchor frames run out of non-salient tokens for their segment's pooled context
        assert len(selection.kept) == keep if keep < 30 else len(selection.kept) < keep
        assert torch.equal(selection.assignment[selection.kept], torch.arange(len(selection.kept)))
        # one token per frame leaves no context (int(1 * 0.4) = 0): the rest is dropped, as in the reference
        assert bool((selection.assignment >= 0).all()) == (keep >= 20)


@pytest.mark.parametrize("argument", [dict(segments=0), dict(merge_every=1.5), dict(tau=2.0), dict(context=-0.1),
                                      dict(beta=True)])
def test_refuses_bad_arguments(argument):
    with pytest.raises(ValueError, match=f"{next(iter(argument))}=.*pass"):
        ts.load("fastvid", **argument)


def test_refuses_a_still_image():
    image = VisualTokens(torch.randn(16, 4), (4, 4), signals={ATTENTION: torch.rand(1, 16)})
    with pytest.raises(ValueError, match="fastvid acts on videos.*still image"):
        ts.load("fastvid").select(image)
