"""``ts.apply(model, method, positions="repack")``: the tokens kept before the LLM are renumbered without gaps, as
vLLM numbers them (docs/vllm.md); the default keeps original positions (every other test)."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from families import FAMILIES
from tiny_models import LLAVA
from tiny_qwen2_vl import QWEN2_VL
from tokensieve.adapters import adapter_for
from tokensieve.engine.compat import CACHE_ARGUMENT, output_cache

TEXTS = [[5, 6, 7, 8], [9, 10]]
ONE_D_ROPE = [family for family in FAMILIES if not family.name.startswith("qwen")]
#: families whose decoder alone, fed embeddings and positions, is the reference (Gemma3's also needs its image blocks)
PLAIN_DECODER = [family for family in ONE_D_ROPE if family.masked_reference is None]


def _decoder_input(model, inputs) -> torch.Tensor:
    """The stock decoder's inputs_embeds for ``inputs`` (no method applied)."""
    seen = {}
    hook = adapter_for(model).decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        model(**inputs)
    finally:
        hook.remove()
    return seen["embeds"]


def _decoder_output(model, inputs, method) -> tuple[torch.Tensor, list]:
    """The decoder's last hidden states under ``method`` with repacked positions, and the run's image records."""
    seen = {}
    hook = adapter_for(model).decoder.register_forward_hook(lambda module, args, output: seen.update(hidden=output[0]))
    try:
        with ts.apply(model, method, positions="repack") as run:
            model(**inputs)
    finally:
        hook.remove()
    return seen["hidden"], run.stats.images


def _kept_columns(input_ids: torch.Tensor, image_token: int, records) -> torch.Tensor:
    """The columns of one unpadded row the method kept: every text token and each image's kept tokens."""
    keep = torch.ones(input_ids.shape[-1], dtype=torch.bool)
    placeholders = (input_ids[0] == image_token).nonzero().squeeze(1)
    start = 0
    for record in records:
        block = placeholders[start:start + record.before]
        keep[block] = False
        keep[block[record.kept]] = True
        start += record.before
    return keep.nonzero().squeeze(1)


@pytest.mark.parametrize("family", PLAIN_DECODER, ids=lambda f: f.name)
@pytest.mark.parametrize("name", ["divprune", "uniform", "random"])
def test_repack_equals_the_stock_decoder_fed_only_the_kept_tokens_at_contiguous_positions(family, name):
    """Each row of a left-padded batch (positions counted from its first real token) gives, at every kept token, the
    hidden state of the stock decoder fed that row's kept tokens alone at positions 0, 1, 2, ..."""
    model = build_model(family)
    batch = family.make_inputs(TEXTS, seed=4)
    batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    pruned, records = _decoder_output(model, batch, ts.load(name, keep=12))
    decoder = adapter_for(model).decoder
    for row, text in enumerate(TEXTS):
        alone = family.make_inputs([text], seed=4, image_offset=row)
        row_records = [record for record in records if record.row == row]
        columns = _kept_columns(alone["input_ids"], family.image_token, row_records)
        embeds = _decoder_input(model, alone)[:, columns]
        expected = decoder(inputs_embeds=embeds, position_ids=torch.arange(len(columns))[None]).last_hidden_state[0]
        real = batch["attention_mask"][row].bool()
        got = pruned[row, -len(columns):]
        assert int(real.sum()) - sum(r.before - r.after for r in row_records) == len(columns)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ONE_D_ROPE, ids=lambda f: f.name)
def test_keep_all_with_repack_is_the_stock_model(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS, seed=5)
    stock = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with ts.apply(model, ts.DivPrune(keep=1.0), positions="repack"):
        kept_all = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(stock, kept_all)


def test_repack_moves_the_text_after_the_image():
    """Renumbering changes what the decoder computes (the text after the image moves left by what was dropped)."""
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS[:1], seed=6)
    logits = {}
    for positions in ("original", "repack"):
        with ts.apply(model, ts.DivPrune(keep=8), positions=positions):
            logits[positions] = model(**inputs).logits[0, -1]
    assert not torch.allclose(logits["original"], logits["repack"])


@pytest.mark.parametrize("family", ONE_D_ROPE, ids=lambda f: f.name)
def test_repack_keeps_cache_batch_and_turns_consistent(family):
    """generate() with a cache equals a no-cache loop, a padded batch equals its rows alone, and a second turn on the
    pruned cache equals a fresh prefill of the whole conversation."""
    model = build_model(family)
    method = ts.DivPrune(keep=12)
    batch = family.make_inputs(TEXTS, seed=3)
    with ts.apply(model, method, positions="repack"):
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for _ in range(4):
            step = {**batch, "input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
            next_token = model(**step, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
        assert torch.equal(cached, ids)
        for row, text in enumerate(TEXTS):
            alone = model.generate(**family.make_inputs([text], seed=3, image_offset=row), max_new_tokens=4,
                                   do_sample=False, pad_token_id=0)
            assert torch.equal(cached[row, -4:], alone[0, -4:])
        inputs = family.make_inputs(TEXTS)
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        ids = torch.cat([first.sequences, torch.tensor([[11, 12, 13]] * len(TEXTS))], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(TEXTS), 6, dtype=torch.long)], dim=1)
        continued = model.generate(input_ids=ids, attention_mask=mask, **{CACHE_ARGUMENT: output_cache(first)},
                                   max_new_tokens=3, do_sample=False, pad_token_id=0)
        fresh = model.generate(**{**inputs, "input_ids": ids, "attention_mask": mask}, max_new_tokens=3, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(continued, fresh)


@pytest.mark.parametrize(("family", "method", "kwargs", "message"), [
    (LLAVA, ts.DivPrune(keep=8), {"positions": "compact"}, "choose 'original'"),
    (LLAVA, ts.FastV(layer=1, keep=8), {"positions": "repack"}, "ts.PyramidDrop(positions='repack')"),
    (LLAVA, ts.ToMe(keep=8), {"positions": "repack", "ppe": 2}, "pass one of them"),
    (QWEN2_VL, ts.DivPrune(keep=8), {"positions": "repack"}, "mrope"),
], ids=["unknown", "in-llm", "ppe", "mrope"])
def test_repack_refusals_leave_the_model_untouched(family, method, kwargs, message):
    model = build_model(family)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ts.apply(model, method, **kwargs)
    with ts.apply(model, ts.DivPrune(keep=8)):  # nothing was left hooked
        pass
