"""PPLLaVA's prompt-guided pooling: relevance and pooling by hand, the official unfold arithmetic, a per-cell loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.selection import cell_bounds, cell_centres, target_grid
from tokensieve.sieve import VisualTokens

BACKGROUND, OBJECT = [1.0, 0.0], [0.0, 1.0]  # the instruction is OBJECT: cosines 0 and 1


def image(features, grid, text, blocks=()):
    features = torch.as_tensor(features, dtype=torch.float64)
    text = torch.as_tensor(text, dtype=torch.float64).reshape(-1, features.shape[1])
    return VisualTokens(features, grid, {"text_embeddings": text}, blocks=blocks)


def test_relevance_by_hand():
    tokens = image([OBJECT, BACKGROUND, BACKGROUND, BACKGROUND], (2, 2), [OBJECT])
    # scale ln 3: exp(ln3 · cos) is 3 for the object and 1 for the rest, softmax over the four
    torch.testing.assert_close(ts.PPLLaVA(scale=math.log(3)).relevance(tokens), torch.tensor([3.0, 1, 1, 1]) / 6)
    # two instruction tokens: each token's cosines to them are averaged
    halves = image([OBJECT, [0.6, 0.8], BACKGROUND, [-1.0, 0.0]], (2, 2), [OBJECT, [0.6, 0.8]])
    mean_cos = torch.tensor([0.9, 0.9, 0.3, -0.3])  # cos to OBJECT and to (0.6, 0.8), averaged
    torch.testing.assert_close(ts.PPLLaVA(scale=2.0).relevance(halves), torch.softmax(2.0 * mean_cos, 0).float())
    # no instruction tokens: equal weights
    torch.testing.assert_close(ts.PPLLaVA().relevance(image([OBJECT, BACKGROUND], (1, 2), [])), torch.tensor([0.5, 0.5]))


def test_pooling_by_hand():
    # 2x2 to one cell: w = 1/2, 1/6, 1/6, 1/6; temperature 1/(3 ln 2) makes exp(w/τ) 2^1.5 and 2^0.5, so the
    # cell weighs the object 2 and each background token 1: (2·OBJECT + 3·BACKGROUND) / 5
    tokens = image([OBJECT, BACKGROUND, BACKGROUND, BACKGROUND], (2, 2), [OBJECT])
    one = ts.PPLLaVA(keep=1, scale=math.log(3), temperature=1 / (3 * math.log(2))).select(tokens)
    assert one.kept.tolist() == [0]
    torch.testing.assert_close(one.features, torch.tensor([[0.6, 0.4]], dtype=torch.float64))
    # 4x4 to 2x2, the object at token 5 (row 1, column 1) of the first cell: scale ln 17 gives w = 17/32 and
    # 1/32, a difference of 1/2 that temperature 1/(2 ln 4) turns into a factor 4: (4·OBJECT + 3·BACKGROUND) / 7;
    # the other cells hold background only and stay background
    features = [BACKGROUND] * 16
    features[5] = OBJECT
    grid = ts.PPLLaVA(keep=4, scale=math.log(17), temperature=1 / (2 * math.log(4))).select(image(features, (4, 4), [OBJECT]))
    assert grid.kept.tolist() == [0, 2, 8, 10]
    torch.testing.assert_close(grid.features, torch.tensor([[3 / 7, 4 / 7], BACKGROUND, BACKGROUND, BACKGROUND], dtype=torch.float64))


def official(features, text, grid, kernel, scale, temperature):
    """The code's arithmetic, kernel = stride: w = softmax(scale · cos) over every token, then per window
    (``Tensor.unfold``) softmax(w / temperature) and the weighted sum."""
    h, w = grid
    unit = F.normalize(features, dim=-1)
    weights = torch.softmax(scale * (unit @ F.normalize(text, dim=-1).T).mean(1), 0).view(h, w)
    windows = weights.unfold(0, kernel, kernel).unfold(1, kernel, kernel).reshape(h // kernel, w // kernel, -1)
    values = features.T.reshape(-1, h, w).unfold(1, kernel, kernel).unfold(2, kernel, kernel)
    values = values.reshape(features.shape[1], h // kernel, w // kernel, -1)
    return (values * torch.softmax(windows / temperature, -1)).sum(-1).reshape(features.shape[1], -1).T


@pytest.mark.parametrize("grid, keep, kernel", [((24, 24), 64, 3), ((6, 6), 4, 3), ((8, 4), 8, 2)])
def test_equals_the_official_unfold_arithmetic_when_the_cells_divide_the_grid(grid, keep, kernel):
    generator = torch.Generator().manual_seed(keep)
    features = torch.randn(grid[0] * grid[1], 16, dtype=torch.float64, generator=generator)
    text = torch.randn(5, 16, dtype=torch.float64, generator=generator)
    for scale, temperature in ((100.0, 0.01), (10.0, 0.5)):
        selection = ts.PPLLaVA(keep=keep, scale=scale, temperature=temperature).select(image(features, grid, text))
        want = official(features, text, grid, kernel, scale, temperature)
        torch.testing.assert_close(selection.features, want, atol=1e-5, rtol=1e-5)  # float32 inside
        assert selection.kept.tolist() == cell_centres(grid, (grid[0] // kernel, grid[1] // kernel)).tolist()


def per_cell(features, weights, grid, size, temperature):
    """A plain loop over the cells of ``pool``'s spans."""
    (h, w), out = grid, []
    values, weights = features.view(h, w, -1), weights.view(h, w)
    for top, bottom in cell_bounds(h, size[0]):
        for left, right in cell_bounds(w, size[1]):
            a = torch.softmax(weights[top:bottom, left:right].flatten() / temperature, 0)
            out.append((a[:, None] * values[top:bottom, left:right].reshape(-1, values.shape[-1])).sum(0))
    return torch.stack(out)


def test_any_budget_and_pieces_follow_a_per_cell_loop():
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(576, 8, dtype=torch.float64, generator=generator)
    text = torch.randn(3, 8, dtype=torch.float64, generator=generator)
    sieve = ts.PPLLaVA(keep=192, scale=30.0, temperature=0.005)
    weights = sieve.relevance(image(features, (24, 24), text)).double()
    want = per_cell(features, weights, (24, 24), target_grid((24, 24), 192), 0.005)
    torch.testing.assert_close(sieve.select(image(features, (24, 24), text)).features, want, atol=1e-5, rtol=1e-5)
    # pieces: one softmax over all 44 tokens, each piece pooled alone with its share (4, 6, 1)
    blocks = (torch.arange(16).view(4, 4), 16 + torch.arange(24).view(4, 6), 40 + torch.arange(4).view(4, 1))
    tokens = image(features[:44], (1, 44), text, blocks)
    weights = sieve.relevance(tokens).double()
    kept, want = [], []
    for block, size in zip(blocks, [(2, 2), (2, 3), (1, 1)]):
        index = block.flatten()
        kept.append(index[cell_centres(tuple(block.shape), size)])
        want.append(per_cell(features[index], weights[index], tuple(block.shape), size, 0.005))
    kept, want = torch.cat(kept), torch.cat(want)
    order = kept.argsort()
    selection = ts.PPLLaVA(keep=11, scale=30.0, temperature=0.005).select(tokens)
    assert selection.kept.tolist() == kept[order].tolist()
    torch.testing.assert_close(selection.features, want[order], atol=1e-5, rtol=1e-5)


def test_without_instruction_or_scale_it_is_pool():
    features = torch.randn(48, 4, generator=torch.Generator().manual_seed(2))
    pooled = ts.Pool(keep=12).select(VisualTokens(features, (6, 8)))
    for sieve, text in ((ts.PPLLaVA(keep=12), torch.zeros(0, 4)), (ts.PPLLaVA(keep=12, scale=0), torch.randn(2, 4))):
        selection = sieve.select(VisualTokens(features, (6, 8), {"text_embeddings": text}))
        assert selection.kept.tolist() == pooled.kept.tolist()
        torch.testing.assert_close(selection.features, pooled.features)


def test_the_instruction_moves_the_pooled_tokens_and_dtypes_are_kept():
    features = torch.randn(64, 6, generator=torch.Generator().manual_seed(4)).bfloat16()
    pooled = [ts.PPLLaVA(keep=16).select(VisualTokens(features, (8, 8), {"text_embeddings": features[[i]]})) for i in (0, 63)]
    assert pooled[0].features.dtype == torch.bfloat16 and pooled[0].kept.tolist() == pooled[1].kept.tolist()
    assert not torch.equal(pooled[0].features, pooled[1].features)
    assert ts.PPLLaVA(keep=1.0).select(VisualTokens(features, (8, 8), {"text_embeddings": features[:1]})).features is None


def test_arguments_are_checked():
    assert ts.PPLLaVA().defaults() == {"keep": 64, "temperature": 0.01, "scale": 100.0}
    assert ts.build("ppllava:128,temperature=0.1").temperature == 0.1
    for bad in (0, -0.1, "x", True, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            ts.PPLLaVA(temperature=bad)
    for bad in (-1, "x", True, math.inf):
        with pytest.raises(ValueError, match="scale"):
            ts.PPLLaVA(scale=bad)
    with pytest.raises(ValueError, match="adaptive budget"):
        ts.PPLLaVA(keep=ts.Adaptive(mass=0.9))  # no score ranks the tokens
    # a grid method already shares its budget among the pieces by size: per_crop=True changes nothing
    features = torch.randn(64, 4, generator=torch.Generator().manual_seed(5))
    tokens = VisualTokens(features, (8, 8), {"text_embeddings": features[:2]})
    torch.testing.assert_close(ts.PPLLaVA(keep=ts.Budget(16, per_crop=True)).select(tokens).features,
                               ts.PPLLaVA(keep=16).select(tokens).features)


def test_on_a_model_the_pooled_tokens_stand_on_the_lattice():
    model = build_model(LLAVA)
    with ts.apply(model, ts.PPLLaVA(keep=16)) as run:
        model(**LLAVA.make_inputs([[5, 6, 7]]))
    assert run.stats.images[0].kept.tolist() == cell_centres((8, 8), (4, 4)).tolist()
