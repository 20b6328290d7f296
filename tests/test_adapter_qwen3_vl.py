"""Qwen3-VL (DeepStack), Qwen3-VL-MoE and Qwen3.5 (hybrid linear attention) specifics.

What they share with Qwen2-VL (bad mm_token_type_ids refused, 3D positions kept, project(vision_features),
hand-written decode loops) runs in test_adapter_qwen2_vl.py; the shared contract in test_contract.py. Here: the
DeepStack rows follow the kept tokens (and merge maps), the positions/mask the decoder gets cannot be read as
packed sequences, the merger's token-to-patch map, in-LLM stages around the DeepStack layers, Qwen3.5's
reference (the LM on the kept tokens alone, since a masked token still advances a linear layer's state), and videos,
whose frames the prompt separates by timestamp text (the contract runs on them as ``qwen3_vl_video`` and
``qwen3_5_video``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import tokensieve as ts
from conftest import build_model
import test_contract as contract  # its tests run here on more models (imported by name, pytest would collect them)
from test_contract import TEXTS, _assert_same, _snapshot, greedy
from test_in_llm import _assert_kept_rows_equal, _masked_stock_hidden, _pruned_hidden
from tiny_models import Family
from tiny_models import IMAGE_TOKEN
from tiny_qwen2_vl import FRAME_GRID, TOKENS_PER_FRAME, TOKENS_PER_IMAGE, TOKENS_PER_VIDEO, VIDEO_TOKEN, VISION_END, \
    VISION_START, flattened_patches, qwen2_vl_inputs
from tiny_qwen3_vl import (
    QWEN3_5, QWEN3_5_VIDEO, QWEN3_VL, QWEN3_VL_VIDEO, qwen3_vl_video_inputs, tiny_qwen3_vl, tiny_qwen3_vl_moe,
)
from tokensieve.adapters import adapter_for
from tokensieve.engine.compat import CACHE_ARGUMENT

#: three DeepStack sets, added after decoder layers 0, 1 and 2 of four
DEEP = Family("qwen3_vl_deepstack3", partial(tiny_qwen3_vl, deepstack=(0, 1, 2)), qwen2_vl_inputs, TOKENS_PER_IMAGE)
MOE = Family("qwen3_vl_moe", tiny_qwen3_vl_moe, qwen2_vl_inputs, TOKENS_PER_IMAGE)


@dataclass
class _Scattered(ts.Sieve):
    """Keeps tokens 3, 8, 13, ... (not the first ones, so a copy of the first rows shows), or with ``merge`` merges
    every token into the kept one at or before it."""

    name, paper = "scattered", "test"
    stage = "pre_llm"
    merge: bool = False

    def select(self, tokens):
        n = len(tokens)
        kept = torch.arange(3, n, 5)
        if not self.merge:
            return ts.Selection(kept)
        assignment = ((torch.arange(n) - 3).clamp(min=0) // 5).clamp(max=len(kept) - 1)
        return ts.Selection(kept, assignment=assignment, weights=torch.linspace(0.5, 2.0, n))


def _decoder_calls(model, inputs, method=None):
    """The decoder's keyword inputs of one forward (after tokensieve's hook when ``method`` is given), and the run."""
    calls, run = [], None
    decoder = adapter_for(model).decoder
    if method is not None:
        run = ts.attach(model, method)
    handle = decoder.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
        if run is not None:
            run.remove()
    return calls[0], run


def _kept_slots(inputs, records, token=IMAGE_TOKEN):
    """(batch, length) True at every real token the records keep (text and the kept tokens of ``token``)."""
    keep = inputs["attention_mask"].bool().clone()
    placed = (inputs["input_ids"] == token).nonzero()
    start = 0
    for record in records:
        block = placed[start : start + record.before]
        start += record.before
        keep[block[:, 0], block[:, 1]] = False
        keep[block[record.kept, 0], block[record.kept, 1]] = True
    return keep


def _expected_deepstack(stock, records, merge):
    """Per level, the stock DeepStack rows of the kept image tokens, in batch-row order: their own, or their group's
    weighted mean under the records' merge map."""
    levels, start = [], 0
    rows = []
    for record in records:
        image = slice(start, start + record.before)
        start += record.before
        stage = record.stages[-1]
        per_level = []
        for level in stock["deepstack_visual_embeds"]:
            values = level[image]
            if merge:
                selection = ts.Selection(stage.kept, assignment=stage.assignment, weights=stage.weights)
                per_level.append(selection.group_means(values))
            else:
                per_level.append(values[stage.kept])
        rows.append(per_level)
    for j in range(len(stock["deepstack_visual_embeds"])):
        levels.append(torch.cat([image_rows[j] for image_rows in rows]))
    return levels


@pytest.mark.parametrize("merge", [False, True], ids=["pruned", "merged"])
def test_deepstack_rows_follow_the_kept_tokens_and_their_merge_map(merge):
    model = build_model(DEEP)
    inputs = DEEP.make_inputs(TEXTS, n_images=[2, 1])
    stock, _ = _decoder_calls(model, inputs)
    pruned, run = _decoder_calls(model, inputs, _Scattered(keep=13, merge=merge))
    records = run.stats.images
    assert len(pruned["deepstack_visual_embeds"]) == 3
    # where they go: exactly the packed slots of the kept image tokens (each row's kept tokens packed to the right)
    keep = _kept_slots(inputs, records)
    for row in range(len(keep)):
        kept = keep[row].nonzero().squeeze(1)
        at = pruned["visual_pos_masks"][row]
        assert not at[: len(at) - len(kept)].any()
        assert torch.equal(at[-len(kept) :], stock["visual_pos_masks"][row, kept])
    for got, expected in zip(pruned["deepstack_visual_embeds"], _expected_deepstack(stock, records, merge)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_a_method_that_writes_its_own_features_leaves_kept_tokens_their_own_deepstack_rows():
    model = build_model(DEEP)
    inputs = DEEP.make_inputs(TEXTS)
    stock, _ = _decoder_calls(model, inputs)
    pruned, run = _decoder_calls(model, inputs, ts.load("pool", keep=16))
    for got, expected in zip(pruned["deepstack_visual_embeds"], _expected_deepstack(stock, run.stats.images, merge=False)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("family", [DEEP, MOE], ids=lambda f: f.name)
@pytest.mark.parametrize("name", ["uniform", "divprune", "tome"])
def test_every_deepstack_level_prunes_as_the_masked_stock_model(family, name):
    """With rows taken from the wrong tokens (the first ones, say) this differs by ~0.5, silently."""
    contract.test_prefill_equals_the_stock_decoder_with_dropped_tokens_masked(family, name, {})


@pytest.mark.parametrize("family", [DEEP, MOE], ids=lambda f: f.name)
def test_moe_and_three_deepstack_levels_keep_all_and_cache(family):
    contract.test_keep_all_is_the_stock_model_bit_for_bit(family, "uniform", {}, 1.0)
    contract.test_generate_with_cache_equals_a_no_cache_loop(family, "uniform", {})


def _text_and_mrope_positions(model, inputs):
    """The 4-row positions generate() builds: the text row, then mrope's t, h, w."""
    mrope, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                          attention_mask=inputs["attention_mask"])
    text = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return torch.cat([text[None], mrope])


@pytest.mark.parametrize("family", [QWEN3_VL, QWEN3_5], ids=lambda f: f.name)
def test_a_no_cache_forward_without_a_mask_is_not_read_as_packed_sequences(family):
    """4-row positions whose text row has gaps (the kept tokens'), no attention_mask and use_cache=False: transformers
    would split the sequence at every gap into separately attending pieces. The engine always passes a 2D mask."""
    model = build_model(family)
    inputs = family.make_inputs(TEXTS[:1])
    positions = _text_and_mrope_positions(model, inputs)
    no_mask = {k: v for k, v in inputs.items() if k != "attention_mask"}
    seen = []
    with ts.apply(model, ts.load("uniform", keep=16)):
        hook = adapter_for(model).decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"]),
                                                                      with_kwargs=True)
        try:
            bare = model(**no_mask, position_ids=positions, use_cache=False).logits
            masked = model(**inputs, position_ids=positions, use_cache=False).logits
        finally:
            hook.remove()
    assert seen[0] is not None and seen[0].ndim == 2
    torch.testing.assert_close(bare, masked, atol=1e-6, rtol=1e-5)
    # and both are the engine's usual prefill (3-row positions the model builds itself)
    with ts.apply(model, ts.load("uniform", keep=16)):
        usual = model(**inputs).logits
    torch.testing.assert_close(bare[:, -1], usual[:, -1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", [QWEN3_VL, QWEN3_5], ids=lambda f: f.name)
def test_llm_token_i_comes_from_the_towers_patch_rows_4i_to_4i_plus_3(family):
    """vision_features row i is the tower's patch rows 4i..4i+3 concatenated, and the merger maps it to LLM token i;
    the patch rows of token i are the 2x2 block at its place on the grid (the processor's order)."""
    model = build_model(family)
    tower = adapter_for(model).vision_tower
    inputs = family.make_inputs(TEXTS[:1])
    patches = []
    handle = tower.blocks[-1].register_forward_hook(lambda m, a, out: patches.append(out))
    seen = []

    class Probe(ts.Sieve):
        name, paper, signals = "probe", "test", ("vision_features", "project")

        def select(self, tokens):
            seen.append((tokens["vision_features"], tokens["project"](tokens["vision_features"]), tokens.features, tokens.grid))
            return ts.Selection(torch.arange(len(tokens)))

    try:
        with ts.apply(model, Probe(keep=64)):
            model(**inputs)
    finally:
        handle.remove()
    features, projected, tokens, grid = seen[0]
    rows = patches[0]
    assert grid == (8, 8)
    for i in (0, 1, 8, 37, 63):
        assert torch.equal(features[i], rows[4 * i : 4 * i + 4].flatten())
    torch.testing.assert_close(projected, tokens, atol=1e-6, rtol=1e-5)


def test_the_processor_puts_the_2x2_block_of_token_i_in_patch_rows_4i_to_4i_plus_3():
    """Qwen3-VL uses Qwen2-VL's image processor: token i = (r, c) of the 8x8 grid has patches (2r + dy, 2c + dx)."""
    image = torch.rand(3, 64, 64)
    processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, do_resize=False,
                                         do_rescale=False, do_normalize=False)
    out = processor(images=[image.numpy()], return_tensors="pt", input_data_format="channels_first")
    assert out["image_grid_thw"].tolist() == [[1, 16, 16]]
    rows = out["pixel_values"].view(256, 3, 2, 4, 4)  # C, temporal copy, y, x
    for i in (0, 1, 8, 37, 63):
        r, c = divmod(i, 8)
        for offset, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            y, x = 4 * (2 * r + dy), 4 * (2 * c + dx)
            torch.testing.assert_close(rows[4 * i + offset, :, 0], image[:, y : y + 4, x : x + 4])
    assert torch.equal(out["pixel_values"].float(), flattened_patches(image))  # the tests' own inputs match it


def test_in_llm_stages_before_the_last_deepstack_layer_are_refused_before_touching_the_model():
    model = build_model(DEEP)
    before = _snapshot(model)
    for layer in (1, 2):
        with pytest.raises(ValueError, match=f"fastv prunes before decoder layer {layer}, but Qwen3-VL adds its DeepStack "
                                             f"features .* after decoder layers 0 to 2 .* pass layer=3"):
            ts.apply(model, ts.FastV(layer=layer, keep=16))
    with pytest.raises(ValueError, match="pyramiddrop prunes before decoder layer 1"):
        ts.apply(model, ts.Chain(ts.load("uniform", keep=32), ts.PyramidDrop(keep=16)))
    _assert_same(model, before)


def test_an_in_llm_stage_after_the_last_deepstack_layer_equals_the_stock_model_masked_from_there():
    model = build_model(DEEP)
    inputs = DEEP.make_inputs(TEXTS)
    pruned, records = _pruned_hidden(model, inputs, ts.Chain(ts.load("uniform", keep=32), ts.FastV(layer=3, keep=16)))
    stock, final, real = _masked_stock_hidden(model, inputs, records, DEEP)
    _assert_kept_rows_equal(pruned, stock, final, real)
    contract.test_generate_with_cache_equals_a_no_cache_loop(DEEP, "uniform+fastv", {"layer": 3})


def test_qwen3_5_in_llm_methods_are_refused():
    model = build_model(QWEN3_5)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="fastv prunes inside the LLM, which Qwen3_5ForConditionalGeneration cannot serve: Qwen3.5's linear-attention layers"):
        ts.apply(model, ts.FastV(layer=3, keep=16))
    _assert_same(model, before)


def test_qwen3_5_pruning_equals_the_lm_on_the_kept_tokens_not_the_masked_sequence():
    """The reference the contract checks Qwen3.5 against (Family.reference == "gathered"), and why: masking the dropped
    tokens leaves them in the linear layers' recurrence, so every token after the first dropped one differs."""
    model = build_model(QWEN3_5)
    decoder = adapter_for(model).decoder
    inputs = QWEN3_5.make_inputs(TEXTS[:1])
    stock, _ = _decoder_calls(model, inputs)
    pruned, run = _decoder_calls(model, inputs, _Scattered(keep=13))
    keep = _kept_slots(inputs, run.stats.images)[0]
    with torch.no_grad():
        got = decoder(**{**pruned, CACHE_ARGUMENT: None, "use_cache": False}).last_hidden_state[0]
        kept = keep.nonzero().squeeze(1)
        alone = decoder(inputs_embeds=stock["inputs_embeds"][:, kept], position_ids=stock["position_ids"][..., kept],
                        attention_mask=torch.ones(1, len(kept), dtype=torch.long)).last_hidden_state[0]
        masked = decoder(inputs_embeds=stock["inputs_embeds"], position_ids=stock["position_ids"],
                         attention_mask=keep[None].long()).last_hidden_state[0, kept]
    torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-4)
    first_dropped = int((~keep[kept[0]:]).nonzero()[0]) + int(kept[0])
    after = kept > first_dropped
    assert (got[after] - masked[after]).abs().max() > 1e-3
    torch.testing.assert_close(got[~after], masked[~after], atol=2e-5, rtol=1e-4)


DEEP_VIDEO = Family("qwen3_vl_deepstack3_video", DEEP.build, qwen3_vl_video_inputs, TOKENS_PER_VIDEO, VIDEO_TOKEN,
                    videos=True)
FRAMES_T = TOKENS_PER_VIDEO // TOKENS_PER_FRAME  # temporal patches of the tiny video


def _image_and_video(texts) -> dict:
    """Each row ``1, image, video (timestamps between its frames), text``, as the processor lays out a prompt with an
    image and then a video."""
    images, videos = qwen2_vl_inputs([[]] * len(texts)), qwen3_vl_video_inputs([[]] * len(texts))
    rows = []
    for row, text in enumerate(texts):
        image_ids = images["input_ids"][row][images["attention_mask"][row].bool()].tolist()
        video_ids = videos["input_ids"][row][videos["attention_mask"][row].bool()].tolist()[1:]  # one leading 1
        rows.append(image_ids + video_ids + text)
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    types = torch.where(input_ids == VIDEO_TOKEN, 2, (input_ids == IMAGE_TOKEN).int())
    return {**images, **videos, "input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": types}


class _Records(ts.Sieve):
    """Keeps every token and records what it was given."""

    name, paper = "records", "test"
    stage = "pre_llm"
    seen: list

    def select(self, tokens):
        self.seen.append(tokens)
        return ts.Selection.every(tokens)


@pytest.mark.parametrize("family", [QWEN3_VL_VIDEO, QWEN3_5_VIDEO], ids=lambda f: f.name)
def test_a_video_is_one_slot_of_its_frames_tokens_without_the_timestamps_between_them(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS[:1])
    ids = inputs["input_ids"][0]
    # the layout mirrored from Qwen3VLProcessor.replace_video_token: text before every frame, then start, pads, end
    starts, ends = (ids == VISION_START).nonzero().squeeze(1), (ids == VISION_END).nonzero().squeeze(1)
    assert len(starts) == len(ends) == FRAMES_T and bool((starts[1:] - ends[:-1] > 1).all())
    sieve = _Records(keep=1.0)
    sieve.seen = []
    with ts.apply(model, sieve) as run:
        model(**inputs)
    (tokens,) = sieve.seen
    t, h, w = tokens.frames
    assert (t, h, w) == (FRAMES_T, FRAME_GRID // 2, FRAME_GRID // 2) and tokens.grid == (1, t * h * w)
    assert [block.tolist() for block in tokens.layout()] == torch.arange(t * h * w).view(t, h, w).tolist()
    assert tokens.timestamps is None  # the seconds reach the model only as the prompt's text
    (record,) = run.stats.images
    assert (record.before, record.frames, record.timestamps) == (TOKENS_PER_VIDEO, (t, h, w), None)


@pytest.mark.parametrize("family", [QWEN3_VL, QWEN3_5], ids=lambda f: f.name)
def test_an_image_and_a_video_in_one_prompt_keep_all_is_the_stock_model(family):
    model = build_model(family)
    inputs = _image_and_video(TEXTS)
    stock_logits, stock_tokens = model(**inputs).logits, greedy(model, inputs)
    with ts.apply(model, ts.load("divprune", keep=1.0)) as run:
        assert torch.equal(model(**inputs).logits, stock_logits)
        assert torch.equal(greedy(model, inputs), stock_tokens)
    kinds = [(r.row, r.before, r.frames) for r in run.stats.images[:4]]
    assert kinds == [(0, TOKENS_PER_IMAGE, None), (1, TOKENS_PER_IMAGE, None),
                     (0, TOKENS_PER_VIDEO, (FRAMES_T, 4, 4)), (1, TOKENS_PER_VIDEO, (FRAMES_T, 4, 4))]


@pytest.mark.parametrize("family", [QWEN3_VL_VIDEO, QWEN3_5_VIDEO], ids=lambda f: f.name)
def test_kept_video_tokens_keep_their_features_and_the_positions_get_rope_index_gives_the_unpruned_video(family):
    """Token i of a video's slot is its i-th video_pad token, frame after frame (the timestamp, start and end tokens
    between frames are text, and stay), and keeps the mrope position the model's own get_rope_index gives it."""
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    own, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        video_grid_thw=inputs["video_grid_thw"], attention_mask=inputs["attention_mask"])
    stock, _ = _decoder_calls(model, inputs)
    pruned, run = _decoder_calls(model, inputs, _Scattered(keep=13))
    assert [record.after for record in run.stats.images] == [13, 13]
    keep = _kept_slots(inputs, run.stats.images, VIDEO_TOKEN)  # each record's kept indices among the video_pad tokens
    for row in range(keep.shape[0]):
        kept = keep[row].nonzero().squeeze(1)
        assert torch.equal(pruned["position_ids"][-3:, row, -len(kept):], own[:, row, kept])
        assert torch.equal(pruned["inputs_embeds"][row, -len(kept):], stock["inputs_embeds"][row, kept])


@pytest.mark.parametrize("merge", [False, True], ids=["pruned", "merged"])
def test_deepstack_rows_follow_the_kept_video_tokens(merge):
    model = build_model(DEEP_VIDEO)
    inputs = DEEP_VIDEO.make_inputs(TEXTS)
    stock, _ = _decoder_calls(model, inputs)
    pruned, run = _decoder_calls(model, inputs, _Scattered(keep=13, merge=merge))
    records = run.stats.images
    keep = _kept_slots(inputs, records, VIDEO_TOKEN)
    for row in range(len(keep)):
        kept = keep[row].nonzero().squeeze(1)
        at = pruned["visual_pos_masks"][row]
        assert not at[: len(at) - len(kept)].any()
        assert torch.equal(at[-len(kept) :], stock["visual_pos_masks"][row, kept])
    for got, expected in zip(pruned["deepstack_visual_embeds"], _expected_deepstack(stock, records, merge)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_a_frames_stage_spreads_every_deepstack_level_over_the_full_video():
    """The tower runs on the kept frames only; each DeepStack set is given back the full video's length (zeros at the
    dropped frames), or the model's split by video_grid_thw fails."""
    contract.test_prefill_equals_the_stock_decoder_with_dropped_tokens_masked(DEEP_VIDEO, "uniform_frames", {})
