"""LLaVA-NeXT / LLaVA-OneVision specifics: the anyres layout against the model's own packing, [CLS]
scores per crop, refusals, images of different sizes, multi-image prompts and anyres_max on OneVision."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS, _assert_same, _snapshot, greedy
from tiny_llava_next import (
    IMAGE_SIZE, LLAVA_NEXT, LLAVA_ONEVISION, VIDEO_TOKEN, anyres_inputs, anyres_pixels, anyres_tokens,
    tiny_llava_next, tiny_llava_onevision,
)
from tiny_models import IMAGE_TOKEN, left_padded
from tokensieve.selection import split_budget
from tokensieve.sieve import VisualTokens

BOTH = [pytest.param(family, id=family.name) for family in (LLAVA_NEXT, LLAVA_ONEVISION)]
SIZES = [(80, 32), (48, 64), (64, 64), (30, 70)]  # (height, width): tall, wide, square, very wide


def sized_inputs(sizes: list[tuple[int, int]], text: tuple[int, ...] = (5, 6)) -> dict:
    """One row holding one image of each size, then ``text``."""
    ids = [1] + [IMAGE_TOKEN] * sum(anyres_tokens(size) for size in sizes) + list(text)
    input_ids, attention_mask = left_padded([ids])
    crops = [anyres_pixels(1, i, size) for i, size in enumerate(sizes)]
    most = max(len(c) for c in crops)
    pixel_values = torch.stack([torch.cat([c, c.new_zeros(most - len(c), *c.shape[1:])]) for c in crops])
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
        "image_sizes": torch.tensor(sizes),
    }


class Recording:
    """A method whose ``select`` also records the tokens it was given."""

    def __init__(self, name: str, keep: int = 8):
        self.sieve = ts.load(name, keep=keep)
        self.seen: list[VisualTokens] = []
        select = self.sieve.select

        def recording(tokens):
            self.seen.append(tokens)
            return select(tokens)

        self.sieve.select = recording


@pytest.mark.parametrize("family", BOTH)
def test_blocks_match_the_models_own_packing(family):
    """For images of several shapes, the three blocks cover every token once and the newline column
    holds exactly the tokens where the model put its image_newline."""
    model = build_model(family)
    inputs = sized_inputs(SIZES)
    packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    recorder = Recording("divprune")
    with ts.apply(model, recorder.sieve) as run:
        model(**inputs)
    newline = model.model.image_newline
    assert len(recorder.seen) == len(SIZES)
    for tokens, record, features, size in zip(recorder.seen, run.stats.images, packed, SIZES):
        assert record.before == len(tokens) == len(features) == anyres_tokens(size)
        base, high_res, newlines = tokens.layout()
        covered = torch.cat([block.flatten() for block in (base, high_res, newlines)]).sort().values
        assert torch.equal(covered, torch.arange(len(tokens)))
        assert tokens.grid == (1, len(tokens)) and base.shape == (4, 4) and newlines.shape == (high_res.shape[0], 1)
        assert torch.equal(features[newlines.flatten()], newline.expand(newlines.numel(), -1))
        assert not (features[high_res.flatten()] == newline).all(-1).any()
        assert torch.equal(tokens.features, features)


def test_cls_attention_is_each_crops_own_cls_row_packed_like_the_features():
    """Compared with an eager tower's attention maps, packed by the model's own function (newlines: 0)."""
    model = build_model(LLAVA_NEXT)
    inputs = sized_inputs(SIZES[:2])
    recorder = Recording("fastervlm")
    with ts.apply(model, recorder.sieve):
        model(**inputs)
    eager = tiny_llava_next()  # the same seed: the same weights
    eager.model.vision_tower.set_attn_implementation("eager")
    counts = [len(anyres_pixels(1, i, size)) for i, size in enumerate(SIZES[:2])]
    crops = torch.cat([inputs["pixel_values"][i, :n] for i, n in enumerate(counts)])
    attentions = eager.model.vision_tower(crops, output_attentions=True).attentions
    cls_rows = attentions[eager.config.vision_feature_layer][:, :, 0, 1:].transpose(1, 2)  # (crops, 16, heads)
    newline = torch.zeros(cls_rows.shape[-1])
    expected, _ = eager.model.pack_image_features(list(cls_rows.split(counts)), inputs["image_sizes"], "default", newline)
    assert len(recorder.seen) == len(expected) == 2
    for tokens, want in zip(recorder.seen, expected):
        torch.testing.assert_close(tokens["cls_attention"], want.T, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", BOTH)
@pytest.mark.parametrize("name", ["uniform", "pool", "random", "divprune"])
def test_images_of_different_sizes_are_each_pruned_to_the_budget(family, name):
    model = build_model(family)
    inputs = sized_inputs(SIZES)
    with ts.apply(model, ts.load(name, keep=16)) as run:
        tokens = greedy(model, inputs)
    assert [r.before for r in run.stats.images] == [anyres_tokens(size) for size in SIZES]
    if name == "pool":  # rounds each piece down to a whole grid
        assert all(0 < r.after <= 16 for r in run.stats.images)
    else:
        assert all(r.after == 16 for r in run.stats.images)
    assert tokens.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_grid_methods_share_the_budget_among_the_pieces():
    """uniform and pool give each piece its proportional share; pool averages within a piece only."""
    base, high_res = torch.arange(16).view(4, 4), 16 + torch.arange(50).view(10, 5)
    blocks = (base, high_res[:, :4], high_res[:, 4:])
    features = torch.randn(66, 8)
    tokens = VisualTokens(features, (1, 66), {}, blocks)
    assert split_budget([16, 40, 10], 16) == [4, 10, 2]
    kept = ts.load("uniform", keep=16).select(tokens).kept
    assert [int(torch.isin(kept, block.flatten()).sum()) for block in blocks] == [4, 10, 2]
    selection = ts.load("pool", keep=16).select(tokens)
    assert [int(torch.isin(selection.kept, block.flatten()).sum()) for block in blocks] == [4, 10, 2]
    newline_rows = torch.isin(selection.kept, blocks[2].flatten())
    torch.testing.assert_close(selection.features[newline_rows], torch.stack([features[16 + 4 : 16 + 25 : 5].mean(0), features[16 + 29 :: 5].mean(0)]))
    torch.testing.assert_close(selection.features[0], features[base[:2, :2].flatten()].mean(0))


def test_images_and_placeholders_that_disagree_are_refused():
    model = build_model(LLAVA_NEXT)
    inputs = LLAVA_NEXT.make_inputs([[5, 6]], n_images=[2])
    one_image = {**inputs, "pixel_values": inputs["pixel_values"][:1], "image_sizes": inputs["image_sizes"][:1]}
    other_size = {**inputs, "image_sizes": torch.tensor([[48, 64]] * 2)}  # 2x2 crops + base each, 4 given
    with ts.apply(model, ts.load("divprune", keep=8)):
        with pytest.raises(ValueError, match=r"1 image\(s\) of \[66\] tokens .* need 66 image placeholder tokens, but input_ids has 132"):
            model(**one_image)
        with pytest.raises(ValueError, match="give 10 crops, but the vision tower encoded 8"):
            model(**other_size)
        model(**inputs)  # the block still works after the errors


@pytest.mark.parametrize("family, name, words", [
    (LLAVA_NEXT, "visionzip", "image_newline tokens .* have no vision-tower key or feature"),
    (LLAVA_ONEVISION, "fastervlm", r"cls_attention: the vision tower \(siglip_vision_model\) has no \[CLS\] token"),
    (LLAVA_ONEVISION, "visionzip", r"no \[CLS\] token"),
])
def test_methods_it_cannot_serve_are_refused(family, name, words):
    model = build_model(family)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=f"{name} needs signals .*{words}"):
        ts.apply(model, ts.load(name, keep=16))
    _assert_same(model, before)


def test_onevision_refuses_videos_and_is_left_untouched():
    model = build_model(LLAVA_ONEVISION)
    inputs = LLAVA_ONEVISION.make_inputs(TEXTS[:1])
    frames = 2  # each frame pools 4x4 patches to 2x2, then one newline for the video
    ids = torch.cat([inputs["input_ids"], torch.tensor([[VIDEO_TOKEN] * (frames * 4 + 1)])], dim=1)
    with_video = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": torch.randn(1, frames, 3, 32, 32)}
    model(**with_video)  # the stock model takes it
    before = _snapshot(model)
    with ts.apply(model, ts.load("uniform", keep=16)):
        with pytest.raises(ValueError, match="act on images.*video"):
            model(**with_video)
        with pytest.raises(ValueError, match="act on images.*video"):
            greedy(model, with_video)
    _assert_same(model, before)


def test_onevision_multi_image_rows_are_base_views_with_one_newline():
    """With ``batch_num_images`` (as the processor returns it), images of a multi-image row are not cut
    into crops: 16 base-view tokens and a newline each; a single-image row keeps the anyres layout."""
    model = build_model(LLAVA_ONEVISION)
    inputs = anyres_inputs(TEXTS, n_images=[2, 1])
    per_row = [[1] + [IMAGE_TOKEN] * 17 * 2 + TEXTS[0], [1] + [IMAGE_TOKEN] * anyres_tokens(IMAGE_SIZE) + TEXTS[1]]
    inputs["input_ids"], inputs["attention_mask"] = left_padded(per_row)
    inputs["batch_num_images"] = torch.tensor([2, 1])
    stock = greedy(model, inputs)
    with ts.apply(model, ts.load("uniform", keep=1.0)):
        assert torch.equal(greedy(model, inputs), stock)
    recorder = Recording("uniform", keep=5)
    with ts.apply(model, recorder.sieve) as run:
        greedy(model, inputs)
    assert [(r.row, r.before, r.after) for r in run.stats.images] == [(0, 17, 5), (0, 17, 5), (1, 66, 5)]
    assert [block.shape for block in recorder.seen[0].layout()] == [(4, 4), (1, 1)]


def test_onevision_anyres_max_downsampled_grids_are_laid_out_as_the_model_packs_them():
    model = tiny_llava_onevision(vision_aspect_ratio="anyres_max_1")  # 10x4 patches > 1 crop's worth: downsampled
    inputs = sized_inputs(SIZES[:1])
    packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    n = len(packed)
    assert n < anyres_tokens(IMAGE_SIZE)
    inputs["input_ids"], inputs["attention_mask"] = left_padded([[1] + [IMAGE_TOKEN] * n + [5, 6]])
    recorder = Recording("uniform", keep=8)
    with ts.apply(model, recorder.sieve) as run:
        greedy(model, inputs)
    (tokens,) = recorder.seen
    _, high_res, newlines = tokens.layout()
    assert run.stats.images[0].before == n and high_res.shape == (6, 2)
    assert torch.equal(tokens.features[newlines.flatten()], model.model.image_newline.expand(6, -1))
