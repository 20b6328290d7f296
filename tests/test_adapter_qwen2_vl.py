"""Qwen2-VL / Qwen2.5-VL (and Qwen3-VL, Qwen3.5) specifics: refusals, 3D positions of kept tokens, decode loops, signals.

Loops that append tokens also append zeros (text) to ``mm_token_type_ids``, as ``generate()`` does:
the stock models index one by the other and fail when their lengths differ.
"""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS, appended
from tiny_qwen2_vl import QWEN2_5_VL, QWEN2_VL
from tiny_qwen3_vl import QWEN3_5, QWEN3_VL
from tokensieve.adapters import adapter_for
from tokensieve.engine.compat import CACHE_ARGUMENT, output_cache
from tokensieve.sieve import Selection, Sieve

#: Qwen3-VL and Qwen3.5 share the layout these tests pin (their own specifics: test_adapter_qwen3_vl.py)
QWEN = [pytest.param(family, id=family.name) for family in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_5)]


@pytest.mark.parametrize("family", QWEN)
def test_images_without_mm_token_type_ids_are_refused(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    del inputs["mm_token_type_ids"]
    with ts.apply(model, ts.load("uniform", keep=16)):
        with pytest.raises(ValueError, match="need mm_token_type_ids"):
            model(**inputs)


@pytest.mark.parametrize("family", QWEN)
def test_mm_token_type_ids_that_disagree_with_input_ids_are_refused(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    ids = torch.cat([inputs["input_ids"], inputs["input_ids"][:, -1:]], dim=1)
    longer = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    shifted = {**inputs, "mm_token_type_ids": inputs["mm_token_type_ids"].roll(1, dims=1)}
    with ts.apply(model, ts.load("uniform", keep=16)):
        with pytest.raises(ValueError, match="append zeros"):
            model(**longer)
        with pytest.raises(ValueError, match="exactly at the image_pad tokens"):
            model(**shifted)


@pytest.mark.parametrize("family", QWEN)
def test_kept_tokens_keep_their_3d_positions(family):
    model = build_model(family)
    decoder = adapter_for(model).decoder
    inputs = family.make_inputs(TEXTS, n_images=[2, 1])
    calls = []
    with ts.apply(model, ts.load("uniform", keep=16)) as run:
        # registered after tokensieve's hook, so it sees the pruned inputs
        handle = decoder.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["position_ids"]), with_kwargs=True)
        model(**inputs)
    model(**inputs)
    handle.remove()
    pruned, stock = calls
    assert pruned.shape[0] == stock.shape[0] == 3
    image_positions = (inputs["input_ids"] == family.image_token).nonzero()
    keep = inputs["attention_mask"].bool().clone()
    for i, record in enumerate(run.stats.images):
        block = image_positions[i * record.before : (i + 1) * record.before]
        keep[block[:, 0], block[:, 1]] = False
        keep[block[record.kept, 0], block[record.kept, 1]] = True
    for row in range(len(keep)):
        kept = keep[row].nonzero().squeeze(1)
        assert torch.equal(pruned[:, row, -len(kept) :], stock[:, row, kept])


class ProjectionProbe(Sieve):
    """Keeps every 4th token and records whether ``project(vision_features)`` gives the image's tokens."""

    name, paper, signals = "projection-probe", "test", ("vision_features", "project")

    def __init__(self):
        super().__init__(16)
        self.seen = []

    def select(self, tokens):
        features = tokens["vision_features"]
        projected = tokens["project"](features.unsqueeze(0)).squeeze(0)
        self.seen.append((features.shape, torch.allclose(projected, tokens.features, atol=1e-6)))
        return Selection(torch.arange(0, len(tokens), 4))


@pytest.mark.parametrize("family", QWEN)
def test_project_maps_vision_features_to_the_image_tokens(family):
    model = build_model(family)
    merger = adapter_for(model).merger
    probe = ProjectionProbe()
    with ts.apply(model, probe):
        model(**family.make_inputs(TEXTS, n_images=[2, 1]))
    assert probe.seen == [(torch.Size([family.tokens_per_image, merger.hidden_size]), True)] * 3


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_a_hand_written_cached_decode_loop_needs_no_positions(family, with_mask):
    """The stock model would number the new tokens from the pruned cache's shorter length."""
    model = build_model(family)
    inputs = family.make_inputs(TEXTS if with_mask else TEXTS[:1])
    with ts.apply(model, ts.load("uniform", keep=16)):
        out = model(**inputs)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(3):
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
            step = {"attention_mask": mask} if with_mask else {}
            out = model(input_ids=next_token, **{CACHE_ARGUMENT: output_cache(out)}, **step)
            expected = model(**appended(model, inputs, ids, mask), use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], expected, atol=1e-5, rtol=1e-4)
