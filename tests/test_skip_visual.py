"""skip_visual: image tokens frozen from layer L on, still keys and values of every later layer."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model, serves_in_llm
from families import FAMILIES
from tokensieve.adapters import adapter_for

IN_LLM_FAMILIES = [family for family in FAMILIES if serves_in_llm(family)]  # Gemma3 refuses in-LLM stages

TEXTS = [[5, 6, 7, 8], [9, 10]]


def _frozen_reference(model, inputs, layer, placed):
    """The stock model's logits with the hidden state at every ``placed`` (image) position put back, after each layer from ``layer``
    on, to what it was at ``layer``'s input: image tokens not updated, still attended to."""
    decoder = adapter_for(model).decoder
    saved = {}

    def keep_input(module, args, kwargs):
        saved["hidden"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def put_back(module, args, kwargs, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[placed] = saved["hidden"][placed]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    hooks = [decoder.layers[layer].register_forward_pre_hook(keep_input, with_kwargs=True)]
    hooks += [decoder.layers[j].register_forward_hook(put_back, with_kwargs=True) for j in range(layer, len(decoder.layers))]
    try:
        return model(**inputs).logits[:, -1]
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("family", IN_LLM_FAMILIES, ids=lambda f: f.name)
def test_frozen_image_tokens_equal_the_stock_model_with_their_states_held(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    expected = _frozen_reference(model, inputs, 2, family.visual_positions(inputs["input_ids"]))
    stock = model(**inputs).logits[:, -1]
    with ts.apply(model, ts.load("skip_visual", layer=2)) as run:
        cached = model(**inputs).logits[:, -1]
        uncached = model(**inputs, use_cache=False).logits[:, -1]
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(uncached, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cached, stock, atol=1e-3)
    assert [r.after for r in run.stats.images] == [0, 0, 0, 0]


def test_the_cache_keeps_every_token_while_the_compute_falls():
    family = FAMILIES[0]
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    with ts.observe(model) as stock:
        model(**inputs)
    with ts.apply(model, ts.load("skip_visual", layer=1)) as frozen:
        model(**inputs)
    with ts.apply(model, ts.load("fastv", layer=1, keep=1)) as dropped:
        model(**inputs)
    assert frozen.stats.kv_bytes == stock.stats.kv_bytes  # nothing left the cache
    assert dropped.stats.prefill_flops < frozen.stats.prefill_flops < stock.stats.prefill_flops


def test_the_default_layer_is_half_the_depth_and_bad_schedules_are_refused():
    assert [s.layer for s in ts.load("skip_visual").schedule(32)] == [16]
    model = build_model(FAMILIES[0])
    with pytest.raises(ValueError, match="must be the last in-LLM stage"):
        ts.apply(model, ts.Chain(ts.load("skip_visual", layer=1), ts.load("fastv", layer=2)))
    with pytest.raises(ValueError, match="layer="):
        ts.load("skip_visual", layer=0)
    inputs = FAMILIES[0].make_inputs(TEXTS)
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]  # refused before any hook
