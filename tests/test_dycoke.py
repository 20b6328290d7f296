"""dycoke: DyCoke's TTM, each window's first frame whole, the others keep their tokens least like their reference."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS
from tiny_qwen2_vl import QWEN2_VL_VIDEO
from tokensieve.sieve import VisualTokens


def a_video(features: torch.Tensor, t: int, h: int, w: int) -> VisualTokens:
    return VisualTokens(features, (1, t * h * w), frames=(t, h, w))


# four frames of three places; frame 0 the anchor, frame 1 and 2 compared with frame 0, frame 3 with frame 2
FEATURES = torch.tensor([
    [1.0, 0.0], [0.0, 1.0], [2.0, 0.0],    # frame 0
    [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0],   # frame 1: cosines 1, 0, -1 to frame 0
    [0.0, 1.0], [0.0, 1.0], [1.0, 0.0],    # frame 2: cosines 0, 1, 1 to frame 0 (exact: one nonzero entry each)
    [0.0, 1.0], [1.0, 0.0], [1.0, 1.0],    # frame 3: cosines 1, 0, 0.71 to frame 2
])


@pytest.mark.parametrize("keep, kept", [
    (6, [0, 1, 2, 5, 6, 10]),              # the anchor whole, one per compared frame: each its least similar
    (8, [0, 1, 2, 4, 5, 6, 7, 10]),        # five over three frames: two, two, one; frame 2's tie to the lower index
    (9, [0, 1, 2, 4, 5, 6, 7, 10, 11]),
    (1, [0, 1, 2]),                        # never below the anchor frame
])
def test_each_compared_frame_keeps_its_least_similar_tokens(keep, kept):
    assert ts.load("dycoke", keep=keep).select(a_video(FEATURES, 4, 1, 3)).kept.tolist() == kept


def official_ttm_kept(features: torch.Tensor, t: int, per_frame: int, k: float) -> list[set[int]]:
    """The indices each frame keeps under KD-TAO/DyCoke's ``dycole_ttm`` (llava_arch.py at dd746349), its loops as
    read: pass 1 prunes odd frames against the frame before, pass 2 every window's third frame against its first."""
    frames = features.view(t, per_frame, -1)
    count = int((1 - k) * per_frame)
    kept = [set() for _ in range(t)]
    for i in range(0, t - 1, 2):
        kept[i] = set(range(per_frame))
        similarity = torch.nn.functional.cosine_similarity(frames[i], frames[i + 1], dim=1)
        kept[i + 1] = set(similarity.topk(count, largest=False).indices.tolist())
    for i in range(0, t - 4, 4):
        similarity = torch.nn.functional.cosine_similarity(frames[i], frames[i + 2], dim=1)
        kept[i + 2] = set(similarity.topk(count, largest=False).indices.tolist())
    return kept


def test_matches_the_official_ttm_but_for_its_last_window():
    t, per_frame, d = 8, 10, 6
    features = torch.randn(t * per_frame, d, generator=torch.Generator().manual_seed(0))
    expected = official_ttm_kept(features, t, per_frame, 0.3)
    # K = 0.3: seven of ten on every compared frame; here frame 6 is compared too (the code's loop stops before it)
    kept = ts.load("dycoke", keep=2 * per_frame + 6 * 7).select(a_video(features, t, 1, per_frame)).kept
    ours = [set((kept[kept // per_frame == f] % per_frame).tolist()) for f in range(t)]
    assert [ours[f] for f in range(t) if f != 6] == [expected[f] for f in range(t) if f != 6]
    assert len(expected[6]) == per_frame and len(ours[6]) == 7


def test_a_budget_that_covers_the_video_keeps_every_token():
    assert ts.load("dycoke", keep=1.0).select(a_video(FEATURES, 4, 1, 3)).kept.tolist() == list(range(12))


def test_on_a_tiny_qwen2_vl_video_the_anchor_frame_stays_whole():
    model = build_model(QWEN2_VL_VIDEO)
    with ts.apply(model, ts.load("dycoke", keep=0.5)) as run:  # four frames of 16: frame 0 whole, 16 over the others
        model(**QWEN2_VL_VIDEO.make_inputs(TEXTS))
    for record in run.stats.images:
        assert record.frame_counts.tolist() == [16, 6, 5, 5]


def test_refuses_a_still_image():
    with pytest.raises(ValueError, match="dycoke acts on videos.*still image"):
        ts.load("dycoke").select(VisualTokens(torch.randn(16, 4), (4, 4)))
