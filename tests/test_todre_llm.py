"""ToDRE's second stage: the two attention shares, dropping every token of an image, and what follows from it."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model, serves_in_llm
from families import FAMILIES
from tokensieve.methods.todre_llm import IMAGE_TO_IMAGE, TEXT_TO_IMAGE
from tokensieve.sieve import VisualTokens

IN_LLM_FAMILIES = [family for family in FAMILIES if serves_in_llm(family)]  # Gemma3 refuses in-LLM stages

TEXTS = [[5, 6, 7, 8], [9, 10]]


def _tokens(text_to_image, image_to_image):
    n = text_to_image.shape[-1]
    return VisualTokens(torch.zeros(n, 8), (1, n), {TEXT_TO_IMAGE: text_to_image, IMAGE_TO_IMAGE: image_to_image})


def test_an_image_leaves_when_both_shares_are_below_tau():
    # text to image: 0.02 + 0.03 = 0.05 per head; image to text: 1 - (0.5 + 0.47) = 0.03
    faded = _tokens(torch.tensor([[0.02, 0.03], [0.02, 0.03]]), torch.tensor([[0.5, 0.47], [0.5, 0.47]]))
    assert ts.load("todre_llm").select(faded).kept.tolist() == []
    assert ts.load("todre_llm", keep=1).select(faded).kept.tolist() == [1]  # the instruction's most attended
    assert ts.load("todre_llm", tau=0.04).select(faded).kept.tolist() == [0, 1]  # 0.05 >= 0.04: stays
    # the image still talks to the text (image to text 0.5): it stays whole
    talking = _tokens(torch.tensor([[0.02, 0.03]]), torch.tensor([[0.25, 0.25]]))
    assert ts.load("todre_llm").select(talking).kept.tolist() == [0, 1]


def test_the_check_layer_defaults_to_seven_eighths_of_the_depth():
    assert [s.layer for s in ts.load("todre_llm").schedule(32)] == [28]
    assert [s.layer for s in ts.load("todre_llm").schedule(4)] == [3]
    assert [s.layer for s in ts.load("todre_llm", layer=2).schedule(32)] == [2]


@pytest.mark.parametrize("family", IN_LLM_FAMILIES, ids=lambda f: f.name)
def test_dropping_every_token_of_every_image_keeps_generation_consistent(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    method = ts.load("todre_llm", layer=1, tau=1.0)  # shares are below 1: every image leaves at layer 1
    with ts.apply(model, method) as run:
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        logits = model(**inputs).logits[:, -1]
    assert [r.after for r in run.stats.images] == [0, 0] * 2  # generate's prefill, then the forward
    assert [len(r.stages[-1].kept) for r in run.stats.images] == [0, 0] * 2
    # the first new token is the prefill's argmax; a no-cache forward over prompt + tokens agrees with the cache
    assert torch.equal(cached[:, inputs["input_ids"].shape[1]], logits.argmax(-1))
    with ts.apply(model, method):
        longer = dict(inputs, input_ids=cached[:, :-1],
                      attention_mask=torch.cat([inputs["attention_mask"], torch.ones(2, 2, dtype=torch.long)], dim=1))
        if "mm_token_type_ids" in inputs:
            longer["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(2, 2, dtype=torch.long)], dim=1)
        again = model(**longer, use_cache=False).logits[:, -1].argmax(-1)
    assert torch.equal(again, cached[:, -1])


def test_todre_as_the_paper_runs_it_is_the_chain_of_both_stages():
    model = build_model(FAMILIES[0])
    inputs = FAMILIES[0].make_inputs(TEXTS)
    chain = ts.Chain(ts.load("todre", keep=16), ts.load("todre_llm", layer=1, tau=1.0))
    with ts.apply(model, chain) as run:
        model(**inputs)
    assert [[(s.method, len(s.kept)) for s in r.stages] for r in run.stats.images] == [[("todre", 16), ("todre_llm", 0)]] * 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="tau="):
        ts.load("todre_llm", tau=1.5)
    with pytest.raises(ValueError, match="layer="):
        ts.load("todre_llm", layer=0)
