"""Calls that bring inputs_embeds (no input_ids) with their images: pre-LLM methods find the image tokens as
the model does, as the rows equal to the image token's embedding; in-LLM methods are refused."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model, family_method_params, method_for
from test_contract import PRE_LLM, TEXTS

IN_LLM = family_method_params(stages=("in_llm", "chain"))


def with_embeds(model, inputs: dict) -> tuple[dict, dict]:
    """The same call by input_ids and by inputs_embeds. Qwen2-VL/Qwen2.5-VL compute their 3D positions from
    input_ids only, so both calls get them as position_ids (what a caller of the stock model does too)."""
    by_embeds = {name: value for name, value in inputs.items() if name != "input_ids"}
    by_embeds["inputs_embeds"] = model.get_input_embeddings()(inputs["input_ids"])
    rope_index = getattr(model.model, "get_rope_index", None)
    if rope_index is not None:
        grids = {name: inputs[name] for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if name in inputs}
        positions, _ = rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], attention_mask=inputs["attention_mask"],
                                  **grids)
        inputs, by_embeds["position_ids"] = {**inputs, "position_ids": positions}, positions
    return inputs, by_embeds


@pytest.mark.parametrize("family, name, kwargs", PRE_LLM)
def test_a_forward_by_inputs_embeds_prunes_as_the_forward_by_input_ids(family, name, kwargs):
    model = build_model(family)
    by_ids, by_embeds = with_embeds(model, family.make_inputs(TEXTS))
    with ts.apply(model, method_for(name, kwargs), **family.options) as run:
        expected = model(**by_ids).logits
        logits = model(**by_embeds).logits
    assert torch.equal(logits, expected)
    ids_records, embeds_records = run.stats.images[:2], run.stats.images[2:]
    assert [r.after for r in embeds_records] == [16, 16]
    assert all(torch.equal(a.kept, b.kept) for a, b in zip(ids_records, embeds_records))


# Gemma3's and Gemma 4's generate() refuse inputs_embeds (their prepare_inputs_for_generation does not take them),
# stock and pruned alike: test_adapter_gemma3.py and test_adapter_gemma4.py check it
GENERATES_BY_EMBEDS = [p for p in PRE_LLM if p.values[0].name not in ("gemma3", "gemma4", "gemma3_frames")]


@pytest.mark.parametrize("family, name, kwargs", GENERATES_BY_EMBEDS)
def test_keep_all_by_inputs_embeds_is_the_stock_model(family, name, kwargs):
    model = build_model(family)
    _, by_embeds = with_embeds(model, family.make_inputs(TEXTS))
    expected_logits = model(**by_embeds).logits
    expected_tokens = model.generate(**by_embeds, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with ts.apply(model, method_for(name, kwargs, keep=1.0), **family.options) as run:
        logits = model(**by_embeds).logits
        tokens = model.generate(**by_embeds, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(logits, expected_logits)
    assert torch.equal(tokens, expected_tokens)
    assert [(r.before, r.after) for r in run.stats.images] == [(family.tokens_per_image,) * 2] * 4


# generate() by inputs_embeds gives Qwen2-VL/Qwen2.5-VL 1D positions (it builds 3D ones from input_ids only),
# stock and pruned alike, so there it generates other tokens than by input_ids
POSITIONS_FROM_IDS = {"qwen2_vl", "qwen2_5_vl"}


@pytest.mark.parametrize("family, name, kwargs", [p for p in GENERATES_BY_EMBEDS if p.values[0].name not in POSITIONS_FROM_IDS])
def test_generate_by_inputs_embeds_gives_the_tokens_of_generate_by_input_ids(family, name, kwargs):
    model = build_model(family)
    by_ids, by_embeds = with_embeds(model, family.make_inputs(TEXTS))
    with ts.apply(model, method_for(name, kwargs), **family.options):
        expected = model.generate(**by_ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        tokens = model.generate(**by_embeds, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, expected[:, by_ids["input_ids"].shape[1]:])


@pytest.mark.parametrize("family, name, kwargs", IN_LLM)
def test_in_llm_methods_refuse_images_by_inputs_embeds(family, name, kwargs):
    model = build_model(family)
    _, by_embeds = with_embeds(model, family.make_inputs(TEXTS))
    with ts.apply(model, method_for(name, kwargs), **family.options):
        with pytest.raises(ValueError, match="works inside the LLM.*recognises a prompt by its token ids.*pass input_ids"):
            model(**by_embeds)
        by_ids = family.make_inputs(TEXTS)
        assert model(**by_ids).logits.shape[0] == 2  # the handle still serves a call by input_ids


def test_qwen_by_inputs_embeds_without_position_ids_is_refused():
    from tiny_qwen2_vl import QWEN2_5_VL

    model = build_model(QWEN2_5_VL)
    _, by_embeds = with_embeds(model, QWEN2_5_VL.make_inputs(TEXTS))
    del by_embeds["position_ids"]
    with ts.apply(model, ts.load("uniform", keep=16)):
        with pytest.raises(ValueError, match="silently falls back to 1D ones: pass position_ids"):
            model(**by_embeds)
