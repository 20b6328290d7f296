"""MMTok and the shared greedy maximum coverage: a brute-force greedy loop, the (1 - 1/e) bound against the
exhaustive optimum, hand-worked tokens, the reference objective as read from the official code, its arguments."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from tiny_llava_next import LLAVA_NEXT
from tiny_models import LLAVA
from tokensieve.selection import coverage_greedy
from tokensieve.sieve import VisualTokens


def cover(matrix: torch.Tensor, chosen) -> float:
    """f(S) = sum over rows of the best cover by the chosen columns (0 for none)."""
    return matrix[:, list(chosen)].max(dim=1).values.sum().item() if chosen else 0.0


def brute_force_greedy(matrix: torch.Tensor, k: int) -> list[int]:
    """The reference: at each step evaluate f(S + {j}) for every column left and add the best (ties: lower)."""
    matrix, chosen = matrix.double(), []
    for _ in range(k):
        values = {j: cover(matrix, chosen + [j]) for j in range(matrix.shape[1]) if j not in chosen}
        chosen.append(max(values, key=lambda j: (values[j], -j)))
    return chosen


@pytest.mark.parametrize("seed", range(8))
def test_coverage_greedy_is_the_brute_force_greedy(seed):
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.rand(30, 12, generator=generator) ** 3
    assert coverage_greedy(matrix, 7).tolist() == brute_force_greedy(matrix, 7)


@pytest.mark.parametrize("seed", range(6))
def test_coverage_greedy_is_within_one_minus_one_over_e_of_the_optimum(seed):
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.rand(10, 8, generator=generator).double()
    greedy = cover(matrix, coverage_greedy(matrix, 3).tolist())
    best = max(cover(matrix, subset) for subset in itertools.combinations(range(8), 3))
    assert best >= greedy >= (1 - 1 / math.e) * best


def test_coverage_greedy_by_hand():
    matrix = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.6], [0.0, 0.0, 0.2]])
    # gains 1, 1, 1.3: column 2; then 0.5 (column 0) against 0.4 (column 1); then column 1
    assert coverage_greedy(matrix, 3).tolist() == [2, 0, 1]
    # once everything is covered every gain is 0: the lowest column not chosen yet, never a repeat
    assert coverage_greedy(torch.eye(2).repeat(1, 2), 4).tolist() == [0, 1, 2, 3]


def image(features, text, vision=None):
    features = torch.as_tensor(features, dtype=torch.float)
    signals = {"text_embeddings": torch.as_tensor(text, dtype=torch.float).reshape(-1, features.shape[1])}
    signals["vision_features"] = features if vision is None else torch.as_tensor(vision, dtype=torch.float)
    return VisualTokens(features, (1, len(features)), signals)


def test_by_hand_the_text_token_first_and_one_of_a_duplicate_pair():
    projected = torch.eye(4)
    vision = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # tokens 0 and 1: duplicates
    # the text matches token 3; then 0 covers itself and its duplicate 1; then 2 (1 would add almost nothing)
    assert ts.MMTok(keep=3).select(image(projected, [[0, 0, 0, 1.0]], vision)).kept.tolist() == [0, 2, 3]
    # the text matches token 1 instead: 1 first, and 0 (its duplicate) is never needed
    assert ts.MMTok(keep=3).select(image(projected, [[0, 1.0, 0, 0]], vision)).kept.tolist() == [1, 2, 3]
    # in the projected space the four tokens are distinct: the duplicate pair is no longer seen
    kept = ts.MMTok(keep=3, vision_space="projected").select(image(projected, [[0, 0, 0, 1.0]], vision)).kept
    assert kept.tolist() == [0, 1, 3]


def reference_mmtok(projected, clip, text, k, alpha=0.5, tv=0.02, vv=0.2) -> list[int]:
    """The official objective and greedy as read (Ironieser/MMTok, mm_coverage_selection in
    mmtok/core/semantic_selector.py), written out as a loop: unit vectors (norms floored at 1e-8), text rows
    softmax(cos * (1/tv)) / m against the projected tokens, vision rows softmax(cos * (1/vv)) / n among the
    vision features, times alpha; k times, the token whose summed positive improvement over the rows' best
    cover is largest; sorted."""
    def unit(x):
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    m, n = len(text), len(projected)
    rows = [row for row in (unit(text) @ unit(projected).T * (1.0 / tv)).softmax(dim=1) / m]
    rows += [row * alpha for row in (unit(clip) @ unit(clip).T * (1.0 / vv)).softmax(dim=1) / n]
    best, chosen = [0.0] * len(rows), []
    for _ in range(k):
        gains = [sum(max(row[j].item() - b, 0.0) for row, b in zip(rows, best)) if j not in chosen else -math.inf
                 for j in range(n)]
        pick = max(range(n), key=lambda j: (gains[j], -j))
        chosen.append(pick)
        best = [max(b, row[pick].item()) for row, b in zip(rows, best)]
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kwargs", [{}, {"alpha": 0.8, "tv_temperature": 0.01}, {"alpha": 0.0}])
def test_selection_is_the_reference_on_fixed_tensors(seed, kwargs):
    generator = torch.Generator().manual_seed(seed)
    projected, clip, text = (torch.randn(*shape, generator=generator) for shape in ((36, 16), (36, 12), (5, 16)))
    kept = ts.MMTok(keep=9, **kwargs).select(image(projected, text, clip)).kept.tolist()
    renamed = {"alpha": kwargs.get("alpha", 0.5), "tv": kwargs.get("tv_temperature", 0.02)}
    assert kept == reference_mmtok(projected, clip, text, 9, **renamed)


def test_without_instruction_tokens_only_the_image_is_covered():
    generator = torch.Generator().manual_seed(5)
    projected, clip = torch.randn(20, 8, generator=generator), torch.randn(20, 6, generator=generator)
    tokens = image(projected, torch.zeros(0, 8), clip)
    unit = torch.nn.functional.normalize(clip, dim=-1)
    expected = sorted(brute_force_greedy((unit @ unit.T * 5.0).softmax(dim=1), 6))
    assert ts.MMTok(keep=6).select(tokens).kept.tolist() == expected


def test_the_instruction_changes_the_selection_on_a_model():
    model = build_model(LLAVA)
    kept = []
    for text in ([5, 6, 7], [40, 41, 90]):
        with ts.apply(model, ts.MMTok(keep=16)) as run:
            model(**LLAVA.make_inputs([text]))
        kept.append(run.stats.images[0].kept.tolist())
    assert kept[0] != kept[1]


def test_on_a_model_it_keeps_the_reference_selection_of_its_signals():
    model = build_model(LLAVA)
    sieve = ts.MMTok(keep=12)
    seen = []
    select = sieve.select
    sieve.select = lambda tokens: seen.append(tokens) or select(tokens)
    with ts.apply(model, sieve) as run:
        model(**LLAVA.make_inputs([[5, 6, 7]]))
    tokens = seen[0]
    expected = reference_mmtok(tokens.features.float(), tokens["vision_features"].float(),
                               tokens["text_embeddings"].float(), 12)
    assert run.stats.images[0].kept.tolist() == expected


def test_llava_next_refuses_vision_features_and_serves_the_projected_space():
    model = build_model(LLAVA_NEXT)
    inputs = LLAVA_NEXT.make_inputs([[5, 6, 7]])
    with pytest.raises(ValueError, match="mmtok needs signals"):
        ts.apply(model, ts.MMTok(keep=16))
    with ts.apply(model, ts.MMTok(keep=16, vision_space="projected")) as run:
        model(**inputs)
    assert [r.after for r in run.stats.images] == [16]

def test_arguments_are_checked():
    assert ts.MMTok().defaults() == {"keep": 64, "alpha": 0.5, "tv_temperature": 0.02, "vv_temperature": 0.2,
                                     "vision_space": "vision"}
    assert ts.MMTok(vision_space="projected").requests() == ("text_embeddings",)
    for bad in (dict(alpha=-1), dict(alpha="x"), dict(tv_temperature=0), dict(vv_temperature=True),
                dict(vision_space="clip")):
        with pytest.raises(ValueError):
            ts.MMTok(**bad)
    assert ts.MMTok(keep=1.0).select(image(torch.eye(3), [[1.0, 0, 0]])).kept.tolist() == [0, 1, 2]
    assert ts.build("mmtok:32,vision_space=projected").vision_space == "projected"
