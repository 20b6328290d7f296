"""ATP's training-free stage rule, worked by hand on a 4×4 grid, checked against a plain reference loop, and run
inside a tiny model (each stage keeps what the rule gives on the attention it was given)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_in_llm import _image_blocks, _masked_stock_hidden
from tiny_models import LLAVA
from tiny_qwen2_vl import QWEN2_VL
from tokensieve.methods.atp import ATP, ATPStage, atp_keep
from tokensieve.sieve import VisualTokens
from tokensieve.signals import Signal

IMAGE, INSTRUCTION = Signal("llm_attention", queries="image"), Signal("llm_attention", queries="instruction")

#: head-mean attention on a 4×4 grid: three tokens stand out (2: 9, 9: 6, 12: 4), the rest 1; mean 32/16 = 2
MEAN = torch.ones(16)
MEAN[[2, 9, 12]] = torch.tensor([9.0, 6.0, 4.0])
#: the spatial lattice of 4 tokens on 4×4 (uniform's cell centres, rows 1 and 3, columns 1 and 3)
LATTICE = [5, 7, 13, 15]


def _heads(mean: torch.Tensor) -> torch.Tensor:
    # two heads that disagree (one holds the even tokens' attention, the other the odd ones'): their mean is ``mean``
    even = torch.arange(len(mean)) % 2 == 0
    return torch.stack([torch.where(even, 2 * mean, 0.0), torch.where(even, 0.0, 2 * mean)])


def tokens(mean=MEAN, grid=(4, 4), entered=None, cross=None) -> VisualTokens:
    """The image with a redundancy score ``mean``: the attention from the image's tokens (self) and from its
    instruction (cross) average to it; by default the instruction attends evenly (1 each) and the image's tokens
    give ``2 * mean - 1``."""
    cross = torch.ones(len(mean)) if cross is None else cross
    signals = {IMAGE: _heads(2 * mean - cross), INSTRUCTION: _heads(cross)}
    return VisualTokens(torch.zeros(len(mean), 8), grid, signals, entered=entered)


def kept(stage: ATPStage, visual: VisualTokens) -> list[int]:
    return stage.select(visual).kept.tolist()


def test_hand_worked_grid_keeps_the_tokens_above_the_mean_and_the_lattice():
    # alpha=1: above the mean 2 are 2, 9 and 12; spatial 0.25 of 16 = the 4 lattice tokens; their union, 7 tokens
    assert kept(ATPStage(layer=1), tokens()) == [2, 5, 7, 9, 12, 13, 15]
    # alpha=2: the threshold is 4, which 12 only meets (the test is strict): 2 and 9, and the lattice
    assert kept(ATPStage(layer=1, alpha=2.0), tokens()) == [2, 5, 7, 9, 13, 15]
    # spatial=0: the redundancy test alone
    assert kept(ATPStage(layer=1, spatial=0.0), tokens()) == [2, 9, 12]
    # spatial=1: every token is on the lattice
    assert kept(ATPStage(layer=1, spatial=1.0), tokens()) == list(range(16))


def test_the_redundancy_score_is_the_mean_of_the_self_and_cross_modality_importance():
    # the instruction attends evenly: alone (cross) no token is above its mean, only the lattice stays
    assert kept(ATPStage(layer=1, redundancy="cross"), tokens()) == LATTICE
    # the image's tokens alone (self, 17, 11 and 7 at 2, 9, 12, else 1; mean 3) rank as the mean does
    assert kept(ATPStage(layer=1, redundancy="self"), tokens()) == [2, 5, 7, 9, 12, 13, 15]
    # the instruction prefers token 0 (16 there, 0 elsewhere); the image's tokens give 2 * MEAN - cross, so 0 gets
    # -14 from them and the mean is still MEAN: 0 is not kept, though the instruction alone would keep it
    cross = torch.zeros(16)
    cross[0] = 16.0
    assert kept(ATPStage(layer=1), tokens(cross=cross)) == [2, 5, 7, 9, 12, 13, 15]
    assert kept(ATPStage(layer=1, redundancy="cross"), tokens(cross=cross)) == [0] + LATTICE
    assert ATP().requests() == (IMAGE, INSTRUCTION) and ATP(redundancy="cross").requests() == (INSTRUCTION,)


def test_keep_is_a_floor_topped_up_by_attention_and_a_covering_budget_keeps_everything():
    # at least 10: the 7 of the rule, then the best of the rest, all at 1, so the lowest indices 0, 1, 3
    assert kept(ATPStage(10, layer=1), tokens()) == [0, 1, 2, 3, 5, 7, 9, 12, 13, 15]
    assert kept(ATPStage(0.625, layer=1), tokens()) == [0, 1, 2, 3, 5, 7, 9, 12, 13, 15]  # 10 of 16
    # a floor below the rule's count changes nothing
    assert kept(ATPStage(5, layer=1), tokens()) == [2, 5, 7, 9, 12, 13, 15]
    # the floor counts the tokens the image had at the method's first stage: 8 of 16 entered covers these 8
    assert kept(ATPStage(0.5, layer=2), tokens(MEAN[:8], (1, 8), entered=16)) == list(range(8))
    assert kept(ATPStage(1.0, layer=1), tokens()) == list(range(16))
    assert kept(ATPStage(16, layer=1), tokens()) == list(range(16))


def test_the_last_stage_of_an_exact_schedule_keeps_exactly_keep_the_union_first():
    # 5 of the union's 7: 2, 9 and 12 by attention, then the lattice tokens, all at 1, so 5 and 7
    assert kept(ATPStage(5, layer=1, exact=True), tokens()) == [2, 5, 7, 9, 12]
    # 2 of them: by attention, 2 and 9 (the lattice token 5 has less)
    assert kept(ATPStage(2, layer=1, exact=True), tokens()) == [2, 9]
    # more than the union: topped up as the floor is
    assert kept(ATPStage(10, layer=1, exact=True), tokens()) == [0, 1, 2, 3, 5, 7, 9, 12, 13, 15]
    assert [s.exact for s in ATP().schedule(32)] == [False, False, True]
    assert [s.exact for s in ATP(exact=False).schedule(32)] == [False, False, False]


def test_a_stage_that_sees_part_of_the_grid_spreads_its_lattice_along_raster_order():
    # 8 tokens left of an image (grid (1, 8)): scores mean 1, above it 3 and 7; 2 lattice tokens at 2 and 6
    scores = torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 3.0])
    assert kept(ATPStage(layer=2), tokens(scores, (1, 8), entered=16)) == [2, 3, 6, 7]


def test_the_count_adapts_to_each_images_attention():
    # one budget, two images: a peaked one keeps its peak and the lattice, a spread one half of its tokens
    peaked = torch.full((16,), 0.1)
    peaked[6] = 10.0
    spread = torch.arange(16, dtype=torch.float32)  # mean 7.5: tokens 8..15 are above it
    stage = ATPStage(layer=1)
    assert kept(stage, tokens(peaked)) == [5, 6, 7, 13, 15]
    assert kept(stage, tokens(spread)) == [5, 7, 8, 9, 10, 11, 12, 13, 14, 15]


def _reference(scores: list[float], grid, alpha, spatial, floor, exact) -> list[int]:
    """The rule as a plain loop; the lattice taken from ``uniform``'s selection of as many tokens."""
    n = len(scores)
    mean = sum(scores) / n
    chosen = {i for i in range(n) if scores[i] > alpha * mean}
    count = round(spatial * n)
    if count:
        lattice = ts.Uniform(keep=count).select(VisualTokens(torch.zeros(n, 1), grid)).kept.tolist()
        chosen |= set(lattice)
    if exact:  # the passing tokens by score, then the others by score: the first floor of them
        ranked = sorted(range(n), key=lambda i: (i not in chosen, -scores[i], i))
        return sorted(ranked[: min(floor, n)])
    rest = sorted((i for i in range(n) if i not in chosen), key=lambda i: (-scores[i], i))
    chosen |= set(rest[: max(0, min(floor, n) - len(chosen))])
    return sorted(chosen)


@pytest.mark.parametrize("grid", [(4, 4), (6, 5), (1, 23), (24, 24)])
@pytest.mark.parametrize("alpha, spatial, floor", [(1.0, 0.25, 1), (0.5, 0.1, 3), (2.0, 0.0, 40), (1.5, 0.5, 7)])
@pytest.mark.parametrize("exact", [False, True])
def test_the_rule_equals_a_reference_loop(grid, alpha, spatial, floor, exact):
    generator = torch.Generator().manual_seed(grid[0] * 31 + grid[1] + int(alpha * 10))
    n = grid[0] * grid[1]
    scores = torch.rand(n, generator=generator) ** 3  # skewed, as attention is
    got = atp_keep(scores, VisualTokens(torch.zeros(n, 1), grid).layout(), alpha, spatial, floor, exact).tolist()
    assert got == _reference(scores.tolist(), grid, alpha, spatial, floor, exact)


def test_schedule_places_the_stages_by_depth_or_at_the_given_layers():
    assert [s.layer for s in ATP().schedule(32)] == [8, 16, 24]
    assert [s.layer for s in ATP().schedule(4)] == [1, 2, 3]
    stages = ATP(keep=0.25, layers=(2, 6), alpha=0.5, spatial=0.1).schedule(32)
    assert [(s.layer, s.keep, s.alpha, s.spatial, s.exact) for s in stages] == [(2, 0.25, 0.5, 0.1, False), (6, 0.25, 0.5, 0.1, True)]
    assert all(s.redundancy == "both" for s in stages) and ATP(redundancy="self").schedule(4)[0].redundancy == "self"
    assert all(s.llm_attention_at == "previous" and s.stage == "in_llm" for s in stages)
    assert ts.build("atp:0.25,alpha=0.5,layers=(2,6),spatial=0.1,redundancy=self") == ATP(0.25, (2, 6), 0.5, 0.1, "self")


class _Recording(ATP):
    """ATP whose stages record the attention rows and entered counts they are given."""

    def schedule(self, n_layers):
        owner = self

        class Recording(ATPStage):
            def select(stage, visual):
                owner.seen.append((stage.layer, visual[IMAGE].clone(), visual[INSTRUCTION].clone(), visual.entered, visual.grid))
                return super().select(visual)

        self.seen = []
        return tuple(Recording(s.keep, s.layer, s.alpha, s.spatial, s.redundancy, s.exact) for s in super().schedule(n_layers))


@pytest.mark.parametrize("exact", [True, False])
def test_inside_a_tiny_model_each_stage_keeps_what_the_rule_gives_on_its_attention(exact):
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs([[5, 6, 7, 8], [9, 10]])
    method = _Recording(keep=4, exact=exact)
    with ts.apply(model, method) as run:
        model(**inputs)
    seen = iter(method.seen)
    for stage_index, layer in enumerate((1, 2, 3)):
        for record in run.stats.images:
            got_layer, image, instruction, entered, grid = next(seen)
            assert got_layer == layer and entered == LLAVA.tokens_per_image
            received = record.stages[stage_index - 1].kept if stage_index else torch.arange(record.before)
            assert image.shape[1] == instruction.shape[1] == len(received)
            layout = VisualTokens(torch.zeros(len(received), 1), grid).layout()
            score = (image.mean(0) + instruction.mean(0)) / 2
            expected = received[atp_keep(score, layout, 1.0, 0.25, 4, exact and layer == 3)]
            assert torch.equal(record.stages[stage_index].kept, expected)
    counts = [record.after for record in run.stats.images]
    assert counts == [4, 4] if exact else all(4 <= count < LLAVA.tokens_per_image for count in counts)


@pytest.mark.parametrize("family", [LLAVA, QWEN2_VL], ids=lambda f: f.name)
def test_each_stage_scores_with_eager_attention_of_the_layer_before_on_what_is_left(family):
    """Stage s before layer K_s gets eager attention in layer K_s - 1 of the stock model in which every layer masks
    what the stages before it dropped, averaged over the rows of the image's tokens still there (self-modality)."""
    model = family.build()
    model.set_attn_implementation("eager")
    inputs = family.make_inputs([[5, 6, 7, 8], [9, 10]])
    method = _Recording(keep=8)
    with ts.apply(model, method) as run:
        model(**inputs)
    records = run.stats.images
    blocks = _image_blocks(inputs, family, records)
    attentions = []
    hook = model.register_forward_hook(lambda m, a, out: attentions.append(out.attentions))
    try:
        _masked_stock_hidden(model, {**inputs, "output_attentions": True}, records, family)
    finally:
        hook.remove()
    seen = iter(method.seen)
    for stage_index in range(3):
        for record, (row, positions) in zip(records, blocks):
            layer, got, _, _, _ = next(seen)
            left = record.stages[stage_index - 1].kept if stage_index else torch.arange(record.before)
            rows = attentions[-1][layer - 1][row][:, positions[left]]
            expected = rows[:, :, positions[left]].float().mean(1)
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_bad_arguments_are_refused_with_what_to_change():
    for alpha in (0, -1.0, math.inf, True, "1"):
        with pytest.raises(ValueError, match="alpha=.*a number > 0"):
            ATP(alpha=alpha)
    for spatial in (-0.1, 1.5, True, None):
        with pytest.raises(ValueError, match="spatial=.*in \\[0, 1\\]"):
            ATP(spatial=spatial)
    with pytest.raises(ValueError, match="redundancy='text': choose 'both'"):
        ATP(redundancy="text")
    for layers in ((3, 2), (0,), (2, 2), ()):
        with pytest.raises(ValueError, match="strictly increasing ints >= 1"):
            ATP(layers=layers)
    with pytest.raises(ValueError, match="exact=.*pass True"):
        ATP(exact=1)
    with pytest.raises(ValueError, match="atp cannot take an adaptive budget"):
        ATP(keep=ts.Adaptive(mass=0.9))
    with pytest.raises(TypeError, match="runs as stages inside the LLM"):
        ATP().select(tokens())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="has 4 layers"):
            ts.apply(build_model(LLAVA), ATP(layers=(2, 5)))
