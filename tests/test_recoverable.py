"""Recoverable Compression: the tensor LOF worked by hand and against a plain loop, each selection rule on a hand-worked
4×4 grid, the whole selection against a reference loop, the merge map, refusals and arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from conftest import build_model
from tiny_qwen2_vl import QWEN2_VL
from tokensieve.methods.recoverable import local_outlier_factor, outliers
from tokensieve.sieve import VisualTokens
from tokensieve.signals import Signal

LAST = Signal("cls_attention", layers=(-1,))


def reference_lof(values, neighbours: int) -> list[float]:
    """sklearn's LOF, one point at a time: the k nearest other points (ties to the lower index), k-distance,
    reachability distance max(d(p, o), k-distance(o)), lrd = 1 / (mean reach + 1e-10), LOF = mean lrd(o) / lrd(p)."""
    x = [float(v) for v in values]
    n = len(x)
    k = max(1, min(neighbours, n - 1))
    near = [sorted((abs(x[i] - x[j]), j) for j in range(n) if j != i)[:k] for i in range(n)]
    k_distance = [points[-1][0] for points in near]
    density = [1 / (sum(max(d, k_distance[j]) for d, j in points) / k + 1e-10) for points in near]
    return [sum(density[j] for _, j in points) / k / density[i] for i, points in enumerate(near)]


def test_lof_by_hand():
    # k=1: neighbours 0->1, 1->0 (1 and 2 are equally near: the nearer place in sorted order, left first), 2->1,
    # 10->2; k-distances 1, 1, 1, 8; every reach is 1 but 10's (8): LOF 1, 1, 1 and 8
    values = torch.tensor([0.0, 1.0, 2.0, 10.0])
    assert local_outlier_factor(values, 1).tolist() == pytest.approx([1, 1, 1, 8])
    # k=2: neighbours 0->{1,2}, 1->{0,2}, 2->{1,0}, 10->{2,1}; k-distances 2, 1, 2, 9;
    # mean reach 1.5, 2, 1.5, 8.5: lrd 2/3, 1/2, 2/3, 2/17; LOF 7/8, 4/3, 7/8, (7/12)/(2/17) = 119/24
    assert local_outlier_factor(values, 2).tolist() == pytest.approx([7 / 8, 4 / 3, 7 / 8, 119 / 24])
    assert outliers(values, 2) == 1 and outliers(values, 1) == 1
    # duplicates: every reach is 0, every density 1e10, every LOF 1; too few points: none
    assert local_outlier_factor(torch.full((5,), 0.3), 3).tolist() == pytest.approx([1] * 5)
    assert outliers(torch.full((5,), 0.3), 3) == 0 and outliers(torch.tensor([1.0]), 3) == 0
    # neighbours beyond N - 1 are capped as sklearn does
    assert local_outlier_factor(values, 20).tolist() == pytest.approx(reference_lof(values, 3))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("neighbours", [1, 3, 10, 20])
def test_lof_matches_the_reference_loop(seed, neighbours):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 60, (1,), generator=generator))
    values = torch.rand(n, generator=generator) ** 4  # heavy tailed: a few outliers
    assert local_outlier_factor(values, neighbours).tolist() == pytest.approx(reference_lof(values, neighbours), rel=1e-9)


def hand_worked_tokens(text: bool = True) -> VisualTokens:
    """A 4×4 grid. [CLS] attention (one head; before it is normalised to sum 1): spikes at 5 (0.5) and 10 (0.4)
    over an even band 0.010..0.023 where 0 and 15 are highest. Relevance (cosine of the projected token to the one
    instruction token): 5 is highest (0.95), 6 (0.9) and 9 (0.8) stand out of an even band 0.10..0.21 where 10
    sits at 0.15. Keys (heads concatenated): columns 0-1 along one axis, columns 2-3 along another."""
    rest = [t for t in range(16) if t not in (0, 5, 10, 15)]
    attention = torch.zeros(16)
    attention[rest + [15, 0]] = 0.010 + 0.001 * torch.arange(14).float()
    attention[5], attention[10] = 0.5, 0.4
    band = [t for t in range(16) if t not in (5, 6, 9, 10)]
    relevance = torch.zeros(16)
    relevance[band] = 0.10 + 0.01 * torch.arange(12).float()
    relevance[[5, 6, 9, 10]] = torch.tensor([0.95, 0.9, 0.8, 0.15])
    projected = torch.stack([(1 - relevance**2).sqrt(), torch.zeros(16), relevance], dim=1)
    row, column = torch.arange(16) // 4, torch.arange(16) % 4
    left = (column < 2).float()
    keys = torch.stack([left, 0.1 * row * left, 0.1 * row * (1 - left), 1 - left], dim=1)  # (N, heads·d_head)
    signals = {
        LAST: (attention / attention.sum())[None, None],  # one head: the one-head attention is this row itself
        "vision_keys": keys.view(16, 2, 2).transpose(0, 1),
        "text_embeddings": torch.tensor([[0.0, 0.0, 2.0]]) if text else torch.zeros(0, 3),
    }
    return VisualTokens(projected, (4, 4), signals)


def test_the_lof_counts_on_the_hand_worked_grid():
    tokens = hand_worked_tokens()
    attention = ts.RecoverableCompression().attention(tokens)
    torch.testing.assert_close(attention, tokens[LAST][0, 0])
    assert (local_outlier_factor(attention, 3) > 1.5).nonzero().flatten().tolist() == [5, 10]
    relevance = ts.RecoverableCompression().relevance(tokens)
    torch.testing.assert_close(relevance, tokens.features[:, 2])
    with_filter_at_minimum = torch.where(torch.isin(torch.arange(16), torch.tensor([5, 10])), relevance.min(), relevance)
    assert (local_outlier_factor(with_filter_at_minimum, 3) > 1.5).nonzero().flatten().tolist() == [6, 9]


def test_hand_worked_grid():
    # 3 LOF neighbours on this small grid (the code's 20 are for 576 tokens). Visual filter: the two attention
    # outliers, 5 and 10. Text: 6 and 9 are the relevance outliers (5 is the most relevant but already kept, and
    # sits at the minimum for the count), so floor((16 - 2) · 2/16) = 1 is recovered: 6. Centres: the budget's
    # remaining 2 by attention among the rest, 0 and 15.
    selection = ts.RecoverableCompression(keep=5, neighbours=3).select(hand_worked_tokens())
    assert selection.kept.tolist() == [0, 5, 6, 10, 15]
    # every other token joins the centre of its key: columns 0-1 token 0 (slot 0), columns 2-3 token 15 (slot 4)
    assert selection.assignment.tolist() == [0, 0, 4, 4, 0, 1, 2, 4, 0, 0, 3, 4, 0, 0, 4, 4]
    attention = hand_worked_tokens()[LAST][0, 0]
    kept = torch.zeros(16, dtype=torch.bool)
    kept[[0, 5, 6, 10, 15]] = True
    torch.testing.assert_close(selection.weights, torch.where(kept, 1.0, attention))  # up to the log-softmax's rounding
    assert selection.sizes().tolist() == [7, 1, 1, 1, 6]
    # a centre becomes (x_c + sum a_j x_j) / (1 + sum a_j): the code's sum, normalised
    values = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    members = [1, 4, 8, 9, 12, 13]
    expected = (values[0] + (attention[members, None] * values[members]).sum(0)) / (1 + attention[members].sum())
    torch.testing.assert_close(selection.merged(values)[0], expected)
    torch.testing.assert_close(selection.merged(values)[1], values[5])
    # smaller budgets: one centre takes every remaining token; then none, and the rest is dropped; the filter trimmed
    four = ts.RecoverableCompression(keep=4, neighbours=3).select(hand_worked_tokens())
    assert four.kept.tolist() == [0, 5, 6, 10] and four.assignment.tolist() == [0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0]
    three = ts.RecoverableCompression(keep=3, neighbours=3).select(hand_worked_tokens())
    assert three.kept.tolist() == [5, 6, 10] and three.sizes().tolist() == [1, 1, 1]
    assert ts.RecoverableCompression(keep=1, neighbours=3).select(hand_worked_tokens()).kept.tolist() == [5]
    assert ts.RecoverableCompression(keep=16, neighbours=3).select(hand_worked_tokens()).kept.tolist() == list(range(16))


def test_hand_worked_grid_without_instruction_or_budget():
    # no instruction tokens: every relevance is equal, nothing stands out, no token is recovered by text; the
    # centres are the three highest of the band, 0, 15 and 14
    selection = ts.RecoverableCompression(keep=5, neighbours=3).select(hand_worked_tokens(text=False))
    assert selection.kept.tolist() == [0, 5, 10, 14, 15]
    # adaptive: the code's count of centres, the LOF outliers of attention among the rest: none on the even band
    adaptive = ts.RecoverableCompression(keep=5, adaptive=True, neighbours=3).select(hand_worked_tokens())
    assert adaptive.kept.tolist() == [5, 6, 10] and adaptive.sizes().tolist() == [1, 1, 1]
    assert ts.RecoverableCompression(keep=0.5, adaptive=True, neighbours=3).select(hand_worked_tokens()).kept.tolist() == [5, 6, 10]
    # keep=1.0 is no cap in the adaptive count (the paper's own budget), and a cap of 2 trims the filter's outliers
    assert ts.RecoverableCompression(keep=1.0, adaptive=True, neighbours=3).select(hand_worked_tokens()).kept.tolist() == [5, 6, 10]
    assert ts.RecoverableCompression(keep=2, adaptive=True, neighbours=3).select(hand_worked_tokens()).kept.tolist() == [5, 10]
    # adaptive with no outlier anywhere keeps the highest [CLS] token, which takes everything
    tokens = hand_worked_tokens(text=False)
    flat = VisualTokens(tokens.features, (4, 4), {**tokens.signals, LAST: torch.full((1, 2, 16), 1 / 16)})
    kept = ts.RecoverableCompression(keep=5, adaptive=True, neighbours=3).select(flat)
    assert kept.kept.tolist() == [0] and kept.assignment.tolist() == [0] * 16


def reference_select(tokens: VisualTokens, k: int, adaptive: bool, neighbours: int = 20, centre_neighbours: int = 10):
    """The rule with Python lists: the reference LOF, sorts keyed by (score, index), a loop over tokens for the map."""
    n = len(tokens)
    rows = tokens[LAST][0].double()  # the one-head attention: softmax over patches of sum_h log p_h / sqrt(heads)
    logits = [sum(math.log(p) for p in column) / math.sqrt(len(rows)) for column in rows.T.tolist()]
    attention = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
    unit = F.normalize(tokens.features.double(), dim=-1)
    text = F.normalize(tokens["text_embeddings"].double(), dim=-1)
    relevance = (unit @ text.T).mean(dim=1).tolist()

    def count(values, kk):
        return sum(factor > 1.5 for factor in reference_lof(values, kk)) if len(values) > 1 else 0

    def top(scores, among, how_many):
        return sorted(among, key=lambda i: (-scores[i], i))[:how_many]

    visual_count = min(count(attention, neighbours), k)
    visual = top(attention, range(n), visual_count)
    lowest = min(relevance)
    text_count = count([lowest if i in visual else relevance[i] for i in range(n)], neighbours)
    text_count = min((n - visual_count) * text_count // n, k - visual_count)
    picked = set(visual) | set(top(relevance, [i for i in range(n) if i not in visual], text_count))
    rest = [i for i in range(n) if i not in picked]
    left = k - visual_count - text_count
    if adaptive:
        left = min(count([attention[i] for i in rest], centre_neighbours), left) if rest else 0
        left = max(left, int(not picked))
    centres = sorted(top(attention, rest, left))
    kept = sorted(picked | set(centres))
    keys = F.normalize(tokens["vision_keys"].double().transpose(0, 1).reshape(n, -1), dim=-1)
    assignment = []
    for i in range(n):
        if i in kept:
            assignment.append(kept.index(i))
        elif centres:
            best = max(centres, key=lambda c: (float(keys[i] @ keys[c]), -c))
            assignment.append(kept.index(best))
        else:
            assignment.append(-1)
    return kept, assignment


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("adaptive", [False, True])
def test_selection_matches_the_reference_loop(seed, adaptive):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(12, 80, (1,), generator=generator))
    k = int(torch.randint(1, n, (1,), generator=generator))
    heads = 3
    signals = {
        LAST: torch.softmax(torch.randn(1, heads, n, generator=generator), dim=-1),
        "vision_keys": torch.randn(heads, n, 4, generator=generator),
        "text_embeddings": torch.randn(int(torch.randint(0, 4, (1,), generator=generator)), 8, generator=generator),
    }
    features = torch.randn(n, 8, generator=generator)
    features[:3] += 4 * signals["text_embeddings"].sum(0)  # a few tokens close to the instruction
    tokens = VisualTokens(features, (1, n), signals)
    selection = ts.RecoverableCompression(keep=k, adaptive=adaptive, neighbours=20).select(tokens)
    kept, assignment = reference_select(tokens, k, adaptive)
    assert selection.kept.tolist() == kept
    assert selection.assignment.tolist() == assignment
    assert len(kept) == k or adaptive


def test_the_one_head_attention_is_the_code_s_softmax_over_the_whole_query_and_key():
    # the code: softmax(q·k / sqrt(d_model)) over the concatenated heads; the signal: per-head rows over the patches
    generator = torch.Generator().manual_seed(0)
    heads, n, d_head = 4, 10, 8
    query, keys = torch.randn(heads, d_head, generator=generator), torch.randn(heads, n + 1, d_head, generator=generator)
    per_head = torch.einsum("hd,hnd->hn", query, keys) / d_head**0.5
    rows = per_head.softmax(dim=-1)[:, 1:]  # [CLS] column dropped, as the signal
    one_head = (query.reshape(-1) @ keys.transpose(0, 1).reshape(n + 1, -1).T / (heads * d_head) ** 0.5)[1:].softmax(dim=0)
    tokens = VisualTokens(torch.zeros(n, 2), (2, 5), {LAST: rows[None]})
    torch.testing.assert_close(ts.RecoverableCompression().attention(tokens), one_head)
    at_feature_layer = VisualTokens(torch.zeros(n, 2), (2, 5), {"cls_attention": rows})
    torch.testing.assert_close(ts.RecoverableCompression(attention_layer=None).attention(at_feature_layer), one_head)
    assert ts.RecoverableCompression(attention_layer=None).requests()[0] == Signal("cls_attention")
    assert ts.RecoverableCompression().requests() == (LAST, "vision_keys", "text_embeddings")


def test_towers_without_cls_are_refused():
    model = build_model(QWEN2_VL)
    with pytest.raises(ValueError, match=r"recoverable needs signals .*no \[CLS\] token"):
        ts.apply(model, ts.RecoverableCompression())


def test_defaults_and_argument_checks():
    assert ts.RecoverableCompression().defaults() == {
        "keep": 64, "adaptive": False, "neighbours": 20, "centre_neighbours": 10, "attention_layer": -1}
    assert ts.build("recoverable:0.1,adaptive=True").adaptive is True
    with pytest.raises(ValueError, match="adaptive must be True"):
        ts.RecoverableCompression(adaptive=1)
    with pytest.raises(ValueError, match="neighbours must be a count of LOF neighbours"):
        ts.RecoverableCompression(neighbours=0)
    with pytest.raises(ValueError, match="centre_neighbours must be a count"):
        ts.RecoverableCompression(centre_neighbours=2.5)
    with pytest.raises(ValueError, match="attention_layer must be a vision layer"):
        ts.RecoverableCompression(attention_layer=0)
    assert math.isclose(ts.RecoverableCompression(keep=0.1).budget.value, 0.1)
