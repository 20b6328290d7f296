"""VisionDrop's vision stage: its 42+6 split, worked by hand on a 4×4 grid (dominant patches by head-summed [CLS]
attention, strided targets, members by head-mean key cosine, ``target + mean(members)`` projected), and equal
to VisionZip at the same split (the official code's vision stage is VisionZip's code)."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.sieve import VisualTokens

#: a linear projector (with the batch dimension VisionZip's merge hands it): (x0, x1, x0 + x1, x2)
PROJECTOR = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def hand_worked_tokens() -> VisualTokens:
    # head-summed attention ranks 5 (0.5 + 0.5) above 7 (0.9 + 0): a rule taking one head's or the
    # largest head's score would keep 7
    attention = torch.zeros(2, 16)
    attention[:, 5] = 0.5
    attention[0, 7] = 0.9
    for patch, score in ((15, 2.0), (0, 1.8), (12, 1.6), (10, 1.4), (3, 1.2)):
        attention[:, patch] = score / 2
    attention[1, [1, 2, 4, 6, 8, 9, 11, 13, 14]] = torch.linspace(0.1, 0.01, 9)
    # head-mean keys: the left patches 1, 2, 4, 6 point along e0, the rest along e1; patch 6's first head
    # alone points along e1 (its mean (1.5, 0.5) is nearer e0)
    keys = torch.zeros(2, 16, 2)
    keys[:, :, 1] = 1.0
    keys[:, [1, 2, 4], :] = torch.tensor([1.0, 0.0])
    keys[0, 6], keys[1, 6] = torch.tensor([0.0, 1.0]), torch.tensor([3.0, 0.0])
    vision = torch.stack([torch.arange(16.0), torch.ones(16), torch.zeros(16)], dim=1)
    features = torch.arange(64.0).view(16, 4)
    signals = {"cls_attention": attention, "vision_keys": keys, "vision_features": vision, "project": lambda x: x @ PROJECTOR}
    return VisualTokens(features, (4, 4), signals)


def test_hand_worked_grid():
    # keep 8 with 2 contextual: dominant = the 6 best by head sum: 15 0 12 10 3 5 (not 7, see above).
    # Remaining (raster) 1 2 4 6 7 8 9 11 13 14; stride 10 // 2 = 5: targets 1 and 8.
    # Members 2 4 6 join target 1 (keys along e0), 7 9 11 13 14 join target 8.
    # Target 1: (1, 1, 0) + mean((2, 1, 0), (4, 1, 0), (6, 1, 0)) = (5, 2, 0), projected (5, 2, 7, 0);
    # target 8: (8, 1, 0) + mean of 7 9 11 13 14 = (8 + 10.8, 2, 0), projected (18.8, 2, 20.8, 0).
    selection = ts.VisionDrop(keep=8, contextual=2).select(tokens := hand_worked_tokens())
    assert selection.kept.tolist() == [0, 1, 3, 5, 8, 10, 12, 15]
    dominant = [0, 2, 3, 5, 6, 7]  # rows of the dominant patches 0 3 5 10 12 15 in the selection
    assert torch.equal(selection.features[dominant], tokens.features[[0, 3, 5, 10, 12, 15]])
    assert torch.allclose(selection.features[1], torch.tensor([5.0, 2.0, 7.0, 0.0]))
    assert torch.allclose(selection.features[4], torch.tensor([18.8, 2.0, 20.8, 0.0]))


def test_default_split_keeps_one_contextual_token_in_eight():
    # keep 8 by default: round(8 * 6 / 48) = 1 contextual, 7 dominant: the six above and 7;
    # the one target is the first remaining patch, 1, and every other remaining patch joins it
    selection = ts.VisionDrop(keep=8).select(tokens := hand_worked_tokens())
    assert selection.kept.tolist() == [0, 1, 3, 5, 7, 10, 12, 15]
    members = torch.tensor([2, 4, 6, 8, 9, 11, 13, 14])
    merged = tokens["vision_features"][1] + tokens["vision_features"][members].mean(dim=0)
    assert torch.allclose(selection.features[1], merged @ PROJECTOR)


def test_split_is_the_official_forty_two_and_six():
    drop = ts.VisionDrop()
    assert drop.defaults() == {"keep": 48, "contextual": None}
    assert drop.split(48) == (42, 6) and drop.split(64) == (56, 8) and drop.split(192) == (168, 24)
    assert drop.split(4) == (4, 0)  # round(0.5) = 0: no contextual token
    assert ts.VisionDrop(contextual=3).split(2) == (1, 1)  # at least one dominant token


@pytest.mark.parametrize("seed", range(3))
def test_equals_visionzip_at_the_same_split(seed):
    generator = torch.Generator().manual_seed(seed)
    signals = {
        "cls_attention": torch.rand(4, 576, generator=generator).softmax(dim=-1),
        "vision_keys": torch.randn(4, 576, 16, generator=generator),
        "vision_features": torch.randn(576, 32, generator=generator),
        "project": torch.nn.Linear(32, 24).requires_grad_(False),
    }
    tokens = VisualTokens(torch.randn(576, 24, generator=generator), (24, 24), signals)
    ours, zip_ = ts.VisionDrop().select(tokens), ts.VisionZip(keep=48, contextual=6).select(tokens)
    assert len(ours.kept) == 48
    assert torch.equal(ours.kept, zip_.kept) and torch.equal(ours.features, zip_.features)


def test_full_budget_and_ratio():
    tokens = hand_worked_tokens()
    assert ts.VisionDrop(keep=16).select(tokens).kept.tolist() == list(range(16))
    assert ts.VisionDrop(keep=0.5).select(tokens).kept.tolist() == ts.VisionDrop(keep=8).select(tokens).kept.tolist()


def test_argument_checks():
    for bad in (-1, 1.5, True, "6"):
        with pytest.raises(ValueError, match="contextual must be a count >= 0"):
            ts.VisionDrop(contextual=bad)
    with pytest.raises(ValueError, match="keep=0 keeps no token"):
        ts.VisionDrop(keep=0)
