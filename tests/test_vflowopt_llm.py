"""VFlowOpt's in-LLM stages: counts and selections worked by hand, the no-cache tail merge against the official
formula, the schedule by depth, and the chain vflowopt+vflowopt_llm inside a tiny model."""

from __future__ import annotations

import warnings

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.methods.vflowopt_llm import VFlowOptLLM, VFlowOptLLMStage, tail_merge
from tokensieve.sieve import VisualTokens
from tokensieve.signals import Signal

#: head-mean attention of 8 tokens: ranks 2 (9), 6 (7), 0 (5), 4 (4), 7 (3), 1 (2), 5 (1), 3 (0)
MEAN = torch.tensor([5.0, 2.0, 9.0, 0.0, 4.0, 1.0, 7.0, 3.0])


def tokens(mean=MEAN, entered=None, queries="last") -> VisualTokens:
    # two heads that disagree (one holds the even tokens' attention, the other the odd ones'): their mean is ``mean``
    even = torch.arange(len(mean)) % 2 == 0
    heads = torch.stack([torch.where(even, 2 * mean, 0.0), torch.where(even, 0.0, 2 * mean)])
    features = torch.arange(len(mean), dtype=torch.float32)[:, None] * torch.tensor([[1.0, 10.0]])
    # the same rows as the vision stage's map, so both scores rank alike
    return VisualTokens(features, (2, 4), {Signal("llm_attention", queries=queries): heads,
                                           Signal("vision_attention", queries="mean"): heads}, entered=entered)


def test_hand_worked_stages_drop_the_least_attended_tokens():
    # an earlier stage keeps n - round(n (1 - r)): 8 - round(8 * 0.4) = 5 -> tokens 2, 6, 0, 4, 7
    assert VFlowOptLLMStage(keep=2, layer=9, ratio=0.6).select(tokens()).kept.tolist() == [0, 2, 4, 6, 7]
    # never under the final budget: 8 - round(8 * 0.9) = 1 < keep=3
    assert VFlowOptLLMStage(keep=3, layer=9, ratio=0.1).select(tokens()).kept.tolist() == [0, 2, 6]
    # the last stage keeps keep of what the image had at the first stage: 0.5 of 12 = 6 of these 8
    last = VFlowOptLLMStage(keep=0.5, layer=18).select(tokens(entered=12))
    assert last.kept.tolist() == [0, 1, 2, 4, 6, 7] and last.assignment is None
    assert VFlowOptLLMStage(keep=3, layer=18).select(tokens(entered=12)).kept.tolist() == [0, 2, 6]
    # ties go to the lower index: 4 tokens at 1.0, keep 2 -> 0 and 1
    assert VFlowOptLLMStage(keep=2, layer=1).select(tokens(torch.ones(4))).kept.tolist() == [0, 1]


def test_a_stage_at_ratio_one_or_a_covering_budget_keeps_everything_as_it_is():
    stage = VFlowOptLLMStage(keep=2, layer=9, ratio=1.0)
    assert stage.requests() == ()  # the code's shipped first stage: nothing to score
    visual = VisualTokens(torch.zeros(8, 2), (2, 4), entered=8)  # no attention given: none is read
    selection = stage.select(visual)
    assert selection.kept.tolist() == list(range(8)) and selection.assignment is None
    for sieve in (VFlowOptLLMStage(keep=1.0, layer=18), VFlowOptLLMStage(keep=8, layer=18, merge="tail")):
        selection = sieve.select(tokens(entered=8))
        assert selection.kept.tolist() == list(range(8)) and selection.assignment is None


def test_hand_worked_tail_merge_weights_the_dropped_tokens_by_rank():
    # keep 3 of MEAN: 2, 6, 0; the last kept is 0 (slot 0); dropped by rank: 4 (w 2), 7 (3), 1 (4), 5 (5), 3 (6)
    selection = VFlowOptLLMStage(keep=3, layer=18, merge="tail").select(tokens(entered=8))
    assert selection.kept.tolist() == [0, 2, 6]
    assert selection.assignment.tolist() == [0, 0, 1, 0, 0, 0, 2, 0]
    assert selection.weights.tolist() == [1.0, 4.0, 1.0, 6.0, 2.0, 5.0, 1.0, 3.0]
    # token 0 becomes (0·1 + 4·2 + 7·3 + 1·4 + 5·5 + 3·6) / 21 = 76 / 21; 2 and 6 keep their own
    merged = selection.merged(tokens().features)
    torch.testing.assert_close(merged[:, 0], torch.tensor([76 / 21, 2.0, 6.0]))
    torch.testing.assert_close(merged[:, 1], 10 * merged[:, 0])
    assert selection.sizes().tolist() == [6, 1, 1]


def _official_tail(scores: torch.Tensor, hidden: torch.Tensor, r: int) -> tuple[list[int], torch.Tensor]:
    """The code's no-cache merge (forward_illava, ``use_cache`` off), on one image's tokens: the kept indices and
    their hidden states after it."""
    n = len(scores)
    indices = scores.topk(n).indices
    values = hidden[indices[n - (r + 1):]]
    size = torch.arange(1, r + 2)
    hidden = hidden.clone().double()
    hidden[indices[n - (r + 1)]] = size.double() @ values.double() / size.double().sum()
    kept = sorted(indices[: n - r].tolist())
    return kept, hidden[kept]


@pytest.mark.parametrize("n, r", [(8, 3), (30, 12), (64, 63), (100, 1)])
def test_the_tail_merge_is_the_official_formula(n, r):
    generator = torch.Generator().manual_seed(n + r)
    scores = torch.randperm(n, generator=generator).float()  # no ties: the code's topk order is then defined
    hidden = torch.randn(n, 5, generator=generator)
    kept, expected = _official_tail(scores, hidden, r)
    selection = tail_merge(scores, n - r)
    assert selection.kept.tolist() == kept
    torch.testing.assert_close(selection.merged(hidden).double(), expected, atol=1e-5, rtol=1e-5)


def _official_counts(n: int, ratios) -> list[int]:
    """forward_illava's KV-cache path: each stage drops round(n (1 - r)) of the n it gets."""
    counts = []
    for r in ratios:
        n -= round(n * (1 - r))
        counts.append(n)
    return counts


def _counts(method: VFlowOptLLM, n: int) -> list[int]:
    counts, left = [], n
    for stage in method.schedule(28):
        left = stage.count(left, n)
        counts.append(left)
    return counts


def test_counts_follow_the_code_exactly_at_the_shipped_config_and_within_a_token_at_the_others():
    for n in range(1, 4000):
        assert _counts(VFlowOptLLM(), n) == _official_counts(n, [1.0, 0.6011])
    for keep, ratios in ((0.8627, [0.9833433139039235, 0.8773258179532721]), (0.3646, [0.748747637472693, 0.487])):
        method = VFlowOptLLM(keep=keep, ratios=(ratios[0],))
        for n in range(50, 4000, 7):
            ours, official = _counts(method, n), _official_counts(n, ratios)
            assert ours[0] == official[0] and abs(ours[1] - official[1]) <= 1


def test_schedule_places_the_stages_at_nine_and_eighteen_twenty_eighths_of_the_depth():
    assert [(s.layer, s.ratio) for s in VFlowOptLLM().schedule(28)] == [(9, 1.0), (18, None)]
    assert [s.layer for s in VFlowOptLLM().schedule(32)] == [10, 20]
    assert [s.layer for s in VFlowOptLLM().schedule(4)] == [1, 2]
    assert [s.layer for s in VFlowOptLLM(ratios=(0.9, 0.8)).schedule(28)] == [9, 18, 27]
    # too shallow for two distinct layers: the last stage alone
    assert [(s.layer, s.ratio) for s in VFlowOptLLM().schedule(2)] == [(1, None)]
    stages = VFlowOptLLM(keep=32, ratios=0.5, layers=(2, 6), merge="tail", queries="instruction", score="llm").schedule(28)
    assert [(s.layer, s.keep, s.ratio, s.merge, s.queries) for s in stages] == [(2, 32, 0.5, "tail", "instruction"),
                                                                                (6, 32, None, "tail", "instruction")]
    assert stages[0].requests() == (Signal("llm_attention", queries="instruction"),)
    assert VFlowOptLLM(ratios=0.5).schedule(28)[0].requests() == (Signal("vision_attention", queries="mean"),)
    assert all(s.llm_attention_at == "previous" and s.stage == "in_llm" and s.name == "vflowopt_llm" for s in stages)
    assert ts.build("vflowopt_llm:32,ratios=(0.5,),layers=(2,6),merge=tail,queries=instruction") == VFlowOptLLM(
        32, (0.5,), (2, 6), "tail", "instruction")
    chain = ts.build("vflowopt+vflowopt_llm")
    assert [s.name for s in chain.sieves] == ["vflowopt", "vflowopt_llm"]


class _Recording(VFlowOptLLM):
    """VFlowOptLLM whose stages record the attention rows, the count at the first stage and the tokens they got."""

    def schedule(self, n_layers):
        owner = self

        class Recording(VFlowOptLLMStage):
            def select(stage, visual):
                rows = visual[stage.requests()[0]].clone() if stage.requests() else None
                owner.seen.append((stage.layer, rows, visual.entered, len(visual)))
                return super().select(visual)

        self.seen = []
        return tuple(Recording(s.keep, s.layer, s.ratio, s.merge, s.queries, s.score) for s in super().schedule(n_layers))


@pytest.mark.parametrize("merge", ["none", "tail"])
def test_the_chain_inside_a_tiny_model_keeps_what_the_rule_gives_on_its_attention(merge):
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs([[5, 6, 7, 8], [9, 10]])
    inside = _Recording(keep=0.5, ratios=(0.75,), merge=merge)
    with ts.apply(model, ts.Chain(ts.VFlowOpt(keep=32, m=2.0), inside)) as run:
        model(**inputs)
    seen = iter(inside.seen)
    for index, layer in enumerate((1, 2)):
        for record in run.stats.images:
            got_layer, rows, entered, count = next(seen)
            vision, received = record.stages[0], record.stages[index]
            assert vision.method == "vflowopt" and vision.after == 32
            assert got_layer == layer and entered == 32 and count == received.after
            expected = 24 if index == 0 else 16  # 32 - round(32 * 0.25), then 0.5 of the 32
            stage = record.stages[index + 1]
            assert (stage.method, stage.layer, stage.after) == ("vflowopt_llm", layer, expected)
            order = torch.sort(rows.mean(0), descending=True, stable=True).indices
            assert torch.equal(stage.kept, received.kept[order[:expected].sort().values])
            if merge == "tail":
                assert stage.sizes.sum() == count and stage.sizes.max() == count - expected + 1
            else:
                assert stage.sizes is None
    assert [record.after for record in run.stats.images] == [16, 16]


def test_bad_arguments_are_refused_with_what_to_change():
    for ratios in ((0.0,), (1.5,), (True,), ("0.5",), (-0.2, 0.5)):
        with pytest.raises(ValueError, match="ratios=.*numbers in \\(0, 1\\]"):
            VFlowOptLLM(ratios=ratios)
    for layers in ((18, 9), (0, 9), (9, 9), (), (9.0, 18)):
        with pytest.raises(ValueError, match="strictly increasing ints >= 1"):
            VFlowOptLLM(layers=layers)
    with pytest.raises(ValueError, match="has 3 stages but ratios=\\(1.0,\\) gives 2.*one layer more than ratios"):
        VFlowOptLLM(layers=(4, 9, 18))
    with pytest.raises(ValueError, match="merge='cells': choose 'none'.*or 'tail'"):
        VFlowOptLLM(merge="cells")
    with pytest.raises(ValueError, match="queries='first': choose one of"):
        VFlowOptLLM(queries="first")
    with pytest.raises(ValueError, match="score='text': choose 'vision'"):
        VFlowOptLLM(score="text")
    with pytest.raises(ValueError, match="vflowopt_llm cannot take an adaptive budget"):
        VFlowOptLLM(keep=ts.Adaptive(mass=0.9))
    with pytest.raises(TypeError, match="runs as stages inside the LLM"):
        VFlowOptLLM().select(tokens())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VFlowOptLLM(keep=16, ratios=[0.5], layers=[2, 6])  # lists are taken as tuples
