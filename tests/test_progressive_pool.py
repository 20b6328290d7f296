"""progressive_pool: each frame pooled to a share of the budget that falls geometrically within its group."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS
from tiny_qwen2_vl import QWEN2_VL_VIDEO
from tokensieve.sieve import VisualTokens


@pytest.mark.parametrize("t, per_frame, k, group, decay, shares", [
    (8, 16, 30, 4, 0.5, [8, 4, 2, 1, 8, 4, 2, 1]),  # weights 1, 1/2, 1/4, 1/8 per group: exact
    (4, 16, 16, 4, 0.5, [9, 4, 2, 1]),               # 8.53, 4.27, 2.13, 1.07: the one left over to frame 0
    (2, 4, 6, 2, 0.25, [4, 2]),                      # 4.8 capped at the frame's 4: the surplus to frame 1
    (3, 4, 6, 4, 1.0, [2, 2, 2]),                    # decay 1: every frame alike
    (3, 4, 4, 1, 0.5, [2, 1, 1]),                    # groups of one: every frame its group's first; tie to frame 0
])
def test_shares_fall_geometrically_within_each_group(t, per_frame, k, group, decay, shares):
    assert ts.load("progressive_pool", group=group, decay=decay).shares(t, per_frame, k) == shares


def test_a_later_frame_is_pooled_coarser():
    # two frames of 2x2; shares 4 and 1: frame 0 as it is, frame 1 one token, its mean, at its centre cell (token 0)
    features = torch.arange(16, dtype=torch.float32).view(8, 2)
    video = VisualTokens(features, (1, 8), blocks=tuple(torch.arange(8).view(2, 2, 2)), frames=(2, 2, 2))
    selection = ts.load("progressive_pool", keep=5, group=2, decay=0.25).select(video)
    assert selection.kept.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(selection.features, torch.cat([features[:4], features[4:].mean(0, keepdim=True)]))


def test_on_a_tiny_qwen2_vl_video_the_first_frame_keeps_most():
    model = build_model(QWEN2_VL_VIDEO)
    with ts.apply(model, ts.load("progressive_pool", keep=16)) as run:  # four frames of 4x4: grids 3x3, 2x2, 1x2, 1x1
        model(**QWEN2_VL_VIDEO.make_inputs(TEXTS))
    for record in run.stats.images:
        assert record.frame_counts.tolist() == [9, 4, 2, 1]


@pytest.mark.parametrize("argument", [dict(group=0), dict(group=2.0), dict(decay=0), dict(decay=1.5), dict(decay=True)])
def test_refuses_bad_arguments(argument):
    with pytest.raises(ValueError, match=f"{next(iter(argument))}=.*pass"):
        ts.load("progressive_pool", **argument)


def test_refuses_a_still_image():
    with pytest.raises(ValueError, match="progressive_pool acts on videos.*still image"):
        ts.load("progressive_pool").select(VisualTokens(torch.randn(16, 4), (4, 4)))
