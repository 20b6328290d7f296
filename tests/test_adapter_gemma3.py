"""Gemma3 specifics: the masks rebuilt for the kept tokens (image blocks from the gathered token_type_ids), the
sliding window's semantics, signals (what it shares with Gemma 4, refused type ids among them: test_image_blocks.py).

The equivalence reference: while the prompt fits in the sliding window, the pruned prefill equals the stock model
with the dropped tokens masked out (test_contract.py, on the tiny model with a 512-token window). Beyond the
window, sliding layers count indices: they reach ``sliding_window - 1`` kept tokens back, further in the original
prompt than the stock model, so the reference is the stock model run on the kept tokens alone.
"""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS, appended, greedy
from test_signals import MEAN, ProjectionCheck, eager, probed
from tiny_gemma3 import BOI, EOI, GEMMA3, TOKENS_PER_IMAGE, gemma3_inputs, tiny_gemma3
from tokensieve.engine.compat import CACHE_ARGUMENT, output_cache

SHORT_WINDOW = 8  # shorter than an image's 64 tokens


@pytest.fixture(scope="module")
def short_window():
    return tiny_gemma3(window=SHORT_WINDOW)


def decoder_inputs(model, method, inputs):
    """The keyword inputs the decoder gets in one forward under ``method`` (None: stock), after tokensieve's hook,
    and the run's stats."""
    calls = []
    record = lambda module, args, kwargs: calls.append(dict(kwargs))  # noqa: E731
    decoder = model.model.language_model
    if method is None:
        handle = decoder.register_forward_pre_hook(record, with_kwargs=True)
        model(**inputs)
        handle.remove()
        return calls[0], None
    with ts.apply(model, method) as run:
        handle = decoder.register_forward_pre_hook(record, with_kwargs=True)
        model(**inputs)
        handle.remove()
    return calls[0], run.stats


def allowed(mask: torch.Tensor) -> torch.Tensor:
    """(batch, queries, keys) True where a 4D mask (boolean, or float with 0 where allowed) lets a query attend."""
    return (mask if mask.dtype == torch.bool else mask == 0)[:, 0]


def test_each_kept_image_attends_to_all_its_kept_tokens_and_text_stays_causal():
    """The decoder's masks for the packed sequence: the kept tokens of each image form one bidirectional block, as
    the stock model's token_type_ids make them, and text rows are causal. Stale token_type_ids (not gathered with the
    kept tokens) put the blocks elsewhere."""
    model = build_model(GEMMA3)
    inputs = gemma3_inputs([[5, 6, 7, 8]], n_images=[2])
    decoder, stats = decoder_inputs(model, ts.load("random", keep=16), inputs)
    masks = decoder["attention_mask"]
    assert set(masks) == {"full_attention", "sliding_attention"}
    width = decoder["inputs_embeds"].shape[1]
    assert width == inputs["input_ids"].shape[1] - 2 * (TOKENS_PER_IMAGE - 16)
    # packed layout: bos, (BOI, 16 kept, EOI) x 2, text
    expected = torch.ones(width, width).tril().bool()
    for start in (2, 2 + 18):
        expected[start : start + 16, start : start + 16] = True
    for name in ("full_attention", "sliding_attention"):  # the window (512) covers the prompt
        assert torch.equal(allowed(masks[name])[0], expected), name
    assert [r.after for r in stats.images] == [16, 16]





def test_a_short_sliding_window_reaches_further_back_after_pruning(short_window):
    """Window 8, prompt of 71 tokens: the pruned prefill is the stock model run on the kept tokens alone (their
    embeddings, original positions and token_type_ids), not the stock model with the dropped tokens masked out."""
    model = short_window
    inputs = gemma3_inputs(TEXTS[:1])
    stock, _ = decoder_inputs(model, None, inputs)
    pruned, stats = decoder_inputs(model, ts.load("random", keep=16), inputs)
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    image = (inputs["input_ids"][0] == GEMMA3.image_token).nonzero().squeeze(1)
    keep[image] = False
    keep[image[stats.images[0].kept]] = True
    kept_only = model.model(
        inputs_embeds=stock["inputs_embeds"][:, keep], attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
        position_ids=stock["position_ids"][:, keep] if stock["position_ids"] is not None else keep.nonzero().T,
        token_type_ids=inputs["token_type_ids"][:, keep],
    ).last_hidden_state
    again = {**pruned, CACHE_ARGUMENT: None, "use_cache": False}  # the decoder input, rerun without the filled cache
    out = model.model.language_model(**again).last_hidden_state
    torch.testing.assert_close(out, kept_only, atol=2e-5, rtol=1e-4)
    masked = model.model(
        inputs_embeds=stock["inputs_embeds"], attention_mask=inputs["attention_mask"] * keep,
        position_ids=torch.arange(len(keep))[None], token_type_ids=inputs["token_type_ids"],
    ).last_hidden_state[:, keep]
    assert not torch.allclose(out[:, -5:], masked[:, -5:], atol=1e-3), "the window should reach different tokens"


def test_a_short_sliding_window_generates_as_a_no_cache_loop(short_window):
    """The sliding layers' cache keeps the last window of kept tokens; each decode step sees what a no-cache
    forward on the pruned prompt sees."""
    model = short_window
    inputs = gemma3_inputs(TEXTS[:1])
    with ts.apply(model, ts.load("divprune", keep=16)):
        cached = greedy(model, inputs, n=6)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(6):
            step = appended(model, inputs, ids, mask)
            next_token = model(**step, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    assert torch.equal(cached, ids)


def test_a_short_sliding_window_batch_equals_each_row_alone(short_window):
    model = short_window
    batch = gemma3_inputs(TEXTS, seed=3)
    with ts.apply(model, ts.load("divprune", keep=16)):
        batch_tokens = greedy(model, batch)[:, -4:]
        for i, text in enumerate(TEXTS):
            row = gemma3_inputs([text], seed=3, image_offset=i)
            assert torch.equal(greedy(model, row)[0, -4:], batch_tokens[i])


def test_a_second_turn_with_a_new_image_continues_the_pruned_cache():
    """generate() continuing a cache passes token_type_ids from the start of the conversation; the new image's
    kept tokens form their own block, the cached ones none."""
    model = build_model(GEMMA3)
    inputs = gemma3_inputs(TEXTS[:1])
    second = gemma3_inputs([[11, 12]], image_offset=1)
    with ts.apply(model, ts.load("divprune", keep=16)) as run:
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                               suppress_tokens=[GEMMA3.image_token])
        ids = torch.cat([first.sequences, second["input_ids"]], dim=1)
        turn = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": (ids == GEMMA3.image_token).long(),
                "pixel_values": second["pixel_values"]}
        continued = model.generate(**turn, **{CACHE_ARGUMENT: output_cache(first)}, max_new_tokens=3, do_sample=False)
        both = {**turn, "pixel_values": torch.cat([inputs["pixel_values"], second["pixel_values"]])}
        fresh = model.generate(**both, max_new_tokens=3, do_sample=False)
    assert torch.equal(continued, fresh)
    assert [r.after for r in run.stats.images] == [16, 16, 16, 16]



def test_projecting_the_vision_features_gives_the_llm_tokens():
    model = build_model(GEMMA3)
    sieve = ProjectionCheck()
    with ts.apply(model, sieve):
        model.generate(**gemma3_inputs([[5, 6], [7]], n_images=[2, 1]), max_new_tokens=2, do_sample=False)
    assert [shape[-1] for shape in sieve.shapes] == [model.config.vision_config.hidden_size] * 3
    assert max(sieve.errors) < 1e-6


def test_vision_attention_is_eagers_received_attention_pooled_over_each_tokens_patches():
    inputs = gemma3_inputs([[5, 6], [7]], n_images=[2, 1])
    seen = probed(GEMMA3, inputs, MEAN[1], MEAN[-1])
    model = eager(tiny_gemma3)
    attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    for request, index in ((MEAN[1], 0), (MEAN[-1], len(attentions) - 1)):
        received = attentions[index].mean(dim=2)  # (images, heads, patches) over a 16x16 grid
        side, k = 16, 2
        pooled = received.view(*received.shape[:2], side // k, k, side // k, k).mean(dim=(3, 5)).flatten(2)
        for image, tokens in enumerate(seen):
            torch.testing.assert_close(tokens[request], pooled[image], atol=1e-6, rtol=1e-5)


def test_the_inputs_are_laid_out_as_the_processor_lays_them_out():
    inputs = gemma3_inputs([[5]], n_images=[2])
    ids = inputs["input_ids"][0].tolist()
    block = [BOI] + [GEMMA3.image_token] * TOKENS_PER_IMAGE + [EOI]
    assert ids == [1] + block * 2 + [5]
    assert torch.equal(inputs["token_type_ids"], (inputs["input_ids"] == GEMMA3.image_token).long())

