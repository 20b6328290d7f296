"""Gemma 4 specifics: the masks rebuilt for the kept tokens (image blocks in the sliding layers only, from the
gathered mm_token_type_ids), per-layer inputs packed with the kept tokens, refused inputs that would give silently
wrong logits (or that a method does not act on: videos, audio; the type ids Gemma3 shares: test_image_blocks.py), images of different sizes (different token
counts and grids), the sliding window's semantics, KV-shared layers, signals.

The equivalence reference: while the prompt fits in the sliding window, the pruned prefill equals the stock model
with the dropped tokens masked out and the stock per-layer inputs (test_contract.py, on the tiny model with a
512-token window). Beyond the window, the reference is the stock model run on the kept tokens alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.gemma4 import image_processing_pil_gemma4 as processing

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS, _assert_same, _snapshot, appended, greedy
from test_adapter_gemma3 import allowed, decoder_inputs
from test_signals import MEAN, ProjectionCheck, eager, probed
from tiny_gemma4 import (
    BOI, EOI, GEMMA4, KERNEL, PATCH, SIZE, TOKENS_PER_IMAGE, gemma4_inputs, patches, per_layer_inputs, tiny_gemma4,
)
from tokensieve.sieve import Selection, Sieve

SHORT_WINDOW = 8  # shorter than an image's 64 tokens
MIXED_SIZES = [(64, 64), (32, 64), (64, 32)]  # 8x8, 4x8 and 8x4 tokens


@pytest.fixture(scope="module")
def short_window():
    return tiny_gemma4(window=SHORT_WINDOW)


def _kept(inputs, stats) -> torch.Tensor:
    """(batch, length) True at the tokens a run kept (every text token, the kept image tokens)."""
    keep = inputs["attention_mask"].bool().clone()
    image = (inputs["input_ids"] == GEMMA4.image_token).nonzero()
    start = 0
    for record in stats.images:
        block = image[start : start + record.before]
        start += record.before
        keep[block[:, 0], block[:, 1]] = False
        keep[block[record.kept, 0], block[record.kept, 1]] = True
    return keep


def test_kept_image_tokens_attend_both_ways_in_sliding_layers_and_causally_in_full_ones():
    """The decoder's masks for the packed sequence: unlike Gemma3, only the sliding layers let an image's kept
    tokens attend to each other both ways; the full-attention layers are causal."""
    model = build_model(GEMMA4)
    inputs = gemma4_inputs([[5, 6, 7, 8]], n_images=[2])
    decoder, stats = decoder_inputs(model, ts.load("random", keep=16), inputs)
    masks = decoder["attention_mask"]
    assert set(masks) == {"full_attention", "sliding_attention"}
    width = decoder["inputs_embeds"].shape[1]
    assert width == inputs["input_ids"].shape[1] - 2 * (TOKENS_PER_IMAGE - 16)
    causal = torch.ones(width, width).tril().bool()
    blocks = causal.clone()  # packed layout: bos, (BOI, 16 kept, EOI) x 2, text
    for start in (2, 2 + 18):
        blocks[start : start + 16, start : start + 16] = True
    assert torch.equal(allowed(masks["sliding_attention"])[0], blocks)  # the window (512) covers the prompt
    assert masks["full_attention"] is None or torch.equal(allowed(masks["full_attention"])[0], causal)
    assert [r.after for r in stats.images] == [16, 16]


def test_per_layer_inputs_are_packed_with_the_kept_tokens():
    """The decoder adds each token's per-layer embedding after every layer: the packed sequence carries the kept
    tokens' own rows (text rows differ token by token), in a left-padded batch."""
    model = build_model(GEMMA4)
    inputs = gemma4_inputs(TEXTS)
    stock, _ = decoder_inputs(model, None, inputs)
    pruned, stats = decoder_inputs(model, ts.load("divprune", keep=16), inputs)
    assert torch.equal(stock["per_layer_inputs"], per_layer_inputs(model, inputs["input_ids"]))
    keep = _kept(inputs, stats)
    for row in range(len(TEXTS)):
        kept = keep[row].nonzero().squeeze(1)
        packed = pruned["per_layer_inputs"][row, -len(kept):]
        assert torch.equal(packed, stock["per_layer_inputs"][row, kept])
        assert pruned["per_layer_inputs"].shape[:2] == pruned["inputs_embeds"].shape[:2]
    text = stock["per_layer_inputs"][0, -4:]
    assert not torch.equal(text[0], text[1])




@pytest.mark.parametrize("modality", ["video", "audio"])
def test_videos_and_audio_are_refused_before_the_model_is_touched(modality):
    model = build_model(GEMMA4)
    inputs = gemma4_inputs(TEXTS[:1])
    extra = {"pixel_values_videos": inputs["pixel_values"]} if modality == "video" else {
        "input_features": torch.zeros(1, 16, 128), "input_features_mask": torch.ones(1, 16, dtype=torch.bool)}
    with ts.apply(model, ts.load("uniform", keep=16)):
        refusal = "serves videos only on Qwen2-VL" if modality == "video" else "act on images, not audio"
        with pytest.raises(ValueError, match=refusal):
            model(**inputs, **extra)


def test_images_of_different_sizes_give_their_own_token_counts_and_grids():
    """The processor keeps each image's aspect ratio: an h x w patch image gives (h/k) x (w/k) tokens in raster
    order. Each image's budget and grid come from its own patches' positions; the pruned prefill generates as a
    no-cache loop on the pruned prompt."""
    model = build_model(GEMMA4)
    inputs = gemma4_inputs([[5, 6], [7]], n_images=[2, 1], sizes=MIXED_SIZES)
    grids = []

    class RecordGrids(Sieve):
        name, paper, signals = "record-grids", "test", ()

        def select(self, tokens):
            grids.append(tokens.grid)
            return Selection(torch.arange(0, len(tokens), 2))

    with ts.apply(model, RecordGrids(keep=0.5)) as run:
        cached = greedy(model, inputs, n=4)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(4):
            step = appended(model, inputs, ids, mask)
            logits = model(**step, use_cache=False).logits[:, -1]
            logits[:, GEMMA4.image_token] = float("-inf")
            next_token = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
    side = PATCH * KERNEL
    expected = [(h // side, w // side) for h, w in MIXED_SIZES]
    assert grids[: len(MIXED_SIZES)] == expected
    assert [(r.before, r.after) for r in run.stats.images[:3]] == [(rows * cols, rows * cols // 2) for rows, cols in expected]
    assert torch.equal(cached, ids)



def test_a_short_sliding_window_reaches_further_back_after_pruning(short_window):
    """Window 8, prompt of 71 tokens: the pruned prefill is the stock model run on the kept tokens alone (their
    embeddings, per-layer inputs, original positions and mm_token_type_ids), not the stock model with the dropped
    tokens masked out."""
    model = short_window
    inputs = gemma4_inputs(TEXTS[:1])
    stock, _ = decoder_inputs(model, None, inputs)
    pruned, stats = decoder_inputs(model, ts.load("random", keep=16), inputs)
    keep = _kept(inputs, stats)[0]
    positions = torch.arange(len(keep))[None]
    kept_only = model.model(
        inputs_embeds=stock["inputs_embeds"][:, keep], attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
        position_ids=positions[:, keep], mm_token_type_ids=inputs["mm_token_type_ids"][:, keep],
        per_layer_inputs=stock["per_layer_inputs"][:, keep],
    ).last_hidden_state
    again = {**pruned, "cache": None, "use_cache": False}  # the decoder input, rerun without the filled cache
    out = model.model.language_model(**again).last_hidden_state
    torch.testing.assert_close(out, kept_only, atol=2e-5, rtol=1e-4)
    masked = model.model(
        inputs_embeds=stock["inputs_embeds"], attention_mask=inputs["attention_mask"] * keep, position_ids=positions,
        mm_token_type_ids=inputs["mm_token_type_ids"], per_layer_inputs=stock["per_layer_inputs"],
    ).last_hidden_state[:, keep]
    assert not torch.allclose(out[:, -5:], masked[:, -5:], atol=1e-3), "the window should reach different tokens"


@pytest.mark.parametrize("shared_layers", [0, 2])
def test_a_short_sliding_window_generates_as_a_no_cache_loop(shared_layers):
    """The sliding layers' cache keeps the last window of kept tokens, and KV-shared layers read what their producer
    holds: each decode step sees what a no-cache forward on the pruned prompt sees."""
    model = tiny_gemma4(window=SHORT_WINDOW, shared_layers=shared_layers)
    inputs = gemma4_inputs(TEXTS)
    with ts.apply(model, ts.load("divprune", keep=16)):
        cached = greedy(model, inputs, n=6)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(6):
            step = appended(model, inputs, ids, mask)
            logits = model(**step, use_cache=False).logits[:, -1]
            logits[:, GEMMA4.image_token] = float("-inf")
            next_token = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
    assert torch.equal(cached, ids)



def test_projecting_the_vision_features_gives_the_llm_tokens():
    model = build_model(GEMMA4)
    sieve = ProjectionCheck()
    with ts.apply(model, sieve):
        model.generate(**gemma4_inputs([[5, 6], [7]], n_images=[2, 1], sizes=MIXED_SIZES), max_new_tokens=2, do_sample=False)
    width = model.config.vision_config.hidden_size
    assert sieve.shapes == [(64, width), (32, width), (32, width)]
    assert max(sieve.errors) < 1e-5


def test_vision_attention_is_eagers_received_attention_pooled_over_each_tokens_patches():
    """Over each image's real patches (padding excluded), from queries and keys after the tower's norms and 2D
    rotary embedding, with the tower's scale of 1; images of different sizes."""
    inputs = gemma4_inputs([[5, 6], [7]], n_images=[2, 1], sizes=MIXED_SIZES)
    seen = probed(GEMMA4, inputs, MEAN[1], MEAN[-1])
    model = eager(tiny_gemma4)
    attentions = model.model.vision_tower(inputs["pixel_values"], inputs["image_position_ids"], output_attentions=True).attentions
    for request, index in ((MEAN[1], 0), (MEAN[-1], len(attentions) - 1)):
        for image, ((h, w), tokens) in enumerate(zip(MIXED_SIZES, seen)):
            rows, cols = h // PATCH, w // PATCH
            real = rows * cols
            received = attentions[index][image, :, :real, :real].mean(dim=1)  # (heads, patches), raster order
            pooled = received.view(-1, rows // KERNEL, KERNEL, cols // KERNEL, KERNEL).mean(dim=(2, 4)).flatten(1)
            torch.testing.assert_close(tokens[request], pooled, atol=1e-6, rtol=1e-5)


def test_the_inputs_are_laid_out_as_the_processor_lays_them_out():
    inputs = gemma4_inputs([[5]], n_images=[2], sizes=[(64, 64), (32, 64)])
    ids = inputs["input_ids"][0].tolist()
    assert ids == [1] + [BOI] + [GEMMA4.image_token] * 64 + [EOI] + [BOI] + [GEMMA4.image_token] * 32 + [EOI] + [5]
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == GEMMA4.image_token).long())
    image = torch.rand(3, 32, SIZE)
    flat, where = patches(image)
    expected = processing.convert_image_to_patches(image.numpy(), PATCH)
    grid_x, grid_y = np.meshgrid(np.arange(SIZE // PATCH), np.arange(32 // PATCH), indexing="xy")
    padded, positions = processing.pad_along_first_dim(expected, np.stack([grid_x, grid_y], -1).reshape(-1, 2), 256)
    assert np.array_equal(flat.numpy(), expected) and np.array_equal(where.numpy(), positions[: len(flat)])
    assert (positions[len(flat):] == -1).all()




@pytest.mark.parametrize("variant", [
    dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),  # the 26B-A4B's MoE blocks
    dict(use_bidirectional_attention=None),  # image tokens causal, as text: no blocks to rebuild
    dict(hidden_size_per_layer_input=0, num_kv_shared_layers=0),  # the large models: no per-layer inputs, no sharing
], ids=["moe", "causal-images", "no-per-layer-inputs"])
def test_the_config_variants_prefill_as_the_stock_model_with_the_dropped_tokens_masked(variant):
    model = tiny_gemma4(**variant)
    inputs = gemma4_inputs(TEXTS)
    stock, _ = decoder_inputs(model, None, inputs)
    pruned, stats = decoder_inputs(model, ts.load("divprune", keep=16), inputs)
    keep = _kept(inputs, stats)
    again = {**pruned, "cache": None, "use_cache": False}  # the decoder input, rerun without the filled cache
    out = model.model.language_model(**again).last_hidden_state
    masked = model.model(
        inputs_embeds=stock["inputs_embeds"], attention_mask=inputs["attention_mask"] * keep,
        position_ids=stock["position_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        per_layer_inputs=stock.get("per_layer_inputs"),
    ).last_hidden_state
    for row in range(len(TEXTS)):
        kept = keep[row].nonzero().squeeze(1)
        torch.testing.assert_close(out[row, -len(kept):], masked[row, kept], atol=2e-5, rtol=1e-4)


def test_pixel_values_and_patch_positions_of_other_images_are_refused():
    """One image's pixels with two images' patch positions: the stock tower broadcasts them into two images (the
    first one's pixels at two sets of positions) and runs, silently."""
    model = build_model(GEMMA4)
    one, two = gemma4_inputs(TEXTS[:1]), gemma4_inputs(TEXTS)
    mixed = {**two, "pixel_values": one["pixel_values"]}
    assert model(**mixed).logits.shape == model(**two).logits.shape
    before = _snapshot(model)
    with ts.apply(model, ts.load("uniform", keep=16)):
        with pytest.raises(ValueError, match="must hold the same images and patches"):
            model(**mixed)
    _assert_same(model, before)
