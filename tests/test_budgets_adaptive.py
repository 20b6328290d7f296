"""Adaptive and per-crop budgets: hand-worked counts against a plain loop, min/max clamps, negative scores,
the per-crop split, coverage budgets (mmtok), the command-line spelling, refusals at construction, and the
shared contract on tiny models for scoring methods with an adaptive budget."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

import test_contract
import tokensieve as ts
from cases import _tiny_arguments
from conftest import build_model
from test_contract import TEXTS, greedy
from test_mmtok import brute_force_greedy, cover
from tiny_llava_next import LLAVA_NEXT
from tiny_models import LLAVA
from tokensieve.budget import Adaptive, Budget, as_budget, mass_count, parse_keep, split_top_level
from tokensieve.registry import method_class
from tokensieve.selection import coverage_greedy, split_budget, top_k_in_order
from tokensieve.sieve import ScoringSieve, Selection, VisualTokens, adaptive_rules_of


@dataclass
class Given(ScoringSieve):
    """A scoring method whose scores are the tokens' first feature (not registered)."""

    name = "given"
    paper = "-"

    def score(self, tokens):
        return tokens.features[:, 0]


def tokens_of(scores, grid=None, blocks=()):
    scores = torch.as_tensor(scores, dtype=torch.float)
    return VisualTokens(scores[:, None].repeat(1, 2), grid or (1, len(scores)), blocks=blocks)


def kept(keep, scores, **where) -> list[int]:
    return Given(keep=keep).select(tokens_of(scores, **where)).kept.tolist()


def loop_count(scores: list[float], mass: float) -> int:
    """The mass rule as a plain loop: shift if any score is negative, walk the ranking until the share is reached."""
    shift = min(min(scores), 0.0)
    weights = [s - shift for s in scores]
    total = sum(weights)
    ranking = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    held = 0.0
    for count, i in enumerate(ranking, start=1):
        held += weights[i]
        if held >= mass * total * (1 - 1e-9):
            return count
    return len(scores)


# -- the mass rule --------------------------------------------------------------------------------


def test_hand_worked_counts_on_scores_of_known_mass():
    scores = [0.5, 0.125, 0.25, 0.125]  # total 1; ranked 0, 2, then 1 and 3 tied (ties to the lower index)
    assert kept(Adaptive(mass=0.5, min=1), scores) == [0]  # 0.5 alone holds half
    assert kept(Adaptive(mass=0.6, min=1), scores) == [0, 2]  # 0.75
    assert kept(Adaptive(mass=0.75, min=1), scores) == [0, 2]  # reached exactly
    assert kept(Adaptive(mass=0.8, min=1), scores) == [0, 1, 2]  # 0.875: of the tied pair the lower index
    assert kept(Adaptive(mass=0.9, min=1), scores) == [0, 1, 2, 3]
    assert kept(Adaptive(mass=1.0, min=1), scores) == [0, 1, 2, 3]
    # float32 rounding does not cost a token: half of [0.1, 0.1] is one of them, a tenth of ten 0.1s is one
    assert kept(Adaptive(mass=0.5, min=1), [0.1, 0.1]) == [0]
    assert mass_count(torch.full((10,), 0.1), 0.3) == 3


def test_mass_one_keeps_tokens_of_zero_score_too():
    assert kept(Adaptive(mass=1.0, min=1), [0.0, 1.0, 0.0]) == [0, 1, 2]
    assert kept(Adaptive(mass=0.999, min=1), [0.0, 1.0, 0.0]) == [1]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mass", [0.1, 0.5, 0.77, 0.9, 0.99])
def test_the_count_is_the_plain_loops(seed, mass):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(50, generator=generator) ** 4 - (0.2 if seed % 2 else 0.0)  # odd seeds: some negative
    count = loop_count(scores.tolist(), mass)
    assert mass_count(scores, mass) == count
    assert kept(Adaptive(mass=mass, min=1), scores) == top_k_in_order(scores, count).tolist()


def test_min_and_max_clamp_the_count():
    scores = [0.9, 0.05, 0.03, 0.02]  # 0.9 holds 90%: one token
    assert kept(Adaptive(mass=0.9, min=1), scores) == [0]
    assert kept(Adaptive(mass=0.9, min=3), scores) == [0, 1, 2]
    assert kept(Adaptive(mass=1.0, min=1, max=2), scores) == [0, 1]
    assert kept(Adaptive(mass=0.9, min=2, max=2), scores) == [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an image smaller than min keeps every token, with no warning
        assert kept(Adaptive(mass=0.5), scores) == [0, 1, 2, 3]  # min=16 > 4 tokens
    assert Adaptive(mass=0.5, min=3, max=9).bounds(5) == (3, 5) and Adaptive(mass=0.5).bounds(4) == (4, 4)


def test_negative_scores_are_shifted_by_the_lowest():
    scores = [-1.0, 3.0, 1.0, -1.0]  # shifted: [0, 4, 2, 0], total 6
    assert kept(Adaptive(mass=0.6, min=1), scores) == [1]  # 4/6
    assert kept(Adaptive(mass=0.7, min=1), scores) == [1, 2]  # 6/6: the zero-mass tokens are not needed
    assert kept(Adaptive(mass=0.99, min=1), scores) == [1, 2]
    # a shifted count depends on neither the offset nor the (positive) scale of the scores
    for a, b in [(3.0, -5.0), (0.5, -2.0)]:
        assert kept(Adaptive(mass=0.6, min=1), [a * s + b for s in scores]) == [1]
        assert kept(Adaptive(mass=0.7, min=1), [a * s + b for s in scores]) == [1, 2]


def test_degenerate_scores():
    # no mass at all (every score equal after the shift, or zero): min tokens, by index
    assert kept(Adaptive(mass=0.5, min=2), [-2.0, -2.0, -2.0]) == [0, 1]
    assert kept(Adaptive(mass=0.5, min=1), [0.0, 0.0, 0.0]) == [0]
    # -inf holds no mass and is ranked last
    assert kept(Adaptive(mass=0.9, min=1), [float("-inf"), 1.0, 3.0]) == [1, 2]
    assert kept(Adaptive(mass=0.7, min=1), [float("-inf"), 1.0, 3.0]) == [2]


# -- per crop ---------------------------------------------------------------------------------------

# a 2x2 base view (tokens 0..3) and a 2x4 high-res piece (4..11): sizes 4 and 8
BASE, HIGH = torch.arange(4).view(2, 2), torch.arange(4, 12).view(2, 4)
PIECE_SCORES = [9.0, 8.0, 7.0, 6.0, 0.1, 0.5, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6]


def test_per_crop_splits_the_count_by_size_and_takes_each_pieces_top():
    where = dict(blocks=(BASE, HIGH))
    assert kept(6, PIECE_SCORES, **where) == [0, 1, 2, 3, 7, 9]  # one budget: the base view's four first
    # per crop: 6 shared 2 + 4 by size; the base's top two, the high-res piece's top four
    assert kept(Budget(6, per_crop=True), PIECE_SCORES, **where) == [0, 1, 5, 7, 9, 11]
    # 5 shared: exact 5/3 and 10/3, the larger remainder (the high-res piece's 1/3 < base's 2/3) rounds up
    assert split_budget([4, 8], 5) == [2, 3]
    assert kept(Budget(5, per_crop=True), PIECE_SCORES, **where) == [0, 1, 7, 9, 11]
    # a budget over every token, or an image of one piece, splits nothing
    assert kept(Budget(12, per_crop=True), PIECE_SCORES, **where) == list(range(12))
    assert kept(Budget(6, per_crop=True), PIECE_SCORES) == kept(6, PIECE_SCORES)


def test_per_crop_against_a_reference_loop():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(12, generator=generator)
    for k in range(1, 13):
        shares = split_budget([4, 8], k)
        expected = sorted(int(block.flatten()[i]) for block, share in zip((BASE, HIGH), shares)
                          for i in top_k_in_order(scores[block.flatten()], share))
        assert kept(Budget(k, per_crop=True), scores, blocks=(BASE, HIGH)) == expected


def test_an_adaptive_per_crop_budget_counts_over_the_image_then_splits():
    where = dict(blocks=(BASE, HIGH))
    total = sum(PIECE_SCORES)  # 33.6: the base view's 30 hold 89%, so mass=0.8 needs 4 tokens (9+8+7+6=30 >= 26.9)
    assert mass_count(torch.tensor(PIECE_SCORES), 0.8) == 4 and 24 < 0.8 * total <= 30
    assert kept(Adaptive(mass=0.8, min=1), PIECE_SCORES, **where) == [0, 1, 2, 3]
    assert kept(Adaptive(mass=0.8, min=1, per_crop=True), PIECE_SCORES, **where) == [0, 7, 9, 11]  # 4 = 1 + 3


def test_grid_methods_always_split_by_piece():
    tokens = VisualTokens(torch.randn(12, 3, generator=torch.Generator().manual_seed(1)), (1, 12), blocks=(BASE, HIGH))
    plain, split = ts.Pool(keep=6).select(tokens), ts.Pool(keep=Budget(6, per_crop=True)).select(tokens)
    assert torch.equal(plain.kept, split.kept) and torch.equal(plain.features, split.features)


# -- coverage (mmtok) -------------------------------------------------------------------------------


def loop_fewest(matrix, fraction, at_least, most) -> list[int]:
    """The fewest brute-force greedy columns (at least ``at_least``, at most ``most``) reaching ``fraction`` of f(all)."""
    order = brute_force_greedy(matrix, most)
    full = cover(matrix.double(), list(range(matrix.shape[1])))
    for count in range(at_least, most + 1):
        if cover(matrix.double(), order[:count]) >= fraction * full * (1 - 1e-6):
            return order[:count]
    return order


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fraction, at_least, most", [(0.5, 1, 40), (0.9, 1, 40), (0.99, 1, 40), (0.9, 20, 40),
                                                      (0.99, 1, 10), (1.0, 1, 40)])
def test_coverage_greedy_stops_at_the_fewest_columns_reaching_the_fraction(seed, fraction, at_least, most):
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.rand(30, 40, generator=generator) ** 6  # 40 columns: past the 16-step read-back
    expected = loop_fewest(matrix, fraction, at_least, most)
    assert coverage_greedy(matrix, most, fraction, at_least).tolist() == expected
    assert coverage_greedy(matrix, most).tolist()[: len(expected)] == expected  # a prefix of the plain greedy


def test_coverage_by_hand():
    # columns 0, 1, 2 cover rows 0, 1, 2 alone with 0.5, 0.3, 0.2 (f(all) = 1); greedy takes them in that order
    matrix = torch.diag(torch.tensor([0.5, 0.3, 0.2]))
    assert coverage_greedy(matrix, 3, 0.5).tolist() == [0]
    assert coverage_greedy(matrix, 3, 0.8).tolist() == [0, 1]
    assert coverage_greedy(matrix, 3, 0.81).tolist() == [0, 1, 2]
    assert coverage_greedy(matrix, 3, 0.5, at_least=2).tolist() == [0, 1]
    assert coverage_greedy(matrix, 1, 0.81).tolist() == [0]  # capped at k


def test_mmtok_with_an_adaptive_coverage_budget():
    generator = torch.Generator().manual_seed(3)
    features, text = torch.randn(24, 8, generator=generator), torch.randn(3, 8, generator=generator)
    tokens = VisualTokens(features, (4, 6), {"text_embeddings": text, "vision_features": features})
    method = ts.MMTok(keep=Adaptive(coverage=0.9, min=1))
    matrix = method.coverage(tokens)
    expected = sorted(loop_fewest(matrix, 0.9, 1, 24))
    assert 1 < len(expected) < 24 and method.select(tokens).kept.tolist() == expected
    assert ts.MMTok(keep=len(expected)).select(tokens).kept.tolist() == expected  # the same tokens as that count
    assert ts.MMTok(keep=Adaptive(coverage=1.0)).select(tokens).kept.tolist() == list(range(24))
    assert ts.MMTok(keep=Adaptive(coverage=1.0, min=1, max=5)).select(tokens).kept.tolist() == ts.MMTok(keep=5).select(tokens).kept.tolist()
    assert len(ts.MMTok(keep=Adaptive(coverage=0.01, min=7)).select(tokens).kept) == 7


# -- spelling and construction ----------------------------------------------------------------------


def test_command_line_spelling():
    assert parse_keep("adaptive(0.9)") == Adaptive(mass=0.9)
    assert parse_keep(" Adaptive( mass=0.5, min=8, max=100 ) ") == Adaptive(mass=0.5, min=8, max=100)
    assert parse_keep("adaptive(coverage=0.95,per_crop=True)") == Adaptive(coverage=0.95, per_crop=True)
    assert parse_keep("budget(64,per_crop=True)") == Budget(64, per_crop=True)
    for budget in [Adaptive(0.9), Adaptive(coverage=0.5, min=3, max=9, per_crop=True), Budget(0.25, per_crop=True)]:
        assert parse_keep(str(budget)) == budget and " " not in str(budget)
    assert str(Adaptive(0.9)) == "adaptive(mass=0.9)" and repr(Adaptive(0.9, max=64)) == "Adaptive(mass=0.9, max=64)"
    assert split_top_level("64, adaptive(0.9,min=32),0.25") == ["64", "adaptive(0.9,min=32)", "0.25"]
    assert ts.build("fastervlm:adaptive(0.9)").keep == Adaptive(mass=0.9)
    assert ts.build("fastervlm:keep=adaptive(mass=0.5,min=8)").budget == Adaptive(mass=0.5, min=8)
    assert ts.build("fastervlm:keep=budget(64,per_crop=True)").keep == Budget(64, per_crop=True)
    assert ts.build("mmtok:keep=adaptive(coverage=0.9)").budget.adaptive == "coverage"
    assert ts.build("fastervlm", keep=Adaptive(0.5)).keep == Adaptive(0.5)
    assert repr(ts.FasterVLM(keep=Adaptive(0.9))) == "FasterVLM(keep=Adaptive(mass=0.9))"
    assert ts.FasterVLM(keep=Budget(64)).keep == 64  # a plain Budget is its number
    assert as_budget("adaptive(0.9)") == Adaptive(0.9)


@pytest.mark.parametrize("text, words", [
    ("adaptive(x)", "write an adaptive budget as adaptive\\(0.9\\)"),
    ("adaptive(0.9)(1)", "write an adaptive budget"),
    ("adaptive(0.9,foo=1)", "adaptive\\(\\) takes mass, coverage, min, max, per_crop"),
    ("budget(64,per_crop=True,x=1)", "budget\\(\\) takes value, per_crop"),
    ("adaptive(1.5)", "share in \\(0, 1\\]"),
    ("lots", "a token count \\(64\\), a ratio \\(0.25\\) or adaptive\\(0.9\\)"),
])
def test_bad_spellings_are_refused(text, words):
    with pytest.raises(ValueError, match=words):
        parse_keep(text)


@pytest.mark.parametrize("make, error, words", [
    (lambda: Adaptive(), ValueError, "one threshold: mass=0.9 .* or coverage=0.9 .* not none"),
    (lambda: Adaptive(mass=0.5, coverage=0.5), ValueError, "one threshold.* not both"),
    (lambda: Adaptive(0.0), ValueError, "Adaptive\\(mass=0.0\\): the threshold is a share in \\(0, 1\\]"),
    (lambda: Adaptive(True), ValueError, "share in \\(0, 1\\]"),
    (lambda: Adaptive(coverage=1.2), ValueError, "Adaptive\\(coverage=1.2\\)"),
    (lambda: Adaptive(0.5, min=0), ValueError, "min=0.*an int >= 1"),
    (lambda: Adaptive(0.5, min=2.5), ValueError, "min=2.5"),
    (lambda: Adaptive(0.5, min=8, max=4), ValueError, "max=4.*>= min=8, or None"),
    (lambda: Adaptive(0.5, per_crop="yes"), TypeError, "per_crop must be True .* or False"),
    (lambda: Budget(64, per_crop=1), TypeError, "per_crop must be True"),
    (lambda: ts.FasterVLM(keep="64"), TypeError, "int .* or a float .* or an adaptive budget"),
])
def test_bad_budgets_are_refused_when_built(make, error, words):
    with pytest.raises(error, match=words):
        make()


@pytest.mark.parametrize("make, words", [
    (lambda: ts.DivPrune(keep=Adaptive(0.9)), "divprune cannot take an adaptive budget keep=Adaptive\\(mass=0.9\\): "
                                              "divprune does not decide its count .* pass a count \\(keep=64\\) or a ratio"),
    (lambda: ts.PyramidDrop(keep=Adaptive(0.9)), "pyramiddrop cannot take an adaptive budget"),
    (lambda: ts.Pool(keep=Adaptive(0.9)), "pool cannot take an adaptive budget"),
    (lambda: ts.FasterVLM(keep=Adaptive(coverage=0.9)), "fastervlm takes Adaptive\\(mass=...\\)"),
    (lambda: ts.MMTok(keep=Adaptive(mass=0.9)), "mmtok takes Adaptive\\(coverage=...\\)"),
    (lambda: ts.DivPrune(keep=Budget(64, per_crop=True)), "divprune cannot split its budget per crop .*per_crop=False"),
    (lambda: ts.MMTok(keep=Adaptive(coverage=0.9, per_crop=True)), "mmtok cannot split its budget per crop"),
    (lambda: ts.build("uniform:keep=adaptive(0.9)"), "uniform cannot take an adaptive budget"),
])
def test_methods_that_cannot_honour_a_budget_refuse_it_when_built(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_a_scoring_method_that_overrides_select_must_declare_the_rules_again():
    @dataclass
    class OwnSelect(Given):
        def select(self, tokens):
            return Selection(torch.arange(self.budget.resolve(len(tokens))))

    @dataclass
    class Declared(OwnSelect):
        adaptive_rules = ("mass",)

    with pytest.raises(ValueError, match="overrides ScoringSieve.select without declaring adaptive_rules"):
        OwnSelect(keep=Adaptive(0.5))
    with pytest.raises(ValueError, match="cannot split its budget per crop"):
        OwnSelect(keep=Budget(8, per_crop=True))
    assert OwnSelect(keep=8).keep == 8 and Declared(keep=Adaptive(0.5)).keep == Adaptive(0.5)
    assert ts.FastV(keep=Adaptive(0.5)).budget.adaptive == "mass"  # inherits ScoringSieve.select: no declaration


# -- on tiny models --------------------------------------------------------------------------------


def recording(sieve):
    """``sieve`` whose select also records the scores and tokens it was given."""
    seen, select = [], sieve.select

    def record(tokens):
        seen.append((sieve.score(tokens), tokens))
        return select(tokens)

    sieve.select = record
    return sieve, seen


def test_mass_one_is_the_stock_model_bit_for_bit():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS)
    expected_logits, expected_tokens = model(**inputs).logits, greedy(model, inputs)
    with ts.apply(model, ts.FasterVLM(keep=Adaptive(mass=1.0))) as run:
        logits, tokens = model(**inputs).logits, greedy(model, inputs)
    assert torch.equal(logits, expected_logits) and torch.equal(tokens, expected_tokens)
    assert all(r.after == r.before == LLAVA.tokens_per_image for r in run.stats.images)


@pytest.mark.parametrize("method", [ts.FasterVLM, lambda keep: ts.FastV(keep=keep, layer=1)], ids=["fastervlm", "fastv"])
def test_run_stats_report_each_images_adaptive_count(method):
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS, n_images=[2, 1])
    sieve, seen = recording(method(keep=Adaptive(mass=0.8, min=1)))  # the tiny models' attention is nearly flat
    with ts.apply(model, sieve) as run:
        model(**inputs)
    counts = [loop_count(scores.tolist(), 0.8) for scores, _ in seen]
    assert [(r.row, r.before) for r in run.stats.images] == [(0, 64), (0, 64), (1, 64)]
    assert [r.after for r in run.stats.images] == [len(r.kept) for r in run.stats.images] == counts
    assert [r.stages[-1].after for r in run.stats.images] == counts
    assert all(1 < count < 64 for count in counts) and len(set(counts)) > 1  # the images do differ
    for record, (scores, _) in zip(run.stats.images, seen):
        assert record.kept.tolist() == top_k_in_order(scores, record.after).tolist()
    assert run.stats.tokens_after == sum(counts)


def test_per_crop_on_llava_next_splits_over_the_models_own_pieces():
    model = build_model(LLAVA_NEXT)
    inputs = LLAVA_NEXT.make_inputs(TEXTS[:1])
    sieve, seen = recording(ts.FasterVLM(keep=Budget(40, per_crop=True)))
    with ts.apply(model, sieve) as run:
        model(**inputs)
    [(scores, tokens)] = seen
    pieces = tokens.layout()
    assert len(pieces) == 3  # base view, high-res grid, newline column
    shares = split_budget([piece.numel() for piece in pieces], 40)
    expected = sorted(int(piece.flatten()[i]) for piece, share in zip(pieces, shares)
                      for i in top_k_in_order(scores[piece.flatten()], share))
    assert run.stats.images[0].kept.tolist() == expected and run.stats.images[0].after == 40
    with ts.apply(model, ts.FasterVLM(keep=40)) as whole:
        model(**inputs)
    assert whole.stats.images[0].kept.tolist() != expected  # one budget over the image picks otherwise here


def adaptive_cases() -> list:
    """Every registered method that declares an adaptive rule (read from the registry, as tests/cases.py reads the
    contract's), on the tiny LLaVA with the contract's arguments, each with its rule; and one per-crop case."""
    params = []
    for info in ts.list_methods():
        cls = method_class(info.class_name)
        if cls.needs_video:
            continue
        for rule in adaptive_rules_of(cls):
            def make(keep, name=info.name, kwargs=_tiny_arguments(info)):
                return ts.load(name, keep=keep, **kwargs)
            params.append(pytest.param(LLAVA, make, rule, id=f"llava-{info.name}-{rule}"))
    return params + [pytest.param(LLAVA_NEXT, lambda keep: ts.FasterVLM(keep=keep), "mass", id="llava_next-fastervlm-per_crop")]


ADAPTIVE_CASES = adaptive_cases()
CONTRACT_TESTS = [
    "test_generate_with_cache_equals_a_no_cache_loop", "test_left_padded_batch_equals_each_row_alone",
    "test_second_turn_reusing_the_pruned_cache_equals_a_fresh_prefill", "test_sampling_is_reproducible_under_a_seed",
    "test_each_stage_keeps_a_subset_of_what_the_stage_before_it_kept", "test_model_is_restored_on_exit_and_after_an_exception",
]


@pytest.mark.parametrize("family, make, rule", ADAPTIVE_CASES)
@pytest.mark.parametrize("test", CONTRACT_TESTS)
def test_the_shared_contract_holds_with_an_adaptive_budget(family, make, rule, test, monkeypatch):
    """The contract tests themselves, with the method they build swapped for one with an adaptive budget."""
    per_crop = family is LLAVA_NEXT

    def method_for(name, kwargs, keep=16, pre_keep=0.5):
        if keep == 16:  # the contract's pruning budget: adaptive instead
            return make(Adaptive(**{rule: 0.5}, min=4, per_crop=per_crop))
        return make(Adaptive(**{rule: 1.0}, per_crop=per_crop))  # its keep-all budgets

    monkeypatch.setattr(test_contract, "method_for", method_for)
    arguments = {"texts": TEXTS} if "second_turn" in test else {}
    getattr(test_contract, test)(family, "adaptive", {}, **arguments)


@pytest.mark.parametrize("family, make, rule", ADAPTIVE_CASES)
def test_keep_all_contract_with_mass_one(family, make, rule, monkeypatch):
    monkeypatch.setattr(test_contract, "method_for", lambda name, kwargs, keep=16, pre_keep=0.5: make(
        Adaptive(**{rule: 1.0}, per_crop=family is LLAVA_NEXT)))
    test_contract.test_keep_all_is_the_stock_model_bit_for_bit(family, "adaptive", {}, 1.0)


# -- the benchmark ---------------------------------------------------------------------------------


def test_the_sweep_plans_an_adaptive_spelling_and_records_it_as_text():
    from tokensieve.bench.sweep import Config, plan

    configs = plan(["fastervlm:keep=adaptive(0.9)", "mmtok:keep=adaptive(coverage=0.9,min=8)"], [16])
    assert configs[1:] == [Config("fastervlm", "adaptive(0.9)"), Config("mmtok", "adaptive(coverage=0.9,min=8)")]
    assert configs[1].id == "fastervlm-kadaptive(0.9)"
    assert ts.build(configs[1].method, keep=configs[1].keep).budget == Adaptive(0.9)


def test_the_sweep_of_every_method_runs_an_adaptive_budget_where_a_method_takes_one():
    from tokensieve.bench.sweep import SweepSpecError, parse_keep, plan

    takers = {info.name for info in ts.list_methods()
              if "mass" in getattr(ts.build(info.name), "adaptive_rules", ())}
    assert {"fastervlm", "vtc_cls"} <= takers
    configs = plan(["all"], [parse_keep("32"), parse_keep("adaptive(0.9)")])
    assert {c.method for c in configs if isinstance(c.keep, Adaptive)} == takers
    assert sum(c.keep == 32 for c in configs) == len(ts.list_methods())
    stills = plan(["all"], [parse_keep("32")], videos=False)  # a suite of images: no method for videos only
    video_only = {info.name for info in ts.list_methods() if info.needs_video}
    assert {"evs", "vidcom2", "uniform_frames"} <= video_only
    assert {c.method for c in stills[1:]} == {info.name for info in ts.list_methods()} - video_only
    with pytest.raises(SweepSpecError, match="random cannot take an adaptive budget"):
        plan(["random"], [parse_keep("adaptive(0.9)")])


def test_the_summary_places_an_adaptive_run_at_its_mean_count(tmp_path):
    """The plots' x axis is the summary's tokens_kept: the mean of each sample's kept tokens."""
    import json

    from tokensieve.bench.summary import read_runs, summarise

    (tmp_path / "runs").mkdir()
    for config, method, keep, counts in [("baseline", None, None, [256, 256]),
                                         ("fastervlm-kadaptive(0.9)", "fastervlm", "adaptive(0.9)", [137, 45])]:
        lines = [json.dumps({
            "config": config, "method": method, "keep": keep, "sample": f"s{i}", "category": "colour",
            "question": "q", "target": "red", "prediction": "red", "correct": True, "score": 1.0,
            "tokens_before": 256, "tokens_after": count, "kept": list(range(count)), "grid": [16, 16], "groups": None,
            "prefill_flops": count * 10, "prefill_flops_unreduced": 2560, "vision_flops": 1, "prefill_seconds": 0.1,
            "decode_seconds_per_token": 0.01, "new_tokens": 1, "peak_memory_added_bytes": 1, "kv_cache_bytes": count,
            "selection_seconds": None if method is None else 0.001, "warmup": False}) for i, count in enumerate(counts)]
        (tmp_path / "runs" / f"{config}.jsonl").write_text("\n".join(lines) + "\n")
    summary = summarise(read_runs(tmp_path)).set_index("config")
    assert summary.loc["fastervlm-kadaptive(0.9)", "tokens_kept"] == 91.0
    assert summary.loc["fastervlm-kadaptive(0.9)", "keep"] == "adaptive(0.9)"


def test_the_command_line_takes_adaptive_budgets_and_a_spec_may_name_one_first():
    from tokensieve import cli

    assert cli.parse_keep("adaptive(0.9,min=8)") == Adaptive(mass=0.9, min=8)
    assert ts.build("fastervlm:adaptive(0.9,min=8)").keep == Adaptive(mass=0.9, min=8)
    assert ts.split_specs("fastervlm:adaptive(0.9,min=8),fastv:0.5,layer=3") == ["fastervlm:adaptive(0.9,min=8)", "fastv:0.5,layer=3"]
