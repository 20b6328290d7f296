"""Merge maps: a Selection may say which kept token each dropped one went into; the engine averages each group
into every per-token tensor it carries, records the group sizes, and refuses a map that does not fit."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.adapters import adapter_for

TEXTS = [[5, 6, 7, 8], [9, 10]]


def test_a_selection_averages_each_group_with_its_weights_and_skips_dropped_tokens():
    values = torch.arange(12.0).view(6, 2)
    selection = ts.Selection(torch.tensor([1, 4]), assignment=torch.tensor([0, 0, -1, 1, 1, 0]))
    torch.testing.assert_close(selection.merged(values), torch.stack([values[[0, 1, 5]].mean(0), values[[3, 4]].mean(0)]))
    assert selection.sizes().tolist() == [3, 2]
    weighted = ts.Selection(torch.tensor([1, 4]), assignment=selection.assignment, weights=torch.tensor([1.0, 3, 9, 1, 1, 0]))
    torch.testing.assert_close(weighted.merged(values), torch.stack([(values[0] + 3 * values[1]) / 4, values[[3, 4]].mean(0)]))
    assert ts.Selection(torch.tensor([1])).merged(values) is None


@dataclass
class _Mapped(ts.Sieve):
    """Keeps tokens 0, 2, 4, ... and merges each odd token into the one before it (or returns a bad map)."""

    name, paper = "mapped", "test"
    stage = "pre_llm"
    bad: str = ""

    def select(self, tokens):
        n = len(tokens)
        kept = torch.arange(0, n, 2)
        assignment = torch.arange(n) // 2
        if self.bad == "length":
            assignment = assignment[:-1]
        elif self.bad == "own":
            assignment[0] = 1
        elif self.bad == "range":
            assignment[1] = len(kept)
        return ts.Selection(kept, assignment=assignment)


def _decoder_input(model, inputs, method):
    """The decoder's inputs_embeds after tokensieve's hook (registered after it, so it runs after it)."""
    seen = []
    with ts.apply(model, method) as run:
        hook = adapter_for(model).decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
    return seen[-1], run


def test_the_engine_gives_each_kept_token_its_groups_mean_and_records_the_sizes():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS[:1])
    stock, _ = _decoder_input(model, inputs, ts.Uniform(keep=1.0))
    merged, run = _decoder_input(model, inputs, _Mapped(keep=1.0))
    (record,) = run.stats.images
    (stage,) = record.stages
    assert stage.sizes.tolist() == [2] * 32 and torch.equal(stage.assignment, torch.arange(64) // 2)
    image = (inputs["input_ids"][0] == LLAVA.image_token).nonzero().squeeze(1)
    pairs = stock[0, image].view(32, 2, -1).mean(1)
    start = int(image[0])
    torch.testing.assert_close(merged[0, start : start + 32], pairs)


def test_tome_reports_its_groups_and_the_llm_sees_their_means():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS[:1])
    stock, _ = _decoder_input(model, inputs, ts.Uniform(keep=1.0))
    merged, run = _decoder_input(model, inputs, ts.ToMe(keep=16))
    stage = run.stats.images[0].stages[0]
    assert int(stage.sizes.sum()) == 64 and len(stage.sizes) == 16
    image = (inputs["input_ids"][0] == LLAVA.image_token).nonzero().squeeze(1)
    features = stock[0, image]
    means = torch.stack([features[stage.assignment == group].mean(0) for group in range(16)])
    start = int(image[0])
    torch.testing.assert_close(merged[0, start : start + 16], means, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad, message", [
    ("length", "a merge map of shape \\(63,\\) for 64 tokens"),
    ("own", "a merge map that puts a kept token in another token.s group"),
    ("range", "a merge map with groups outside -1..31"),
])
def test_a_merge_map_that_does_not_fit_is_refused_and_the_handle_recovers(bad, message):
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS[:1])
    with ts.apply(model, _Mapped(keep=1.0, bad=bad)):
        with pytest.raises(RuntimeError, match=f"mapped returned {message}"):
            model(**inputs)
    with ts.apply(model, _Mapped(keep=1.0)) as run:
        model(**inputs)
    assert run.stats.images[0].after == 32


def test_an_images_groups_follow_every_stages_merge_map_back_to_its_patches():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS[:1])
    with ts.apply(model, ts.Chain(ts.ToMeViT(keep=32), ts.ToMe(keep=8), ts.FastV(keep=4, layer=1))) as run:
        model(**inputs)
    (record,) = run.stats.images
    vision, before, inside = record.stages
    groups = record.groups()
    assert sorted(set(groups.tolist()) - {-1}) == record.kept.tolist()
    for patch in range(64):  # follow one patch by hand through the three stages
        token = vision.kept[vision.assignment[patch]]
        token = before.kept[before.assignment[int((vision.kept == token).nonzero())]]
        expected = int(token) if int(token) in inside.kept.tolist() else -1
        assert int(groups[patch]) == expected


def test_merge_groups_paint_each_group_its_mean_colour():
    import numpy as np
    from PIL import Image

    from tokensieve.draw import merge_groups

    image = Image.fromarray(np.array([[[0, 0, 0], [200, 0, 0]], [[0, 100, 0], [0, 0, 50]]], dtype=np.uint8))
    painted = np.asarray(merge_groups(image, (2, 2), [1, 1, 3, 3]))
    assert painted[0, 0].tolist() == painted[0, 1].tolist() == [100, 0, 0]  # black and red, kept as patch 1
    assert painted[1, 0].tolist() == painted[1, 1].tolist() == [0, 50, 25]  # green and blue, kept as patch 3
    dropped = np.asarray(merge_groups(image, (2, 2), [1, 1, -1, 3], strength=1.0))
    assert dropped[1, 0].tolist() == [128, 128, 128] and dropped[1, 1].tolist() == [0, 0, 50]


def test_the_report_gallery_paints_a_merging_configs_groups():
    import numpy as np
    import pandas as pd
    from PIL import Image

    from tokensieve.bench.gallery import _cell
    from tokensieve.draw import grey_out, merge_groups

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    base = {"config": "tome-k2", "keep_label": "2", "tokens_after": 2, "tokens_before": 4, "prediction": "red",
            "correct": True, "answer": "red", "grid": [2, 2], "kept": [1, 3]}
    merged = _cell(pd.Series({**base, "groups": [1, 1, 3, 3]}), "red", image)
    pruned = _cell(pd.Series({**base, "groups": None}), "red", image)
    from tokensieve.bench.gallery import thumbnail_data_uri

    assert merged.image_uri == thumbnail_data_uri(merge_groups(image, (2, 2), [1, 1, 3, 3]))
    assert pruned.image_uri == thumbnail_data_uri(grey_out(image, (2, 2), [1, 3]))
    assert merged.image_uri != pruned.image_uri
