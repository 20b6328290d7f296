"""VTC-CLS: a hand-worked example, the official code's rule on fixed attention maps, and its arguments."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_signals import eager
from tiny_llava_next import LLAVA_ONEVISION
from tiny_models import LLAVA, tiny_llava
from tokensieve.sieve import VisualTokens
from tokensieve.signals import Signal


def tokens_for(rows, grid):
    """One image whose requested [CLS] rows (layers, heads, N) are given."""
    rows = torch.as_tensor(rows, dtype=torch.float)
    request = Signal("cls_attention", layers=tuple(range(-1 - len(rows), -1)))
    return VisualTokens(torch.zeros(rows.shape[-1], 4), grid, {request: rows})


def official(attentions, start_layer, token_num):
    """THU-MIG/VTC-CLS as read (``cls_token_only`` then ``encode_images``), on a batch of one: ``attentions`` is
    the tower's tuple of (1, heads, 1 + N, 1 + N) maps, [CLS] first."""
    rows = [attention.squeeze(0).mean(dim=0)[0, 1:] for attention in attentions[start_layer:-1]]
    summed = torch.sum(torch.stack(rows), dim=0)
    return torch.topk(summed, token_num, dim=0, largest=True).indices.sort().values


def signal_from(attentions, sieve):
    """The ``cls_attention(layers=...)`` signal the adapter gives for these maps: each requested layer's [CLS]
    row, [CLS] column dropped (layer L is ``attentions[L - 1]``, or ``attentions[depth + L]`` from the last)."""
    [request] = sieve.requests()
    depth = len(attentions)
    return request, torch.stack([attentions[depth + layer][0, :, 0, 1:] for layer in request.layers])


def test_hand_worked_head_mean_then_sum_over_layers():
    # 2 layers x 2 heads over a 2x3 grid; head means [.1 .2 .0 .3 .1 .3] and [.3 .0 .2 .1 .0 .2]
    rows = [[[0.2, 0.2, 0.0, 0.4, 0.2, 0.0], [0.0, 0.2, 0.0, 0.2, 0.0, 0.6]],
            [[0.6, 0.0, 0.2, 0.0, 0.0, 0.2], [0.0, 0.0, 0.2, 0.2, 0.0, 0.2]]]
    # sums: [.4 .2 .2 .4 .1 .5]: the top three are 5, then 0 and 3 (tied at .4)
    assert ts.VTCCLS(keep=3, first_layer=-3).select(tokens_for(rows, (2, 3))).kept.tolist() == [0, 3, 5]
    # a tie at the budget's edge goes to the lower index: 1 and 2 tie at .2 for the fourth place
    assert ts.VTCCLS(keep=4, first_layer=-3).select(tokens_for(rows, (2, 3))).kept.tolist() == [0, 1, 3, 5]
    # the last layer alone (first_layer=-2) ranks by [.3 .0 .2 .1 .0 .2]
    assert ts.VTCCLS(keep=2, first_layer=-2).select(tokens_for(rows[1:], (2, 3))).kept.tolist() == [0, 2]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("start_layer, first_layer", [(16, -8), (20, -4), (22, -2)])
def test_the_official_rule_on_a_24_layer_tower(seed, start_layer, first_layer):
    """``--layer 16`` (the code's default) reads ``attentions[16:-1]``: layers -8..-2 here."""
    generator = torch.Generator().manual_seed(seed)
    attentions = tuple(torch.rand(1, 4, 1 + 36, 1 + 36, generator=generator).softmax(dim=-1) for _ in range(24))
    sieve = ts.VTCCLS(keep=9, first_layer=first_layer)
    assert len(sieve.requests()[0].layers) == 23 - start_layer
    request, rows = signal_from(attentions, sieve)
    kept = sieve.select(VisualTokens(torch.zeros(36, 4), (6, 6), {request: rows})).kept
    assert kept.tolist() == official(attentions, start_layer, 9).tolist()


def test_on_a_model_it_keeps_what_the_official_rule_keeps_from_eager_attention():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs([[5, 6]])
    k = 22
    with ts.apply(model, ts.VTCCLS(keep=k, first_layer=-3)) as run:  # the tiny tower's 3 layers: -3 and -2
        model(**inputs)
    attentions = eager(tiny_llava).model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    assert len(attentions) == 3
    summed = torch.stack([a.squeeze(0).mean(dim=0)[0, 1:] for a in attentions[0:-1]]).sum(dim=0)
    edge = summed.sort(descending=True).values
    assert edge[k - 1] - edge[k] > 1e-5  # no near-tie at the budget's edge: recomputed rows select the same
    assert run.stats.images[0].kept.tolist() == official(attentions, 0, k).tolist()
    assert official(attentions, 0, k).tolist() != official(attentions, 1, k).tolist()  # the ensemble matters here


def test_defaults_arguments_and_refusals():
    assert ts.VTCCLS().defaults() == {"keep": 64, "first_layer": -8}
    assert ts.VTCCLS().requests() == (Signal("cls_attention", layers=(-8, -7, -6, -5, -4, -3, -2)),)
    assert ts.build("vtc_cls:32,first_layer=-4").requests() == (Signal("cls_attention", layers=(-4, -3, -2)),)
    assert ts.VTCCLS(keep=1.0, first_layer=-3).select(tokens_for(torch.rand(2, 2, 6), (2, 3))).kept.tolist() == list(range(6))
    for bad in (0, -1, 16, True, "x", None):
        with pytest.raises(ValueError, match="first_layer must count from the last"):
            ts.VTCCLS(first_layer=bad)
    with pytest.raises(ValueError, match="the vision tower has 3 layers"):  # -8 needs 8 layers
        ts.apply(build_model(LLAVA), ts.VTCCLS())
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):  # SigLIP
        ts.apply(build_model(LLAVA_ONEVISION), ts.VTCCLS(first_layer=-2))
