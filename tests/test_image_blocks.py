"""What Gemma3 and Gemma 4 share (tokensieve/adapters/image_blocks.py): their type ids, which make each image one
bidirectional block, are required and must mark exactly the image tokens, and the decoder's masks are rebuilt
with an explicit 2D mask. Each family's own masks, windows and signals: test_adapter_gemma3.py, test_adapter_gemma4.py."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS, _assert_same, _snapshot, greedy
from tiny_gemma3 import GEMMA3
from tiny_gemma4 import GEMMA4

#: family, its type-id input, the image inputs of its vision tower (in get_image_features' order)
CASES = [(GEMMA3, "token_type_ids", ("pixel_values",)),
         (GEMMA4, "mm_token_type_ids", ("pixel_values", "image_position_ids"))]
IDS = [family.name for family, _, _ in CASES]


@pytest.mark.parametrize("family, type_ids, pixels", CASES, ids=IDS)
def test_images_without_type_ids_are_refused(family, type_ids, pixels):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    without = {name: value for name, value in inputs.items() if name != type_ids}
    silently = model(**without).logits  # the stock model runs, causal over the image tokens
    assert not torch.allclose(silently, model(**inputs).logits, atol=1e-3)
    with ts.apply(model, ts.load("uniform", keep=16)):
        with pytest.raises(ValueError, match=f"images need {type_ids}"):
            model(**without)
        with pytest.raises(ValueError, match=f"images need {type_ids}"):
            greedy(model, without)


@pytest.mark.parametrize("stale", ["longer", "shifted"])
@pytest.mark.parametrize("family, type_ids, pixels", CASES, ids=IDS)
def test_type_ids_that_miss_the_image_tokens_are_refused(family, type_ids, pixels, stale):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS[:1])
    types = inputs[type_ids]
    if stale == "longer":  # a shortened prompt with the unpruned type ids: no error from the stock model
        keep = torch.ones(types.shape[1], dtype=torch.bool)
        keep[3:10] = False
        inputs = {**inputs, "input_ids": inputs["input_ids"][:, keep], "attention_mask": inputs["attention_mask"][:, keep]}
        images = [inputs.pop(name) for name in pixels]
    else:
        inputs[type_ids] = types.roll(1, dims=1)
    before = _snapshot(model)
    with ts.apply(model, ts.load("uniform", keep=16)):
        with pytest.raises(ValueError, match=f"{type_ids} .* must be 1 exactly at the image tokens"):
            if stale == "longer":  # with features encoded before the call, as generate() passes them
                model(**inputs, mm_encoder_outputs={"image": model.model.get_image_features(*images)})
            else:
                model(**inputs)
    _assert_same(model, before)


@pytest.mark.parametrize("family", [GEMMA3, GEMMA4], ids=IDS)
def test_a_pruned_forward_without_a_mask_equals_one_with_an_explicit_mask(family):
    """With no 2D mask and no cache, transformers reads the gaps pruning leaves in the positions as packed
    sequences (an IndexError in the block overlay, or silently wrong masks): the engine rebuilds the decoder's
    masks with an explicit 2D mask."""
    model = build_model(family)
    inputs = family.make_inputs(TEXTS[:1])
    without = {name: value for name, value in inputs.items() if name != "attention_mask"}
    with ts.apply(model, ts.load("random", keep=16)):
        explicit = model(**inputs, use_cache=False).logits
        implicit = model(**without, use_cache=False).logits
    assert torch.equal(implicit, explicit)


@pytest.mark.parametrize("method", ["fastv", "uniform+pyramiddrop"])
@pytest.mark.parametrize("family", [GEMMA3, GEMMA4], ids=IDS)
def test_in_llm_stages_are_refused_before_the_model_is_touched(family, method):
    model = build_model(family)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=f"prunes inside the LLM, which {type(model).__name__} cannot serve: its decoder "
                                         f"alternates sliding-window and full-attention layers.*divprune"):
        ts.apply(model, ts.build(method, keep=16))
    _assert_same(model, before)


@pytest.mark.parametrize("family", [GEMMA3, GEMMA4], ids=IDS)
def test_keep_all_by_inputs_embeds_is_the_stock_model_and_generate_refuses_them_as_stock_does(family):
    """By inputs_embeds the model finds its image tokens by matching the embedding table (Gemma 4 also each token's
    id for its per-layer inputs, image tokens read as padding); keep-all is the stock forward, and generate()
    refuses them, stock or not."""
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    by_embeds = {name: value for name, value in inputs.items() if name != "input_ids"}
    by_embeds["inputs_embeds"] = model.get_input_embeddings()(inputs["input_ids"])
    expected = model(**by_embeds).logits
    torch.testing.assert_close(expected, model(**inputs).logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="inputs_embeds.*doesn't have its forwarding implemented"):
        greedy(model, by_embeds)
    with ts.apply(model, ts.load("divprune", keep=1.0)) as run:
        assert torch.equal(model(**by_embeds).logits, expected)
        with pytest.raises(ValueError, match="inputs_embeds.*doesn't have its forwarding implemented"):
            greedy(model, by_embeds)
    assert [(r.before, r.after) for r in run.stats.images] == [(family.tokens_per_image,) * 2] * 2
