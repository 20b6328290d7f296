"""ToDRE's first stage: the shared greedy max-sum and k-center algorithms against plain loops, both rules and
the pivot worked by hand on small grids, the selection on a model against a loop over its own signals, arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensieve as ts
from conftest import build_model
from tiny_llava_next import LLAVA_NEXT
from tiny_models import LLAVA
from tiny_qwen2_vl import QWEN2_5_VL
from tokensieve.selection import farthest_point, k_center_greedy, max_sum_greedy
from tokensieve.sieve import VisualTokens
from tokensieve.signals import Signal

LAST = Signal("cls_attention", layers=(-1,))


def loop_max_sum(similarity: torch.Tensor, k: int, first: int) -> list[int]:
    """Each step: the token left whose similarities to the chosen ones, added in the order chosen, sum lowest."""
    chosen = [first]
    while len(chosen) < k:
        sums = {}
        for j in range(similarity.shape[0]):
            if j not in chosen:
                total = torch.tensor(0.0)
                for c in chosen:
                    total = total + similarity[c, j]
                sums[j] = total.item()
        chosen.append(min(sums, key=lambda j: (sums[j], j)))
    return chosen


def loop_k_center(distance: torch.Tensor, k: int, first: int) -> list[int]:
    """Each step: the token left whose distance to its nearest chosen token is largest."""
    chosen = [first]
    while len(chosen) < k:
        nearest = {j: min(distance[c, j].item() for c in chosen) for j in range(distance.shape[0]) if j not in chosen}
        chosen.append(max(nearest, key=lambda j: (nearest[j], -j)))
    return chosen


def cosine(features: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(features.float(), dim=-1)
    return unit @ unit.T


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), k=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_max_sum_greedy_is_the_plain_loop(n, k, seed):
    k = min(k, n)
    generator = torch.Generator().manual_seed(seed)
    similarity = cosine(torch.randn(n, 8, generator=generator))
    first = int(torch.randint(n, (1,), generator=generator))
    assert max_sum_greedy(similarity, k, first).tolist() == loop_max_sum(similarity, k, first)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), k=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_k_center_greedy_is_the_plain_loop_and_divprune_from_divprunes_seed(n, k, seed):
    k = min(k, n)
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 8, generator=generator)
    distance = 1.0 - cosine(features)
    first = int(torch.randint(n, (1,), generator=generator))
    assert k_center_greedy(distance, k, first).tolist() == loop_k_center(distance, k, first)
    isolated = distance.clone().fill_diagonal_(float("inf")).min(dim=1).values.argmax()
    assert torch.equal(k_center_greedy(distance, k, isolated).sort().values, farthest_point(features, k))


def test_greedy_algorithms_never_repeat_a_pick():
    same = torch.ones(5, 5)  # every token alike: every step ties, the lowest index left wins
    assert max_sum_greedy(same, 5, 3).tolist() == [3, 0, 1, 2, 4]
    assert k_center_greedy(1.0 - same, 5, torch.tensor([3])).tolist() == [3, 0, 1, 2, 4]


def on_circle(degrees) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees])


def grid(degrees, attention, signal=LAST, blocks=()) -> VisualTokens:
    """Tokens at the given angles (2D unit vectors), [CLS] attention identical in two heads."""
    heads = torch.tensor(attention, dtype=torch.float).expand(2, -1)
    if signal.layers is not None:
        heads = heads.unsqueeze(0)
    features = on_circle(degrees)
    shape = (1, len(features)) if blocks else (2, len(features) // 2)
    return VisualTokens(features, shape, {signal: heads}, blocks)


#: a 2x2 grid: B at 85 degrees, the pivot P at 0 (the most [CLS] attention), A at 150, A' at 160
HAND = ([85, 0, 150, 160], [0.2, 0.5, 0.1, 0.2])


def test_hand_worked_max_sum_keeps_the_far_pair_even_when_alike():
    # from P: cosines to P are B .087, A -.866, A' -.940: A' joins (lowest sum).
    # sums then: B .087 + cos 75 (.259) = .346, A -.866 + cos 10 (.985) = .119: A joins, A' 's near twin
    assert ts.ToDRE(keep=3).select(grid(*HAND)).kept.tolist() == [1, 2, 3]


def test_hand_worked_k_center_keeps_the_far_token_and_then_the_uncovered_one():
    # from P: distances 1 - cos: B .913, A 1.866, A' 1.940: A' joins (largest).
    # nearest-chosen distances then: B min(.913, .741) = .741, A min(1.866, .015) = .015: B joins
    assert ts.ToDRE(keep=3, diversity="k_center").select(grid(*HAND)).kept.tolist() == [0, 1, 3]


def test_the_pivot_is_the_top_cls_token_at_the_requested_layer():
    degrees, attention = HAND
    assert ts.ToDRE(keep=1).select(grid(degrees, attention)).kept.tolist() == [1]
    assert ts.ToDRE(keep=1).select(grid(degrees, [0.3, 0.1, 0.3, 0.3])).kept.tolist() == [0]  # ties: lower index
    # pivot B instead: cosines to B are P .087, A .423, A' .259: P joins, then A' (sum -.681) before A (-.443)
    assert ts.ToDRE(keep=3).select(grid(degrees, [0.5, 0.2, 0.1, 0.2])).kept.tolist() == [0, 1, 3]
    feature_layer = Signal("cls_attention")
    assert ts.ToDRE(pivot_layer=None).requests() == (feature_layer,)
    assert ts.ToDRE(keep=1, pivot_layer=None).select(grid(degrees, attention, feature_layer)).kept.tolist() == [1]


def test_the_pivot_comes_from_the_base_view_of_an_anyres_image():
    # LLaVA-NeXT's layout: a 2x2 base view (tokens 0-3), then a high-res piece; the top [CLS] score is in the latter
    blocks = (torch.arange(4).view(2, 2), torch.arange(4, 8).view(2, 2))
    tokens = grid([0, 40, 80, 120, 160, 200, 240, 280], [0.1, 0.1, 0.3, 0.1, 0.9, 0.1, 0.1, 0.1], blocks=blocks)
    assert ts.ToDRE(keep=1).select(tokens).kept.tolist() == [2]


def test_isolated_pivot_needs_no_cls_and_with_k_center_is_divprune():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(36, 16, generator=generator)
    tokens = VisualTokens(features, (6, 6))
    assert ts.ToDRE(pivot="isolated").requests() == ()
    for k in (1, 5, 12, 35):
        kept = ts.ToDRE(keep=k, pivot="isolated", diversity="k_center").select(tokens).kept
        assert torch.equal(kept, ts.DivPrune(keep=k).select(tokens).kept)
    # the hand grid: P is the most isolated token (its nearest, B, is 85 degrees away), so the cls pivot's selections
    hand = grid(*HAND)
    assert ts.ToDRE(keep=3, pivot="isolated").select(hand).kept.tolist() == [1, 2, 3]
    assert ts.ToDRE(keep=3, pivot="isolated", diversity="k_center").select(hand).kept.tolist() == [0, 1, 3]


def test_on_a_model_it_keeps_the_loops_selection_of_its_signals():
    model = build_model(LLAVA)
    for diversity, loop in (("max_sum", loop_max_sum), ("k_center", loop_k_center)):
        sieve = ts.ToDRE(keep=12, diversity=diversity)
        seen = []
        select = sieve.select
        sieve.select = lambda tokens: seen.append(tokens) or select(tokens)
        with ts.apply(model, sieve) as run:
            model(**LLAVA.make_inputs([[5, 6, 7]]))
        tokens = seen[0]
        pivot = int(tokens[LAST].float()[0].mean(dim=0).argmax())
        similarity = cosine(tokens.features)
        matrix = similarity if diversity == "max_sum" else 1.0 - similarity
        assert run.stats.images[0].kept.tolist() == sorted(loop(matrix, 12, pivot))


def test_families_without_cls_refuse_the_cls_pivot_and_serve_the_isolated_one():
    model = build_model(QWEN2_5_VL)
    with pytest.raises(ValueError, match="todre needs signals.*no \\[CLS\\] token"):
        ts.apply(model, ts.ToDRE(keep=8))
    with ts.apply(model, ts.ToDRE(keep=8, pivot="isolated")) as run:
        model(**QWEN2_5_VL.make_inputs([[5, 6, 7]]))
    assert [image.after for image in run.stats.images] == [8]


def test_llava_next_is_served_with_one_budget_per_image():
    model = build_model(LLAVA_NEXT)
    with ts.apply(model, ts.ToDRE(keep=16)) as run:
        model(**LLAVA_NEXT.make_inputs([[5, 6, 7]]))
    assert [image.after for image in run.stats.images] == [16]


def test_arguments_are_checked():
    assert ts.ToDRE().defaults() == {"keep": 0.1, "diversity": "max_sum", "pivot": "cls", "pivot_layer": -1}
    for bad in (dict(diversity="max_min"), dict(pivot="center"), dict(pivot_layer=0), dict(pivot_layer=True),
                dict(pivot_layer=1.5)):
        with pytest.raises(ValueError):
            ts.ToDRE(**bad)
    assert ts.ToDRE(keep=1.0).select(grid(*HAND)).kept.tolist() == [0, 1, 2, 3]
    built = ts.build("todre:32,diversity=k_center,pivot=isolated")
    assert (built.keep, built.diversity, built.pivot) == (32, "k_center", "isolated")
