"""generate()'s output options as columns of the contract: scores, logits, hidden states and attentions.

Hidden states and attentions have the pruned length: the kept tokens, left-padded where rows keep different
counts (``run.stats.images`` says which were kept). In-LLM methods give layers before K every token.
"""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model, freezes, method_for
from test_contract import CONTRACT, TEXTS

OPTIONS = {"output_scores": "scores", "output_logits": "logits", "output_hidden_states": "hidden_states",
           "output_attentions": "attentions"}
_EAGER = {}


def model_for(family, option: str):
    """SDPA returns no attention weights (stock and pruned alike): attentions are tested on an eager copy."""
    if option != "output_attentions":
        return build_model(family)
    if family.name not in _EAGER:
        _EAGER[family.name] = family.build()
        _EAGER[family.name].set_attn_implementation("eager")
    return _EAGER[family.name]


def generate(model, inputs, option: str):
    return model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                          **{option: True})


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
        return
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert_same(x, y)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("family, name, kwargs", CONTRACT)
def test_keep_all_outputs_are_the_stock_models(family, name, kwargs, option):
    model = model_for(family, option)
    inputs = family.make_inputs(TEXTS)
    expected = generate(model, inputs, option)
    with ts.apply(model, method_for(name, kwargs, keep=1.0, pre_keep=1.0), **family.options):
        out = generate(model, inputs, option)
    assert torch.equal(out.sequences, expected.sequences)
    assert_same(getattr(out, OPTIONS[option]), getattr(expected, OPTIONS[option]))


def _kept_width(inputs, run) -> tuple[int, int]:
    """The decoder's last layers see each row's real tokens less its dropped ones, left-padded to the longest; their
    keys are those, after the tokens a freezing method froze (left-padded to the most a row froze)."""
    removed = torch.zeros(len(inputs["attention_mask"]), dtype=torch.long)
    for record in (r for r in run.stats.images if r.call == 0):  # generate()'s prefill
        removed[record.row] += record.before - record.after
    return int((inputs["attention_mask"].sum(1) - removed).max()), int(removed.max())


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("family, name, kwargs", CONTRACT)
def test_outputs_under_pruning_describe_the_pruned_sequence(family, name, kwargs, option):
    model = model_for(family, option)
    inputs = family.make_inputs(TEXTS)
    prompt = inputs["input_ids"].shape[1]
    with ts.apply(model, method_for(name, kwargs), **family.options) as run:
        out = generate(model, inputs, option)
        first_logits = model(**inputs).logits[:, -1]
    steps = getattr(out, OPTIONS[option])
    assert len(steps) == 3
    if option in ("output_scores", "output_logits"):  # greedy without logits processors: scores are the logits
        torch.testing.assert_close(steps[0], first_logits)
        assert all(torch.equal(step.argmax(-1), out.sequences[:, prompt + i]) for i, step in enumerate(steps))
        return
    width, dropped = _kept_width(inputs, run)
    keys = width + (dropped if freezes(name, kwargs) else 0)
    if option == "output_hidden_states":
        last_layer = steps[0][-1]  # the prefill's last hidden state, after the final norm
        assert last_layer.shape[1] == width
        torch.testing.assert_close(model.lm_head(last_layer[:, -1]), first_logits)
        assert all(layer.shape[1] == 1 for step in steps[1:] for layer in step)
        return
    last_layer = steps[0][-1]  # (batch, heads, queries, keys) at the prefill
    assert last_layer.shape[-2:] == (width, keys)
    torch.testing.assert_close(last_layer.sum(-1), torch.ones_like(last_layer.sum(-1)))
    assert all(step[-1].shape[-2:] == (1, keys + i + 1) for i, step in enumerate(steps[1:]))
