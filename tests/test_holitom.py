"""holitom (HoliTom's merging outside the LLM) and holitom_llm (its inner-LLM merge): a hand-worked video, the code's
dynamic programming and running average as plain loops, argument checks, and the chain on the tiny video model."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
import test_contract
from test_contract import TEXTS
from tiny_qwen2_vl import QWEN2_VL_VIDEO
from tokensieve.methods.holitom import ATTENTION, HoliTom
from tokensieve.sieve import VisualTokens

X, Y, Z = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
#: 4 frames of 2x2 places (p0..p3). Transitions 0-1: p0, p1 alike; 1-2: p0, p1, p3; 2-3: p3 alone. Segments (0, 2)
#: save 2 places x 2 frames = 4 tokens, more than (1, 2) with 3 places x 1, so the segments are (0, 2) and (3, 3)
FEATURES = torch.tensor([[X, Y, X, [1.0, 1.0, 0.0]],
                         [X, Y, Y, Z],
                         [X, Y, X, Z],
                         [Z, Z, Y, Z]]).view(16, 3)
ATTENTIONS = torch.tensor([[0.0, 0.0, 0.5, 0.2],
                           [0.0, 0.0, 0.1, 0.3],
                           [0.0, 0.0, 0.4, 0.4],
                           [0.1, 0.9, 0.3, 0.5]]).view(1, 16)


def a_video(features=FEATURES, attention=ATTENTIONS, t=4, h=2, w=2) -> VisualTokens:
    return VisualTokens(features, (1, t * h * w), signals={ATTENTION: attention}, frames=(t, h, w))


def test_static_tokens_merge_across_the_segment_and_the_rest_keep_by_attention():
    # 16 - 4 saved = 12 after static merging, in parts of 2 (static p0, p1), 2, 2, 2 (frames 0-2: p2, p3) and 4
    # (frame 3); keep=6 gives them 1, 1, 1, 1, 2. The static part's one cluster has its centre at p0 (equal density
    # and distance: the lower index), kept at frame 0; each frame keeps its most attended (frame 2: a tie, p2)
    selection = ts.load("holitom", keep=6).select(a_video())
    assert selection.kept.tolist() == [0, 2, 7, 10, 13, 15]
    assert selection.assignment.tolist() == [0, 0, 1, -1, 0, 0, -1, 2, 0, 0, 3, -1, -1, 4, -1, 5]
    merged = selection.group_means(FEATURES)
    assert torch.allclose(merged[0], torch.tensor([0.6, 0.4, 0.0]))  # 0.6 * mean(p0) + 0.4 * mean(p1)
    assert torch.equal(merged[1:], FEATURES[[2, 7, 10, 13, 15]])


def test_context_merges_the_rest_of_a_frame_by_density():
    # context=0.5: a share of 1 has round(0.5) = 0 dominant tokens (the code's round), so frames 0-2 cluster p2, p3
    # (centre p2); frame 3 keeps p1 (attention 0.9) and clusters p0, p2, p3 into p0
    selection = ts.load("holitom", keep=6, context=0.5).select(a_video())
    assert selection.kept.tolist() == [0, 2, 6, 10, 12, 13]
    assert selection.assignment.tolist() == [0, 0, 1, 1, 0, 0, 2, 2, 0, 0, 3, 3, 4, 5, 4, 4]
    assert torch.allclose(selection.weights, torch.tensor([0.6, 0.4, 0.6, 0.4] * 3 + [0.6, 1.0, 0.2, 0.2]))


def test_a_budget_above_what_static_merging_leaves_keeps_every_part_whole():
    selection = ts.load("holitom", keep=13).select(a_video())
    assert len(selection.kept) == 12  # 16 - 4: the code caps its raised ratio at 1
    assert selection.sizes().tolist() == [3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert ts.load("holitom", keep=16).select(a_video()).assignment is None


def reference_segments(feature_sim: torch.Tensor, tau: float) -> list[tuple[int, int]]:
    """The code's ``select_static_windows`` (cokeshao/HoliTom e9b2972f), step for step, MAX_WINDOW_SIZE 1024."""
    t = feature_sim.shape[0] + 1
    similarity_matrix = torch.ones((t, t, feature_sim.shape[1]))
    for start in range(t - 1):
        cum_similarity = torch.cumprod(feature_sim[start:] > tau, dim=0)
        similarity_matrix[start, start + 1:start + 1 + len(cum_similarity)] = cum_similarity
    window_lengths = (torch.arange(t).unsqueeze(0) - torch.arange(t).unsqueeze(1)).clamp(min=0)
    pruned_static_count = (similarity_matrix.sum(dim=-1) * window_lengths).float()
    dp, prev = torch.zeros(t), torch.zeros(t, dtype=torch.long)
    for i in range(t):
        max_val, best_j = (dp[i - 1] if i > 0 else 0), i
        for window_size in range(2, min(i + 1, 1024) + 1):
            j = i - window_size
            current_val = (dp[j] if j >= 0 else 0) + pruned_static_count[j + 1, i]
            if current_val > max_val:
                max_val, best_j = current_val, j + 1
        dp[i], prev[i] = max_val, best_j
    selected, i = [], t - 1
    while i >= 0:
        selected.append((prev[i].item(), i))
        i = prev[i].item() - 1
    return selected[::-1]


@pytest.mark.parametrize("seed", range(6))
def test_segments_match_the_code_dynamic_programming(seed):
    generator = torch.Generator().manual_seed(seed)
    t, places, tau = 9, 5, 0.5
    feature_sim = torch.rand(t - 1, places, generator=generator) ** 0.5  # mostly similar: long segments pay off
    dissimilar = feature_sim <= tau
    breaks = torch.cat([torch.zeros_like(dissimilar[:1]), dissimilar]).long().cumsum(dim=0)
    assert HoliTom.segments(breaks) == reference_segments(feature_sim, tau)


def test_the_count_is_exact_and_merges_stay_in_their_segment():
    t, h, w, d = 6, 2, 3, 4
    generator = torch.Generator().manual_seed(3)
    frames = torch.randn(1, h * w, d, generator=generator) + 0.2 * torch.randn(t, h * w, d, generator=generator)
    video = a_video(frames.flatten(0, 1), torch.rand(2, t * h * w, generator=generator), t, h, w)
    for keep in (3, 7, 12, 20):
        selection = ts.load("holitom", keep=keep, tau=0.9, context=0.5).select(video)
        assert len(selection.kept) == keep
        members = (selection.assignment >= 0).nonzero().squeeze(1)
        kept_frame = selection.kept[selection.assignment[members]] // (h * w)
        assert bool((kept_frame <= members // (h * w)).all())  # a static token's slot is its segment's first frame


@pytest.mark.parametrize("argument", [dict(tau=1.5), dict(tau=True), dict(context=-0.1), dict(beta=2)])
def test_refuses_bad_arguments(argument):
    with pytest.raises(ValueError, match=next(iter(argument))):
        ts.load("holitom", **argument)


@pytest.mark.parametrize("argument", [dict(layer=0), dict(layer=2.5), dict(layer=True)])
def test_holitom_llm_refuses_bad_layers(argument):
    with pytest.raises(ValueError, match="layer=.*HOLITOM_k"):
        ts.load("holitom_llm", **argument)


def test_refuses_a_still_image():
    image = VisualTokens(torch.randn(16, 4), (4, 4), signals={ATTENTION: torch.rand(1, 16)})
    with pytest.raises(ValueError, match="holitom acts on videos.*still image"):
        ts.load("holitom").select(image)


def test_holitom_llm_keeps_the_most_attended_and_folds_the_rest_in_by_hand():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [0.9, 0.0]])
    attention = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]])
    tokens = VisualTokens(hidden, (1, 5), {"llm_attention": attention})
    selection = ts.load("holitom_llm", keep=2).select(tokens)
    assert selection.kept.tolist() == [0, 1]
    assert selection.assignment.tolist() == [0, 1, 0, 1, 0]
    # token 0 takes 2 then 4: ((h0 + h2) / 2 + h4) / 2 = h0/4 + h2/4 + h4/2
    assert torch.allclose(selection.weights, torch.tensor([0.25, 0.5, 0.25, 0.5, 0.5]))


@pytest.mark.parametrize("seed", range(4))
def test_holitom_llm_equals_the_code_running_average(seed):
    generator = torch.Generator().manual_seed(seed)
    n, d, keep = 30, 6, 9
    hidden = torch.randn(n, d, generator=generator)
    attention = torch.rand(3, n, generator=generator)
    selection = ts.load("holitom_llm", keep=keep).select(VisualTokens(hidden, (1, n), {"llm_attention": attention}))
    # the code's loop (modeling_qwen2.py at e9b2972f): similarities once, then each dropped token in order
    top = attention.mean(dim=0).topk(keep).indices
    others = torch.tensor([i for i in range(n) if i not in top.tolist()])
    unit = hidden / hidden.norm(dim=-1, keepdim=True)
    nearest = (unit[others] @ unit[top].T).argmax(dim=1)
    states = hidden.clone()
    for i, target in zip(others.tolist(), nearest.tolist()):
        states[top[target]] = (states[top[target]] + states[i]) / 2
    assert selection.kept.tolist() == sorted(top.tolist())
    assert torch.allclose(selection.group_means(hidden), states[selection.kept], atol=1e-6)


def test_the_chain_runs_on_the_tiny_video_model():
    model = build_model(QWEN2_VL_VIDEO)
    inputs = QWEN2_VL_VIDEO.make_inputs(TEXTS)
    n = QWEN2_VL_VIDEO.tokens_per_image
    with ts.apply(model, ts.Chain(ts.load("holitom", keep=0.5, tau=0.9), ts.load("holitom_llm", keep=0.5, layer=1))) as run:
        model(**inputs)
    for record in run.stats.images:
        pre, inside = record.stages
        assert (pre.stage, inside.stage, inside.layer) == ("pre_llm", "in_llm", 1)
        assert pre.after <= n // 2 and inside.after == round(pre.after / 2)
        assert pre.sizes.sum() <= n and int(pre.sizes.max()) > 1  # static places merged across frames
        assert inside.sizes.sum() == pre.after


#: the contract's cases run with tau=1.0 (tests/cases.py), where no token is static; at 0.9 the tiny videos have static
#: and dynamic places (tau=0.8 makes every place static)
STATIC_CASES = [("holitom:tau=0.9", {}), ("holitom:tau=0.9+holitom_llm", {"layer": 1})]
CONTRACT_CHECKS = ["test_generate_with_cache_equals_a_no_cache_loop", "test_left_padded_batch_equals_each_row_alone",
                   "test_each_stage_keeps_a_subset_of_what_the_stage_before_it_kept"]


@pytest.mark.parametrize("check", CONTRACT_CHECKS)
@pytest.mark.parametrize("name, kwargs", STATIC_CASES, ids=[name for name, _ in STATIC_CASES])
def test_the_contract_with_static_merging(check, name, kwargs):
    getattr(test_contract, check)(QWEN2_VL_VIDEO, name, kwargs)
    if "+" not in name:
        test_contract.test_prefill_equals_the_stock_decoder_with_dropped_tokens_masked(QWEN2_VL_VIDEO, name, kwargs)
