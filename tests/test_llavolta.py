"""LLaVolta's 1-D average pooling: the runs worked by hand, against avg_pool1d, and inside a decoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.adapters import adapter_for
from tokensieve.sieve import VisualTokens

TEN = VisualTokens(torch.arange(10.0)[:, None] * torch.tensor([[1.0, -2.0]]), (2, 5))


def _pooled(sieve, tokens=TEN):
    selection = sieve.select(tokens)
    return selection.kept.tolist(), selection.assignment.tolist(), selection.merged(tokens.features)[:, 0].tolist()


def test_hand_worked_runs_by_budget_and_by_stride():
    # keep=4 of 10: token t in run t*4//10 -> runs 0-2, 3-4, 5-7, 8-9, kept at start + (size-1)//2, means of 0..9
    assert _pooled(ts.LLaVolta(keep=4)) == ([1, 3, 6, 8], [0, 0, 0, 1, 1, 2, 2, 2, 3, 3], [1.0, 3.5, 6.0, 8.5])
    # keep=2: two runs of five (stride 5); a ratio resolves the same way: 0.2 of 10 is 2
    assert _pooled(ts.LLaVolta(keep=2)) == ([2, 7], [0] * 5 + [1] * 5, [2.0, 7.0])
    assert _pooled(ts.LLaVolta(keep=0.2)) == _pooled(ts.LLaVolta(keep=2))
    # stride=3: 10 // 3 = 3 runs of three, the one left over joins the last (6-9, kept at 6 + 3 // 2 = 7)
    assert _pooled(ts.LLaVolta(stride=3)) == ([1, 4, 7], [0, 0, 0, 1, 1, 1, 2, 2, 2, 2], [1.0, 4.0, 7.5])
    # stride=4: runs 0-3 and 4-9; a stride above the count pools everything into one token
    assert _pooled(ts.LLaVolta(stride=4)) == ([1, 6], [0] * 4 + [1] * 6, [1.5, 6.5])
    assert _pooled(ts.LLaVolta(stride=11)) == ([4], [0] * 10, [4.5])
    # the mean covers every channel
    torch.testing.assert_close(ts.LLaVolta(keep=2).select(TEN).merged(TEN.features), torch.tensor([[2.0, -4.0], [7.0, -14.0]]))


def test_a_full_budget_or_stride_one_keeps_every_token_without_a_merge_map():
    for sieve in (ts.LLaVolta(keep=1.0), ts.LLaVolta(keep=10), ts.LLaVolta(stride=1)):
        selection = sieve.select(TEN)
        assert selection.kept.tolist() == list(range(10)) and selection.assignment is None


@pytest.mark.parametrize("n, stride", [(576, 8), (576, 2), (64, 4), (48, 8)])
def test_equal_runs_are_avg_pool1d_and_each_token_stands_at_its_runs_floored_mean_position(n, stride):
    features = torch.randn(n, 6, generator=torch.Generator().manual_seed(n + stride))
    tokens = VisualTokens(features, (1, n))
    for sieve in (ts.LLaVolta(stride=stride), ts.LLaVolta(keep=n // stride)):
        selection = sieve.select(tokens)
        expected = F.avg_pool1d(features.T[None], kernel_size=stride, stride=stride)[0].T
        torch.testing.assert_close(selection.merged(features), expected)
        # the official code's position: the mean of the run's positions, cast down to an integer
        positions = F.avg_pool1d(torch.arange(n, dtype=torch.float32)[None, None], stride, stride).flatten().long()
        assert torch.equal(selection.kept, positions)
        assert torch.equal(selection.sizes(), torch.full((n // stride,), stride))


def _decoder_outputs(model, inputs, pre_hooks=None, method=None):
    """The decoder's last hidden state, with ``pre_hooks`` {layer: hook} on its layers, optionally under ``method``."""
    decoder = adapter_for(model).decoder
    outputs = []
    handles = [decoder.register_forward_hook(lambda m, a, out: outputs.append(out.last_hidden_state))]
    try:
        if method is None:
            handles += [decoder.layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i, hook in (pre_hooks or {}).items()]
            model(**inputs)
            return outputs[-1], None
        with ts.apply(model, method) as run:
            model(**inputs)
        return outputs[-1], run.stats.images
    finally:
        for handle in handles:
            handle.remove()


def test_in_the_llm_the_runs_means_enter_layer_k_and_the_rest_is_dropped_from_it_on():
    """Each kept token's final hidden state equals the stock decoder's when, at layer 1's input, the kept token's
    hidden state is replaced by its run's mean and every layer from 1 on masks the other tokens of the runs."""
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs([[5, 6, 7]])
    pruned, (record,) = _decoder_outputs(model, inputs, method=ts.LLaVolta(keep=16, layer=1))
    (stage,) = record.stages
    assert (stage.method, stage.layer, stage.after) == ("llavolta", 1, 16)
    assert torch.equal(stage.sizes, torch.full((16,), 4)) and torch.equal(stage.assignment, torch.arange(64) // 4)
    assert record.kept.tolist() == list(range(1, 64, 4))

    image = (inputs["input_ids"][0] == LLAVA.image_token).nonzero().squeeze(1)
    length = inputs["input_ids"].shape[1]
    dropped = torch.zeros(length, dtype=torch.bool)
    dropped[image] = True
    dropped[image[record.kept]] = False
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & ~dropped[None, :]
    mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)

    def merge_at_layer_1(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        means = hidden[0, image].view(16, 4, -1).mean(1)
        hidden[0, image[record.kept]] = means
        kwargs = {**kwargs, "attention_mask": mask}
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    def masked(module, args, kwargs):
        return args, {**kwargs, "attention_mask": mask}

    stock, _ = _decoder_outputs(model, inputs, {1: merge_at_layer_1, 2: masked, 3: masked})
    torch.testing.assert_close(pruned[0], stock[0, ~dropped], atol=2e-5, rtol=1e-4)


def test_bad_arguments_name_what_to_change():
    with pytest.raises(ValueError, match=r"layer=0: pass the decoder layer to pool before, an int >= 1"):
        ts.LLaVolta(layer=0)
    for bad in (0, -2, True, 8.0):
        with pytest.raises(ValueError, match=r"stride=.*: pass the tokens per pooled run, an int >= 1"):
            ts.LLaVolta(stride=bad)
    with pytest.raises(ValueError, match=r"keep=64 and stride=8: the stride sets the budget \(N // stride\); pass one of them"):
        ts.LLaVolta(keep=64, stride=8)
    assert ts.build("llavolta:layer=16,stride=8") == ts.LLaVolta(layer=16, stride=8)
    assert ts.LLaVolta().defaults() == {"keep": 0.125, "layer": 2, "stride": None}
