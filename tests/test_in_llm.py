"""In-LLM pruning (stage ``in_llm``) and chains: what layers K.. compute, the attention signal, errors.

The shared contract (test_contract.py) covers cache, batching, turns and restoring for these too.
"""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model, family_method_params, freezes, method_for, serves_in_llm
from families import FAMILIES
from tiny_models import LLAVA
from tiny_qwen2_vl import QWEN2_VL
from tokensieve.adapters import adapter_for
from tokensieve.engine.compat import CACHE_ARGUMENT, output_cache
from tokensieve.signals import Signal, instruction_positions
from tokensieve.engine.flops import decoder_prefill_flops

IN_LLM = family_method_params(stages=("in_llm", "chain"))
IN_LLM_FAMILIES = [family for family in FAMILIES if serves_in_llm(family)]  # Gemma3 and Qwen3.5 refuse in-LLM stages
#: methods that drop keys: a freezing method keeps them, and is held against its own reference (test_skip_visual.py)
DROPPING = [case for case in IN_LLM if not freezes(*case.values[1:])]
TEXTS = [[5, 6, 7, 8], [9, 10]]


def _image_blocks(inputs, family, records):
    """(row, positions) of each image record's tokens in the decoder input."""
    placed = (inputs["input_ids"] == family.image_token).nonzero()
    blocks, start = [], 0
    for record in records:
        block = placed[start : start + record.before]
        start += record.before + family.trailing_placeholders
        blocks.append((int(block[0, 0]), block[:, 1]))
    return blocks


def _dropped(shape, blocks, kept_per_image):
    dropped = torch.zeros(shape, dtype=torch.bool)
    for (row, positions), kept in zip(blocks, kept_per_image):
        dropped[row, positions] = True
        dropped[row, positions[kept]] = False
    return dropped


def _dropped_at(layer, shape, blocks, records):
    """(batch, length) True at the image tokens decoder layer ``layer`` does not see: those dropped by the last
    stage at or before it (a pre-LLM stage acts before layer 0)."""
    kept = []
    for record in records:
        stages = [stage for stage in record.stages if (stage.layer or 0) <= layer]
        kept.append(stages[-1].kept if stages else torch.arange(record.before))
    return _dropped(shape, blocks, kept)


def _masked_stock_hidden(model, inputs, records, family, hook_layer=None, before_stage_at=None):
    """The stock decoder's last hidden states when every layer masks the keys the schedule dropped before it
    (``hook_layer(index, kwargs)`` may change each layer's other inputs too); layer ``before_stage_at`` masks
    only what was dropped before the stage there, as that stage's score sees it."""
    decoder = adapter_for(model).decoder
    blocks = _image_blocks(inputs, family, records)
    shape = inputs["input_ids"].shape
    real = inputs["attention_mask"].bool()
    causal = torch.ones(shape[1], shape[1], dtype=torch.bool).tril()

    def masked(dropped):
        allowed = causal & real[:, None, :] & ~dropped[:, None, :]
        return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]

    stash = {}

    def set_mask(index):
        dropped = _dropped_at(index - (index == before_stage_at), shape, blocks, records)
        seen = ~_dropped_at(index - 1, shape, blocks, records) if index else torch.ones(shape, dtype=torch.bool)

        def hook(m, args, kw):
            args, kw = _merged_at(index, args, kw, blocks, records)
            args, kw = _restored_at(args, kw, stash, seen, dropped)
            return args, (hook_layer or (lambda i, k: k))(index, {**kw, "attention_mask": masked(dropped)})
        return hook

    outputs = []
    hooks = [layer.register_forward_pre_hook(set_mask(i), with_kwargs=True) for i, layer in enumerate(decoder.layers)]
    hooks.append(decoder.register_forward_hook(lambda m, a, out: outputs.append(out.last_hidden_state)))
    try:
        model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs[-1], _dropped_at(len(decoder.layers), shape, blocks, records), real


def _restored_at(args, kwargs, stash, seen, dropped):
    """A token a restoring stage (``Sieve.restores``) brings back enters with the hidden state it had at the input of
    the layer that dropped it: every token the layer before saw stores its input hidden state here, and a token the
    layer before did not see but this one does takes its stored one."""
    hidden = args[0] if args else kwargs["hidden_states"]
    returning = ~seen & ~dropped
    if returning.any():
        hidden = hidden.clone()
        hidden[returning] = stash["hidden"][returning]
    kept = stash.get("hidden", hidden).clone()
    kept[seen] = hidden[seen]
    stash["hidden"] = kept
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _merged_at(layer, args, kwargs, blocks, records):
    """A stage at ``layer`` that returned a merge map: each kept token's hidden state becomes its group's mean (over the
    tokens the stage received, those the stage before it kept)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    for (row, positions), record in zip(blocks, records):
        received = torch.arange(record.before)
        for stage in record.stages:
            if stage.layer == layer and stage.assignment is not None:
                hidden = hidden.clone()
                values = hidden[row, positions[received]]
                members = stage.assignment >= 0
                weights = (stage.weights if stage.weights is not None else torch.ones(len(values)))[members]
                groups = stage.assignment[members]
                sums = torch.zeros(stage.after, values.shape[-1]).index_add_(0, groups, values[members] * weights[:, None])
                hidden[row, positions[stage.kept]] = sums / torch.zeros(stage.after).index_add_(0, groups, weights)[:, None]
            received = stage.kept
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _pruned_hidden(model, inputs, method):
    outputs = []
    capture = adapter_for(model).decoder.register_forward_hook(lambda m, a, out: outputs.append(out.last_hidden_state))
    try:
        with ts.apply(model, method) as run:
            model(**inputs)
    finally:
        capture.remove()
    return outputs[-1], run.stats.images


def _assert_kept_rows_equal(pruned, stock, final, real):
    for row in range(final.shape[0]):
        kept = (~final[row]).nonzero().squeeze(1)
        compared = real[row, kept]
        torch.testing.assert_close(pruned[row, -len(kept) :][compared], stock[row, kept][compared], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family, name, kwargs", DROPPING)
def test_layers_from_k_equal_the_stock_model_with_the_dropped_keys_masked_there(family, name, kwargs):
    """Each kept token's final hidden state equals the stock decoder's when every layer masks the keys the stages
    up to it dropped (a pre-LLM stage from layer 0, each in-LLM stage from its layer on; left-padded batch)."""
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    pruned, records = _pruned_hidden(model, inputs, method_for(name, kwargs))
    assert all(len(record.stages) >= 1 for record in records)
    stock, final, real = _masked_stock_hidden(model, inputs, records, family)
    _assert_kept_rows_equal(pruned, stock, final, real)


class _Recorder(ts.Sieve):
    """Keeps every token and records the attention rows it was given."""

    name, paper, stage, signals = "recorder", "test", "in_llm", ("llm_attention",)

    def __init__(self, layer):
        super().__init__(1.0)
        self.layer, self.rows = layer, []

    def select(self, tokens):
        self.rows.append(tokens["llm_attention"])
        return ts.Selection(torch.arange(len(tokens)))


@pytest.mark.parametrize("family", IN_LLM_FAMILIES, ids=lambda f: f.name)
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
    with pytest.raises(ValueError, match="has 4 layers: pass a layer from 1 to 3"):
        ts.apply(model, ts.FastV(layer=4))
    with pytest.raises(ValueError, match="pyramiddrop prunes after layer=5, but this language model has 4 layers"):
        ts.apply(model, ts.PyramidDrop(layers=(2, 5)))
    with pytest.raises(ValueError, match="strictly increasing decoder layers, in chain order; got fastv at layer 1, pyramiddrop at layer 1"):
        ts.apply(model, ts.Chain(ts.FastV(layer=1), ts.PyramidDrop()))  # PyramidDrop places its stages at 1, 2, 3
    with pytest.raises(ValueError, match="an int >= 1"):
        ts.FastV(layer=0)
    with pytest.raises(ValueError, match="strictly increasing ints >= 1"):
        ts.PyramidDrop(layers=(3, 2))
    with pytest.raises(ValueError, match="choose 'original'"):
        ts.PyramidDrop(positions="packed")
    with pytest.raises(ValueError, match="at most one pre_llm method; then in_llm"):
        ts.Chain(ts.FastV(), ts.Uniform())
    with pytest.raises(ValueError, match="at most one pre_llm method; then in_llm"):
        ts.Chain(ts.Uniform(), ts.DivPrune())
    with pytest.raises(ValueError, match="fastv at layer 3 comes before fastv at layer 2"):
        ts.Chain(ts.FastV(layer=3), ts.FastV(layer=2))
    with pytest.raises(ValueError, match="fastv at layer 2 comes before pyramiddrop at layer 2"):
        ts.Chain(ts.FastV(layer=2), ts.PyramidDrop(layers=(2, 3)))
    with pytest.raises(TypeError, match="expected tokensieve methods"):
        ts.Chain("fastv")
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
    qwen = build_model(QWEN2_VL)
    qwen_hooks = sum(len(m._forward_pre_hooks) for m in qwen.modules())
    with pytest.raises(ValueError, match="uses multi-row \\(mrope\\) positions: use positions='original'"):
        ts.apply(qwen, ts.PyramidDrop(positions="repack"))
    assert sum(len(m._forward_pre_hooks) for m in qwen.modules()) == qwen_hooks


def test_in_llm_pruning_also_runs_where_gradients_are_recorded():
    model, inputs = build_model(LLAVA), LLAVA.make_inputs(TEXTS)
    with ts.apply(model, ts.FastV(keep=16, layer=1)):
        expected = model(**inputs).logits
        with torch.enable_grad():  # a plain forward outside no_grad, as in fine-tuning or a user's script
            logits = model(**inputs).logits
    assert logits.requires_grad and torch.equal(logits.detach(), expected)


def test_pyramiddrop_follows_the_reference_schedule():
    from tokensieve.methods.pyramiddrop import default_layers, stage_count

    assert [stage_count(576, 72, s, 3) for s in (1, 2, 3)] == [288, 144, 72]  # the reference's ratios 0.5, 0.25, 0.125
    assert [stage_count(64, 16, s, 3) for s in (1, 2, 3)] == [40, 25, 16]
    assert default_layers(32) == (8, 16, 24) and default_layers(30) == (7, 15, 22)
    assert default_layers(4) == (1, 2, 3) and default_layers(2) == (1,)
    stages = ts.PyramidDrop().schedule(32)
    assert [(stage.layer, stage.index, stage.stages) for stage in stages] == [(8, 1, 3), (16, 2, 3), (24, 3, 3)]


class _RecordingPyramid(ts.PyramidDrop):
    """PyramidDrop whose stages record the attention rows they are given."""

    def schedule(self, n_layers):
        from tokensieve.methods.pyramiddrop import PyramidStage

        class Recording(PyramidStage):
            def select(stage, tokens):
                self.rows.append((stage.layer, tokens["llm_attention"]))
                return super().select(tokens)

        self.rows = []
        return tuple(Recording(s.keep, s.layer, s.index, s.stages) for s in super().schedule(n_layers))


@pytest.mark.parametrize("family", [LLAVA, QWEN2_VL], ids=lambda f: f.name)
def test_each_pyramiddrop_stage_scores_with_layer_k_eager_attention_on_what_is_left(family):
    """Stage s's row equals eager attention of the last token in layer K_s of the stock model in which every layer
    masks what the stages before it dropped; and each stage keeps the top of that row among what is left."""
    model = family.build()
    model.set_attn_implementation("eager")
    inputs = family.make_inputs(TEXTS)
    method = _RecordingPyramid(keep=16)
    with ts.apply(model, method) as run:
        model(**inputs)
    records = run.stats.images
    blocks = _image_blocks(inputs, family, records)
    rows = iter(method.rows)
    for stage_index in range(3):
        attentions = []
        hook = model.register_forward_hook(lambda m, a, out: attentions.append(out.attentions))
        try:
            layer = records[0].stages[stage_index].layer
            _masked_stock_hidden(model, {**inputs, "output_attentions": True}, records, family, before_stage_at=layer)
        finally:
            hook.remove()
        for record, (row, positions) in zip(records, blocks):
            layer, got = next(rows)
            left = record.stages[stage_index - 1].kept if stage_index else torch.arange(record.before)
            expected = attentions[-1][layer][row, :, -1, positions[left]].float()
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
            top = got.mean(0).topk(record.stages[stage_index].after).indices.sort().values
            assert torch.equal(record.stages[stage_index].kept, left[top])


def test_pyramiddrop_counts_each_layer_at_its_own_length():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS[:1])
    with ts.apply(model, ts.PyramidDrop(keep=16)) as run:
        model(**inputs)
    (record,) = run.stats.images
    assert [(stage.layer, stage.after) for stage in record.stages] == [(1, 40), (2, 25), (3, 16)]
    config, length = model.config.get_text_config(), inputs["input_ids"].shape[1]
    text = length - record.before
    expected = decoder_prefill_flops(config, [length], layers=1) + sum(
        decoder_prefill_flops(config, [text + stage.after], layers=1) for stage in record.stages)
    assert run.stats.prefill_flops == expected


def _repacked_positions(positions, dropped, real):
    """Each token's position less the real tokens dropped before it in its row."""
    dropped_real = (dropped & real).long()
    return positions - (dropped_real.cumsum(1) - dropped_real)


#: csp brings its clustering stage's dropped tokens back at its second stage, renumbered with the rest
REPACKING = [ts.PyramidDrop(keep=16, positions="repack"), ts.CSP(keep=16, clusters=16, positions="repack")]


@pytest.mark.parametrize("method", REPACKING, ids=lambda m: m.name)
def test_repacked_positions_equal_the_stock_model_renumbered_without_the_dropped_tokens(method):
    """positions='repack' (the reference's policy): each kept token's final hidden state equals the stock decoder's
    when every layer masks what was dropped before it and renumbers positions without those tokens."""
    model = build_model(LLAVA)
    decoder = adapter_for(model).decoder
    inputs = LLAVA.make_inputs(TEXTS)
    pruned, records = _pruned_hidden(model, inputs, method)
    blocks = _image_blocks(inputs, LLAVA, records)
    shape, real = inputs["input_ids"].shape, inputs["attention_mask"].bool()
    positions = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)

    def renumbered(index, kwargs):
        moved = _repacked_positions(positions, _dropped_at(index, shape, blocks, records), real)
        return {**kwargs, "position_ids": moved, "position_embeddings": decoder.rotary_emb(kwargs["hidden_states"] if "hidden_states" in kwargs else torch.zeros(1), moved)}

    stock, final, real = _masked_stock_hidden(model, inputs, records, LLAVA, hook_layer=renumbered)
    _assert_kept_rows_equal(pruned, stock, final, real)


ONE_D_ROPE = [family for family in IN_LLM_FAMILIES if not family.name.startswith("qwen")]


@pytest.mark.parametrize("method", REPACKING, ids=lambda m: m.name)
@pytest.mark.parametrize("family", ONE_D_ROPE, ids=lambda f: f.name)
def test_repacked_positions_keep_cache_batch_and_turns_consistent(family, method):
    """positions='repack' on every family with 1D positions: generate() with a cache equals a no-cache loop, a
    padded batch equals its rows alone, and a second turn equals a fresh prefill of the whole conversation."""
    model = build_model(family)
    batch = family.make_inputs(TEXTS, seed=3)
    with ts.apply(model, method):
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
        fresh = model.generate(**{**inputs, "input_ids": ids, "attention_mask": mask}, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(continued, fresh)


class _QueryRecorder(ts.Sieve):
    """Keeps every token and records the ``llm_attention(queries=...)`` it was given."""

    name, paper, stage, signals = "query_recorder", "test", "in_llm", ("llm_attention",)

    def __init__(self, layer, queries, at="previous", per_query=False):
        super().__init__(1.0)
        self.layer, self.llm_attention_at, self.rows = layer, at, []
        self.request = Signal("llm_attention", queries=queries, per_query=per_query)

    def requests(self):
        return (self.request,)

    def select(self, tokens):
        self.rows.append(tokens[self.request])
        return ts.Selection.every(tokens)


def _expected_rows(eager, inputs, blocks, queries, per_query=False):
    """Eager attention averaged over each image's query rows (its own tokens, or its instruction's), at its tokens
    (``per_query``: each of those rows). The instruction skips the images' own tokens: a placeholder in no image's
    record (LLaVA-OneVision's video newline, kept always) counts as its text."""
    mask, placeholders = inputs["attention_mask"], torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
    for row, positions in blocks:
        placeholders[row, positions] = True
    for row, positions in blocks:
        rows = positions if queries == "image" else instruction_positions(mask[row], placeholders[row], int(positions[-1]), mask.shape[1] - 1)
        each = eager[row][:, rows][:, :, positions].float()
        yield each if per_query else each.mean(1)


@pytest.mark.parametrize("per_query", [False, True], ids=["averaged", "per_query"])
@pytest.mark.parametrize("queries", ["instruction", "image"])
@pytest.mark.parametrize("family", IN_LLM_FAMILIES, ids=lambda f: f.name)
def test_llm_attention_of_the_instruction_or_the_image_tokens_is_their_eager_rows_averaged(family, queries, per_query):
    model = family.build()
    model.set_attn_implementation("eager")
    inputs = family.make_inputs(TEXTS)
    eager = model(**inputs, output_attentions=True).attentions[0]  # layer K-1 = 0
    recorder = _QueryRecorder(1, queries, per_query=per_query)
    with ts.apply(model, recorder) as run:
        model(**inputs)
    blocks = _image_blocks(inputs, family, run.stats.images)
    for got, expected in zip(recorder.rows, _expected_rows(eager, inputs, blocks, queries, per_query), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_an_images_instruction_skips_the_other_images_and_layer_k_scores_its_own_input():
    model = LLAVA.build()
    model.set_attn_implementation("eager")
    inputs = LLAVA.make_inputs(TEXTS, n_images=[2, 1])
    attentions = model(**inputs, output_attentions=True).attentions
    for at, eager in (("previous", attentions[1]), ("input", attentions[2])):
        recorder = _QueryRecorder(2, "instruction", at)
        with ts.apply(model, recorder) as run:
            model(**inputs)
        blocks = _image_blocks(inputs, LLAVA, run.stats.images)
        assert len(blocks) == 3
        for got, expected in zip(recorder.rows, _expected_rows(eager, inputs, blocks, "instruction"), strict=True):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match=r"llm_attention\(queries=...\) must be one of \('last', 'instruction', 'image'\)"):
        Signal("llm_attention", queries="cls")


class _VisionProbe(ts.Sieve):
    """Keeps its first ``keep`` tokens and records the vision-tower signals it was given (before or inside the LLM)."""

    name, paper, signals = "vision_probe", "test", ("cls_attention", "vision_attention", "vision_features")

    def __init__(self, keep, stage="in_llm", layer=None, asks=("cls_attention", Signal("vision_attention", layer=-1))):
        super().__init__(keep)
        self.stage, self.layer, self.asks, self.seen = stage, layer, asks, []

    def requests(self):
        return self.asks

    def select(self, tokens):
        self.seen.append(dict(tokens.signals))
        return ts.Selection(torch.arange(self.budget.resolve(len(tokens))))


def test_in_llm_stages_get_the_vision_towers_signals_at_the_tokens_still_there():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS)
    full = _VisionProbe(1.0, stage="pre_llm")
    with ts.apply(model, full):
        model(**inputs)
    first, second = _VisionProbe(16, layer=1), _VisionProbe(8, layer=2)
    with ts.apply(model, ts.Chain(ts.Uniform(keep=32), first, second)) as run:
        model(**inputs)
    for image, record in enumerate(run.stats.images):
        before_first, before_second = record.stages[0].kept, record.stages[1].kept
        for request, value in full.seen[image].items():
            assert torch.equal(first.seen[image][request], value[..., before_first])
            assert torch.equal(second.seen[image][request], value[..., before_second])
    with pytest.raises(ValueError, match="asks for vision_features inside the LLM"):
        ts.apply(model, _VisionProbe(8, layer=1, asks=("vision_features",)))
    qwen = build_model(QWEN2_VL)
    with pytest.raises(ValueError, match=r"vision_probe needs signals Qwen2VLForConditionalGeneration cannot give \(cls_attention"):
        ts.apply(qwen, _VisionProbe(8, layer=1))
    assert not any(layer._forward_pre_hooks for layer in qwen.model.language_model.layers)


def test_tokens_per_layer_average_what_each_decoder_layer_processes():
    model = build_model(LLAVA)  # 4 decoder layers
    with ts.apply(model, ts.build("uniform:32+fastv:8,layer=3")) as run:
        model(**LLAVA.make_inputs([[5, 6, 7]]))
    [record] = run.stats.images
    assert (record.before, record.at_llm_input, record.after) == (64, 32, 8)
    assert run.stats.decoder_layers == 4
    assert run.stats.tokens_per_layer == (32 * 3 + 8 * 1) / 4  # layers 0-2 see the 32, layer 3 the 8
    assert run.stats.tokens_at_llm_input == 32
