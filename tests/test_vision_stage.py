"""The in_vision stage (ToMe inside the ViT): merges between tower layers with proportional attention, the
tower's outputs back at full length, and the engine keeping one token per group."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.adapters import adapter_for
from tokensieve.selection import bipartite_round

TEXTS = [[5, 6, 7, 8], [9, 10]]


def _tower_outputs(model, run_model):
    """The vision tower's returned hidden states during ``run_model()``."""
    outputs = []
    hook = adapter_for(model).vision_tower.register_forward_hook(lambda m, a, out: outputs.append(out.hidden_states))
    try:
        run_model()
    finally:
        hook.remove()
    return outputs[-1]


def test_merged_tokens_with_proportional_attention_equal_the_stock_tower_fed_group_means():
    """A merged token of size s with log(s) added to its attention logits acts as s equal copies: the tower's
    restored outputs equal the stock tower's when each patch is replaced by its group's mean where merging happens."""
    model = build_model(LLAVA)  # CLIP, 3 layers; LLaVA reads layer 1's output, so layer 1's input is the one merging point
    inputs = LLAVA.make_inputs(TEXTS)
    with ts.apply(model, ts.ToMeViT(keep=16)) as run:
        merged = _tower_outputs(model, lambda: model(**inputs))
    groups = [record.stages[0] for record in run.stats.images]
    assert [(g.stage, g.after, int(g.sizes.sum())) for g in groups] == [("in_vision", 16, 64)] * 2
    layers = adapter_for(model).vision_tower.encoder.layers

    def group_means(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        for image, group in enumerate(groups):
            patches = hidden[image, 1:]
            means = torch.zeros(group.after, patches.shape[-1]).index_add_(0, group.assignment, patches)
            hidden[image, 1:] = (means / group.sizes[:, None])[group.assignment]
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    hook = layers[1].register_forward_pre_hook(group_means, with_kwargs=True)
    try:
        stock = _tower_outputs(model, lambda: model(**inputs))
    finally:
        hook.remove()
    for got, expected in zip(merged[2:], stock[2:]):  # the outputs of layers 1 and 2
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    for image, group in enumerate(groups):  # every patch carries its group's token; the group's token is its kept patch
        torch.testing.assert_close(merged[2][image, 1:], merged[2][image, 1 + group.kept][group.assignment])


def test_groups_are_tomes_bipartite_matching_on_the_previous_layers_head_mean_keys():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS)
    attention = adapter_for(model).vision_tower.encoder.layers[0].self_attn
    keys = []
    hook = attention.k_proj.register_forward_hook(lambda m, a, out: keys.append(out))
    try:
        model(**inputs)
    finally:
        hook.remove()
    heads = model.config.vision_config.num_attention_heads
    metric = keys[-1].view(*keys[-1].shape[:2], heads, -1).mean(2)
    target, survivors = bipartite_round(metric, 32, protect_first=True)
    with ts.apply(model, ts.ToMeViT(keep=32)) as run:
        model(**inputs)
    for image, record in enumerate(run.stats.images):
        group = record.stages[0]
        owner = (survivors[image].long().cumsum(0) - 1)[target[image]][1:] - 1
        assert torch.equal(group.assignment, owner)
        assert torch.equal(group.kept, survivors[image, 1:].nonzero().squeeze(1))


def test_later_vision_layers_see_fewer_tokens():
    model = build_model(LLAVA)
    layers = adapter_for(model).vision_tower.encoder.layers
    seen = []
    hook = layers[2].register_forward_pre_hook(lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        with ts.apply(model, ts.ToMeViT(keep=16)):
            model(**LLAVA.make_inputs(TEXTS))
    finally:
        hook.remove()
    assert seen == [17]  # 16 patches and [CLS]


def test_r_per_layer_and_bad_arguments():
    assert [ts.ToMeViT(keep=1, r=8).merges(step, 22, 576, 576 - 8 * step) for step in range(3)] == [8, 8, 8]
    assert ts.ToMeViT(keep=64).merges(0, 4, 576, 576) == 128  # 512 merges spread over four layers
    with pytest.raises(ValueError, match="an int >= 1 \\(ToMe's 8 or 16\\)"):
        ts.ToMeViT(r=0)
    model = build_model(LLAVA)
    with pytest.raises(ValueError, match="start_layer=2, but the model reads the output of layer 1"):
        ts.apply(model, ts.ToMeViT(start_layer=2))
    with pytest.raises(ValueError, match="then at most one in_vision method"):
        ts.Chain(ts.Uniform(), ts.ToMeViT())


def test_the_vision_flops_count_the_merged_tower():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS[:1])
    flops = {}
    for name, method in {"stock": None, "uniform": ts.Uniform(keep=16), "tome_vit": ts.ToMeViT(keep=16)}.items():
        with ts.apply(model, method, vision_flops=True) as run:
            model(**inputs)
        flops[name] = run.stats.vision_flops
    assert flops["uniform"] == flops["stock"]  # pruning before the LLM runs the whole tower
    assert flops["tome_vit"] < 0.7 * flops["stock"]  # layers 1 and 2 see 17 of 65 tokens
