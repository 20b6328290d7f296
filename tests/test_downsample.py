"""downsample: the antialiased bilinear resize by hand, against PIL's triangle filter written out, and pieces."""

from __future__ import annotations

import math

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.selection import cell_centres, target_grid
from tokensieve.sieve import VisualTokens


def triangle_matrix(size: int, cells: int) -> torch.Tensor:
    """(cells, size) PIL's antialiased bilinear weights, one output at a time: output i of scale s = size/cells
    is centred at s(i + 0.5) and weighs input j by max(0, 1 - |j + 0.5 - centre| / max(s, 1)), normalised."""
    scale = size / cells
    support = max(scale, 1.0)
    rows = []
    for i in range(cells):
        centre = scale * (i + 0.5)
        row = torch.tensor([max(0.0, 1 - abs(j + 0.5 - centre) / support) for j in range(size)], dtype=torch.float64)
        rows.append(row / row.sum())
    return torch.stack(rows)


def test_a_4x4_grid_to_2x2_by_hand():
    # value 4y + x: each axis weighs its inputs 3/7, 3/7, 1/7 (a triangle twice the cell wide), so the row
    # 0, 1, 2, 3 gives 5/7 and 16/7 where pool's box gives 0.5 and 2.5
    features = (4 * torch.arange(4.0)[:, None] + torch.arange(4.0)).reshape(16, 1)
    selection = ts.Downsample(keep=4).select(VisualTokens(features, (4, 4)))
    assert selection.kept.tolist() == [0, 2, 8, 10]
    torch.testing.assert_close(selection.features[:, 0], torch.tensor([25.0, 36.0, 69.0, 80.0]) / 7)
    pooled = ts.Pool(keep=4).select(VisualTokens(features, (4, 4)))
    torch.testing.assert_close(pooled.features[:, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))
    # one bright token spreads over the cells its triangle reaches: token 5 (row 1, column 1)
    spike = torch.zeros(16, 1)
    spike[5] = 49.0
    torch.testing.assert_close(ts.Downsample(keep=4).select(VisualTokens(spike, (4, 4))).features[:, 0],
                               torch.tensor([9.0, 3.0, 3.0, 1.0]))


@pytest.mark.parametrize("grid, keep", [((24, 24), 64), ((24, 24), 128), ((24, 24), 192), ((6, 5), 6), ((7, 3), 5), ((3, 7), 7)])
def test_it_is_the_triangle_filter_on_each_axis(grid, keep):
    (h, w), (rows, cols) = grid, target_grid(grid, keep)
    x = torch.randn(h, w, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(h * w + keep))
    want = torch.einsum("ry,yxd,cx->rcd", triangle_matrix(h, rows), x, triangle_matrix(w, cols)).reshape(-1, 3)
    selection = ts.Downsample(keep=keep).select(VisualTokens(x.reshape(h * w, 3), grid))
    assert selection.kept.tolist() == cell_centres(grid, (rows, cols)).tolist()
    torch.testing.assert_close(selection.features, want, atol=1e-5, rtol=1e-5)  # float32 inside


def test_constants_stay_and_it_commutes_with_a_per_token_affine_map():
    constant = ts.Downsample(keep=9).select(VisualTokens(torch.full((48, 2), 3.0), (6, 8))).features
    torch.testing.assert_close(constant, torch.full((8, 2), 3.0))  # 6x8 to at most 9: 2x4
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(48, 5, dtype=torch.float64, generator=generator)
    weight, bias = torch.randn(5, 7, dtype=torch.float64, generator=generator), torch.randn(7, dtype=torch.float64, generator=generator)
    sieve = ts.Downsample(keep=12)
    before = sieve.select(VisualTokens(features, (6, 8)))
    after = sieve.select(VisualTokens(features @ weight + bias, (6, 8)))
    torch.testing.assert_close(after.features, before.features @ weight + bias, atol=1e-5, rtol=1e-5)


def test_pieces_share_the_budget_by_size_and_are_resized_alone():
    """An anyres-like image: a 4x4 piece, a 4x6 piece and a 4x1 newline column (44 tokens), keep 11."""
    blocks = (torch.arange(16).view(4, 4), 16 + torch.arange(24).view(4, 6), 40 + torch.arange(4).view(4, 1))
    features = torch.randn(44, 3, dtype=torch.float64)
    selection = ts.Downsample(keep=11).select(VisualTokens(features, (1, 44), blocks=blocks))
    kept, want = [], []
    for block, size in zip(blocks, [(2, 2), (2, 3), (1, 1)]):  # shares 4, 6, 1
        (h, w) = block.shape
        kept.append(block.flatten()[cell_centres((h, w), size)])
        piece = features[block.flatten()].view(h, w, 3)
        want.append(torch.einsum("ry,yxd,cx->rcd", triangle_matrix(h, size[0]), piece, triangle_matrix(w, size[1])).reshape(-1, 3))
    kept, want = torch.cat(kept), torch.cat(want)
    order = kept.argsort()
    assert selection.kept.tolist() == kept[order].tolist() == [0, 2, 8, 10, 16, 18, 20, 28, 30, 32, 41]
    torch.testing.assert_close(selection.features, want[order], atol=1e-6, rtol=1e-5)


def test_a_full_budget_keeps_everything_and_a_whole_piece_is_unchanged():
    features = torch.randn(16, 3).bfloat16()
    assert ts.Downsample(keep=1.0).select(VisualTokens(features, (4, 4))).features is None
    blocks = (torch.arange(12).view(3, 4), 12 + torch.arange(4).view(4, 1))
    selection = ts.Downsample(keep=15).select(VisualTokens(features, (1, 16), blocks=blocks))  # shares 11 and 4
    assert selection.features.dtype == torch.bfloat16
    assert selection.kept[-4:].tolist() == [12, 13, 14, 15] and torch.equal(selection.features[-4:], features[12:])


def test_arguments_are_checked():
    assert ts.Downsample().defaults() == {"keep": 64}
    assert ts.build("downsample:0.25").keep == 0.25
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match="keep"):
            ts.Downsample(keep=bad)
    with pytest.raises(ValueError, match="adaptive budget"):
        ts.Downsample(keep=ts.Adaptive(mass=0.9))
    assert ts.Downsample(keep=ts.Budget(4, per_crop=True)).select(VisualTokens(torch.eye(16), (4, 4))).kept.tolist() == [0, 2, 8, 10]


def test_on_a_model_the_kept_tokens_are_the_lattice():
    model = build_model(LLAVA)
    with ts.apply(model, ts.Downsample(keep=16)) as run:
        model(**LLAVA.make_inputs([[5, 6]]))
    assert run.stats.images[0].kept.tolist() == cell_centres((8, 8), (4, 4)).tolist()
    assert math.prod(target_grid((8, 8), 16)) == len(run.stats.images[0].kept)
