"""The decode stage (tokensieve/engine/decode_stage.py): MustDrop's eviction after the prefill
(``mustdrop_llm:decode=True``) and DyCoke's step-by-step KV pruning (``dycoke:kv_keep=...``), pinned by hand on the
tiny models, and the attention row it recomputes against eager attention."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS, appended, greedy, next_text_token
from tiny_models import LLAVA
from tiny_qwen2_vl import QWEN2_VL, QWEN2_VL_VIDEO
from tokensieve.adapters import adapter_for
from tokensieve.engine.compat import CACHE_ARGUMENT, output_cache
from tokensieve.engine.llm_signals import attention_module, attention_rows, rotary_function


def _cached_prefill(model, inputs, method):
    with ts.apply(model, method) as run:
        out = model(**inputs, use_cache=True)
    return out, output_cache(out), run


@pytest.mark.parametrize("layers, evicted", [(None, (1,)), ((2, 3), (1, 2))], ids=["tiny-schedule", "layers-2-3"])
def test_mustdrop_evicts_the_first_stages_layers_to_what_the_last_stage_kept(layers, evicted):
    """After the prefill, each evicted layer holds the text tokens and the image tokens the last stage kept, with the
    keys and values it computed for them; layer 0 and the layers from the last stage on are as without the rule."""
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS[:1])
    plain_out, plain, plain_run = _cached_prefill(model, inputs, ts.load("mustdrop_llm", keep=16, layers=layers))
    with ts.apply(model, ts.load("mustdrop_llm", keep=16, layers=layers, decode=True)) as run:
        out = model(**inputs, use_cache=True)
        cache = output_cache(out)
        snapshot = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        # a decode step on the evicted cache adds its one token to every layer
        token = out.logits[:, -1:].argmax(-1)
        model(input_ids=token, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1),
              **{CACHE_ARGUMENT: cache})
    assert torch.equal(out.logits, plain_out.logits)  # the prefill itself is untouched
    kept = run.stats.images[0].kept
    image = (inputs["input_ids"][0] == LLAVA.image_token).nonzero().squeeze(1)
    text = (inputs["input_ids"][0] != LLAVA.image_token).nonzero().squeeze(1)
    columns = torch.cat([text, image[kept]]).sort().values  # what an evicted layer keeps, in sequence order
    for number, ((keys, values), theirs) in enumerate(zip(snapshot, plain.layers)):
        if number in evicted:
            assert torch.equal(keys, theirs.keys[:, :, columns]) and torch.equal(values, theirs.values[:, :, columns])
        else:
            assert torch.equal(keys, theirs.keys) and torch.equal(values, theirs.values)
    per_layer_token = 2 * plain.layers[0].keys[0, :, 0].numel() * plain.layers[0].keys.element_size()
    dropped = LLAVA.tokens_per_image - len(kept)
    assert run.stats.kv_bytes == plain_run.stats.kv_bytes - len(evicted) * dropped * per_layer_token
    assert [layer.keys.shape[2] for layer in cache.layers] == [keys.shape[2] + 1 for keys, _ in snapshot]


def test_mustdrop_decode_steps_match_a_no_cache_loop_and_a_fresh_prefill_with_a_layer_before_the_stages():
    """layers=(2, 3): layer 1, before the first stage, is evicted too and maps its mask onto what it holds."""
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS)
    method = ts.load("mustdrop_llm", keep=16, layers=(2, 3), decode=True)
    with ts.apply(model, method):
        cached = greedy(model, inputs, n=5)
        plain_rows = []
        for row in range(len(TEXTS)):
            alone = LLAVA.make_inputs([TEXTS[row]], image_offset=row)
            ids, mask = alone["input_ids"], alone["attention_mask"]
            for _ in range(5):
                step = appended(model, alone, ids, mask)
                token = next_text_token(model(**step, use_cache=False).logits, model)
                ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            plain_rows.append(ids[0, -5:])
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                               suppress_tokens=[LLAVA.image_token])
        follow_up = torch.tensor([[11, 12, 13]] * len(TEXTS))
        ids = torch.cat([first.sequences, follow_up], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(TEXTS), 6, dtype=torch.long)], dim=1)
        continued = model.generate(input_ids=ids, attention_mask=mask, **{CACHE_ARGUMENT: output_cache(first)},
                                   max_new_tokens=3, do_sample=False)
        fresh = model.generate(**appended(model, inputs, ids, mask), max_new_tokens=3, do_sample=False)
    with ts.apply(model, ts.load("mustdrop_llm", keep=16, layers=(2, 3))):
        without_rule = greedy(model, inputs, n=5)
    assert torch.equal(cached[:, -5:], torch.stack(plain_rows))
    assert torch.equal(continued, fresh)
    assert not torch.equal(cached, without_rule), "evicting 75% of the image tokens from two layers changed nothing"


@pytest.mark.parametrize("family", [LLAVA, QWEN2_VL], ids=lambda f: f.name)
def test_the_recomputed_row_is_eager_attention_at_a_decode_step_and_without_a_cache(family):
    model = family.build()
    model.set_attn_implementation("eager")
    attention = attention_module(adapter_for(model).decoder.layers[1])
    rotary = rotary_function(attention)
    checked = []

    def compare(module, args, kwargs, output):
        hidden = kwargs["hidden_states"]
        cache = kwargs.get(CACHE_ARGUMENT)
        length = hidden.shape[1]
        queries = torch.tensor([[length - 1, length - 3, length - 8]]).expand(hidden.shape[0], -1) if length > 1 else \
            torch.zeros(hidden.shape[0], 1, dtype=torch.long)
        keys = cache.layers[1].keys if cache is not None else None
        got = attention_rows(module, rotary, hidden, kwargs["position_embeddings"], queries, kwargs["attention_mask"], keys)
        expected = output[1].float().mean(1)
        expected = expected.gather(1, queries[:, :, None].expand(-1, -1, expected.shape[-1]))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
        checked.append(cache is not None)

    handle = attention.register_forward_hook(compare, with_kwargs=True)
    try:
        inputs = family.make_inputs(TEXTS)
        model(**inputs, use_cache=False)
        greedy(model, inputs, n=3)  # a prefill and two decode steps on the cache, left-padded
    finally:
        handle.remove()
    assert checked == [False, True, True, True]


def test_dycoke_picks_the_top_share_at_the_first_step_and_when_the_attention_moves():
    dycoke = ts.load("dycoke", keep=0.5, kv_keep=0.5)
    now = torch.tensor([0.1, 0.4, 0.2, 0.3])
    assert dycoke.decode_step(now, None, total=8).tolist() == [1, 3]
    assert dycoke.decode_step(now, now * 2, total=8) is None  # as the step before (cosine 1 >= 0.9): every token
    moved = torch.tensor([0.4, 0.1, 0.3, 0.2])  # cosine 0.67 < 0.9: picked anew
    assert dycoke.decode_step(moved, now, total=8).tolist() == [0, 2]
    assert ts.load("dycoke", keep=1.0, kv_keep=0.5).decode_step(now, None, total=8) is None  # keep covers the video
    assert ts.load("dycoke", keep=0.5).decode_rule(4) is None  # kv_keep=None: TTM alone


def test_dycoke_masks_each_decode_token_to_the_image_tokens_it_attends_to_most_in_the_layer_before():
    """Eager attention of layer 1 at the first decode step picks the top quarter of the video's kept tokens; layers 2
    and 3 get masks whose row blocks exactly the other video tokens (and nothing else)."""
    model = QWEN2_VL_VIDEO.build()
    model.set_attn_implementation("eager")
    decoder = adapter_for(model).decoder
    inputs = QWEN2_VL_VIDEO.make_inputs(TEXTS[:1])
    seen = {}

    def weights(module, args, kwargs, output):
        if kwargs["hidden_states"].shape[1] == 1 and "weights" not in seen:
            seen["weights"] = output[1].float().mean(1)[0, 0]

    def masks(layer):
        def record(module, args, kwargs):
            if kwargs["hidden_states"].shape[1] == 1 and layer not in seen:
                seen[layer] = kwargs["attention_mask"][0, 0, 0].clone()
        return record

    handles = [attention_module(decoder.layers[1]).register_forward_hook(weights, with_kwargs=True)]
    with ts.apply(model, ts.load("dycoke", keep=0.5, kv_keep=0.25, kv_layer=2)) as run:
        handles += [attention_module(decoder.layers[j]).register_forward_pre_hook(masks(j), with_kwargs=True) for j in (1, 2, 3)]
        greedy(model, inputs, n=2)
    for handle in handles:
        handle.remove()
    record = run.stats.images[0]
    start = int((inputs["input_ids"][0] == QWEN2_VL_VIDEO.image_token).nonzero()[0])
    video = start + torch.arange(len(record.kept))  # the kept video tokens, packed where the video began
    top = video[seen["weights"][video].topk(len(video) // 4).indices]
    for layer in (2, 3):
        blocked = (seen[layer] < -1).nonzero().squeeze(1) if seen[layer].dtype != torch.bool else (~seen[layer]).nonzero().squeeze(1)
        assert blocked.tolist() == sorted(set(video.tolist()) - set(top.tolist()))
    layer_1 = seen[1]
    assert not bool((layer_1 < -1).any() if layer_1.dtype != torch.bool else (~layer_1).any())  # the layer before: all


def test_dycoke_keeps_every_token_in_the_cache():
    model = build_model(QWEN2_VL_VIDEO)
    inputs = QWEN2_VL_VIDEO.make_inputs(TEXTS)
    lengths = {}
    for kv_keep in (None, 0.2):
        with ts.apply(model, ts.load("dycoke", keep=0.5, kv_keep=kv_keep, kv_layer=1)) as run:
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        lengths[kv_keep] = ([layer.keys.shape[2] for layer in output_cache(out).layers], run.stats.kv_bytes)
    assert lengths[0.2] == lengths[None]


def test_decode_rules_refuse_what_they_cannot_serve():
    model = build_model(LLAVA)
    with pytest.raises(ValueError, match="mustdrop_llm evicts .* chain it before other in-LLM methods"):
        ts.apply(model, ts.Chain(ts.load("fastv", layer=1, keep=16), ts.load("mustdrop_llm", layers=(2, 3), decode=True)))
    video = build_model(QWEN2_VL_VIDEO)
    with pytest.raises(ValueError, match="dycoke picks each decode token's image tokens .* cannot follow fastv"):
        ts.apply(video, ts.Chain(ts.load("dycoke", kv_keep=0.2), ts.load("fastv", layer=1)))
    with pytest.raises(ValueError, match="from layer 4 on, but this language model has 4 layers"):
        ts.apply(video, ts.load("dycoke", kv_keep=0.2, kv_layer=4))
    with pytest.raises(ValueError, match="kv_keep=1.5: pass a share between 0 and 1"):
        ts.load("dycoke", kv_keep=1.5)
    with pytest.raises(ValueError, match="decode='yes'"):
        ts.load("mustdrop_llm", decode="yes")
