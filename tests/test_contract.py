"""The contract every method and every family must pass (see tests/cases.py for the list)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import tokensieve as ts
from tokensieve.engine.compat import CACHE_ARGUMENT, output_cache
from conftest import build_model, family_method_params, method_for, supported
from families import CONTRACT_FAMILIES
from tokensieve.adapters import adapter_for

CONTRACT = family_method_params(families=CONTRACT_FAMILIES)
PRE_LLM = family_method_params(stages=("pre_llm",), families=CONTRACT_FAMILIES)
REFUSED = family_method_params(want_supported=False, families=CONTRACT_FAMILIES)
TEXTS = [[5, 6, 7, 8], [9, 10]]  # two rows of different length, so the batch is left-padded


def appended(model, inputs, ids, mask):
    """``inputs`` extended to ``ids``/``mask`` by text tokens: inputs aligned with input_ids (e.g. Qwen's
    mm_token_type_ids) get zeros (text) for the new tokens, as generate() extends them."""
    step = {**inputs, "input_ids": ids, "attention_mask": mask}
    for name in adapter_for(model).aligned_inputs:
        if name in inputs:
            extra = inputs[name].new_zeros(len(ids), ids.shape[1] - inputs[name].shape[1])
            step[name] = torch.cat([inputs[name], extra], dim=1)
    return step


def greedy(model, inputs, n=4):
    # a random tiny model may pick its image placeholder as the next token, which no model takes as text
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0,
                          suppress_tokens=[adapter_for(model).image_token_id()])


def next_text_token(logits: torch.Tensor, model) -> torch.Tensor:
    """The greedy next token of each row's last ``logits``, never the image placeholder (as ``greedy``)."""
    logits = logits[:, -1].clone()
    logits[:, adapter_for(model).image_token_id()] = float("-inf")
    return logits.argmax(-1, keepdim=True)


@pytest.mark.parametrize("family, name, kwargs", CONTRACT)
@pytest.mark.parametrize("keep_all", [1.0, "count"])
def test_keep_all_is_the_stock_model_bit_for_bit(family, name, kwargs, keep_all):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    expected_logits = model(**inputs).logits
    expected_tokens = greedy(model, inputs)
    keep = family.tokens_per_image if keep_all == "count" else keep_all
    with ts.apply(model, method_for(name, kwargs, keep=keep, pre_keep=keep), **family.options) as run:
        logits = model(**inputs).logits
        tokens = greedy(model, inputs)
    assert torch.equal(logits, expected_logits)
    assert torch.equal(tokens, expected_tokens)
    assert all(r.after == r.before == family.tokens_per_image for r in run.stats.images)


@pytest.mark.parametrize("family, name, kwargs", CONTRACT)
def test_pruning_acts_and_is_deterministic(family, name, kwargs):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    stock = model(**inputs).logits[:, -1]
    results = []
    for _ in range(2):
        with ts.apply(model, method_for(name, kwargs), **family.options) as run:
            results.append((model(**inputs).logits[:, -1], [r.kept for r in run.stats.images]))
    (first, kept_first), (second, kept_second) = results
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(kept_first, kept_second))
    assert [len(k) for k in kept_first] == [16, 16]
    assert not torch.allclose(first, stock), "pruning 75% of the image tokens changed nothing"


@pytest.mark.parametrize("family, name, kwargs", CONTRACT)
def test_generate_with_cache_equals_a_no_cache_loop(family, name, kwargs):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS[:1])
    with ts.apply(model, method_for(name, kwargs), **family.options):
        cached = greedy(model, inputs)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(4):
            step = appended(model, inputs, ids, mask)
            next_token = next_text_token(model(**step, use_cache=False).logits, model)
            ids = torch.cat([ids, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    assert torch.equal(cached, ids)


@pytest.mark.parametrize("family, name, kwargs", CONTRACT)
def test_left_padded_batch_equals_each_row_alone(family, name, kwargs):
    model = build_model(family)
    batch = family.make_inputs(TEXTS, seed=3)
    rows = [family.make_inputs([text], seed=3, image_offset=i) for i, text in enumerate(TEXTS)]
    with ts.apply(model, method_for(name, kwargs), **family.options):
        batch_logits = model(**batch).logits[:, -1]
        batch_tokens = greedy(model, batch)[:, -4:]
        for i, row in enumerate(rows):
            assert torch.allclose(model(**row).logits[0, -1], batch_logits[i], atol=1e-5)
            assert torch.equal(greedy(model, row)[0, -4:], batch_tokens[i])


def _decoder_calls(decoder):
    """Record the keyword inputs and output of every decoder call (after tokensieve's own hook)."""
    calls = []
    pre = decoder.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    post = decoder.register_forward_hook(lambda m, a, out: calls[-1].update(output=out.last_hidden_state))
    return calls, (pre, post)


@pytest.mark.parametrize("family, name, kwargs", PRE_LLM)  # in-LLM methods: test_in_llm.py
def test_prefill_equals_the_stock_decoder_with_dropped_tokens_masked(family, name, kwargs):
    model = build_model(family)
    decoder = adapter_for(model).decoder
    inputs = family.make_inputs(TEXTS)
    with ts.apply(model, method_for(name, kwargs), **family.options) as run:
        calls, handles = _decoder_calls(decoder)
        model(**inputs)
    pruned = calls[0]
    calls.clear()
    model(**inputs)
    stock = calls[0]
    for handle in handles:
        handle.remove()

    # the stock sequence with the dropped image tokens masked out and merged features in place
    embeds = stock["inputs_embeds"].clone()
    stock_mask = adapter_for(model).flat_mask(stock["attention_mask"], inputs)  # Gemma3's decoder gets a dict of masks
    mask = stock_mask.clone() if stock_mask is not None else torch.ones(embeds.shape[:2], dtype=torch.long)
    keep = torch.ones(embeds.shape[:2], dtype=torch.bool)
    image_positions = (inputs["input_ids"] == family.image_token).nonzero()
    start = 0
    for record in run.stats.images:
        block = image_positions[start : start + record.before]
        start += record.before + family.trailing_placeholders
        keep[block[:, 0], block[:, 1]] = False
        keep[block[record.kept, 0], block[record.kept, 1]] = True
    mask = mask * keep
    for row in range(embeds.shape[0]):
        kept = keep[row].nonzero().squeeze(1)
        embeds[row, kept] = pruned["inputs_embeds"][row, -len(kept) :]
    positions = stock["position_ids"]
    if positions is None:
        positions = torch.arange(embeds.shape[1]).unsqueeze(0)
    if family.masked_reference is not None:
        masked = family.masked_reference(model, inputs, embeds, mask, positions)
    else:
        deepstack = _deepstack_reference(stock, run) if stock.get("deepstack_visual_embeds") is not None else {}
        masked = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **deepstack).last_hidden_state
    for row in range(embeds.shape[0]):
        kept = keep[row].nonzero().squeeze(1)
        real = mask[row, kept].bool()
        got = pruned["output"][row, -len(kept) :][real]
        if family.reference == "gathered":  # the kept tokens alone, at their positions
            alone = kept[real]
            at = positions[..., row if positions.shape[-2] > 1 else 0, :][..., alone].unsqueeze(-2)
            expected = decoder(inputs_embeds=embeds[row : row + 1, alone], attention_mask=torch.ones(1, len(alone), dtype=torch.long),
                               position_ids=at).last_hidden_state[0]
        else:
            expected = masked[row, kept][real]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def _deepstack_reference(stock, run):
    """Qwen3-VL's DeepStack inputs for the masked reference: the stock rows, with each kept token's group mean
    where the pre-LLM stage recorded a merge map (dropped tokens are masked out, whatever their rows)."""
    levels = [level.clone() for level in stock["deepstack_visual_embeds"]]
    start = 0
    for record in run.stats.images:  # images in batch-row order, as the rows are
        image = slice(start, start + record.before)
        start += record.before
        stage = record.stages[-1]
        if stage.assignment is not None:
            selection = ts.Selection(stage.kept, assignment=stage.assignment, weights=stage.weights)
            for level in levels:
                level[image][stage.kept] = selection.group_means(level[image])
    return {"visual_pos_masks": stock["visual_pos_masks"], "deepstack_visual_embeds": levels}


@pytest.mark.parametrize("family, name, kwargs", CONTRACT)
@pytest.mark.parametrize("texts", [TEXTS[:1], TEXTS], ids=["one-row", "padded-batch"])
def test_second_turn_reusing_the_pruned_cache_equals_a_fresh_prefill(family, name, kwargs, texts):
    model = build_model(family)
    inputs = family.make_inputs(texts)
    with ts.apply(model, method_for(name, kwargs), **family.options):
        # a random model may answer with the image token, which the second turn would read as a placeholder
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                               suppress_tokens=[family.image_token])
        follow_up = torch.tensor([[11, 12, 13]] * len(texts))
        ids = torch.cat([first.sequences, follow_up], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(texts), 6, dtype=torch.long)], dim=1)
        turn = {"input_ids": ids, "attention_mask": mask}
        continued = model.generate(**turn, **{CACHE_ARGUMENT: output_cache(first)}, max_new_tokens=3, do_sample=False)
        fresh = model.generate(**appended(model, inputs, ids, mask), max_new_tokens=3, do_sample=False)
    assert torch.equal(continued, fresh)


@pytest.mark.parametrize("family, name, kwargs", CONTRACT)
def test_each_stage_keeps_a_subset_of_what_the_stage_before_it_kept(family, name, kwargs):
    model = build_model(family)
    method = method_for(name, kwargs)
    sieves = method.sieves if isinstance(method, ts.Chain) else (method,)
    depth = model.config.get_text_config().num_hidden_layers
    stages = [(stage, sieve) for sieve in sieves for stage in (sieve.schedule(depth) if sieve.stage == "in_llm" else (sieve,))]
    with ts.apply(model, method, **family.options) as run:
        model.generate(**family.make_inputs(TEXTS), max_new_tokens=2, do_sample=False, pad_token_id=0)
    for record in run.stats.images:
        assert [(s.method, s.layer) for s in record.stages] == [(s.name, getattr(s, "layer", None)) for s, _ in stages]
        left, began = set(range(record.before)), {}
        for stage, (sieve, method) in zip(record.stages, stages):
            began.setdefault(id(method), left)  # a restoring stage may bring back what its method's first stage received
            pool = began[id(method)] if sieve.restores else left
            assert stage.after == len(stage.kept) <= len(pool)
            assert set(stage.kept.tolist()) <= pool
            left = set(stage.kept.tolist())
        assert record.stages[-1].after == record.after and torch.equal(record.stages[-1].kept, record.kept)


@pytest.mark.parametrize("family, name, kwargs", CONTRACT)
def test_sampling_is_reproducible_under_a_seed(family, name, kwargs):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    outputs = []
    with ts.apply(model, method_for(name, kwargs), **family.options):
        for _ in range(2):
            torch.manual_seed(7)
            outputs.append(model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=20, pad_token_id=0))
    assert torch.equal(*outputs)


@pytest.mark.parametrize("family, name, kwargs", CONTRACT)
def test_several_images_in_one_prompt_are_each_pruned(family, name, kwargs):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS, n_images=[2, 1])
    with ts.apply(model, method_for(name, kwargs), **family.options) as run:
        tokens = greedy(model, inputs)
    assert [(r.row, r.before, r.after) for r in run.stats.images] == [
        (0, family.tokens_per_image, 16), (0, family.tokens_per_image, 16), (1, family.tokens_per_image, 16)
    ]
    assert tokens.shape == (2, inputs["input_ids"].shape[1] + 4)


def _identity(value):
    """A plain value as itself, anything else by identity: a patch that swaps an object and puts back a copy shows."""
    return value if isinstance(value, (int, float, str, bool, type(None))) else id(value)


# State the stock model itself rewrites at every prefill (Qwen2-VL's rope offsets for the decode steps).
PER_CALL_STATE = {"rope_deltas"}


def _snapshot(model):
    """Every module's attributes (a dict's entries one by one: hooks, parameters, submodules), weights and config."""
    modules = {
        name: {
            attribute: {key: _identity(v) for key, v in value.items()} if isinstance(value, dict) else _identity(value)
            for attribute, value in vars(module).items() if attribute not in PER_CALL_STATE
        }
        for name, module in model.named_modules()
    }
    return modules, {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_json_string()


def _assert_same(model, before):
    modules, weights, config = _snapshot(model)
    assert modules == before[0]
    assert weights.keys() == before[1].keys() and all(torch.equal(weights[k], before[1][k]) for k in weights)
    assert config == before[2]


@pytest.mark.parametrize("family, name, kwargs", CONTRACT)
def test_model_is_restored_on_exit_and_after_an_exception(family, name, kwargs):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    before = _snapshot(model)
    with ts.apply(model, method_for(name, kwargs), **family.options):
        greedy(model, inputs)
    _assert_same(model, before)
    with pytest.raises(KeyError):
        with ts.apply(model, method_for(name, kwargs), **family.options):
            model(**inputs)
            raise KeyError("boom")
    _assert_same(model, before)
    handle = ts.attach(model, method_for(name, kwargs), **family.options)
    with pytest.raises(RuntimeError, match="already has a tokensieve method"):
        ts.apply(model, method_for(name, kwargs), **family.options)
    handle.remove()
    handle.remove()
    _assert_same(model, before)


@pytest.mark.parametrize("family, name, kwargs", REFUSED)
def test_a_method_the_family_cannot_serve_is_refused_before_touching_the_model(family, name, kwargs):
    model = build_model(family)
    before = _snapshot(model)
    methods = "|".join(spec.split(":")[0] for spec in name.split("+"))  # a chain names the method that needs them
    model_name = type(model).__name__
    # the alternatives a refusal may take; each but the layer's names a servable method after it
    refusal = (f"(needs signals {model_name} cannot give.*divprune|prunes inside the LLM, which {model_name} cannot serve.*divprune"
               f"|acts on videos, and tokensieve takes videos only on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-OneVision, not on {model_name}.*divprune"
               f"|prunes before decoder layer|merges inside the vision tower, which encodes each frame)")
    method = method_for(name, kwargs)
    if adapter_for(model).takes_video and supported(replace(family, videos=True), name, kwargs):
        # a video method the family serves on videos, given images: refused at the forward, before the decoder runs
        with ts.apply(model, method, **family.options):
            with pytest.raises(ValueError, match=f"{methods} acts on videos.*carries an image"):
                model(**family.make_inputs(TEXTS))
    else:
        with pytest.raises(ValueError, match=f"({methods}) {refusal}"):
            ts.apply(model, method, **family.options)
    _assert_same(model, before)
