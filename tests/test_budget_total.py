"""A budget over all the images of a prompt (``ts.Budget(total=...)``): shared by score mass for scoring methods,
by token count for the others, at least one token an image; checked by hand, against its rules, and on a model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS, greedy
from tiny_models import LLAVA
from tokensieve.budget import Budget, parse_keep, score_mass, share_total
from tokensieve.sieve import VisualTokens
from tokensieve.signals import Signal


def test_shares_worked_by_hand():
    # each image keeps one first; the 8 left go 1:3 by weight
    assert share_total(10, [1.0, 3.0], [20, 20]) == [3, 7]
    # the first image holds only 2: what it cannot take goes to the others
    assert share_total(10, [1.0, 1.0, 1.0], [2, 20, 20]) == [2, 4, 4]
    # weights all zero: by size; a total below the number of images still keeps one each
    assert share_total(7, [0.0, 0.0], [10, 30]) == [2, 5]
    assert share_total(2, [1.0, 1.0, 1.0], [5, 5, 5]) == [1, 1, 1]
    # a total that covers every token keeps them all
    assert share_total(50, [1.0, 9.0], [5, 20]) == [5, 20]


@given(st.integers(1, 200), st.lists(st.tuples(st.floats(0, 10), st.integers(1, 60)), min_size=1, max_size=6))
def test_shares_add_up_and_stay_within_each_image(total, images):
    weights, sizes = [w for w, _ in images], [n for _, n in images]
    shares = share_total(total, weights, sizes)
    assert all(1 <= share <= size for share, size in zip(shares, sizes))
    assert sum(shares) == max(min(total, sum(sizes)), len(sizes))


def images_of_one_prompt(weights: list[float], n: int = 16) -> list[VisualTokens]:
    generator = torch.Generator().manual_seed(0)
    return [VisualTokens(torch.randn(n, 4, generator=generator), (4, 4),
                         {"cls_attention": torch.rand(2, n, generator=generator) * weight}, prompt=0) for weight in weights]


def test_a_scoring_method_shares_the_total_by_score_mass_and_keeps_each_images_top_tokens():
    images = images_of_one_prompt([1.0, 3.0])
    masses = [score_mass(ts.FasterVLM().score(tokens)) for tokens in images]
    expected = share_total(20, masses, [16, 16])
    selections = ts.FasterVLM(keep=Budget(total=20)).select_all(images)
    assert [len(s.kept) for s in selections] == expected and expected[1] > expected[0]
    for selection, tokens, k in zip(selections, images, expected):
        assert torch.equal(selection.kept, ts.FasterVLM(keep=k).select(tokens).kept)


def test_other_methods_share_it_by_token_count_and_prompts_do_not_mix():
    images = images_of_one_prompt([1.0, 1.0]) + [VisualTokens(torch.randn(8, 4), (2, 4), prompt=1)]
    selections = ts.DivPrune(keep=Budget(total=12)).select_all(images)
    assert [len(s.kept) for s in selections] == [6, 6, 8]
    for selection, tokens in zip(selections[:2], images):
        assert torch.equal(selection.kept, ts.DivPrune(keep=6).select(tokens).kept)


def test_spelling_and_refusals():
    assert parse_keep("budget(total=256)") == Budget(total=256) and str(Budget(total=256)) == "budget(total=256)"
    assert repr(ts.FasterVLM(keep=Budget(total=9))) == "FasterVLM(keep=Budget(total=9))"
    assert ts.build("divprune:budget(total=32)").keep == Budget(total=32)
    with pytest.raises(ValueError, match="a count per image or a total per prompt, not both"):
        Budget(64, total=9)
    with pytest.raises(ValueError, match="an int >= 1"):
        Budget(total=0)
    with pytest.raises(ValueError, match="fastv cannot take a total budget per prompt"):
        ts.FastV(keep=Budget(total=9))


def test_on_a_model_each_prompts_images_keep_the_total_together():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS, n_images=[2, 1])
    with ts.apply(model, ts.FasterVLM(keep=Budget(total=40))) as run:
        model(**inputs)
    per_row = {}
    for record in run.stats.images:
        per_row[record.row] = per_row.get(record.row, 0) + record.after
    assert per_row == {0: 40, 1: 40} and all(record.after < 40 for record in run.stats.images if record.row == 0)
    expected_logits, expected_tokens = model(**inputs).logits, greedy(model, inputs)
    with ts.apply(model, ts.FasterVLM(keep=Budget(total=2 * LLAVA.tokens_per_image))):  # covers every token
        assert torch.equal(model(**inputs).logits, expected_logits) and torch.equal(greedy(model, inputs), expected_tokens)


def test_a_total_budget_per_crop_keeps_splitting_each_images_share_over_its_crops():
    # two pieces of 2x2 and 2x4 tokens in one image; [CLS] attention highest in the second piece
    blocks = (torch.arange(4).view(2, 2), torch.arange(4, 12).view(2, 4))
    attention = torch.linspace(0, 1, 12).expand(2, -1)
    image = VisualTokens(torch.randn(12, 4), (1, 12), {Signal("cls_attention"): attention}, blocks=blocks, prompt=0)
    (per_crop,) = ts.FasterVLM(keep=Budget(total=6, per_crop=True)).select_all([image])
    (alone,) = ts.FasterVLM(keep=Budget(6, per_crop=True)).select_all([image])
    assert torch.equal(per_crop.kept, alone.kept)
    assert per_crop.kept.tolist() == [2, 3, 8, 9, 10, 11]  # 2 of the first piece's 4, 4 of the second's 8
