"""VFlowOpt's vision stage: a hand-worked grid, the official recycling loop, a loop of the exact-count rule, the
entropy term, and its arguments."""

from __future__ import annotations

import math
import random

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.methods.vflowopt import cell_ids, importance, patch_entropy, recycle
from tokensieve.sieve import VisualTokens
from tokensieve.signals import Signal

RECEIVED = Signal("vision_attention")

# a 4x4 grid; with m=2 its cells are {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}
SCORES = [0.10, 0.02, 0.50, 0.40, 0.01, 0.03, 0.60, 0.70, 0.20, 0.30, 0.05, 0.04, 0.80, 0.90, 0.06, 0.07]


def tokens_for(scores, grid=(4, 4), blocks=(), heads=None):
    """One image whose feature is its raster index, with the given received attention (two heads: their mean)."""
    scores = torch.as_tensor(scores, dtype=torch.float)
    heads = torch.stack([scores - 0.005, scores + 0.005]) if heads is None else heads
    return VisualTokens(torch.arange(float(len(scores)))[:, None], grid, {RECEIVED: heads}, blocks)


def official(scores, grid, k, m, features):
    """The official recycling (llava_qwen_training_free.py) one token at a time, with its count rule: the lowest
    ``N - k + int(N/m²)`` tokens, grouped by cell, each group's score-weighted mean put into its best member."""
    n, w = len(scores), grid[1]
    low = sorted(range(n), key=lambda i: scores[i])[: n - k + int(n / (m * m))]
    kept, merged, groups = set(range(n)) - set(low), {}, {}
    for i in low:
        groups.setdefault((math.floor(i // w / m), math.floor(i % w / m)), []).append(i)
    for members in groups.values():
        best = max(members, key=lambda i: scores[i])
        kept.add(best)
        merged[best] = sum(scores[i] * features[i] for i in members) / sum(scores[i] for i in members)
    return sorted(kept), merged


def exact_count(scores, cells, k):
    """The rule as the docstring states it, one token at a time: kept indices and each token's group (a kept index)."""
    n = len(scores)
    low, seen, absorbed = [], set(), 0
    for i in sorted(range(n), key=lambda i: (scores[i], -i)):  # lowest first; ties: the higher index is lower
        if absorbed == n - k:
            break
        low.append(i)
        absorbed += cells[i] in seen
        seen.add(cells[i])
    best = {}
    for i in low:
        if cells[i] not in best or (scores[i], -i) > (scores[best[cells[i]]], -best[cells[i]]):
            best[cells[i]] = i
    target = [best[cells[i]] if i in low else i for i in range(n)]
    kept = sorted(sorted(set(target), key=lambda i: (-scores[i], i))[:k])
    return kept, [t if t in kept else None for t in target]


def test_hand_worked_grid_recycles_each_cell_into_its_best_low_token():
    selection = ts.VFlowOpt(keep=8, m=2).select(tokens_for(SCORES))
    # lowest first: 4 1 5 | 11 10 14 15 | 0 | 8 9 | 3 2: the 12th token (2) is the 8th that is not its cell's
    # first, so these 12 recycle; cells' best: 0, 2, 9, 15; 6, 7, 12, 13 stay alone
    assert selection.kept.tolist() == [0, 2, 6, 7, 9, 12, 13, 15]
    assert selection.assignment.tolist() == [0, 0, 1, 1, 0, 0, 2, 3, 4, 4, 7, 7, 5, 6, 7, 7]
    assert selection.sizes().tolist() == [4, 2, 1, 1, 2, 1, 1, 4]
    merged = selection.merged(torch.arange(16.0)[:, None]).flatten()
    expected = [(0.10 * 0 + 0.02 * 1 + 0.01 * 4 + 0.03 * 5) / 0.16, (0.5 * 2 + 0.4 * 3) / 0.9, 6, 7,
                (0.2 * 8 + 0.3 * 9) / 0.5, 12, 13, (0.04 * 11 + 0.05 * 10 + 0.06 * 14 + 0.07 * 15) / 0.22]
    torch.testing.assert_close(merged, torch.tensor(expected))
    # the official count rule lands on 8 here (12 = 16 - 8 + int(16/4)): the same tokens and features
    kept, features = official(SCORES, (4, 4), 8, 2, list(range(16)))
    assert kept == selection.kept.tolist()
    assert all(abs(features[i] - merged[selection.kept.tolist().index(i)]) < 1e-5 for i in features)


def test_equals_the_official_loop_whenever_its_count_is_the_budget():
    rng = random.Random(0)
    compared = 0
    for trial in range(40):
        grid, m = rng.choice([((6, 6), 3.0), ((6, 6), 2.5), ((5, 7), 2.0), ((6, 6), 4.2)])
        n = grid[0] * grid[1]
        scores = [rng.random() for _ in range(n)]
        for k in range(1, n):
            kept, features = official(scores, grid, k, m, list(range(n)))
            if len(kept) != k:
                continue
            compared += 1
            selection = ts.VFlowOpt(keep=k, m=m).select(tokens_for(scores, grid, heads=torch.tensor([scores])))
            assert selection.kept.tolist() == kept
            merged = selection.merged(torch.arange(float(n))[:, None]).flatten().tolist()
            for i, value in features.items():
                assert value == pytest.approx(merged[kept.index(i)], rel=1e-5)
    assert compared > 300


def test_equals_a_loop_of_the_exact_count_rule_with_ties_pieces_and_small_budgets():
    rng = random.Random(1)
    blocks = (torch.arange(9).view(3, 3), 9 + torch.arange(20).view(4, 5), 29 + torch.arange(4).view(4, 1))
    for trial in range(30):
        scores = [float(rng.randrange(6)) for _ in range(33)]  # many ties
        m = rng.choice([0.5, 1.0, 1.5, 2.0, 3.0, 10.0])
        cells = cell_ids(blocks, 33, m).tolist()
        for k in range(1, 33):
            selection = recycle(torch.tensor(scores), torch.tensor(cells), k)
            kept, target = exact_count(scores, cells, k)
            assert selection.kept.tolist() == kept
            assert len(kept) == k
            assert [kept[a] if a >= 0 else None for a in selection.assignment.tolist()] == target


def test_cells_are_m_by_m_within_each_piece():
    blocks = (torch.arange(4).view(2, 2), 4 + torch.arange(6).view(2, 3))
    assert cell_ids(blocks, 10, 2.0).tolist() == [0, 0, 0, 0, 1, 1, 2, 1, 1, 2]
    # floor(row/1.5), floor(col/1.5): 0, 0, 1 on each axis; m < 1 leaves no gaps in the numbering
    assert cell_ids((torch.arange(9).view(3, 3),), 9, 1.5).tolist() == [0, 0, 1, 0, 0, 1, 2, 2, 3]
    assert cell_ids((torch.arange(4).view(2, 2),), 4, 0.5).tolist() == [0, 1, 2, 3]
    # one cell per piece: each piece's low tokens go into that piece's best low token, never across pieces
    scores = [0.1, 0.2, 0.9, 0.3, 0.4, 0.5, 0.05, 0.8, 0.6, 0.7]
    selection = ts.VFlowOpt(keep=5, m=10).select(tokens_for(scores, (1, 10), blocks))
    # lowest first: 6 (opens B) 0 (opens A) 1 3 4 5 8: five absorbed; A's best low token 3, B's 8
    assert selection.kept.tolist() == [2, 3, 7, 8, 9]
    assert selection.assignment.tolist() == [1, 1, 0, 1, 3, 3, 3, 2, 3, 4]


def test_ties_keep_the_lower_index():
    selection = ts.VFlowOpt(keep=2, m=10).select(tokens_for([0.5] * 4, (2, 2)))
    assert selection.kept.tolist() == [0, 1]  # 3 opens the cell, 2 and 1 absorbed: 1 is the cell's best
    assert selection.assignment.tolist() == [0, 1, 1, 1]


def test_budget_under_the_cell_count_keeps_the_best_representatives():
    # m=2 on 4x4: four cells, every token low; their best are 0 (0.10), 2 (0.50), 13 (0.90), 15 (0.07)
    selection = ts.VFlowOpt(keep=2, m=2).select(tokens_for(SCORES))
    assert selection.kept.tolist() == [7, 13]  # cell {2,3,6,7}'s best is 7 (0.70)
    assert selection.assignment.tolist() == [-1, -1, 0, 0, -1, -1, 0, 0, 1, 1, -1, -1, 1, 1, -1, -1]
    # cells of one token (m <= 1): plain top-k, the rest dropped without merging
    plain = ts.VFlowOpt(keep=5, m=1).select(tokens_for(SCORES))
    assert plain.kept.tolist() == ts.selection.top_k_in_order(torch.tensor(SCORES), 5).tolist()
    assert (plain.assignment >= 0).sum() == 5 and plain.sizes().tolist() == [1] * 5


def test_keep_all_returns_every_token_without_a_merge_map():
    selection = ts.VFlowOpt(keep=1.0).select(tokens_for(SCORES))
    assert selection.kept.tolist() == list(range(16)) and selection.assignment is None


def test_weights_are_scores_in_groups_and_one_alone():
    scores = [0.0, 0.0, 0.0, 1.0]  # the low group {0,1,2} scores 0: its merge is a plain mean, not 0/0
    selection = ts.VFlowOpt(keep=2, m=10).select(tokens_for(scores, (2, 2), heads=torch.tensor([scores])))
    assert selection.kept.tolist() == [0, 3]
    assert selection.weights[3] == 1.0
    torch.testing.assert_close(selection.merged(torch.arange(4.0)[:, None]).flatten(), torch.tensor([1.0, 3.0]))


def test_adaptive_mass_budget_counts_on_the_scores():
    scores = torch.tensor(SCORES)
    sieve = ts.VFlowOpt(keep=ts.Adaptive(mass=0.5, min=1), m=2)
    selection = sieve.select(tokens_for(SCORES))
    assert len(selection.kept) == sieve.budget.count(scores)


def test_patch_entropy_and_importance_by_hand():
    def patch(*pixels):  # four RGB pixels as a 2x2 patch
        return torch.tensor(pixels, dtype=torch.float).T.reshape(3, 2, 2)

    patches = torch.stack([
        patch((100, 100, 100), (100, 100, 100), (100, 100, 100), (100, 100, 100)),  # one level: 0 bits
        patch((0, 0, 0), (0, 0, 0), (255, 255, 255), (255, 255, 255)),  # two levels, half each: 1 bit
        patch((0, 0, 0), (85, 85, 85), (170, 170, 170), (255, 255, 255)),  # four levels: 2 bits
        patch((255, 0, 0), (0, 255, 0), (0, 0, 255), (85, 85, 85)),  # grey = 0.3333 per channel: all 85
    ])
    torch.testing.assert_close(patch_entropy(patches), torch.tensor([0.0, 1.0, 2.0, 0.0]))
    relevance = torch.tensor([0.1, 0.2])
    torch.testing.assert_close(importance(relevance, torch.tensor([0.0, math.log(3)]), 0.4), torch.tensor([0.2, 0.5]))
    assert torch.equal(importance(relevance, torch.tensor([0.0, 1.0]), 0.0), relevance)


def test_requests_and_defaults():
    sieve = ts.VFlowOpt()
    assert (sieve.keep, sieve.t, sieve.m, sieve.alpha_v) == (0.1166, 39.265, 17.387, 0.0)
    assert sieve.requests() == (Signal("vision_attention", layer=None, queries="mean"),)
    assert ts.VFlowOpt(relevance="cls", vision_layer=-2).requests() == (
        Signal("vision_attention", layer=-2, queries="cls"),)
    assert ts.build("vflowopt:0.25,m=12,t=30") == ts.VFlowOpt(keep=0.25, m=12, t=30)


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha_v": 0.5}, "alpha_v=0.5: the entropy term needs each patch's pixels"),
    ({"m": 0}, "m must be > 0"),
    ({"m": float("nan")}, "m must be a finite number"),
    ({"t": -1.0}, "t must be >= 0"),
    ({"t": True}, "t must be a finite number"),
    ({"relevance": "global"}, "official global-token rows need a signal"),
    ({"relevance": "last"}, "relevance must be one of"),
    ({"vision_layer": 0}, "vision layer number"),
    ({"keep": ts.Adaptive(coverage=0.9)}, "vflowopt takes Adaptive\\(mass=...\\)"),
])
def test_bad_arguments_are_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ts.VFlowOpt(**kwargs)


def test_on_a_tiny_llava_every_token_lands_in_a_group():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs([[5, 6, 7, 8]])
    with ts.apply(model, ts.VFlowOpt(keep=16, m=4)) as run:
        model(**inputs)
    (record,) = run.stats.images
    (stage,) = record.stages
    assert record.after == 16 and int(stage.sizes.sum()) == record.before == 64
