"""Restoring in-LLM stages (``Sieve.restores``, tokensieve/engine/layer_stages.py) on their own: a stage brings back
exactly the tokens its method's earlier stages dropped, with the hidden states they had when dropped, at their own
positions; with a cache and without, in a left-padded batch; and what it cannot do is refused first."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.adapters import adapter_for
from tokensieve.sieve import Selection
from tokensieve.signals import Signal

TEXTS = [[5, 6, 7, 8], [9, 10]]  # two rows of different length: the batch is left-padded
N = LLAVA.tokens_per_image


@dataclass
class _Stage(ts.Sieve):
    """Keeps ``kept`` (indices into the tokens it is given) and records what it was given."""

    name, paper, stage = "restore_test", "test", "in_llm"
    keep: int | float = 1.0
    layer: int = 1
    kept: tuple = ()

    def __post_init__(self):
        super().__post_init__()
        self.given = []

    def select(self, tokens):
        self.given.append(tokens)
        return Selection(torch.tensor(self.kept, dtype=torch.long) if self.kept else torch.arange(len(tokens)))


@dataclass
class _Restoring(_Stage):
    restores = True


@dataclass
class _Method(ts.Sieve):
    """Drops the odd tokens before layer 1, brings all but token 1 back before layer 2, keeps all before layer 3."""

    name, paper, stage = "restore_test", "test", "in_llm"
    keep: int | float = 1.0

    def __post_init__(self):
        super().__post_init__()
        self.stages = (_Stage(layer=1, kept=tuple(range(0, N, 2))), _Restoring(layer=2, kept=(0, *range(2, N))), _Stage(layer=3))

    def schedule(self, n_layers):
        return self.stages


def _layer_io(model, inputs, layer, masked_keys=None):
    """The stock decoder's input and output of ``layer`` (its keys at ``masked_keys`` hidden, as a stage drops them)."""
    decoder = adapter_for(model).decoder
    seen = {}

    def before(module, args, kwargs):
        seen["input"] = kwargs.get("hidden_states", args[0] if args else None)
        if masked_keys is None:
            return None
        length = masked_keys.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = causal & inputs["attention_mask"].bool()[:, None] & ~masked_keys[:, None]
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
        return args, {**kwargs, "attention_mask": mask}

    def after(module, args, output):
        seen["output"] = output[0] if isinstance(output, tuple) else output

    hooks = [decoder.layers[layer].register_forward_pre_hook(before, with_kwargs=True),
             decoder.layers[layer].register_forward_hook(after)]
    try:
        model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["input"], seen["output"]


def test_a_restoring_stage_gets_every_entered_token_the_dropped_ones_with_their_states_when_dropped():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS)
    method = _Method()
    with ts.apply(model, method) as run:
        model(**inputs)
    image = inputs["input_ids"] == LLAVA.image_token
    dropped_keys = image.clone()
    for row in range(len(TEXTS)):
        dropped_keys[row, image[row].nonzero().squeeze(1)[0::2]] = False
    stock_input, _ = _layer_io(model, inputs, 1)
    _, masked_output = _layer_io(model, inputs, 1, masked_keys=dropped_keys)
    given = method.stages[1].given
    assert [len(tokens) for tokens in given] == [N, N] and [tokens.entered for tokens in given] == [N, N]
    for row, tokens in enumerate(given):
        positions = image[row].nonzero().squeeze(1)
        # dropped before layer 1: layer 1's input, exactly; kept there: layer 1's output with the dropped keys masked
        assert torch.equal(tokens.features[1::2], stock_input[row, positions[1::2]])
        torch.testing.assert_close(tokens.features[0::2], masked_output[row, positions[0::2]], atol=2e-5, rtol=1e-4)
    for record in run.stats.images:
        assert [stage.after for stage in record.stages] == [N // 2, N - 1, N - 1]
        assert record.stages[1].kept.tolist() == [0, *range(2, N)]  # its kept indices index the entered tokens
        assert record.kept.tolist() == [0, *range(2, N)]
    assert [len(tokens) for tokens in method.stages[2].given] == [N - 1, N - 1]


def test_restored_tokens_sit_at_their_own_positions_and_each_layer_caches_its_own_count():
    """The layers after the restoring stage see every token but image token 1, each at its decoder-input position
    and in sequence order (their rotary cos/sin are the stock ones there); the cache holds each stage's count."""
    model = build_model(LLAVA)
    decoder = adapter_for(model).decoder
    inputs = LLAVA.make_inputs(TEXTS)
    seen = {}

    def noting(name):
        return lambda module, args, kwargs: seen.update({name: kwargs["position_embeddings"]})

    stock = decoder.layers[2].register_forward_pre_hook(noting("stock"), with_kwargs=True)
    model(**inputs)
    stock.remove()
    method = _Method()
    with ts.apply(model, method):
        hook = decoder.layers[2].register_forward_pre_hook(noting("kept"), with_kwargs=True)
        try:
            output = model(**inputs, use_cache=True)
        finally:
            hook.remove()
    image = inputs["input_ids"] == LLAVA.image_token
    length = image.shape[1]
    for row in range(len(TEXTS)):
        kept = torch.ones(length, dtype=torch.bool)
        kept[image[row].nonzero()[1]] = False
        count = int(kept.sum())
        for stock_part, kept_part in zip(seen["stock"], seen["kept"]):
            assert torch.equal(kept_part[row if kept_part.shape[0] > 1 else 0, -count:], stock_part[row if stock_part.shape[0] > 1 else 0, kept])
    cache = output.past_key_values
    held = [cache.layers[j].keys.shape[-2] for j in range(len(decoder.layers))]
    assert held == [length, length - N // 2, length - 1, length - 1]


def test_generation_with_a_cache_equals_one_without_in_a_padded_batch():
    """Each decode step on the pruned cache (its layers holding the clustered, restored and pruned counts) gives the
    tokens a fresh prefill of the whole sequence gives, row for row of a left-padded batch."""
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS, seed=3)
    with ts.apply(model, _Method()):
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)
    with ts.apply(model, ts.CSP(keep=8, clusters=16)):
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


@dataclass
class _Asking(_Restoring):
    signals = ("llm_attention", "llm_transition")
    asks: tuple = ("llm_attention",)

    def requests(self):
        return self.asks


@dataclass
class _Transition(_Stage):
    signals = ("llm_transition",)

    def requests(self):
        return (Signal("llm_transition", start=0),)


@dataclass
class _KeepsNone(_Stage):
    may_keep_none = True


class _Schedule(ts.Sieve):
    name, paper, stage = "restore_test", "test", "in_llm"

    def __init__(self, *stages):
        super().__init__(keep=1.0)
        self.stages = stages

    def schedule(self, n_layers):
        return self.stages


@pytest.mark.parametrize("stages, message", [
    ((_Stage(layer=1), _Asking(layer=2)), "brings tokens back at layer 2 .* cannot ask for llm_attention"),
    ((_Stage(layer=1), _Asking(layer=2, asks=(Signal("llm_transition", start=0),))), "cannot ask for llm_transition"),
    ((_Transition(layer=1), _Restoring(layer=2)),
     "asks for llm_transition, which restored tokens .* have no value of"),
    ((_KeepsNone(layer=1), _Restoring(layer=2)), "may keep no token of an image .* and also brings tokens back"),
])
def test_what_a_restoring_stage_cannot_do_is_refused_before_touching_the_model(stages, message):
    model = build_model(LLAVA)

    def hooks():
        return [(len(module._forward_hooks), len(module._forward_pre_hooks)) for module in model.modules()]

    before = hooks()
    with pytest.raises(ValueError, match=message):
        ts.apply(model, _Schedule(*stages))
    assert hooks() == before
    with ts.apply(model, ts.CSP(keep=8, clusters=16)):  # the model is still free to hook
        model(**LLAVA.make_inputs(TEXTS))
