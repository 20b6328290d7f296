"""LLaVA-NeXT / LLaVA-OneVision specifics: the anyres layout against the model's own packing, [CLS]
scores per crop, refusals, images of different sizes, multi-image prompts and anyres_max on OneVision
(OneVision's videos: test_adapter_llava_onevision_video.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from cases import METHOD_CASES
from conftest import _stage, build_model, supported
from test_contract import TEXTS, _assert_same, _snapshot, greedy
from tiny_llava_next import (
    IMAGE_SIZE, LLAVA_NEXT, LLAVA_ONEVISION, anyres_inputs, anyres_pixels, anyres_tokens,
    tiny_llava_next, tiny_llava_onevision,
)
from tiny_models import IMAGE_TOKEN, left_padded
from tokensieve.adapters import adapter_for
from tokensieve.adapters.llava_next import Pieces
from tokensieve.budget import Budget
from tokensieve.methods.visionzip import equal_shares
from tokensieve.selection import split_budget
from tokensieve.sieve import VisualTokens
from tokensieve.signals import as_signal

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
    (LLAVA_NEXT, "prumerge", "image_newline tokens .* have no vision-tower key or feature"),
    (LLAVA_ONEVISION, "fastervlm", r"cls_attention: the vision tower \(siglip_vision_model\) has no \[CLS\] token"),
    (LLAVA_ONEVISION, "visionzip", r"no \[CLS\] token"),
])
def test_methods_it_cannot_serve_are_refused(family, name, words):
    model = build_model(family)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=f"{name} needs signals .*{words}"):
        ts.apply(model, ts.load(name, keep=16))
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


# -- VisionZip crop by crop, and per-crop budgets -----------------------------------------------------------

#: a NeXT-like image of 14 tokens: a 2x2 base view (0-3), then two 2x2 high-res crops side by side, each row
#: of the high-res grid ending in a newline token (8, 13)
BASE, HIGH_RES, NEWLINES = torch.arange(4).view(2, 2), torch.tensor([[4, 5, 6, 7], [9, 10, 11, 12]]), torch.tensor([[8], [13]])
CROPS = (BASE, HIGH_RES[:, :2], HIGH_RES[:, 2:])
#: head-summed [CLS] scores, each crop's own (newline tokens 0): the base view scores low everywhere, so one
#: budget over the image would take none of it
SCORES = torch.tensor([0.01, 0.04, 0.03, 0.02, 0.5, 0.1, 0.05, 0.15, 0.0, 0.2, 0.35, 0.6, 0.25, 0.0])


def next_like(keys: torch.Tensor | None = None, seed: int = 0, pieces=None) -> VisualTokens:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 14, 3, generator=generator) if keys is None else keys
    signals = {
        "cls_attention": torch.stack([SCORES * 0.25, SCORES * 0.75]),
        "vision_keys": keys,
        "vision_features": torch.randn(14, 3, generator=generator),
        "project": lambda x: x + 100.0,
    }
    blocks = pieces if pieces is not None else Pieces((BASE, HIGH_RES, NEWLINES), CROPS)
    return VisualTokens(torch.randn(14, 3, generator=generator), (1, 14), signals, blocks)


def test_visionzip_equal_shares_cap_a_small_crop_and_give_the_remainder_to_the_earlier_crops():
    assert equal_shares([16, 12, 16, 12], 320 // 5 * 4) == [16, 12, 16, 12]  # the crops hold less than their shares
    assert equal_shares([4, 4, 4], 5) == [2, 2, 1]
    assert equal_shares([4, 4, 2], 9) == [4, 3, 2]  # crop 3 holds 2 of its 3: the rest shared again, base first
    assert equal_shares([4, 4, 4], 2) == [1, 1, 0]
    assert equal_shares([64] * 5, 320) == [64] * 5  # keep=320 on five crops: the code's 64 per crop (54 + 10)
    assert ts.VisionZip(keep=320).split(64) == (54, 10)


def test_visionzip_runs_each_crop_on_its_own_cls_row_and_splits_the_budget_equally():
    """keep=5: shares 2, 2, 1 (the remainder to the base view), each crop's top by its own [CLS] row; one
    budget over the image (fastervlm) would keep none of the base view."""
    tokens = next_like()
    assert ts.VisionZip(keep=5).select(tokens).kept.tolist() == [1, 2, 4, 10, 11]
    assert ts.FasterVLM(keep=5).select(tokens).kept.tolist() == [4, 9, 10, 11, 12]
    # keep=13 > the 12 patches: every patch, then the rest to newline tokens, evenly spread (the first)
    assert ts.VisionZip(keep=13).select(tokens).kept.tolist() == [i for i in range(14) if i != 13]
    assert torch.equal(ts.VisionZip(keep=14).select(tokens).kept, torch.arange(14))


def test_visionzip_merges_each_crops_rest_into_its_own_contextual_tokens():
    """keep=6, contextual=3: 2 per crop, 1 dominant + 1 contextual each. The contextual target is the first
    of the crop's remaining patches and every other remaining patch of the crop joins it: target + mean(members)
    in vision space, then projected (+100 here); dominant tokens keep their own features."""
    tokens = next_like()
    vision, features = tokens["vision_features"], tokens.features
    selection = ts.VisionZip(keep=6, contextual=3).select(tokens)
    assert selection.kept.tolist() == [0, 1, 4, 5, 6, 11]  # dominant 1, 4, 11; targets 0, 5, 6
    expected = torch.stack([
        vision[0] + vision[[2, 3]].mean(0) + 100, features[1], features[4],
        vision[5] + vision[[9, 10]].mean(0) + 100, vision[6] + vision[[7, 12]].mean(0) + 100, features[11],
    ])
    torch.testing.assert_close(selection.features, expected)


def test_visionzip_joins_each_member_to_the_most_similar_target_of_its_own_crop_by_head_mean_key():
    """keep=9, contextual=6: 1 dominant + 2 targets per crop (the first two remaining patches, stride 1), the
    third remaining patch joins the target whose head-mean key is more cosine-similar."""
    keys = torch.zeros(2, 14, 3)
    keys[0, :, 0], keys[1, :, 1] = 1.0, 1.0  # every token (1, 1, 0)/2 by default: equally similar
    keys[:, 10] = torch.tensor([0.0, 0.0, 2.0])  # crop 2's member 10 looks like target 9 ...
    keys[:, 9] = torch.tensor([0.0, 0.1, 1.0])
    keys[:, 3] = torch.tensor([3.0, 3.0, 0.0])  # ... base's member 3 like target 0, not 2
    keys[:, 2] = torch.tensor([0.0, 0.0, 1.0])
    tokens = next_like(keys)
    vision = tokens["vision_features"]
    selection = ts.VisionZip(keep=9, contextual=6).select(tokens)
    # base: dominant 1, targets 0, 2, member 3; crop 2: dominant 4, targets 5, 9, member 10; crop 3: dominant 11,
    # targets 6, 7, member 12
    assert selection.kept.tolist() == [0, 1, 2, 4, 5, 6, 7, 9, 11]
    got = dict(zip(selection.kept.tolist(), selection.features))
    torch.testing.assert_close(got[0], vision[0] + vision[3] + 100)
    torch.testing.assert_close(got[2], vision[2] + 100)
    torch.testing.assert_close(got[9], vision[9] + vision[10] + 100)
    torch.testing.assert_close(got[5], vision[5] + 100)


def test_visionzip_per_crop_shares_the_budget_over_the_pieces_by_size():
    """per_crop=True, keep=7: pieces of 4, 8 and 2 tokens get 2, 4 and 1; the high-res piece's 4 go 2 and 2
    to its crops, the newline column's 1 to its first token."""
    selection = ts.VisionZip(keep=Budget(7, per_crop=True)).select(next_like())
    assert selection.kept.tolist() == [1, 2, 4, 8, 10, 11, 12]
    assert ts.VisionZip(keep=Budget(7, per_crop=True)).select(next_like(pieces=())).kept.tolist() == \
        ts.VisionZip(keep=7).select(next_like(pieces=())).kept.tolist()  # one view: one crop, the same


def reference_visionzip(scores, keys, vision, features, project, crops: list[list[int]], shares, contextual):
    """VisionZip crop by crop in plain Python: each crop's top ``share - contextual`` by score (ties to the lower
    index), targets at a stride of ``max(1, rest // contextual)`` over the rest, members to the most cosine-similar
    target by head-mean key, ``target + mean(members)`` projected."""
    kept, replaced = [], {}
    mean_keys = keys.mean(0)
    for crop, share, merging in zip(crops, shares, contextual):
        if share >= len(crop):
            kept += crop
            continue
        ranked = sorted(crop, key=lambda i: (-float(scores[i]), i))
        kept += ranked[: share - merging]
        rest = sorted(ranked[share - merging:])
        if not merging:
            continue
        targets = rest[:: max(1, len(rest) // merging)][:merging]
        groups = {t: [] for t in targets}
        for member in (i for i in rest if i not in targets):
            similarity = [float(F.cosine_similarity(mean_keys[member], mean_keys[t], dim=0)) for t in targets]
            groups[targets[similarity.index(max(similarity))]].append(member)
        for t, members in groups.items():
            merged = vision[t] + (vision[members].mean(0) if members else 0)
            replaced[t] = project(merged[None, None])[0, 0]
            kept.append(t)
    kept = sorted(kept)
    return kept, torch.stack([replaced.get(i, features[i]) for i in kept])


@pytest.mark.parametrize("keep, contextual", [(5, None), (7, 2), (9, 6), (11, None), (12, 3), (3, 3)])
@pytest.mark.parametrize("seed", range(3))
def test_visionzip_matches_a_plain_loop_crop_by_crop(keep, contextual, seed):
    tokens = next_like(seed=seed)
    tokens.signals[as_signal("cls_attention")] = torch.rand(2, 14, generator=torch.Generator().manual_seed(seed)) * (SCORES > 0)
    sieve = ts.VisionZip(keep=keep, contextual=contextual)
    crops = [crop.flatten().tolist() for crop in CROPS]
    shares = equal_shares([len(crop) for crop in crops], keep)
    merging = [sieve.split(s)[1] for s in shares] if contextual is None else split_budget(shares, min(contextual, keep - 1))
    kept, features = reference_visionzip(tokens["cls_attention"].sum(0), tokens["vision_keys"],
                                         tokens["vision_features"], tokens.features,
                                         tokens["project"], crops, shares, merging)
    selection = sieve.select(tokens)
    assert selection.kept.tolist() == kept
    torch.testing.assert_close(selection.features if selection.features is not None else tokens.features[selection.kept], features)


#: pre-LLM methods LLaVA-NeXT serves that do not split a budget per crop yet (each refuses per_crop=True clearly);
#: a method that learns to leaves this list, and the test below then checks its counts
REFUSES_PER_CROP = {
    "catp", "cdpruner", "dart_pre", "divprune", "fopru", "hiprune", "idpruner", "mustdrop", "random", "todre", "tome",
    "uniform", "vflowopt",
}
PER_CROP_CASES = [pytest.param(name, kwargs, id=name) for name, kwargs in METHOD_CASES
                  if "+" not in name and _stage(name, kwargs) == "pre_llm" and supported(LLAVA_NEXT, name, kwargs)]


@pytest.mark.parametrize("name, kwargs", PER_CROP_CASES)
def test_every_method_llava_next_serves_keeps_each_pieces_share_of_a_per_crop_budget(name, kwargs):
    """Budget(16, per_crop=True) on LLaVA-NeXT's pieces (a 4x4 base view, a 10x4 high-res grid, 10 newline
    tokens): 4, 10 and 2 tokens, read from the run's stats; or a clear refusal when the method is built."""
    if name in REFUSES_PER_CROP:
        with pytest.raises(ValueError, match=f"{name} cannot split its budget per crop"):
            ts.load(name, keep=Budget(16, per_crop=True), **kwargs)
        return
    model = build_model(LLAVA_NEXT)
    sieve, seen = ts.load(name, keep=Budget(16, per_crop=True), **kwargs), []
    select = sieve.select
    sieve.select = lambda tokens: (seen.append(tokens), select(tokens))[1]
    with ts.apply(model, sieve) as run:
        model(**LLAVA_NEXT.make_inputs([[5, 6, 7]]))
    pieces = seen[0].layout()
    kept = run.stats.images[0].kept
    assert [int(torch.isin(kept, piece.flatten()).sum()) for piece in pieces] == [4, 10, 2]


def test_visionzip_on_llava_next_reads_each_crops_keys_and_features_packed_like_the_features():
    """vision_keys and vision_features (asked with missing="zeros") are the tower's per crop, packed by the
    model's own function with zero rows for the newline tokens; the crops are the model's own (each crop's
    unpadded patches), and keep=20 keeps 5 in each of the four crops, no newline token."""
    model = build_model(LLAVA_NEXT)
    inputs = sized_inputs(SIZES[:1])
    recorder = Recording("visionzip", keep=20)
    with ts.apply(model, recorder.sieve) as run:
        model(**inputs)
    (tokens,) = recorder.seen
    tower = model.model.vision_tower
    crops = inputs["pixel_values"][0, : len(anyres_pixels(1, 0, SIZES[0]))]
    hidden = tower(crops, output_hidden_states=True).hidden_states
    layer = tower.encoder.layers[model.config.vision_feature_layer]
    keys = layer.self_attn.k_proj(layer.layer_norm1(hidden[model.config.vision_feature_layer - 1]))[:, 1:]
    for name, values in (("vision_features", hidden[model.config.vision_feature_layer][:, 1:]), ("vision_keys", keys)):
        expected, _ = model.model.pack_image_features([values], inputs["image_sizes"], "default", torch.zeros(values.shape[-1]))
        got = tokens[ts.Signal(name, missing="zeros")]
        if name == "vision_keys":  # (heads, N, d_head)
            got = got.transpose(0, 1).flatten(1)
        torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=1e-5)
    ids = torch.arange(len(crops) * 16, dtype=torch.float64).view(len(crops), 16, 1)
    sources, _ = model.model.pack_image_features([ids], inputs["image_sizes"], "default", torch.tensor([-1.0], dtype=torch.float64))
    sources = sources[0][:, 0]
    for index, crop in enumerate(tokens.blocks.crops):
        assert torch.equal(crop.flatten(), ((sources // 16) == index).nonzero().squeeze(1))
    kept = run.stats.images[0].kept
    assert [int(torch.isin(kept, crop.flatten()).sum()) for crop in tokens.blocks.crops] == [5, 5, 5, 5]
    assert not torch.isin(kept, tokens.layout()[2].flatten()).any()


def test_a_plain_vision_features_request_stays_refused_on_llava_next():
    adapter = adapter_for(build_model(LLAVA_NEXT))
    assert set(adapter.missing_signals(["vision_keys", "vision_features"])) == {"vision_keys", "vision_features"}
    assert adapter.missing_signals([ts.Signal("vision_keys", missing="zeros"), ts.Signal("vision_features", missing="zeros")]) == {}
    with pytest.raises(ValueError, match=r"missing=\.\.\.\) must be one of"):
        ts.Signal("vision_features", missing="nan")
