"""``ts.observe(model)`` (``ts.apply``/``ts.attach`` without a method): the stock forward, untouched and recorded.

Every family: logits, greedy and beam tokens, a second turn on the cache and labels give the unhooked
model's results bit for bit (a static cache too: tests/test_static_cache.py); ``run.stats`` counts every image's tokens (before == after), the LLM
prefill FLOPs (reduced == unreduced == tokensieve.engine.flops on the real lengths), the KV-cache bytes the prefill
left (== the real cache's tensors, layer by layer, also when in-LLM pruning makes later layers shorter) and,
asked for, the vision side's FLOPs. And the bench reaches the engine through the public API only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import tokensieve as ts
from conftest import build_model, method_for
from families import FAMILIES
from test_contract import TEXTS, appended, greedy
from tiny_models import LLAVA
from tokensieve.adapters import adapter_for
from tokensieve.engine.compat import CACHE_ARGUMENT, output_cache
from tokensieve.engine.flops import decoder_prefill_flops

BY_FAMILY = [pytest.param(family, id=family.name) for family in FAMILIES]


def cache_bytes(cache) -> int:
    """The key and value tensors' bytes, read here from the cache itself, and the fixed-size states of
    linear-attention layers (Qwen3.5's), which hold no keys; Gemma 4's KV-shared layers hold nothing."""
    return sum(layer.keys.nbytes + layer.values.nbytes if getattr(layer, "keys", None) is not None
               else sum(t.nbytes for t in [*layer.conv_states.values(), *layer.recurrent_states.values()])
               if hasattr(layer, "conv_states") else 0
               for layer in cache.layers)


def prompt_flops(model, inputs) -> int:
    """The decoder's prefill FLOPs over each row's real (unpadded) prompt."""
    return decoder_prefill_flops(model.config.get_text_config(), inputs["attention_mask"].sum(1).tolist())


@pytest.mark.parametrize("family", BY_FAMILY)
def test_observing_changes_no_output_and_records_the_stock_forward(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS, n_images=[2, 1])
    stock = model(**inputs)
    stock_tokens = greedy(model, inputs)
    stock_beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, pad_token_id=0)

    with ts.observe(model) as run:
        observed = model(**inputs)
    with ts.apply(model) as generating:  # no method: the same observer
        tokens = greedy(model, inputs)
    with ts.attach(model) as beaming:
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, pad_token_id=0)

    assert torch.equal(observed.logits, stock.logits)
    assert torch.equal(tokens, stock_tokens) and torch.equal(beams, stock_beams)
    assert [r.row for r in run.stats.images] == [0, 0, 1]  # with beams: the row of each prompt's first copy
    for stats, copies in ((run.stats, 1), (generating.stats, 1), (beaming.stats, 2)):
        assert [(r.before, r.after) for r in stats.images] == [(family.tokens_per_image,) * 2] * 3
        assert all(torch.equal(r.kept, torch.arange(r.before)) and r.grid[0] * r.grid[1] == r.before
                   for r in stats.images)
        assert stats.calls == 1  # the prefill: decode steps carry no images
        # the prefill's FLOPs, exactly those of the whole prompt (of each copy of it that generate() makes),
        # with and without "the reduction"
        assert stats.prefill_flops == stats.prefill_flops_unreduced == copies * prompt_flops(model, inputs)
        assert stats.vision_flops is None  # not asked for
    # the cache the prefill left, byte for byte: here the forward's own
    assert run.stats.kv_bytes == cache_bytes(output_cache(observed)) > 0
    assert generating.stats.kv_bytes == run.stats.kv_bytes  # generate()'s prefill holds the same tokens
    assert beaming.stats.kv_bytes == 2 * run.stats.kv_bytes  # every return sequence's copy of the prompt
    assert repr(run).startswith(f"<Run observe on {type(model).__name__}, removed: 1 call(s), 3 image(s)")


@pytest.mark.parametrize("family", BY_FAMILY)
def test_a_second_turn_on_the_observed_cache_is_the_stock_one(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)

    def two_turns():
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        ids = torch.cat([first.sequences, torch.tensor([[11, 12, 13]] * len(TEXTS))], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(TEXTS), 6, dtype=torch.long)], dim=1)
        continued = model.generate(input_ids=ids, attention_mask=mask, **{CACHE_ARGUMENT: output_cache(first)},
                                   max_new_tokens=3, do_sample=False, pad_token_id=0)
        return first.sequences, continued, model(**appended(model, inputs, ids, mask)).logits

    stock = two_turns()
    with ts.observe(model) as run:
        observed = two_turns()
    assert all(torch.equal(a, b) for a, b in zip(observed, stock))
    assert run.stats.calls == 2 and len(run.stats.images) == 2 * len(TEXTS)  # the first turn, the fresh prefill


def test_a_later_image_on_an_observed_cache_is_passed_on_untouched_and_counted_with_its_past():
    model = build_model(LLAVA)
    first = LLAVA.make_inputs(TEXTS[:1])
    second = LLAVA.make_inputs([[9, 10]], image_offset=1)
    ids = torch.cat([first["input_ids"], second["input_ids"]], dim=1)
    mask = torch.cat([first["attention_mask"], second["attention_mask"]], dim=1)

    def turns():
        past = output_cache(model(**first))
        bytes_before = cache_bytes(past)
        out = model(input_ids=second["input_ids"], attention_mask=mask, pixel_values=second["pixel_values"],
                    **{CACHE_ARGUMENT: past})
        return out.logits, cache_bytes(output_cache(out)) - bytes_before

    stock_logits, added = turns()
    with ts.observe(model) as run:
        logits, _ = turns()
    assert torch.equal(logits, stock_logits)
    text = model.config.get_text_config()
    past, new = int(first["attention_mask"].sum()), int(second["attention_mask"].sum())
    assert run.stats.prefill_flops == run.stats.prefill_flops_unreduced == (
        decoder_prefill_flops(text, [past]) + decoder_prefill_flops(text, [new], [past]))
    # each prefill adds what it brings: the second turn's bytes come on top of the first's
    assert run.stats.kv_bytes == cache_bytes(output_cache(model(input_ids=ids, attention_mask=mask,
                                                                  pixel_values=torch.cat([first["pixel_values"], second["pixel_values"]]))))
    assert added > 0


def test_labels_with_images_run_as_the_stock_model():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    stock_loss = model(**inputs, labels=labels).loss
    with ts.observe(model) as run:
        loss = model(**inputs, labels=labels).loss  # a method refuses labels: it drops what they cover
        tokens = greedy(model, inputs)
    assert torch.equal(loss, stock_loss) and torch.equal(tokens, greedy(model, inputs))
    assert run.stats.calls == 2


@pytest.mark.parametrize("name, kwargs", [("uniform", {}), ("fastv", {"layer": 1}), ("uniform+fastv", {"layer": 1})])
def test_kv_bytes_are_the_real_cache_at_each_layers_own_length(name, kwargs):
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS)
    with ts.observe(model) as observed:
        model(**inputs)
    with ts.apply(model, method_for(name, kwargs)) as run:
        cache = output_cache(model(**inputs))
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    if "fastv" in name:  # layer 0 holds every token it saw, layer 1 only the kept ones
        assert lengths[0] > lengths[1]
    assert run.stats.kv_bytes == cache_bytes(cache) < observed.stats.kv_bytes


def test_vision_flops_are_counted_when_asked_and_the_same_under_every_method():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS, n_images=[2, 1])
    single = LLAVA.make_inputs(TEXTS[:1])
    with ts.observe(model, vision_flops=True) as observed:
        greedy(model, inputs)
    with ts.apply(model, ts.FasterVLM(keep=16), vision_flops=True) as pruned:  # its hooks read [CLS] attention
        greedy(model, inputs)
    with ts.observe(model, vision_flops=True) as alone:
        greedy(model, single)
    # the tower and projector run once per generate(), on every image: three here, one alone
    assert observed.stats.vision_flops == pruned.stats.vision_flops == 3 * alone.stats.vision_flops > 0
    with pytest.raises(KeyError):
        with ts.observe(model, vision_flops=True) as failed:
            greedy(model, single)
            raise KeyError("boom")
    assert failed.stats.vision_flops is None and model not in ts.engine.run._HOOKED_MODELS


def test_the_observer_is_a_run_like_any_other():
    model = build_model(LLAVA)
    handle = ts.observe(model)
    with pytest.raises(RuntimeError, match="already has a tokensieve method"):
        ts.apply(model, ts.FasterVLM(keep=16))
    handle.remove()
    with pytest.raises(RuntimeError, match="this observe handle was removed"):
        with handle:
            pass
    assert adapter_for(model) is not None


BENCH = Path(ts.__file__).parent / "bench"
#: the parts of tokensieve that are not the engine: the bench itself, the embedded model, the QA suite, drawing.
#: Every other submodule (engine, adapters, flops, stats, ...) is reached through the package's public names only.
NOT_THE_ENGINE = {"bench", "mini", "qa", "draw", "extras"}  # extras: the one-line fix for a missing optional part


def test_the_bench_and_the_lmms_eval_bridge_use_only_the_public_api():
    public = set(ts.__all__)
    offences = []
    for path in sorted(BENCH.rglob("*.py")):
        package = "tokensieve." + ".".join(path.relative_to(BENCH.parent).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(part for part in (base, node.module or "") if part)
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                module, names = None, [alias.name for alias in node.names]
            else:
                continue
            targets = [f"{module}.{name}" for name in names] if module == "tokensieve" else (
                [module] if module is not None else names)
            for target in targets:
                parts = target.split(".")
                if parts[0] != "tokensieve" or len(parts) == 1:
                    continue
                if len(parts) == 2 and parts[1] in public:
                    continue  # from tokensieve import apply, RunStats, ...
                if parts[1] not in NOT_THE_ENGINE:
                    offences.append(f"{path.relative_to(BENCH.parent.parent)}: {target}")
    assert not offences, offences
