"""Adaptive budgets (``ts.Adaptive(mass=...)``) on the methods that rank tokens by one score without being a
``ScoringSieve``: each image's count is the fewest top tokens of that score holding the mass, clamped to
``[min, max]``, and the method then keeps exactly what a fixed ``keep`` of that count keeps. Worked by hand on
each method's own small grid (from its test file), then on a tiny model (the count in ``run.stats``)."""

from __future__ import annotations

import pytest
import torch

import test_fopru
import test_mustdrop
import test_prumerge
import test_recoverable
import test_scope
import test_visiondrop
import test_vispruner
import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS
from tiny_models import LLAVA
from tokensieve.budget import Adaptive, mass_count
from tokensieve.sieve import Selection, VisualTokens


def same(a: Selection, b: Selection) -> bool:
    """Two selections keep the same tokens with the same features and merge map."""
    parts = [(a.kept, b.kept), (a.features, b.features), (a.assignment, b.assignment), (a.weights, b.weights)]
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in parts)


def prumerge_tokens():
    return test_prumerge.grid_tokens(test_prumerge.ATTENTION_4X4, test_prumerge.keys_4x4(), torch.eye(16), (4, 4))


def fopru_tokens():
    # head means: 5 holds 0.6, 3 0.5, 12 0.45 of 1.55 (every other token 0): 39% with one token, 71% with two
    heads = torch.zeros(2, 16)
    heads[0, 3], heads[1, 12] = 1.0, 0.9
    heads[:, 5] = 0.6
    return test_fopru.tokens_for(heads)


def mustdrop_tokens():
    # key scores 0..35 (mass 630): the top 11 hold 330 (52.4%), the top 12 354 (56.2%); windows 0 and 2 merge
    e = torch.eye(64)
    return test_mustdrop.tokens_for(test_mustdrop.six_by_six(e[0], e[1]), torch.arange(36.0), (6, 6))


def skip_visual_tokens():
    # the last prompt token's head-mean attention: 0.4 0.3 0.1 0.1 0.05 0.05 0 0; the top two hold 70%, three 80%
    mean = torch.tensor([0.05, 0.3, 0.1, 0.0, 0.4, 0.1, 0.05, 0.0])
    return VisualTokens(torch.zeros(8, 4), (2, 4), {"llm_attention": torch.stack([2 * mean, torch.zeros(8)])})


# (method, its grid, a mass, the count it gives, by hand). PruMerge's [CLS] attention in 64ths, sorted: 18 12 9
# (39 = 60.9%) 3 3 3 (48) 2 2 2 2 2 (58 = 90.6%) ...; VisionZip's head sums on VisionDrop's grid: top 6 hold 86.6%,
# top 7 95.2%; VisPruner's head means 16..1 (136): top 7 hold 91 (66.9%); Recoverable's [CLS] row: 5 and 10 hold
# 0.9 of 1.131 (79.6%), with 0 (0.023) 81.6%
HAND_WORKED = [
    pytest.param(ts.PruMerge, dict(neighbours=2), prumerge_tokens, 0.6, 3, id="prumerge"),
    pytest.param(ts.PruMerge, dict(neighbours=2), prumerge_tokens, 0.9, 11, id="prumerge-0.9"),
    pytest.param(ts.PruMergePlus, dict(neighbours=2), prumerge_tokens, 0.6, 3, id="prumerge_plus"),
    pytest.param(ts.VisionZip, {}, test_visiondrop.hand_worked_tokens, 0.9, 7, id="visionzip"),
    pytest.param(ts.VisionZip, dict(contextual=2), test_visiondrop.hand_worked_tokens, 0.85, 6, id="visionzip-contextual"),
    pytest.param(ts.VisionDrop, {}, test_visiondrop.hand_worked_tokens, 0.9, 7, id="visiondrop"),
    pytest.param(ts.VisPruner, dict(removed_per_round=3), test_vispruner.hand_worked_tokens, 0.65, 7, id="vispruner"),
    pytest.param(ts.FoPru, {}, fopru_tokens, 0.7, 2, id="fopru"),
    pytest.param(ts.FoPru, dict(strategy="row"), fopru_tokens, 0.75, 3, id="fopru-row"),
    pytest.param(ts.RecoverableCompression, dict(neighbours=3), test_recoverable.hand_worked_tokens, 0.8, 3, id="recoverable"),
    pytest.param(ts.MustDrop, {}, mustdrop_tokens, 0.55, 12, id="mustdrop"),
    pytest.param(ts.SkipVisual, dict(layer=1), skip_visual_tokens, 0.7, 2, id="skip_visual"),
]


@pytest.mark.parametrize("method, kwargs, tokens, mass, count", HAND_WORKED)
def test_the_mass_count_by_hand_then_what_that_fixed_count_keeps(method, kwargs, tokens, mass, count):
    adaptive = method(keep=Adaptive(mass=mass, min=1), **kwargs).select(tokens())
    assert len(adaptive.kept) == count
    assert same(adaptive, method(keep=count, **kwargs).select(tokens()))


def test_hand_worked_selections():
    """The kept tokens themselves, as the methods' own hand-worked tests give them at those counts."""
    assert ts.PruMerge(keep=Adaptive(0.6, min=1), neighbours=2).select(prumerge_tokens()).kept.tolist() == [3, 5, 10]
    assert ts.PruMerge(keep=Adaptive(0.45, min=1), neighbours=2).select(prumerge_tokens()).kept.tolist() == [5, 10]
    vispruner = ts.VisPruner(keep=Adaptive(0.65, min=1), removed_per_round=3)
    assert vispruner.select(test_vispruner.hand_worked_tokens()).kept.tolist() == [0, 1, 5, 7, 8, 10, 15]
    assert ts.FoPru(keep=Adaptive(0.7, min=1)).select(fopru_tokens()).kept.tolist() == [3, 5]
    assert ts.FoPru(keep=Adaptive(0.75, min=1)).select(fopru_tokens()).kept.tolist() == [3, 5, 12]
    recoverable = ts.RecoverableCompression(keep=Adaptive(0.8, min=1), neighbours=3)
    assert recoverable.select(test_recoverable.hand_worked_tokens()).kept.tolist() == [5, 6, 10]
    mustdrop = ts.MustDrop(keep=Adaptive(0.55, min=1)).select(mustdrop_tokens())
    assert mustdrop.kept.tolist() == [16, 17, 21, 22, 23, 25, 27, 28, 29, 33, 34, 35]
    assert ts.SkipVisual(keep=Adaptive(0.7, min=1), layer=1).select(skip_visual_tokens()).kept.tolist() == [1, 4]
    # 2 and 5 tie at 0.1: the lower index goes first
    assert ts.SkipVisual(keep=Adaptive(0.75, min=1), layer=1).select(skip_visual_tokens()).kept.tolist() == [1, 2, 4]


def test_scope_keeps_the_fewest_of_its_greedy_picks_reaching_the_coverage():
    """SCOPE's 2×3 grid: sky 0 1 2, an object 3 4, a small object 5; cosines 1 within a group, 0 across, so each
    token covers its group and every token's coverage is 6. With saliency the picks go 4 (covers 2 of 6), 0 (5 of
    6), 5 (6); without (alpha=0) 0 (3 of 6), 3 (5), 5."""
    tokens = test_scope.hand_worked_tokens([0.1, 0.1, 0.05, 0.3, 0.4, 0.05])

    def kept(coverage, **kwargs):
        return ts.SCOPE(keep=Adaptive(coverage=coverage, **{"min": 1, **kwargs})).select(tokens).kept.tolist()

    assert kept(0.3) == [4] and kept(0.34) == [0, 4] and kept(0.8) == [0, 4] and kept(0.9) == [0, 4, 5]
    assert kept(0.3, min=2) == [0, 4] and kept(0.9, max=2) == [0, 4]
    plain = [ts.SCOPE(keep=Adaptive(coverage=c, min=1), alpha=0).select(tokens).kept.tolist() for c in (0.5, 0.6)]
    assert plain == [[0], [0, 3]]
    # the picks are the prefix of a fixed keep's (the order does not depend on the count)
    assert kept(0.8) == ts.SCOPE(keep=2).select(tokens).kept.tolist()
    every = ts.SCOPE(keep=Adaptive(coverage=1.0)).select(tokens)
    assert every.kept.tolist() == list(range(6)) and every.features is None
    with pytest.raises(ValueError, match="scope takes Adaptive\\(coverage=...\\)"):
        ts.SCOPE(keep=Adaptive(mass=0.9))


@pytest.mark.parametrize("method, kwargs, tokens, mass, count", HAND_WORKED)
def test_min_and_max_clamp_the_count(method, kwargs, tokens, mass, count):
    n = len(tokens())
    raised = method(keep=Adaptive(mass=mass, min=count + 1), **kwargs).select(tokens())
    capped = method(keep=Adaptive(mass=mass, min=1, max=count - 1), **kwargs).select(tokens())
    assert len(raised.kept) == count + 1 and same(raised, method(keep=count + 1, **kwargs).select(tokens()))
    assert len(capped.kept) == count - 1 and same(capped, method(keep=count - 1, **kwargs).select(tokens()))
    # a min above the image's tokens keeps them all, without the warning a count gives
    assert method(keep=Adaptive(mass=mass, min=n + 5), **kwargs).select(tokens()).kept.tolist() == list(range(n))


@pytest.mark.parametrize("method, kwargs, tokens, mass, count", HAND_WORKED)
def test_mass_one_keeps_every_token_as_it_is(method, kwargs, tokens, mass, count):
    """Also the tokens of zero score (fopru's grid has 13): every token, no features, no merge map."""
    selection = method(keep=Adaptive(mass=1.0), **kwargs).select(tokens())
    assert same(selection, Selection.every(tokens()))


@pytest.mark.parametrize("method", [ts.PruMerge, ts.PruMergePlus, ts.RecoverableCompression])
def test_two_adaptive_counts_are_refused(method):
    with pytest.raises(ValueError, match="adaptive=True .* two rules for one count; pass adaptive=False"):
        method(keep=Adaptive(0.9), adaptive=True)
    assert method(keep=Adaptive(0.9)).budget == Adaptive(0.9)


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus", "visionzip", "visiondrop", "vispruner", "fopru",
                                  "recoverable", "mustdrop", "skip_visual"])
def test_coverage_is_refused_naming_the_rule_taken(name):
    with pytest.raises(ValueError, match=f"{name} takes Adaptive\\(mass=...\\)"):
        ts.load(name, keep=Adaptive(coverage=0.9))


@pytest.mark.parametrize("name, rule", [("divprune", "mass"), ("pyramiddrop", "mass"), ("uniform", "coverage")])
def test_methods_without_the_rule_name_those_that_take_it(name, rule):
    with pytest.raises(ValueError, match=f"{name} does not decide its count .* pass a count \\(keep=64\\) or a ratio "
                                         f"\\(keep=0.25\\), or use a method that takes it \\(.*"
                                         + ("visionzip" if rule == "mass" else "mmtok")):
        ts.load(name, keep=Adaptive(**{rule: 0.9}))


SCORES = {  # the score each method's count is decided on, from the tokens it was given on the tiny LLaVA
    "visionzip": lambda tokens: tokens["cls_attention"].sum(dim=0),
    "fopru": lambda tokens: ts.FoPru().significance(tokens),
}


@pytest.mark.parametrize("name", sorted(SCORES))
def test_run_stats_report_each_images_adaptive_count(name):
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS, n_images=[2, 1])
    sieve, seen = ts.load(name, keep=Adaptive(mass=0.8, min=1)), []
    select = sieve.select
    sieve.select = lambda tokens: seen.append(SCORES[name](tokens)) or select(tokens)
    with ts.apply(model, sieve) as run:
        model(**inputs)
    counts = [mass_count(scores, 0.8) for scores in seen]
    assert [r.after for r in run.stats.images] == [len(r.kept) for r in run.stats.images] == counts
    assert all(1 < count < 64 for count in counts)
    assert run.stats.tokens_after == sum(counts)


def test_coverage_steps():
    """What a greedy coverage method runs: a count's steps, or the coverage rule's bounds and share."""
    assert ts.Budget(4).coverage_steps(10) == (1, 4, None) and ts.Budget(0.5).coverage_steps(10) == (1, 5, None)
    assert Adaptive(coverage=0.9, min=2, max=6).coverage_steps(10) == (2, 6, 0.9)
    assert Adaptive(coverage=0.9).coverage_steps(10) == (10, 10, 0.9)  # min 16 above the image: every token
    assert Adaptive(coverage=1.0, min=2).coverage_steps(10) == (2, 10, None)  # 1.0 keeps every token
    with pytest.raises(TypeError, match="mass budgets are for methods that rank by a score"):
        Adaptive(mass=0.9).coverage_steps(10)
