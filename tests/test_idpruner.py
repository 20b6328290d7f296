"""IDPruner: the shared MMR greedy against a plain loop of the official rule, the rule worked by hand on a small
grid (each lambda, parallel picks), the selection on a model against the loop over its own signals, arguments."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tiny_qwen2_vl import QWEN2_5_VL
from tokensieve.selection import mmr_greedy
from tokensieve.sieve import VisualTokens
from tokensieve.signals import Signal


def loop_mmr(importance: torch.Tensor, similarity: torch.Tensor, k: int, lam: float, per_step: int = 1) -> list[int]:
    """The official rule as read (Tencent/AngelSlim 67394ce, ``idpruner``), as a loop: the first step ranks by
    importance alone; later steps by lam * importance - (1 - lam) * (largest similarity to a chosen token);
    ``per_step`` picks a step, best first (ties: lower index)."""
    importance, similarity = importance.float(), similarity.float()
    n = len(importance)
    chosen, closest = [], [torch.tensor(-2.0)] * n
    while len(chosen) < k:
        step = min(per_step, k - len(chosen))
        score = {j: importance[j] if not chosen else (lam * importance[j]) - ((1 - lam) * closest[j])
                 for j in range(n) if j not in chosen}
        picks = sorted(score, key=lambda j: (-score[j].item(), j))[:step]
        chosen += picks
        closest = [torch.maximum(closest[j], max(similarity[j, p] for p in picks)) for j in range(n)]
    return chosen


def code_similarity(features: torch.Tensor) -> torch.Tensor:
    unit = features.float() / (features.float().norm(dim=-1, keepdim=True) + 1e-8)
    return unit @ unit.T


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), k=st.integers(1, 30), lam=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
       per_step=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_mmr_greedy_is_the_plain_loop(n, k, lam, per_step, seed):
    k = min(k, n)
    generator = torch.Generator().manual_seed(seed)
    importance = torch.rand(n, generator=generator)
    similarity = code_similarity(torch.randn(n, 6, generator=generator))
    expected = loop_mmr(importance, similarity, k, lam, per_step)
    assert mmr_greedy(importance, similarity, k, lam, per_step).tolist() == expected


def test_mmr_greedy_never_repeats_a_pick():
    assert mmr_greedy(torch.zeros(4), torch.ones(4, 4), 4, 0.5).tolist() == [0, 1, 2, 3]
    assert mmr_greedy(torch.zeros(4), torch.ones(4, 4), 4, 0.5, per_step=3).tolist() == [0, 1, 2, 3]


#: a 2x2 grid: tokens 0 and 1 are the same direction, 2 is orthogonal to them, 3 halfway between
FEATURES = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
#: head-mean [CLS] attention .4 .3 .1 .2: importance after min-max (s - .1) / (.3 + 1e-6) = 1, .667, 0, .333
ATTENTION = torch.tensor([[0.8, 0.6, 0.2, 0.4], [0.0, 0.0, 0.0, 0.0]])


def grid(signal="cls_attention") -> VisualTokens:
    return VisualTokens(FEATURES, (2, 2), {signal: ATTENTION})


def test_hand_worked_balance_takes_the_distinct_token_before_the_important_duplicate():
    # first the most important, 0; then .5 imp - .5 maxcos: 1: .333 - .5 = -.167, 2: 0 - 0 = 0, 3: .167 - .354 = -.187
    assert ts.IDPruner(keep=2).select(grid()).kept.tolist() == [0, 2]
    # next: 1 at -.167 against 3 at -.187 (its largest cosine is still .707)
    assert ts.IDPruner(keep=3).select(grid()).kept.tolist() == [0, 1, 2]


def test_hand_worked_lambda_moves_between_importance_and_diversity():
    tokens = grid()
    # lambda .8: 1: .533 - .2 = .333, 2: 0, 3: .267 - .141 = .125: the duplicate is important enough
    assert ts.IDPruner(keep=2, mmr_lambda=0.8).select(tokens).kept.tolist() == [0, 1]
    # lambda 1: importance alone, FasterVLM's top-k
    assert ts.IDPruner(keep=2, mmr_lambda=1.0).select(tokens).kept.tolist() == [0, 1]
    fastervlm = ts.FasterVLM(keep=3).select(tokens).kept
    assert torch.equal(ts.IDPruner(keep=3, mmr_lambda=1.0).select(tokens).kept, fastervlm)
    # lambda 0: the most important first, then diversity alone: 2 (cosine 0), then 3 (.707) before 1 (1)
    assert ts.IDPruner(keep=3, mmr_lambda=0.0).select(tokens).kept.tolist() == [0, 2, 3]


def test_hand_worked_parallel_picks_take_several_tokens_per_step():
    # two picks in the first step: the two most important, 0 and 1, whatever their similarity
    assert ts.IDPruner(keep=2, parallel_k=2).select(grid()).kept.tolist() == [0, 1]
    # then one more (the last step takes what is left of the budget): 2 at 0 against 3 at -.187
    assert ts.IDPruner(keep=3, parallel_k=2).select(grid()).kept.tolist() == [0, 1, 2]


def test_received_importance_reads_the_attention_each_token_receives():
    received = Signal("vision_attention", queries="mean")
    assert ts.IDPruner(importance="received").requests() == (received,)
    assert ts.IDPruner(keep=2, importance="received").select(grid(received)).kept.tolist() == [0, 2]


def test_on_a_model_it_keeps_the_loops_selection_of_its_signals():
    model = build_model(LLAVA)
    sieve = ts.IDPruner(keep=12)
    seen = []
    select = sieve.select
    sieve.select = lambda tokens: seen.append(tokens) or select(tokens)
    with ts.apply(model, sieve) as run:
        model(**LLAVA.make_inputs([[5, 6, 7]]))
    tokens = seen[0]
    raw = tokens["cls_attention"].float().mean(dim=0)
    importance = (raw - raw.min()) / (raw.max() - raw.min() + 1e-6)
    expected = sorted(loop_mmr(importance, code_similarity(tokens.features), 12, 0.5))
    assert run.stats.images[0].kept.tolist() == expected


def test_families_without_cls_refuse_cls_importance_and_serve_received_attention():
    model = build_model(QWEN2_5_VL)
    with pytest.raises(ValueError, match="idpruner needs signals.*no \\[CLS\\] token"):
        ts.apply(model, ts.IDPruner(keep=8))
    with ts.apply(model, ts.IDPruner(keep=8, importance="received")) as run:
        model(**QWEN2_5_VL.make_inputs([[5, 6, 7]]))
    assert [image.after for image in run.stats.images] == [8]


def test_arguments_are_checked():
    assert ts.IDPruner().defaults() == {"keep": 0.25, "mmr_lambda": 0.5, "parallel_k": 1, "importance": "cls"}
    for bad in (dict(mmr_lambda=1.5), dict(mmr_lambda=-0.1), dict(mmr_lambda=True), dict(parallel_k=0),
                dict(parallel_k=1.0), dict(parallel_k=True), dict(importance="selector")):
        with pytest.raises(ValueError):
            ts.IDPruner(**bad)
    assert ts.IDPruner(keep=1.0).select(grid()).kept.tolist() == [0, 1, 2, 3]
    built = ts.build("idpruner:32,mmr_lambda=0.7,importance=received")
    assert (built.keep, built.mmr_lambda, built.importance) == (32, 0.7, "received")
