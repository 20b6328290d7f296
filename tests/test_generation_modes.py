"""transformers' generation modes as columns of the contract: every mode, every method, every family.

generate() encodes each image once and repeats each prompt's row (and its image features) for every beam
or returned sequence; the engine prunes each image once and gives every copy the same kept tokens.
"""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model, method_for
from test_contract import CONTRACT, TEXTS

MODES = {
    "beam_search": dict(num_beams=2),
    "beam_search_all_beams": dict(num_beams=2, num_return_sequences=2),
    "beam_sample": dict(num_beams=2, do_sample=True, top_k=20),
    "return_sequences": dict(do_sample=True, top_k=20, num_return_sequences=2),
}
N_IMAGES = [1, 2]  # the second prompt has two images, so copies of rows with several images are covered


def generate(model, inputs, family, mode: str, **options):
    torch.manual_seed(3)  # the sampling modes draw the same numbers with and without the method
    # a random model may draw the image placeholder id, which a no-cache loop would then read as an image
    return model.generate(**inputs, max_new_tokens=3, pad_token_id=0, suppress_tokens=[family.image_token], **MODES[mode], **options)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family, name, kwargs", CONTRACT)
def test_keep_all_generates_as_the_stock_model(family, name, kwargs, mode):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS, n_images=N_IMAGES)
    expected = generate(model, inputs, family, mode)
    with ts.apply(model, method_for(name, kwargs, keep=1.0, pre_keep=1.0)) as run:
        tokens = generate(model, inputs, family, mode)
    assert torch.equal(tokens, expected)
    # one record per image, not per copy
    assert [(r.before, r.after) for r in run.stats.images] == [(family.tokens_per_image,) * 2] * sum(N_IMAGES)


@pytest.mark.parametrize("mode", ["beam_search_all_beams", "return_sequences"])
@pytest.mark.parametrize("family, name, kwargs", CONTRACT)
def test_every_copy_of_a_prompt_keeps_the_same_tokens_and_cache_equals_no_cache(family, name, kwargs, mode):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS, n_images=N_IMAGES)
    with ts.apply(model, method_for(name, kwargs)) as run:
        cached = generate(model, inputs, family, mode)
    with ts.apply(model, method_for(name, kwargs)) as uncached_run:
        uncached = generate(model, inputs, family, mode, use_cache=False)
    assert torch.equal(cached, uncached)
    prompts = [r for r in run.stats.images if r.call == 0]
    assert len(prompts) == sum(N_IMAGES) and all(r.after == 16 for r in prompts)
    # each copy of a row holds its image's one selection: the no-cache loop re-selects at every step, the same way
    first = [r.kept for r in uncached_run.stats.images[: sum(N_IMAGES)]]
    assert all(torch.equal(r.kept, first[i % sum(N_IMAGES)]) for i, r in enumerate(uncached_run.stats.images))
    assert all(torch.equal(a.kept, b) for a, b in zip(prompts, first))
