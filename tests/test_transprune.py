"""TransPrune: the token transition variation signal against a hand computation, the score and the schedule."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import tokensieve as ts
from conftest import build_model, serves_in_llm
from families import FAMILIES
from tiny_models import LLAVA
from tokensieve.adapters import adapter_for
from tokensieve.methods.transprune import TransPruneStage, default_layers, score
from tokensieve.signals import Signal
from tokensieve.sieve import VisualTokens

IN_LLM_FAMILIES = [family for family in FAMILIES if serves_in_llm(family)]  # Gemma3 refuses in-LLM stages

TEXTS = [[5, 6, 7, 8], [9, 10]]


class _TransitionRecorder(ts.Sieve):
    """Keeps every token and records the ``llm_transition`` it was given."""

    name, paper, stage, signals = "transition_recorder", "test", "in_llm", ("llm_transition",)

    def __init__(self, layer, start):
        super().__init__(1.0)
        self.layer, self.request, self.values = layer, Signal("llm_transition", start=start), []

    def requests(self):
        return (self.request,)

    def select(self, tokens):
        self.values.append(tokens[self.request])
        return ts.Selection.every(tokens)


def _hand_transitions(model, inputs, layers):
    """Each token's transitions summed over ``layers`` of the stock model, by the formula, row by row."""
    decoder = adapter_for(model).decoder
    seen = []

    def record(module, args, kwargs, output):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen.append((x.float(), (output[0] if isinstance(output, tuple) else output).float()))

    hooks = []
    for index in layers:
        layer = decoder.layers[index]
        hooks += [layer.self_attn.register_forward_hook(record, with_kwargs=True), layer.mlp.register_forward_hook(record, with_kwargs=True)]
    try:
        model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    real = inputs["attention_mask"].bool()
    total = torch.zeros(real.shape)
    for x, y in seen:
        for row in range(real.shape[0]):
            xs, ys = x[row, real[row]], y[row, real[row]]
            ratio = ys.norm(dim=-1) / xs.norm(dim=-1)
            change = torch.exp(1 - F.cosine_similarity(xs, ys, dim=-1))
            total[row, real[row]] += ratio * change / change.sum()
    return total


@pytest.mark.parametrize("family", IN_LLM_FAMILIES, ids=lambda f: f.name)
def test_llm_transition_is_the_papers_formula_summed_over_the_layers(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    recorder = _TransitionRecorder(layer=3, start=1)
    with ts.apply(model, recorder):
        model(**inputs)
    expected = _hand_transitions(model, inputs, layers=(1, 2))
    placed = family.visual_positions(inputs["input_ids"])
    for row, values in enumerate(recorder.values):
        torch.testing.assert_close(values, expected[row, placed[row]], rtol=1e-4, atol=1e-7)


def test_the_score_adds_both_parts_each_normalised_over_the_image():
    transitions = torch.tensor([1.0, 2.0, 3.0, 4.0])  # sums to 10
    attention = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])  # head mean sums to 1
    tokens = VisualTokens(torch.zeros(4, 8), (2, 2), {Signal("llm_transition", start=6): transitions,
                                                      Signal("llm_attention", queries="instruction"): attention})
    torch.testing.assert_close(score(tokens, 6, ttv_only=False), torch.tensor([0.5, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(score(tokens, 6, ttv_only=True), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    stage = TransPruneStage(keep=2, layer=7, ratio=None, start=6)
    assert stage.select(tokens).kept.tolist() == [0, 1]  # all tie at 0.5: the lower indices
    assert TransPruneStage(keep=2, layer=7, start=6, ttv_only=True).select(tokens).kept.tolist() == [2, 3]


def test_the_schedule_is_the_scripts_on_llava_and_scales_with_depth():
    assert default_layers(32) == (7, 9, 12)
    assert default_layers(4) == (1, 2)
    stages = ts.TransPrune().schedule(32)
    assert [(s.layer, s.ratio, s.start) for s in stages] == [(7, 0.875, 6), (9, 0.625, 6), (12, None, 6)]
    counts = []
    tokens = VisualTokens(torch.zeros(576, 4), (24, 24), {Signal("llm_transition", start=6): torch.rand(576),
                                                          Signal("llm_attention", queries="instruction"): torch.rand(2, 576)},
                          entered=576)
    for stage in stages:
        kept = stage.select(tokens).kept
        counts.append(len(kept))
        tokens = VisualTokens(tokens.features[kept], (1, len(kept)),
                              {request: value[..., kept] for request, value in tokens.signals.items()}, entered=576)
    assert counts == [504, 360, 72]  # the code's 576 -> 504 -> 360 -> 72
    assert [s.layer for s in ts.TransPrune().schedule(4)] == [1, 2]  # shallow: the last ratio, then keep
    assert ts.TransPrune(ttv_only=True).schedule(32)[0].requests() == (Signal("llm_transition", start=6),)


def test_transprune_prunes_in_stages_and_records_each():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS)
    with ts.apply(model, ts.TransPrune(keep=8, layers=(1, 2, 3), ratios=(0.75, 0.5))) as run:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    for record in run.stats.images:
        assert [(s.layer, len(s.kept)) for s in record.stages] == [(1, 48), (2, 32), (3, 8)]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="needs 2 ratios"):
        ts.TransPrune(layers=(7, 9, 12), ratios=(0.5,))
    with pytest.raises(ValueError, match="ratios="):
        ts.TransPrune(ratios=(0.875, 1.5))
    with pytest.raises(ValueError, match="positions="):
        ts.TransPrune(positions="gaps")
    with pytest.raises(ValueError, match="start=...\\) must be a decoder layer"):
        Signal("llm_transition", start=-1)
