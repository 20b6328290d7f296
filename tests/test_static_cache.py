"""A static cache (``cache_implementation="static"``, or a ``StaticCache`` passed in) as contract columns.

Methods before the LLM (and merging inside the vision tower, and observing) run with a static cache: the prefill
writes only the kept tokens, to the cache's first slots, and decode positions stay those of the unpruned sequence
(tokensieve/engine/static_cache.py). Every family, every such method, greedy, beam and sampling: keep-all generates the
stock model's tokens, and pruned generation with a static cache gives the tokens of pruned generation with the
default dynamic cache. In-LLM stages (FastV, PyramidDrop, chains with one) are refused before any image is pruned,
and compiled forwards (torch.compile, generate()'s compiled decode steps) are refused under any run.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig, DynamicCache, MistralConfig, StaticCache

import tokensieve as ts
from conftest import build_model, family_method_params, method_for
from families import FAMILIES
from test_contract import TEXTS
from test_observe import cache_bytes
from tiny_models import LLAVA
from tokensieve.engine import decode_stage
from tokensieve.engine.compat import CACHE_ARGUMENT, output_cache

BEFORE_LLM = family_method_params(stages=("in_vision", "pre_llm"))


def _acts_at_decode(name, kwargs) -> bool:
    """Whether the case's method also acts on the KV cache at decode steps (``Sieve.decode_rule``: dycoke:kv_keep),
    which needs the dynamic cache (refused below)."""
    method = method_for(name, kwargs)
    return any(sieve.decode_rule(4) is not None for sieve in getattr(method, "sieves", (method,)))


SERVED = [case for case in BEFORE_LLM if not _acts_at_decode(*case.values[1:])]
AT_DECODE = [case for case in BEFORE_LLM if _acts_at_decode(*case.values[1:])]
IN_LLM = family_method_params(stages=("in_llm", "chain", "vision_chain"))
BY_FAMILY = [pytest.param(family, id=family.name) for family in FAMILIES]
MODES = {
    "greedy": dict(do_sample=False),
    "beam_search": dict(num_beams=2, do_sample=False),
    "return_sequences": dict(do_sample=True, top_k=20, num_return_sequences=2),
}
N_IMAGES = [1, 2]  # the second row has two images
NEW = 3


def generate(model, inputs, family, mode: str, **options):
    torch.manual_seed(3)  # the sampling mode draws the same numbers in both runs
    return model.generate(**inputs, max_new_tokens=NEW, pad_token_id=0, suppress_tokens=[family.image_token],
                          **MODES[mode], **options)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family, name, kwargs", SERVED)
def test_keep_all_with_a_static_cache_generates_as_the_stock_model(family, name, kwargs, mode):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS, n_images=N_IMAGES)
    expected = generate(model, inputs, family, mode, cache_implementation="static")
    with ts.apply(model, method_for(name, kwargs, keep=1.0, pre_keep=1.0)) as run:
        tokens = generate(model, inputs, family, mode, cache_implementation="static")
    assert torch.equal(tokens, expected)
    assert [(r.before, r.after) for r in run.stats.images] == [(family.tokens_per_image,) * 2] * sum(N_IMAGES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family, name, kwargs", SERVED)
def test_pruned_generation_with_a_static_cache_equals_the_dynamic_cache(family, name, kwargs, mode):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS, n_images=N_IMAGES)
    with ts.apply(model, method_for(name, kwargs)) as dynamic_run:
        dynamic = generate(model, inputs, family, mode)
    with ts.apply(model, method_for(name, kwargs)) as static_run:
        static = generate(model, inputs, family, mode, cache_implementation="static")
    assert torch.equal(static, dynamic)
    assert [r.kept.tolist() for r in static_run.stats.images] == [r.kept.tolist() for r in dynamic_run.stats.images]
    assert static_run.stats.prefill_flops == dynamic_run.stats.prefill_flops < static_run.stats.prefill_flops_unreduced


@pytest.mark.parametrize("family", BY_FAMILY)
def test_the_prefill_writes_only_the_kept_tokens_and_a_cache_sized_for_them_suffices(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    width = inputs["input_ids"].shape[1]
    with ts.apply(model, ts.Uniform(keep=16)) as run:
        dynamic = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        # each row has one image and loses as many tokens: the kept prompt is that much shorter
        kept_width = width - (run.stats.images[0].before - run.stats.images[0].after)
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             cache_implementation="static", return_dict_in_generate=True)
        # a cache with room for the kept tokens only: too short for the unpruned prompt
        small = StaticCache(config=model.config, max_cache_len=kept_width + NEW)
        in_small = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **{CACHE_ARGUMENT: small})
    assert kept_width < width
    assert torch.equal(out.sequences, dynamic) and torch.equal(in_small, dynamic)
    cache = output_cache(out)
    # every attention layer (Qwen3.5's linear-attention layers hold a fixed-size state): the kept prompt, then the
    # decode steps (the last token is not fed back)
    for layer in _attention_layers(cache):
        assert int(layer.cumulative_length) == kept_width + NEW - 1
        assert layer.keys.shape[2] >= width + NEW - 1  # generate() sized it for the unpruned prompt
        assert not layer.keys[:, :, kept_width + NEW - 1:].any()  # the slots past them were never written
    assert all(int(layer.cumulative_length) == kept_width + NEW - 1 for layer in _attention_layers(small))


def _attention_layers(cache):
    """The layers that hold keys (Gemma 4's KV-shared layers hold none: they reuse an earlier layer's)."""
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]


@pytest.mark.parametrize("family", BY_FAMILY)
def test_a_second_turn_continues_a_pruned_static_cache_as_a_dynamic_one(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)

    def two_turns(**cache):
        first = model.generate(**inputs, **cache, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                               return_dict_in_generate=True, suppress_tokens=[family.image_token])
        ids = torch.cat([first.sequences, torch.tensor([[11, 12, 13]] * len(TEXTS))], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(TEXTS), NEW + 3, dtype=torch.long)], dim=1)
        return model.generate(input_ids=ids, attention_mask=mask, **{CACHE_ARGUMENT: output_cache(first)},
                              max_new_tokens=NEW, do_sample=False, pad_token_id=0)

    with ts.apply(model, ts.Uniform(keep=16)):
        dynamic = two_turns()
        static = two_turns(**{CACHE_ARGUMENT: StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + 16)})
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("family", BY_FAMILY)
def test_observing_a_static_cache_is_the_stock_run_and_records_it(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    expected = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0, cache_implementation="static")
    with ts.observe(model) as dynamic_run:
        model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with ts.observe(model) as run:
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0, cache_implementation="static",
                             return_dict_in_generate=True)
    with ts.apply(model, ts.Uniform(keep=16)) as pruned_run:
        pruned = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                cache_implementation="static", return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    # the padding read back from generate()'s prebuilt masks counts the same FLOPs as the 2D mask
    assert run.stats.prefill_flops == run.stats.prefill_flops_unreduced == dynamic_run.stats.prefill_flops
    assert [(r.before, r.after) for r in run.stats.images] == [(family.tokens_per_image,) * 2] * len(TEXTS)
    # kv_bytes: the static cache's preallocated tensors, which pruning does not shrink
    for stats, cache in ((run.stats, output_cache(out)), (pruned_run.stats, output_cache(pruned))):
        assert stats.kv_bytes == cache_bytes(cache)


@pytest.mark.parametrize("family, name, kwargs", IN_LLM)
def test_in_llm_stages_refuse_a_static_cache_before_the_prefill_and_the_handle_recovers(family, name, kwargs):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    with ts.apply(model, method_for(name, kwargs)) as run:
        with pytest.raises(ValueError, match="needs the default dynamic cache: a static cache .* prunes inside the LLM, "
                                             "so from decoder layer 1 on"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")
        cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + 2)
        with pytest.raises(ValueError, match="needs the default dynamic cache"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0, **{CACHE_ARGUMENT: cache})
        assert run.stats.images == []  # refused before any image was pruned
        assert all(not layer.is_initialized for layer in cache.layers)  # and before any slot was written
        tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert tokens.shape == (2, inputs["input_ids"].shape[1] + 2)


@pytest.mark.parametrize("family, name, kwargs", AT_DECODE)
def test_a_method_acting_at_decode_steps_refuses_a_static_cache_before_the_prefill(family, name, kwargs):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    with ts.apply(model, method_for(name, kwargs)) as run:
        with pytest.raises(ValueError, match="acts on the KV cache at decode steps, and needs the default dynamic cache"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")
        assert run.stats.images == []  # refused before any image was pruned
        tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert tokens.shape == (2, inputs["input_ids"].shape[1] + 2)


def test_the_decode_cache_refusal_names_the_layers_and_what_to_change():
    """A static cache is the caller's choice; sliding-window layers are the model's own (a Mistral-like config)."""
    method = method_for(*AT_DECODE[0].values[1:])
    sliding = DynamicCache(config=MistralConfig(sliding_window=8, num_hidden_layers=2))
    with pytest.raises(ValueError, match="not a DynamicCache with DynamicSlidingWindowLayer layers: a model with "
                                         "sliding-window attention layers cannot serve it"):
        decode_stage._check_cache(sliding, method)
    static = StaticCache(config=MistralConfig(sliding_window=None, num_hidden_layers=2), max_cache_len=8)
    with pytest.raises(ValueError, match="not a StaticCache with StaticLayer layers: generate without cache_implementation"):
        decode_stage._check_cache(static, method)
    decode_stage._check_cache(DynamicCache(config=MistralConfig(sliding_window=None, num_hidden_layers=2)), method)  # full attention: served


# Compiled forwards are refused: dynamo does not guard on a module's hooks, so a forward compiled before apply()
# would run unpruned and one compiled inside the block could keep pruning after it (tokensieve/engine/static_cache.py).
# The eager backend traces as torch.compile does (the hooks are what matters here) without inductor's C++ build.


def test_a_forward_compiled_before_apply_is_refused_and_dynamo_would_not_see_new_hooks():
    model = LLAVA.build()
    inputs = LLAVA.make_inputs(TEXTS)
    model.forward = torch.compile(model.forward, backend="eager")
    model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    # why: a hook added after compiling is skipped by the compiled forward
    calls = []
    handle = model.model.language_model.register_forward_pre_hook(lambda *args: calls.append(1))
    model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    handle.remove()
    assert calls == []
    with pytest.raises(ValueError, match=r"uniform cannot hook a compiled forward \(model.forward\)"):
        ts.apply(model, ts.Uniform(keep=16))
    del model.forward  # uncompiled again: the method applies
    with ts.apply(model, ts.Uniform(keep=16)) as run:
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert [r.after for r in run.stats.images] == [16, 16]


def test_compiling_inside_the_block_is_refused_and_generate_without_compiling_works():
    model = LLAVA.build()
    inputs = LLAVA.make_inputs(TEXTS)
    options = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, cache_implementation="static")
    with ts.apply(model, ts.Uniform(keep=16)):
        expected = model.generate(**inputs, **options)
        # generate() compiles the decode steps of a static cache on accelerators; _compile_all_devices does it here
        config = CompileConfig(backend="eager", mode=None)
        config._compile_all_devices = True
        with pytest.raises(ValueError, match="uniform is applied and dynamo is compiling the forward .* disable_compile=True"):
            model.generate(**inputs, **options, compile_config=config)
        assert torch.equal(model.generate(**inputs, **options, compile_config=config, disable_compile=True), expected)
        model.forward = torch.compile(model.forward, backend="eager")
        try:
            with pytest.raises(ValueError, match="uniform is applied and dynamo is compiling the forward"):
                model.generate(**inputs, **options)
        finally:
            del model.forward
        assert torch.equal(model.generate(**inputs, **options), expected)
