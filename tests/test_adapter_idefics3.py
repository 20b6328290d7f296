"""Idefics3 / SmolVLM specifics: no [CLS], split images pruned per sub-image, faithful vision signals."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_signals import ProjectionCheck
from tiny_idefics3 import IDEFICS3, SMOLVLM, split_image_inputs

FAMILIES = [pytest.param(family, id=family.name) for family in (IDEFICS3, SMOLVLM)]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_split_image_is_pruned_per_crop_and_global_view(family):
    model = build_model(family)
    inputs = split_image_inputs([5, 6], rows=2, cols=2)
    expected = model(**inputs).logits
    with ts.apply(model, ts.load("uniform", keep=1.0)):
        assert torch.equal(model(**inputs).logits, expected)
    with ts.apply(model, ts.load("divprune", keep=16)) as run:
        logits = model(**inputs).logits
    assert [(r.row, r.before, r.after, r.grid) for r in run.stats.images] == [(0, 64, 16, (8, 8))] * 5
    assert not torch.allclose(logits[:, -1], expected[:, -1])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_row_without_images_beside_one_with_an_image(family):
    model = build_model(family)
    batch = family.make_inputs([[5, 6], [7, 8, 9]], n_images=[0, 1])  # row 0 gets an all-zero padding image
    alone = family.make_inputs([[7, 8, 9]])
    with ts.apply(model, ts.load("divprune", keep=16)) as run:
        batch_tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)
        alone_tokens = model.generate(**alone, max_new_tokens=3, do_sample=False)
    assert [(r.row, r.after) for r in run.stats.images] == [(1, 16), (0, 16)]
    assert torch.equal(batch_tokens[1, -3:], alone_tokens[0, -3:])



@pytest.mark.parametrize("family", FAMILIES)
def test_projecting_the_vision_features_gives_the_llm_tokens(family):
    model = build_model(family)
    sieve = ProjectionCheck()
    with ts.apply(model, sieve):
        model.generate(**family.make_inputs([[5, 6], [7]], n_images=[2, 1]), max_new_tokens=2, do_sample=False)
    vision_width = model.config.vision_config.hidden_size * model.config.scale_factor**2
    assert [shape[-1] for shape in sieve.shapes] == [vision_width] * 3
    assert max(sieve.errors) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_images_and_placeholders_that_disagree_are_refused(family):
    model = build_model(family)
    inputs = family.make_inputs([[5, 6]], n_images=[2])
    inputs["pixel_values"][0, 1] = 0  # an all-zero image is padding: the model drops it
    with ts.apply(model, ts.load("divprune", keep=8)):
        with pytest.raises(ValueError, match="1 \\(sub-\\)image\\(s\\) of 8x8 tokens .* need 64 image placeholder tokens, but input_ids has 128"):
            model(**inputs)
        model(**family.make_inputs([[5, 6]]))  # the block still works after the error
