"""VisPruner's selection rule, worked by hand on a 4×4 grid and checked against a plain reference loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensieve as ts
from tokensieve.sieve import VisualTokens

#: raster indices by descending head-mean [CLS] attention
BY_ATTENTION = [5, 10, 0, 15, 3, 12, 6, 9, 1, 14, 7, 8, 2, 13, 4, 11]


def hand_worked_tokens() -> VisualTokens:
    mean = torch.zeros(16)
    mean[BY_ATTENTION] = torch.arange(16, 0, -1).float()
    # the heads disagree (one holds the even patches' attention, the other the odd ones'): neither alone ranks as BY_ATTENTION
    even = torch.arange(16) % 2 == 0
    heads = torch.stack([torch.where(even, 2 * mean, 0.0), torch.where(even, 0.0, 2 * mean)])
    # sky everywhere (e0), except three objects, each its own direction
    vision = torch.zeros(16, 4)
    vision[:, 0] = 1.0
    for patch, direction in ((15, 1), (1, 2), (8, 3)):
        vision[patch] = F.one_hot(torch.tensor(direction), 4).float()
    # the projected tokens are all alike: a rule that compared them would see only duplicates
    projected = torch.ones(16, 8)
    return VisualTokens(projected, (4, 4), {"cls_attention": heads, "vision_features": vision})


def test_hand_worked_grid_keeps_the_important_patches_and_every_distinct_one():
    # keep 7 at ratio 0.5: important = int(3.5) = 3 patches, 5, 10 and 0; 4 diverse from the other 13,
    # listed by attention as p0..p12 = 15 3 12 6 9 1 14 7 8 2 13 4 11 (objects: p0=15, p5=1, p8=8).
    # Each round removes 3, so 13 -> 10 -> 7 -> 4; an A patch scores 1 if B holds a sky patch and it is sky, else 0.
    # 1: A = 15 12 9 14 8 13 11 scores 0 1 1 1 0 1 1, drop 12 9 14; next list 13 11 15 8 | 3 6 1 7 2 4
    # 2: A = 13 15 3 1 2 scores 1 0 1 0 1, drop 13 3 2; next list 15 1 | 11 8 6 7 4
    # 3: A = 15 11 6 4 scores 0 1 1 1, drop 11 6 4; left 15 1 8 7: the three objects and one sky patch
    sieve = ts.VisPruner(keep=7, removed_per_round=3)
    assert sieve.select(hand_worked_tokens()).kept.tolist() == [0, 1, 5, 7, 8, 10, 15]


def test_hand_worked_grid_at_the_official_eight_per_round_can_drop_a_distinct_patch():
    # keep 8 at ratio 0.5: important = 5 10 0 15 (object 15 among them); 4 diverse from the other 12,
    # listed 3 12 6 9 1 14 7 8 2 13 4 11. A round removes min(8, 12 - 4, |A| = 6) = 6.
    # 1: A = 3 6 1 7 2 4 scores 1 1 0 1 1 1: all six go, object 1 with them; next list 12 9 14 8 13 11
    # 2: removes min(8, 2, 3) = 2; A = 12 14 13 scores 1 1 1, drop 12 14 (ties: earlier first); left 13 | 9 8 11
    assert ts.VisPruner(keep=8).select(hand_worked_tokens()).kept.tolist() == [0, 5, 8, 9, 10, 11, 13, 15]


def test_ratio_one_is_fastervlm_and_a_full_budget_keeps_everything():
    tokens = hand_worked_tokens()
    assert ts.VisPruner(keep=5, important_ratio=1.0).select(tokens).kept.tolist() == [0, 3, 5, 10, 15]
    assert torch.equal(ts.VisPruner(keep=5, important_ratio=1.0).select(tokens).kept, ts.FasterVLM(keep=5).select(tokens).kept)
    assert ts.VisPruner(keep=16).select(tokens).kept.tolist() == list(range(16))


def reference_select(tokens: VisualTokens, k: int, ratio: float, per_round: int) -> list[int]:
    """The rule one token at a time: Python lists, a max over B per A token, sorts keyed by (score, position)."""
    attention = tokens["cls_attention"].float().mean(dim=0).tolist()
    order = sorted(range(len(attention)), key=lambda j: (-attention[j], j))
    important = int(k * ratio)
    unit = F.normalize(tokens["vision_features"].float(), dim=-1)
    candidates = order[important:] if k > important else []
    while len(candidates) > k - important:
        a, b = candidates[0::2], candidates[1::2]
        removed = min(per_round, len(candidates) - (k - important), len(a))
        scores = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda position: (-scores[position], position))
        candidates = [a[position] for position in ranked[removed:]] + b
    return sorted(order[:important] + candidates)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 90), st.integers(1, 90), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.integers(1, 9), st.booleans(),
    st.integers(0, 10_000),
)
def test_selection_matches_the_reference_loop(n, k, ratio, per_round, tied, seed):
    k = min(k, n - 1)
    generator = torch.Generator().manual_seed(seed)
    if tied:  # signed one-hot features: similarities are exactly -1, 0 or 1, so the tie rule decides
        signs = torch.randint(0, 2, (n, 1), generator=generator) * 2 - 1
        vision = F.one_hot(torch.randint(0, 4, (n,), generator=generator), 4).float() * signs
    else:
        vision = torch.randn(n, 16, generator=generator)
    signals = {"cls_attention": torch.rand(2, n, generator=generator), "vision_features": vision}
    tokens = VisualTokens(torch.randn(n, 4, generator=generator), (1, n), signals)
    kept = ts.VisPruner(keep=k, important_ratio=ratio, removed_per_round=per_round).select(tokens).kept
    assert kept.tolist() == reference_select(tokens, k, ratio, per_round)


def test_an_odd_residual_list_is_thinned_to_the_budget():
    # 576 patches, keep 58 at ratio 0.5: 29 important leave 547 (the official code's index shapes disagree there)
    generator = torch.Generator().manual_seed(0)
    signals = {"cls_attention": torch.rand(16, 576, generator=generator), "vision_features": torch.randn(576, 32, generator=generator)}
    tokens = VisualTokens(torch.randn(576, 8, generator=generator), (24, 24), signals)
    kept = ts.VisPruner(keep=58).select(tokens).kept
    assert len(kept) == 58 and kept.tolist() == reference_select(tokens, 58, 0.5, 8)


def test_defaults_and_argument_checks():
    assert ts.VisPruner().defaults() == {"keep": 64, "important_ratio": 0.5, "removed_per_round": 8}
    assert ts.VisPruner().split(64) == (32, 32) and ts.VisPruner(important_ratio=0.75).split(64) == (48, 16)
    with pytest.raises(ValueError, match="important_ratio must be a fraction"):
        ts.VisPruner(important_ratio=1.5)
    with pytest.raises(ValueError, match="removed_per_round must be a count"):
        ts.VisPruner(removed_per_round=0)


def test_towers_without_cls_rank_by_the_attention_each_patch_receives_at_the_last_layer():
    from tokensieve.adapters import adapter_for
    from tokensieve.methods.vispruner import RECEIVED_AT_LAST_LAYER
    from tokensieve.signals import Signal, requests_of

    from conftest import build_model
    from tiny_models import LLAVA
    from tiny_qwen2_vl import QWEN2_VL

    cls_tokens = hand_worked_tokens()
    received = VisualTokens(cls_tokens.features, (4, 4), {RECEIVED_AT_LAST_LAYER: cls_tokens["cls_attention"],
                                                          "vision_features": cls_tokens["vision_features"]})
    assert "cls_attention" not in received and RECEIVED_AT_LAST_LAYER in received
    assert ts.VisPruner(keep=7, removed_per_round=3).select(received).kept.tolist() == [0, 1, 5, 7, 8, 10, 15]
    # the request resolves by the tower: [CLS] where there is one, else the last layer's received attention
    sieve = ts.VisPruner()
    assert requests_of(sieve, adapter_for(build_model(LLAVA))) == (Signal("cls_attention"), Signal("vision_features"))
    qwen = adapter_for(build_model(QWEN2_VL))
    assert requests_of(sieve, qwen) == (RECEIVED_AT_LAST_LAYER, Signal("vision_features"))
    assert not qwen.missing_signals(requests_of(sieve, qwen))
