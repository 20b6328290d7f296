"""HiPrune: hand-worked grids, a reference loop, and its arguments."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.sieve import VisualTokens
from tokensieve.signals import Signal

OBJECT, DEEP = Signal("vision_attention", layer=9), Signal("vision_attention")


def tokens_for(shallow, deep, grid=(4, 4), blocks=()):
    """One image whose object-layer and deep-layer received attention (two heads, same scores) are given."""
    shallow, deep = torch.as_tensor(shallow, dtype=torch.float), torch.as_tensor(deep, dtype=torch.float)
    return VisualTokens(torch.zeros(len(shallow), 8), grid, {OBJECT: shallow.expand(2, -1), DEEP: deep.expand(2, -1)}, blocks)


def reference(shallow, deep, grid, k, alpha):
    """The algorithm as the docstring states it, one token at a time."""
    n, (h, w) = len(shallow), grid
    order = sorted(range(n), key=lambda i: (-shallow[i], i))
    anchors = order[: round(k * alpha / 5)]
    buffers = set()
    for a in anchors:
        y, x = divmod(a, w)
        buffers |= {yy * w + xx for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)) if 0 <= yy < h and 0 <= xx < w}
    first = anchors + [i for i in order if i in buffers and i not in anchors]
    first = first[:k]
    rest = sorted((i for i in range(n) if i not in first), key=lambda i: (-deep[i], i))
    return sorted(first + rest[: k - len(first)])


def test_hand_worked_grid_anchor_buffers_registers():
    shallow = [0.0] * 16
    shallow[5] = 1.0  # the anchor: row 1, column 1
    deep = [float(i) for i in range(16)]  # registers: the highest indices not yet chosen
    kept = ts.HiPrune(keep=10, alpha=0.5).select(tokens_for(shallow, deep)).kept  # round(10 * 0.5 / 5) = 1 anchor
    assert kept.tolist() == [1, 4, 5, 6, 9, 11, 12, 13, 14, 15]


def test_buffers_do_not_wrap_across_row_ends():
    shallow = [0.0] * 16
    shallow[3] = 1.0  # top-right corner: neighbours 2 (left) and 7 (below); the code's +1 would add 4
    kept = ts.HiPrune(keep=5, alpha=1.0).select(tokens_for(shallow, [0.0] * 16)).kept  # 1 anchor
    assert kept.tolist() == [0, 1, 2, 3, 7]  # 3 and its two buffers, then registers by index (all deep scores tie)


def test_buffers_stay_in_their_piece():
    """An anyres-like layout: a 2x2 piece and a 2x3 piece; the anchor's neighbours come from its own piece."""
    blocks = (torch.arange(4).view(2, 2), 4 + torch.arange(6).view(2, 3))
    shallow = [0.0] * 10
    shallow[4] = 1.0  # the second piece's top-left token: neighbours 5 and 7 only
    deep = [0.0] * 10
    deep[9] = 1.0
    kept = ts.HiPrune(keep=4, alpha=1.0).select(tokens_for(shallow, deep, (1, 10), blocks)).kept
    assert kept.tolist() == [4, 5, 7, 9]


def test_anchors_and_buffers_over_the_budget_keep_anchors_then_the_best_buffers():
    shallow = [0.0] * 16
    shallow[5], shallow[6], shallow[9] = 1.0, 0.5, 0.7
    kept = ts.HiPrune(keep=3, alpha=1.0).select(tokens_for(shallow, [0.0] * 16)).kept  # 1 anchor, 4 buffers
    assert kept.tolist() == [5, 6, 9]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k, alpha", [(6, 0.1), (30, 0.5), (12, 1.0), (40, 0.2)])
def test_selection_matches_the_reference_loop(seed, k, alpha):
    generator = torch.Generator().manual_seed(seed)
    grid = (6, 8)
    shallow = torch.rand(48, generator=generator).round(decimals=1)  # ties, on purpose
    deep = torch.rand(48, generator=generator).round(decimals=1)
    kept = ts.HiPrune(keep=k, alpha=alpha).select(tokens_for(shallow, deep, grid)).kept
    assert kept.tolist() == reference(shallow.tolist(), deep.tolist(), grid, k, alpha)


def test_a_full_budget_keeps_everything_and_arguments_are_checked():
    assert ts.HiPrune(keep=1.0).select(tokens_for([0.0] * 16, [0.0] * 16)).kept.tolist() == list(range(16))
    assert ts.HiPrune().defaults() == {"keep": 64, "alpha": 0.1, "object_layer": 9, "deep_layer": None}
    assert ts.HiPrune(object_layer=16, deep_layer=-1).requests() == (
        Signal("vision_attention", layer=16), Signal("vision_attention", layer=-1))
    for bad in (dict(alpha=1.5), dict(alpha="x"), dict(object_layer=0), dict(object_layer=None), dict(deep_layer=0)):
        with pytest.raises(ValueError):
            ts.HiPrune(**bad)
    assert ts.build("hiprune:32,object_layer=2").object_layer == 2


def test_on_a_model_it_keeps_the_reference_selection_of_its_signals():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs([[5, 6]])
    sieve = ts.HiPrune(keep=20, alpha=0.5, object_layer=1)  # 2 anchors
    seen = []
    select = sieve.select
    sieve.select = lambda tokens: seen.append(tokens) or select(tokens)
    with ts.apply(model, sieve) as run:
        model(**inputs)
    shallow, deep = (seen[0][r].mean(0).tolist() for r in sieve.requests())
    assert run.stats.images[0].kept.tolist() == reference(shallow, deep, (8, 8), 20, 0.5)
