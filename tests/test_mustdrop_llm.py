"""MustDrop's prefill stage: the dual-attention filter, the key set it never drops, the schedule."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model, serves_in_llm
from families import FAMILIES
from tokensieve.methods.mustdrop_llm import MustDropStage, TEXT_ROWS
from tokensieve.signals import Signal
from tokensieve.sieve import VisualTokens

IN_LLM_FAMILIES = [family for family in FAMILIES if serves_in_llm(family)]  # Gemma3 refuses in-LLM stages

CLS_LAST = Signal("cls_attention", layers=(-1,))


def _tokens(rows, key_score):
    """Four image tokens, text rows (one head) and the vision tower's key score."""
    return VisualTokens(torch.zeros(4, 8), (2, 2), {TEXT_ROWS: rows[None], CLS_LAST: key_score[None, None]}, entered=4)


def test_the_filter_drops_what_no_text_row_attends_to_in_total_or_alone():
    # summed over the two text rows: 0.30, 0.02, 0.30, 0.02 (total 0.64); token 1 peaks at 0.015 in row 0
    rows = torch.tensor([[0.15, 0.015, 0.15, 0.005], [0.15, 0.005, 0.15, 0.015]])
    stage = MustDropStage(keep=2, layer=3, global_thr=0.1, individual_thr=0.01, key_share=0.0, exact=False)
    # global: 0.02 < 0.064 for tokens 1 and 3; individually both reach 0.015 >= 0.01 once: nothing dropped
    assert stage.select(_tokens(rows, torch.zeros(4))).kept.tolist() == [0, 1, 2, 3]
    stage = MustDropStage(keep=2, layer=3, global_thr=0.1, individual_thr=0.02, key_share=0.0, exact=False)
    assert stage.select(_tokens(rows, torch.zeros(4))).kept.tolist() == [0, 2]
    # the key set (the top ceil(0.25 * 4) = 1 by the tower's score) is never dropped
    stage = MustDropStage(keep=2, layer=3, global_thr=0.1, individual_thr=0.02, key_share=0.25, exact=False)
    assert stage.select(_tokens(rows, torch.tensor([0.0, 0.0, 0.1, 0.9]))).kept.tolist() == [0, 2, 3]
    # a keep that covers the image turns the filter off (keeping every token is the stock model)
    stage = MustDropStage(keep=4, layer=3, global_thr=0.1, individual_thr=0.02, key_share=0.0, exact=False)
    assert stage.select(_tokens(rows, torch.zeros(4))).kept.tolist() == [0, 1, 2, 3]


def test_an_exact_last_stage_keeps_key_tokens_first_then_survivors_then_the_rest():
    rows = torch.tensor([[0.15, 0.015, 0.15, 0.005], [0.15, 0.005, 0.15, 0.015]])
    key_score = torch.tensor([0.0, 0.0, 0.1, 0.9])  # token 3 is the key token
    exact = MustDropStage(keep=2, layer=3, global_thr=0.1, individual_thr=0.02, key_share=0.25, exact=True)
    assert exact.select(_tokens(rows, key_score)).kept.tolist() == [0, 3]  # key 3, then survivor 0 (ties: lower index)
    exact = MustDropStage(keep=4, layer=3, global_thr=0.1, individual_thr=0.02, key_share=0.25, exact=True)
    assert exact.select(_tokens(rows, key_score)).kept.tolist() == [0, 1, 2, 3]  # topped up with the dropped token 1


def test_the_schedule_is_the_codes_on_llava_and_scales_with_depth():
    assert [s.layer for s in ts.load("mustdrop_llm").schedule(32)] == [3, 7, 11, 15]
    assert [s.exact for s in ts.load("mustdrop_llm").schedule(32)] == [False, False, False, True]
    assert [s.layer for s in ts.load("mustdrop_llm").schedule(4)] == [1, 2]
    assert not any(s.exact for s in ts.load("mustdrop_llm", exact=False).schedule(32))


@pytest.mark.parametrize("family", IN_LLM_FAMILIES, ids=lambda f: f.name)
def test_the_full_method_runs_as_a_chain_with_the_vision_stage(family):
    model = build_model(family)
    inputs = family.make_inputs([[5, 6, 7, 8], [9, 10]])
    chain = ts.Chain(ts.load("mustdrop", keep=32, key="received"), ts.load("mustdrop_llm", keep=8, layers=(1, 2)))
    with ts.apply(model, chain) as run:
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    for record in run.stats.images[:2]:
        assert [s.method for s in record.stages] == ["mustdrop", "mustdrop_llm", "mustdrop_llm"]
        assert len(record.stages[0].kept) == 32 and len(record.stages[-1].kept) == 8


def test_bad_arguments_are_refused():
    for name in ("global_thr", "individual_thr", "key_share"):
        with pytest.raises(ValueError, match=name):
            ts.load("mustdrop_llm", **{name: 1.5})
