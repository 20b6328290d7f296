"""The shared algorithms and the budget, checked against plain reference implementations."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tokensieve import Budget, BudgetClampedWarning, FasterVLM, Sieve, register
from tokensieve.engine.flops import decoder_prefill_flops
from tokensieve.selection import target_grid
from tokensieve.selection import bipartite_merge, farthest_point, grid_subsample, merge_into_targets, top_k_in_order


def reference_divprune(features: torch.Tensor, k: int) -> torch.Tensor:
    """The reference loop: recompute the min distance to the whole chosen set at every step."""
    unit = F.normalize(features.float(), dim=-1)
    distance = 1 - unit @ unit.T
    chosen = [int(distance.sort(dim=0).values[1].argmax())]  # second-smallest per column skips self
    while len(chosen) < k:
        to_set = distance[chosen].min(dim=0).values
        to_set[chosen] = -1
        chosen.append(int(to_set.argmax()))
    return torch.tensor(sorted(chosen))


@settings(max_examples=30, deadline=None)
@given(st.integers(4, 80), st.integers(1, 80), st.integers(0, 10_000))
def test_farthest_point_matches_the_reference_loop(n, k, seed):
    k = min(k, n)
    features = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(farthest_point(features, k), reference_divprune(features, k))


@settings(max_examples=50, deadline=None)
@example([0.0] + [1.0] * 10 + [1.2855157795926138e-180], 11)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=60), st.integers(1, 60))
def test_top_k_in_order_keeps_the_highest_scores_in_raster_order(scores, k):
    k = min(k, len(scores))
    tensor = torch.tensor(scores)
    kept = top_k_in_order(tensor, k)
    assert len(kept) == k and torch.equal(kept, kept.sort().values)
    scores = tensor.tolist()  # judged in float32, as top_k_in_order compares (1e-180 is 0 there)
    threshold = sorted(scores, reverse=True)[k - 1]
    assert all(scores[i] >= threshold for i in kept.tolist())


def test_top_k_breaks_ties_towards_the_lower_index():
    assert top_k_in_order(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0]), 2).tolist() == [1, 2]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 900))
def test_grid_subsample_gives_exactly_k_distinct_cells(h, w, k):
    k = min(k, h * w)
    kept = grid_subsample((h, w), k)
    assert len(kept) == k == len(set(kept.tolist()))
    assert 0 <= int(kept.min()) and int(kept.max()) < h * w


def test_grid_subsample_is_an_even_lattice():
    kept = grid_subsample((24, 24), 64)
    rows, cols = kept // 24, kept % 24
    assert rows.unique().tolist() == [1, 4, 7, 10, 13, 16, 19, 22]
    assert cols.unique().tolist() == [1, 4, 7, 10, 13, 16, 19, 22]


def test_pool_target_grids():
    assert target_grid((24, 24), 64) == (8, 8)
    assert target_grid((24, 24), 128) == (11, 11)
    assert target_grid((24, 24), 192) == (13, 14)
    assert target_grid((16, 32), 32) == (4, 8)


def test_merge_into_targets_adds_the_mean_of_members():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [5.0, 0.0], [0.0, 7.0]])
    metric = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, -0.1], [0.1, 1.0]])
    merged = merge_into_targets(hidden, metric, torch.tensor([0, 1]), torch.tensor([2, 3, 4]))
    assert torch.equal(merged, torch.tensor([[1.0 + 4.0, 0.0], [0.0, 1.0 + 7.0]]))


def test_budget_resolution():
    assert Budget(64).resolve(576) == 64
    assert Budget(0.25).resolve(576) == 144
    assert Budget(0.001).resolve(576) == 1
    assert Budget(1.0).resolve(576) == 576


def test_prefill_flops_match_torch_flop_counter_on_a_real_decoder():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, attn_implementation="eager")
    model = LlamaModel(config).eval()
    length = 37
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.zeros(1, length, dtype=torch.long))
    ours = decoder_prefill_flops(config, [length])
    # eager attention multiplies the full L×L score matrix; ours counts the causal half exactly
    head_dim = 64 // 4
    full_minus_causal = 2 * 2 * 4 * head_dim * (length * length - length * (length + 1) // 2) * 2
    assert counter.get_total_flops() == ours + full_minus_causal


def test_registering_a_method_with_an_unknown_signal_fails():
    @dataclass
    class Misspelled(Sieve):
        name = "misspelled"
        paper = "none"
        signals = ("cls_atention",)

    with pytest.raises(ValueError, match="unknown signals \\['cls_atention'\\]"):
        register(Misspelled)


def _one_round_by_loops(x: torch.Tensor, r: int) -> tuple[list[int], torch.Tensor]:
    """ToMe's bipartite soft matching as plain loops: A = even positions, B = odd; each A token's best B by
    cosine (first on ties), the r A tokens with the best matches (earlier on ties) merged into theirs."""
    a, b = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    unit = F.normalize(x, dim=-1)
    best = {i: max(b, key=lambda j: (float(unit[i] @ unit[j]), -j)) for i in a}
    ranked = sorted(a, key=lambda i: (-float(unit[i] @ unit[best[i]]), i))
    merged = set(ranked[:r])
    kept = [i for i in range(len(x)) if i not in merged]
    groups = {j: [j] + [i for i in merged if best[i] == j] for j in kept}
    return kept, torch.stack([x[groups[j]].mean(0) for j in kept])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 30), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_one_round_of_bipartite_merge_matches_the_loop(n, fraction, seed):
    r = round(fraction * (n // 2))  # one round merges at most half the tokens
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
    merge = bipartite_merge(x, x, n - r)
    kept, features = _one_round_by_loops(x, r)
    assert merge.kept.tolist() == kept
    torch.testing.assert_close(merge.features, features, atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 60), seed=st.integers(0, 2**16))
def test_bipartite_merge_leaves_k_tokens_each_the_mean_of_what_it_holds(n, k, seed):
    k = min(k, n)
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    merge = bipartite_merge(x, x, k)
    assert len(merge.kept) == k and merge.kept.tolist() == sorted(set(merge.kept.tolist()))
    assert merge.sizes.sum() == n and merge.sizes.tolist() == torch.bincount(merge.assignment, minlength=k).tolist()
    assert all(merge.assignment[token] == j for j, token in enumerate(merge.kept.tolist()))  # a kept token holds itself
    for j in range(k):
        torch.testing.assert_close(merge.features[j], x[merge.assignment == j].mean(0), atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from([6, 9, 16]), min_size=1, max_size=6), st.integers(1, 9), st.integers(0, 10**6))
def test_a_scoring_method_selects_a_batch_of_images_as_it_selects_each(sizes, keep, seed):
    from tokensieve.sieve import VisualTokens, timed_select_all

    generator = torch.Generator().manual_seed(seed)
    images = [VisualTokens(torch.randn(n, 4, generator=generator), (1, n),
                           {"cls_attention": torch.randint(0, 3, (2, n), generator=generator).float()}) for n in sizes]
    sieve = FasterVLM(keep=keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetClampedWarning)
        batched = timed_select_all(sieve, images)
        alone = [sieve.select(tokens) for tokens in images]
    assert [selection.kept.tolist() for selection, _ in batched] == [selection.kept.tolist() for selection in alone]
    rows = torch.rand(3, 10, generator=generator)
    assert torch.equal(top_k_in_order(rows, 4), torch.stack([top_k_in_order(row, 4) for row in rows]))
