"""In-LLM pruning (stage ``in_llm``) and chains: what layers K.. compute, the attention signal, errors.

The shared contract (test_contract.py) covers cache, batching, turns and restoring for these too.
"""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model, family_method_params, method_for, pre_llm_sieve
from families import FAMILIES
from tiny_models import LLAVA
from tiny_qwen2_vl import QWEN2_VL
from tokensieve.adapters import adapter_for
from tokensieve.flops import decoder_prefill_flops

IN_LLM = family_method_params(stages=("in_llm", "chain"))
TEXTS = [[5, 6, 7, 8], [9, 10]]


def _image_blocks(inputs, family, records):
    """(row, positions) of each image record's tokens in the decoder input."""
    placed = (inputs["input_ids"] == family.image_token).nonzero()
    blocks, start = [], 0
    for record in records:
        block = placed[start : start + record.before]
        start += record.before
        blocks.append((int(block[0, 0]), block[:, 1]))
    return blocks


def _dropped(shape, blocks, kept_per_image):
    dropped = torch.zeros(shape, dtype=torch.bool)
    for (row, positions), kept in zip(blocks, kept_per_image):
        dropped[row, positions] = True
        dropped[row, positions[kept]] = False
    return dropped


@pytest.mark.parametrize("family, name, kwargs", IN_LLM)
def test_layers_from_k_equal_the_stock_model_with_the_dropped_keys_masked_there(family, name, kwargs):
    """Each kept token's final hidden state equals the stock decoder's when layers < K mask the keys the
    pre-LLM stage dropped and layers >= K also mask those the in-LLM stage dropped (left-padded batch)."""
    model = build_model(family)
    decoder = adapter_for(model).decoder
    inputs = family.make_inputs(TEXTS)
    method = method_for(name, kwargs)
    inside = method.inside if isinstance(method, ts.Chain) else method
    outputs = []
    capture = decoder.register_forward_hook(lambda m, a, out: outputs.append(out.last_hidden_state))
    try:
        with ts.apply(model, method) as run:
            model(**inputs)
        pruned = outputs[-1]
        pre = pre_llm_sieve(method)
        pre_kept = None
        if pre is not None:
            with ts.apply(model, pre) as pre_run:
                model(**inputs)
            pre_kept = [r.kept for r in pre_run.stats.images]
        blocks = _image_blocks(inputs, family, run.stats.images)
        shape = inputs["input_ids"].shape
        final = _dropped(shape, blocks, [r.kept for r in run.stats.images])
        early = _dropped(shape, blocks, pre_kept) if pre_kept else torch.zeros(shape, dtype=torch.bool)
        real = inputs["attention_mask"].bool()
        causal = torch.ones(shape[1], shape[1], dtype=torch.bool).tril()

        def masked(dropped):
            allowed = causal & real[:, None, :] & ~dropped[:, None, :]
            return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]

        def set_mask(index):
            dropped = final if index >= inside.layer else early
            return lambda m, args, kw: (args, {**kw, "attention_mask": masked(dropped)})

        hooks = [layer.register_forward_pre_hook(set_mask(i), with_kwargs=True) for i, layer in enumerate(decoder.layers)]
        try:
            model(**inputs)
        finally:
            for hook in hooks:
                hook.remove()
    finally:
        capture.remove()
    stock = outputs[-1]
    for row in range(shape[0]):
        kept = (~final[row]).nonzero().squeeze(1)
        compared = real[row, kept]
        torch.testing.assert_close(pruned[row, -len(kept) :][compared], stock[row, kept][compared], atol=2e-5, rtol=1e-4)


class _Recorder(ts.Sieve):
    """Keeps every token and records the attention rows it was given."""

    name, paper, stage, signals = "recorder", "test", "in_llm", ("llm_attention",)

    def __init__(self, layer):
        super().__init__(1.0)
        self.layer, self.rows = layer, []

    def select(self, tokens):
        self.rows.append(tokens["llm_attention"])
        return ts.Selection(torch.arange(len(tokens)))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_llm_attention_is_the_last_tokens_row_of_eager_attention_at_layer_k_minus_1(family):
    model = family.build()
    model.set_attn_implementation("eager")
    inputs = family.make_inputs(TEXTS)
    eager = model(**inputs, output_attentions=True).attentions[0]  # layer K-1 = 0
    recorder = _Recorder(layer=1)
    with ts.apply(model, recorder) as run:
        model(**inputs)
    blocks = _image_blocks(inputs, family, run.stats.images)
    for (row, positions), got in zip(blocks, recorder.rows):
        torch.testing.assert_close(got, eager[row, :, -1, positions].float(), atol=1e-6, rtol=1e-4)


def test_fastv_keeps_the_most_attended_tokens_and_counts_its_flops():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS[:1])
    recorder = _Recorder(layer=1)
    with ts.apply(model, recorder):
        model(**inputs)
    with ts.apply(model, ts.FastV(keep=8, layer=1)) as run:
        model(**inputs)
    (record,) = run.stats.images
    expected = recorder.rows[0].mean(0).topk(8).indices.sort().values
    assert torch.equal(record.kept, expected)
    assert (record.before, record.after) == (LLAVA.tokens_per_image, 8)
    config = model.config.get_text_config()
    length = inputs["input_ids"].shape[1]
    layers = config.num_hidden_layers
    full_share = decoder_prefill_flops(config, [length], layers=1)
    pruned_share = decoder_prefill_flops(config, [length - record.before + 8], layers=layers - 1)
    assert run.stats.prefill_flops == full_share + pruned_share
    assert run.stats.prefill_flops_unreduced == decoder_prefill_flops(config, [length])


@pytest.mark.parametrize("family", [LLAVA, QWEN2_VL], ids=lambda f: f.name)
def test_a_chain_prunes_inside_the_llm_among_the_tokens_kept_before_it(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    with ts.apply(model, ts.Uniform(keep=32)) as first:
        model(**inputs)
    with ts.apply(model, ts.Chain(ts.Uniform(keep=32), ts.FastV(keep=8, layer=1))) as chained:
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3
    for alone, both in zip(first.stats.images, chained.stats.images):
        assert (both.before, both.after) == (family.tokens_per_image, 8)
        assert set(both.kept.tolist()) <= set(alone.kept.tolist())


def test_bad_layers_and_chains_are_refused_before_touching_the_model():
    model = build_model(LLAVA)
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(ValueError, match="has 2 layers: pass a layer from 1 to 1"):
        ts.apply(model, ts.FastV(layer=2))
    with pytest.raises(ValueError, match="an int >= 1"):
        ts.FastV(layer=0)
    with pytest.raises(ValueError, match="at most one method per stage, in the order pre_llm then in_llm"):
        ts.Chain(ts.FastV(), ts.Uniform())
    with pytest.raises(ValueError, match="at most one method per stage"):
        ts.Chain(ts.Uniform(), ts.DivPrune())
    with pytest.raises(TypeError, match="expected tokensieve methods"):
        ts.Chain("fastv")
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_in_llm_pruning_also_runs_where_gradients_are_recorded():
    model, inputs = build_model(LLAVA), LLAVA.make_inputs(TEXTS)
    with ts.apply(model, ts.FastV(keep=16, layer=1)):
        expected = model(**inputs).logits
        with torch.enable_grad():  # a plain forward outside no_grad, as in fine-tuning or a user's script
            logits = model(**inputs).logits
    assert logits.requires_grad and torch.equal(logits.detach(), expected)
