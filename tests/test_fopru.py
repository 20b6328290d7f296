"""FoPru: hand-worked grids for both strategies, the third-party reference on attention maps, and its arguments."""

from __future__ import annotations

import math

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.sieve import VisualTokens
from tokensieve.signals import Signal

RECEIVED = Signal("vision_attention", queries="mean")


def tokens_for(heads, grid=(4, 4), blocks=()):
    """One image whose attention received at the feature layer is ``heads`` (heads, N)."""
    heads = torch.as_tensor(heads, dtype=torch.float)
    return VisualTokens(torch.zeros(heads.shape[1], 8), grid, {RECEIVED: heads}, blocks)


def test_rank_keeps_the_most_attended_tokens_by_head_mean():
    # head 0 favours 3, head 1 favours 12; their mean favours 5 (0.6), then 3 (0.5), then 12 (0.45)
    heads = torch.zeros(2, 16)
    heads[0, 3], heads[1, 12] = 1.0, 0.9
    heads[:, 5] = 0.6
    assert ts.FoPru(keep=3).select(tokens_for(heads)).kept.tolist() == [3, 5, 12]
    assert ts.FoPru(keep=2).select(tokens_for(heads)).kept.tolist() == [3, 5]


def test_row_keeps_whole_rows_then_the_best_of_the_next_row():
    significance = torch.tensor([
        [0.1, 0.1, 0.1, 0.1],  # row 0: 0.4
        [0.0, 0.9, 0.0, 0.0],  # row 1: 0.9 (its best token is 5)
        [0.3, 0.3, 0.3, 0.3],  # row 2: 1.2
        [0.2, 0.0, 0.5, 0.4],  # row 3: 1.1
    ]).flatten().expand(2, -1)
    row = ts.FoPru(keep=8, strategy="row")
    assert row.select(tokens_for(significance)).kept.tolist() == [8, 9, 10, 11, 12, 13, 14, 15]  # rows 2 and 3
    # 6: row 2 whole, then row 3's two best tokens (14, 15), not the rank strategy's 5
    assert ts.FoPru(keep=6, strategy="row").select(tokens_for(significance)).kept.tolist() == [8, 9, 10, 11, 14, 15]
    assert ts.FoPru(keep=6).select(tokens_for(significance)).kept.tolist() == [5, 8, 9, 10, 14, 15]
    assert ts.FoPru(keep=3, strategy="row").select(tokens_for(significance)).kept.tolist() == [8, 9, 10]  # ties: lower


def test_row_ranks_rows_of_pieces_by_their_mean():
    """An anyres-like layout: a 2x2 piece, a 2x4 piece and a newline column (2x1, attention 0)."""
    blocks = (torch.arange(4).view(2, 2), 4 + torch.arange(8).view(2, 4), torch.tensor([[12], [13]]))
    significance = torch.tensor([0.5, 0.5, 0.0, 0.0,  # piece 0: rows of mean 0.5 and 0
                                 0.3, 0.3, 0.3, 0.3, 0.4, 0.4, 0.4, 0.4,  # piece 1: sums 1.2, 1.6; means 0.3, 0.4
                                 0.0, 0.0]).expand(2, -1)
    tokens = tokens_for(significance, (1, 14), blocks)
    assert ts.FoPru(keep=2, strategy="row").select(tokens).kept.tolist() == [0, 1]  # the highest mean, not sum
    assert ts.FoPru(keep=7, strategy="row").select(tokens).kept.tolist() == [0, 1, 4, 8, 9, 10, 11]


def reference(attention: torch.Tensor, k: int, strategy: str) -> list[int]:
    """HydraInfer's ``focal_prunning`` as read (dongxianzhe/hydrainfer, hydrainfer/layer/token_prunning.py) on
    one (heads, N, N) map of a square grid, with the row budget in rows (``k // width``) as its FocalPrunning
    class has it: head mean; the column mean or row mean, whichever varies more; top tokens or top rows."""
    scores = attention.double().mean(0)
    received, given = scores.mean(0), scores.mean(1)
    significance = received if received.var() > given.var() else given
    n = len(significance)
    if strategy == "rank":
        return sorted(torch.argsort(significance, descending=True)[:k].tolist())
    width = math.isqrt(n)
    rows = torch.argsort(significance.view(width, width).sum(1), descending=True)[: k // width]
    return sorted(torch.arange(n).view(width, width)[rows].flatten().tolist())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("strategy, k", [("rank", 5), ("rank", 20), ("row", 6), ("row", 18)])
def test_matches_the_reference_on_softmax_maps(seed, strategy, k):
    """On a softmax map every row sums to 1, so the reference's variance test picks the column mean (the
    attention received, the signal here); with ``k`` a multiple of the width both keep the same whole rows."""
    generator = torch.Generator().manual_seed(seed)
    attention = (torch.randn(3, 36, 36, generator=generator) * 2).softmax(dim=-1)
    signal = attention.mean(dim=1)  # (heads, N): what vision_attention(queries="mean") gives
    kept = ts.FoPru(keep=k, strategy=strategy).select(tokens_for(signal, (6, 6))).kept
    assert kept.tolist() == reference(attention, k, strategy)


def test_a_full_budget_keeps_everything_and_arguments_are_checked():
    assert ts.FoPru(keep=1.0, strategy="row").select(tokens_for(torch.rand(2, 16))).kept.tolist() == list(range(16))
    assert ts.FoPru().defaults() == {"keep": 64, "strategy": "rank", "vision_layer": None}
    assert ts.FoPru(vision_layer=-2).requests() == (Signal("vision_attention", layer=-2, queries="mean"),)
    for bad in (dict(strategy="column"), dict(vision_layer=0), dict(vision_layer="x")):
        with pytest.raises(ValueError):
            ts.FoPru(**bad)
    assert ts.build("fopru:32,strategy=row").strategy == "row"


@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_on_a_model_it_keeps_the_selection_of_its_signal(strategy):
    model = build_model(LLAVA)
    sieve = ts.FoPru(keep=20, strategy=strategy)
    seen = []
    select = sieve.select
    sieve.select = lambda tokens: seen.append(tokens) or select(tokens)
    with ts.apply(model, sieve) as run:
        model(**LLAVA.make_inputs([[5, 6]]))
    significance = seen[0][RECEIVED].mean(0)
    kept = run.stats.images[0].kept.tolist()
    if strategy == "rank":
        assert kept == sorted(torch.argsort(significance, descending=True, stable=True)[:20].tolist())
    else:  # 8x8 grid: the two best rows whole, then the best 4 tokens of the third
        rows = torch.argsort(significance.view(8, 8).mean(1), descending=True, stable=True)[:3].tolist()
        third = (rows[2] * 8 + torch.argsort(significance.view(8, 8)[rows[2]], descending=True, stable=True)[:4]).tolist()
        assert kept == sorted([r * 8 + c for r in rows[:2] for c in range(8)] + third)
