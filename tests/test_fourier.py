"""Fourier-VLM: the shared DCT/IDCT against the DCT matrix, hand-worked grids, the direct formula, and pieces."""

from __future__ import annotations

import math

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.selection import cell_centres, dct, dct_lowpass, idct
from tokensieve.sieve import VisualTokens


def dct_matrix(n):
    """The orthonormal DCT-II matrix: D[k, j] = sqrt(2/n) c_k cos(πk(2j+1)/2n), c_0 = 1/sqrt(2)."""
    k, j = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None]
    matrix = torch.cos(math.pi * k * (2 * j + 1) / (2 * n)) * math.sqrt(2 / n)
    matrix[0] /= math.sqrt(2)
    return matrix


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 24])
def test_dct_and_idct_equal_the_matrix_products(n):
    x = torch.randn(3, n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    matrix = dct_matrix(n)
    torch.testing.assert_close(dct(x, dim=1), torch.einsum("kj,ajd->akd", matrix, x), atol=1e-12, rtol=0)
    torch.testing.assert_close(idct(x, dim=1), torch.einsum("jk,ajd->akd", matrix, x), atol=1e-12, rtol=0)
    torch.testing.assert_close(idct(dct(x, dim=-1), dim=-1), x, atol=1e-12, rtol=0)
    assert dct(x).dtype == torch.float64 and dct(x.float()).dtype == torch.float32
    assert dct(x.bfloat16()).dtype == idct(x.bfloat16()).dtype == torch.float32


def test_dct_of_a_constant_is_its_dc_term_only():
    coefficients = dct(torch.full((5,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(coefficients, torch.tensor([2 * math.sqrt(5), 0, 0, 0, 0], dtype=torch.float64))


@pytest.mark.parametrize("grid, size", [((4, 4), (2, 2)), ((6, 5), (3, 2)), ((24, 24), (8, 8)), ((3, 7), (1, 7)), ((5, 5), (1, 1))])
def test_lowpass_equals_the_direct_formula(grid, size):
    """Per channel: D'ᵀ (D X Eᵀ)[:h', :w'] E' · sqrt(h'w'/hw), with D, E, D', E' the DCT matrices."""
    (h, w), (rows, cols) = grid, size
    x = torch.randn(h, w, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(h * w))
    low = torch.einsum("kh,hwd,lw->kld", dct_matrix(h), x, dct_matrix(w))[:rows, :cols]
    want = torch.einsum("kr,kld,lc->rcd", dct_matrix(rows), low, dct_matrix(cols)) * math.sqrt(rows * cols / (h * w))
    torch.testing.assert_close(dct_lowpass(x, size), want, atol=1e-12, rtol=0)


def test_hand_worked_rows_and_means():
    # a 4x1 column to 2x1: [1, 1, 3, 3] keeps its mean 2 and its first cosine: 2 ∓ cos(π/8), at tokens 0 and 2
    tokens = VisualTokens(torch.tensor([1.0, 1.0, 3.0, 3.0])[:, None], (4, 1))
    selection = ts.Fourier(keep=2).select(tokens)
    assert selection.kept.tolist() == [0, 2]
    c = math.cos(math.pi / 8)
    torch.testing.assert_close(selection.features[:, 0], torch.tensor([2 - c, 2 + c]))
    # down to one token: the mean, at the centre token
    features = torch.randn(16, 3)
    one = ts.Fourier(keep=1).select(VisualTokens(features, (4, 4)))
    assert one.kept.tolist() == [5]
    torch.testing.assert_close(one.features[0], features.mean(dim=0))


def test_positions_are_the_even_lattice_of_cell_centres():
    assert ts.Fourier(keep=4).select(VisualTokens(torch.randn(16, 2), (4, 4))).kept.tolist() == [0, 2, 8, 10]
    kept = ts.Fourier(keep=64).select(VisualTokens(torch.randn(576, 2), (24, 24))).kept
    assert kept.tolist() == cell_centres((24, 24), (8, 8)).tolist() and kept[:2].tolist() == [25, 28]
    assert len(ts.Fourier(keep=192).select(VisualTokens(torch.randn(576, 2), (24, 24))).kept) == 13 * 14


def test_it_commutes_with_a_per_token_affine_map():
    """So filtering the projected tokens equals filtering the vision features under a linear projector."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(48, 5, dtype=torch.float64, generator=generator)
    weight, bias = torch.randn(5, 7, dtype=torch.float64, generator=generator), torch.randn(7, dtype=torch.float64, generator=generator)
    sieve = ts.Fourier(keep=12)
    before = sieve.select(VisualTokens(features, (6, 8)))
    after = sieve.select(VisualTokens(features @ weight + bias, (6, 8)))
    assert before.kept.tolist() == after.kept.tolist()
    torch.testing.assert_close(after.features, before.features @ weight + bias, atol=1e-5, rtol=1e-5)  # float32 inside


def test_pieces_share_the_budget_by_size_and_are_filtered_alone():
    """An anyres-like image: a 4x4 piece, a 4x6 piece and a 4x1 newline column (44 tokens), keep 11."""
    blocks = (torch.arange(16).view(4, 4), 16 + torch.arange(24).view(4, 6), 40 + torch.arange(4).view(4, 1))
    features = torch.randn(44, 3, dtype=torch.float64)
    selection = ts.Fourier(keep=11).select(VisualTokens(features, (1, 44), blocks=blocks))
    # shares 4, 6, 1 (16:24:4 of 11): grids 2x2, 2x3 and 1x1; centres of even cells are their upper-left middle
    kept, want = [], []
    for block, size in zip(blocks, [(2, 2), (2, 3), (1, 1)]):
        kept.append(block.flatten()[cell_centres(tuple(block.shape), size)])
        want.append(dct_lowpass(features[block.flatten()].view(*block.shape, 3), size).reshape(-1, 3))
    kept, want = torch.cat(kept), torch.cat(want)
    order = kept.argsort()
    assert selection.kept.tolist() == kept[order].tolist() == [0, 2, 8, 10, 16, 18, 20, 28, 30, 32, 41]
    torch.testing.assert_close(selection.features, want[order], atol=1e-6, rtol=1e-5)  # float32 FFTs


def test_a_full_budget_keeps_everything_and_a_whole_piece_is_unchanged():
    features = torch.randn(16, 3).bfloat16()
    assert ts.Fourier(keep=1.0).select(VisualTokens(features, (4, 4))).features is None
    blocks = (torch.arange(12).view(3, 4), 12 + torch.arange(4).view(4, 1))
    selection = ts.Fourier(keep=15).select(VisualTokens(features, (1, 16), blocks=blocks))  # shares 11 and 4
    assert selection.features.dtype == torch.bfloat16
    assert selection.kept[-4:].tolist() == [12, 13, 14, 15] and torch.equal(selection.features[-4:], features[12:])
    assert ts.Fourier().defaults() == {"keep": 64}


def test_on_a_model_the_kept_tokens_are_the_lattice():
    model = build_model(LLAVA)
    with ts.apply(model, ts.Fourier(keep=16)) as run:
        model(**LLAVA.make_inputs([[5, 6]]))
    assert run.stats.images[0].kept.tolist() == cell_centres((8, 8), (4, 4)).tolist()
