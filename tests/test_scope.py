"""SCOPE's greedy saliency-weighted coverage: worked by hand on a 2×3 grid (multiplied and added saliency, the
exponent, head sum), checked against a plain reference loop and against ``coverage_greedy`` without saliency."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensieve as ts
from conftest import build_model
from tiny_llava_next import LLAVA_NEXT
from tokensieve.methods.scope import scope_greedy
from tokensieve.selection import coverage_greedy
from tokensieve.sieve import VisualTokens

#: patches 0 1 2 are sky (e0), 3 4 one object (e1), 5 a small object (e2): cosines exactly 1 or 0
GROUPS = [0, 0, 0, 1, 1, 2]


def hand_worked_tokens(saliency) -> VisualTokens:
    vision = F.one_hot(torch.tensor(GROUPS), 3).float()
    saliency = torch.tensor(saliency)
    # the two heads split each patch's saliency unevenly: only their sum is the saliency
    heads = torch.stack([0.75 * saliency, 0.25 * saliency])
    projected = torch.ones(6, 4)  # all alike: a rule that compared the projected tokens would see only duplicates
    return VisualTokens(projected, (2, 3), {"cls_attention": heads, "vision_features": vision})


def test_hand_worked_grid_multiplies_the_coverage_gain_by_the_saliency():
    tokens = hand_worked_tokens([0.1, 0.1, 0.05, 0.3, 0.4, 0.05])
    # gains (sky 3, object 2, small 1) times saliency: .3 .3 .15 .6 .8 .05: 4;
    # then sky 3 × .1 = .3 (0 before 1), 3 gains 0, 5 gains .05: 0; then 5 (.05, every other score 0)
    assert ts.SCOPE(keep=3).select(tokens).kept.tolist() == [0, 4, 5]
    # without saliency (alpha 0): greedy coverage alone takes 0, then 3 (the lower of the object's), then 5
    assert ts.SCOPE(keep=3, alpha=0).select(tokens).kept.tolist() == [0, 3, 5]
    # saliency alone (FasterVLM's rule) would keep 4 3 0: two patches of one object, and no small object
    assert ts.FasterVLM(keep=3).select(tokens).kept.tolist() == [0, 3, 4]


def test_hand_worked_order_multiplied_and_added():
    tokens = hand_worked_tokens([0.1, 0.1, 0.05, 0.3, 0.4, 1.5])
    similarity = tokens["vision_features"] @ tokens["vision_features"].T
    saliency = tokens["cls_attention"].sum(dim=0)
    # multiplied: .3 .3 .15 .6 .8 1.5: 5; then .3 .3 .15 .6 .8: 4; then sky .3 against object 3's 0: 0
    assert scope_greedy(similarity, saliency, 3).tolist() == [5, 4, 0]
    # added: 3.1 3.1 3.05 2.3 2.4 2.5: 0; then sky 0 + .1, 3: 2.3, 4: 2.4, 5: 2.5: 5; then 4
    assert scope_greedy(similarity, saliency, 3, add=True).tolist() == [0, 5, 4]
    # the heads' mean instead of their sum would halve the saliency: 0, then 4 (2.2) before 5 (1.75)
    assert scope_greedy(similarity, saliency / 2, 3, add=True).tolist() == [0, 4, 5]
    assert ts.SCOPE(keep=2, combine="add").select(tokens).kept.tolist() == [0, 5]


def test_alpha_sharpens_the_saliency():
    tokens = hand_worked_tokens([0.1, 0.1, 0.05, 0.3, 0.4, 0.7])
    # first pick, gains sky 3, object 2, small 1 times saliency ** alpha:
    # alpha 0: 3 2 1, sky (0); alpha 1: .3 .8 .7, the object's 4; alpha 2: .03 .32 .49, the small object 5
    assert ts.SCOPE(keep=1, alpha=0).select(tokens).kept.tolist() == [0]
    assert ts.SCOPE(keep=1).select(tokens).kept.tolist() == [4]
    assert ts.SCOPE(keep=1, alpha=2.0).select(tokens).kept.tolist() == [5]


def reference_select(tokens: VisualTokens, k: int, alpha: float, add: bool, space: str) -> list[int]:
    """SCOPE one token at a time: Python floats, every gain summed row by row, ties to the lower index."""
    features = tokens["vision_features"] if space == "vision" else tokens.features
    unit = F.normalize(features.float(), dim=-1)
    similarity = (unit @ unit.T).tolist()
    saliency = [value ** alpha for value in tokens["cls_attention"].float().sum(dim=0).tolist()]
    n = len(similarity)
    best, chosen = [0.0] * n, []
    for _ in range(k):
        scores = {}
        for j in range(n):
            if j not in chosen:
                gain = sum(max(0.0, similarity[i][j] - best[i]) for i in range(n))
                scores[j] = gain + saliency[j] if add else gain * saliency[j]
        pick = max(scores, key=lambda j: (scores[j], -j))
        chosen.append(pick)
        best = [max(best[i], similarity[i][pick]) for i in range(n)]
    return sorted(chosen)


@settings(max_examples=40, deadline=None, derandomize=True)  # random floats can tie within float32 rounding (n=32, seed=130 did)
@given(st.integers(2, 40), st.integers(1, 40), st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.booleans(), st.booleans(),
       st.sampled_from(["vision", "projected"]), st.integers(0, 10_000))
def test_selection_matches_the_reference_loop(n, k, alpha, add, tied, space, seed):
    k = min(k, n - 1)
    generator = torch.Generator().manual_seed(seed)
    if tied:  # signed one-hot features and saliency of a few exact values: the tie rule decides
        signs = torch.randint(0, 2, (n, 1), generator=generator) * 2 - 1
        vision = F.one_hot(torch.randint(0, 4, (n,), generator=generator), 4).float() * signs
        attention = torch.tensor([0.25, 0.5, 1.0])[torch.randint(0, 3, (2, n), generator=generator)]
    else:
        vision = torch.randn(n, 16, generator=generator)
        attention = torch.rand(2, n, generator=generator)
    projected = vision @ torch.randn(vision.shape[1], 8, generator=generator) if not tied else vision.repeat(1, 2)
    tokens = VisualTokens(projected, (1, n), {"cls_attention": attention, "vision_features": vision})
    sieve = ts.SCOPE(keep=k, alpha=alpha, combine="add" if add else "multiply", vision_space=space)
    assert sieve.select(tokens).kept.tolist() == reference_select(tokens, k, alpha, add, space)


@pytest.mark.parametrize("seed", range(4))
def test_without_saliency_it_is_greedy_coverage(seed):
    generator = torch.Generator().manual_seed(seed)
    vision = torch.randn(64, 16, generator=generator)
    tokens = VisualTokens(torch.randn(64, 8, generator=generator), (8, 8),
                          {"cls_attention": torch.rand(3, 64, generator=generator), "vision_features": vision})
    unit = F.normalize(vision, dim=-1)
    assert torch.equal(ts.SCOPE(keep=12, alpha=0).select(tokens).kept, coverage_greedy(unit @ unit.T, 12).sort().values)


def test_full_budget_requests_and_defaults():
    tokens = hand_worked_tokens([0.1, 0.1, 0.05, 0.3, 0.4, 0.05])
    assert ts.SCOPE(keep=6).select(tokens).kept.tolist() == list(range(6))
    assert ts.SCOPE(keep=0.5).select(tokens).kept.tolist() == [0, 4, 5]
    assert ts.SCOPE().defaults() == {"keep": 64, "alpha": 1.0, "combine": "multiply", "vision_space": "vision"}
    assert ts.SCOPE().requests() == ("cls_attention", "vision_features")
    assert ts.SCOPE(vision_space="projected").requests() == ("cls_attention",)


def test_llava_next_refuses_vision_features_and_serves_the_projected_space():
    model = build_model(LLAVA_NEXT)
    inputs = LLAVA_NEXT.make_inputs([[5, 6, 7]])
    with pytest.raises(ValueError, match="scope needs signals"):
        ts.apply(model, ts.SCOPE(keep=16))
    with ts.apply(model, ts.SCOPE(keep=16, vision_space="projected")) as run:
        model(**inputs)
    assert [record.after for record in run.stats.images] == [16]


def test_argument_checks():
    for bad in (-0.5, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
            ts.SCOPE(alpha=bad)
    with pytest.raises(ValueError, match="combine must be one of"):
        ts.SCOPE(combine="multi")
    with pytest.raises(ValueError, match="vision_space must be one of"):
        ts.SCOPE(vision_space="llm")
