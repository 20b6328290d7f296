"""prunevid (PruneVid's merging before the LLM) and prunevid_llm (its question-guided pruning inside it): a
hand-worked video, the code's cluster refinement, static test and DPC-kNN as plain loops, argument checks, and the
chain on the tiny video model."""

from __future__ import annotations

import math

import pytest
import torch

import tokensieve as ts
from conftest import build_model
import test_contract
from test_contract import TEXTS
from tiny_qwen2_vl import QWEN2_VL_VIDEO
from tokensieve.methods.prunevid import refine
from tokensieve.methods.prunevid_llm import QUESTION
from tokensieve.methods.sparsevlm_recycling import dpc_knn
from tokensieve.sieve import VisualTokens

X, Y, Z, XY = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]
NX, NY, NZ, NXY = ([-v for v in vector] for vector in (X, Y, Z, XY))
#: 4 frames of 2x2 places. Frames 0, 1 share their mean, and so do frames 2, 3: two segments. In (0, 1) places p0, p1
#: stay (cosine 1) and p2, p3 change (cosine 0); in (2, 3) p0, p3 stay and p1, p2 change
FEATURES = torch.tensor([[X, Y, Z, XY],
                         [X, Y, XY, Z],
                         [NX, NY, NZ, NXY],
                         [NX, NZ, NY, NXY]]).view(16, 3)


def a_video(features=FEATURES, t=4, h=2, w=2) -> VisualTokens:
    return VisualTokens(features, (1, t * h * w), frames=(t, h, w))


def test_segments_static_tokens_and_clusters_by_hand():
    method = ts.load("prunevid", keep=6, segment_ratio=0.5)
    assert method.segments(FEATURES.view(4, 4, 3)) == [(0, 1), (2, 3)]
    # parts: static (p0, p1), frame 0 (p2, p3), frame 1 (p2, p3), static (p0, p3), frame 2 (p1, p2), frame 3 (p1, p2),
    # 2 tokens each; keep=6 gives each one cluster, centred on its first place (equal density and distance)
    selection = method.select(a_video())
    assert selection.kept.tolist() == [0, 2, 6, 8, 9, 13]
    assert selection.assignment.tolist() == [0, 0, 1, 1, 0, 0, 2, 2, 3, 4, 4, 3, 3, 5, 5, 3]
    merged = selection.group_means(FEATURES)
    assert torch.allclose(merged[0], torch.tensor([0.5, 0.5, 0.0]))  # the plain mean of p0, p1 over frames 0, 1
    assert torch.allclose(merged[3], torch.tensor([-1.0, -0.5, 0.0]))  # of p0, p3 over frames 2, 3


def test_a_budget_above_what_static_merging_leaves_keeps_each_static_place_once():
    selection = ts.load("prunevid", keep=13, segment_ratio=0.5).select(a_video())
    assert len(selection.kept) == 12  # 16 less the 4 static places' second frames
    assert selection.sizes().tolist().count(2) == 4
    assert ts.load("prunevid", keep=16).select(a_video()).assignment is None


def reference_refine(labels: list[int]) -> list[int]:
    """The code's ``refine_clusters`` (Visual-AI/PruneVid b12600c6) for one video, step for step."""
    n, refined = len(labels), list(labels)
    info = {}
    for label in sorted(set(labels)):
        indices = [i for i, x in enumerate(labels) if x == label]
        segments, start, prev = [], indices[0], indices[0]
        for i in indices[1:]:
            if i == prev + 1:
                prev = i
            else:
                segments.append((start, prev))
                start = prev = i
        segments.append((start, prev))
        info[label] = segments
    for label, segments in info.items():
        longest = max(e - s + 1 for s, e in segments)
        for s, e in segments:
            if longest == 1 or e - s + 1 != longest:
                refined[s:e + 1] = [-1] * (e - s + 1)
    i = 0
    while i < n:
        if refined[i] != -1:
            i += 1
            continue
        start = i
        while i < n and refined[i] == -1:
            i += 1
        end = i - 1
        left_label = right_label = None
        left_length = right_length = 0
        if start > 0:
            left_label, l_idx = refined[start - 1], start - 1
            while l_idx >= 0 and refined[l_idx] == left_label:
                l_idx -= 1
            left_length = start - l_idx - 1
        if end < n - 1:
            right_label, r_idx = refined[end + 1], end + 1
            while r_idx < n and refined[r_idx] == right_label:
                r_idx += 1
            right_length = r_idx - end - 1
        if left_length > right_length:
            label = left_label
        elif right_length > left_length:
            label = right_label
        else:
            label = left_label if left_label is not None else right_label
        refined[start:end + 1] = [0 if label is None else label] * (end - start + 1)
    return refined


def test_refine_by_hand():
    assert refine([0, 0, 1, 0, 0, 2, 2, 1, 1, 1]) == [0, 0, 0, 0, 0, 2, 2, 1, 1, 1]  # a tie goes left
    assert refine([0, 1, 2, 3]) == [0, 0, 0, 0]  # every run a single frame: cluster 0
    assert refine([0, 1, 0, 1, 1]) == [1, 1, 1, 1, 1]


@pytest.mark.parametrize("seed", range(20))
def test_refine_matches_the_code(seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (16,), generator=generator).tolist()
    assert refine(labels) == reference_refine(labels)


def test_static_places_match_the_code_pairwise_mean():
    generator = torch.Generator().manual_seed(0)
    window = torch.randn(1, 30, 5, generator=generator) + 0.5 * torch.randn(3, 30, 5, generator=generator)
    unit = window / window.norm(dim=-1, keepdim=True)
    pairs = [(w, v) for w in range(3) for v in range(3) if w != v]
    mean = sum((unit[w] * unit[v]).sum(dim=-1) for w, v in pairs) / len(pairs)
    static = ts.load("prunevid", tau=0.7)._static(window)
    assert torch.equal(static, mean > 0.7) and 0 < int(static.sum()) < 30


@pytest.mark.parametrize("seed", range(3))
def test_dpc_knn_with_seven_neighbours_matches_the_code_steps(seed):
    x = torch.randn(1, 20, 4, generator=torch.Generator().manual_seed(seed))
    clusters = 6
    # cluster_dpc_knn (modeling_pllava.py at b12600c6) without its 1e-6 noise: k = 7 nearest for the density
    dist = torch.cdist(x, x) / math.sqrt(4)
    density = (-(dist.topk(7, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()
    mask = (density[:, None, :] > density[:, :, None]).float()
    parent = (dist * mask + dist.flatten(1).max(dim=-1).values[:, None, None] * (1 - mask)).min(dim=-1).values
    centres = (parent * density).topk(clusters, dim=-1).indices[0]
    joined = dist[0][centres].argmin(dim=0)
    joined[centres] = torch.arange(clusters)
    ours, assignment = dpc_knn(x[0], clusters, 7)
    assert ours.tolist() == centres.tolist() and assignment.tolist() == joined.tolist()


def test_the_count_is_exact_down_to_what_static_merging_leaves():
    t, h, w, d = 8, 3, 3, 4
    generator = torch.Generator().manual_seed(1)
    frames = torch.randn(2, 1, h * w, d, generator=generator).repeat_interleave(4, dim=0)
    frames = frames.flatten(0, 1) + 0.3 * torch.randn(t, h * w, d, generator=generator)
    method = ts.load("prunevid")
    # two scenes of four frames; 7 and 8 places static: parts of 7, 2 x 4, 8 and 1 x 4 tokens, 27 in all
    assert method.segments(frames) == [(0, 3), (4, 7)]
    assert [int(method._static(frames[a:b + 1]).sum()) for a, b in method.segments(frames)] == [7, 8]
    for keep in (4, 9, 20, 27, 40):
        selection = ts.load("prunevid", keep=keep).select(a_video(frames.flatten(0, 1), t, h, w))
        assert len(selection.kept) == min(keep, 27)
        # a part whose share rounds to nothing is dropped; from 20 on every part has a cluster
        assert bool((selection.assignment >= 0).all()) == (keep >= 20)


@pytest.mark.parametrize("argument", [dict(tau=-2), dict(tau=True), dict(segment_ratio=1.5), dict(segment_ratio=None)])
def test_refuses_bad_arguments(argument):
    with pytest.raises(ValueError, match=next(iter(argument))):
        ts.load("prunevid", **argument)


@pytest.mark.parametrize("argument", [dict(layer=0), dict(layer="11")])
def test_prunevid_llm_refuses_bad_layers(argument):
    with pytest.raises(ValueError, match="layer=.*selected_layer"):
        ts.load("prunevid_llm", **argument)


def test_refuses_a_still_image():
    with pytest.raises(ValueError, match="prunevid acts on videos.*still image"):
        ts.load("prunevid").select(VisualTokens(torch.randn(16, 4), (4, 4)))


def test_prunevid_llm_keeps_the_tokens_any_question_token_attends_to_most():
    # (heads, queries, tokens): token 3 wins on head 1's second query alone; token 0 on head 0's first
    attention = torch.tensor([[[0.6, 0.1, 0.2, 0.1], [0.3, 0.3, 0.3, 0.1]],
                              [[0.2, 0.5, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]]])
    tokens = VisualTokens(torch.zeros(4, 8), (1, 4), {QUESTION: attention})
    assert ts.load("prunevid_llm", keep=2).select(tokens).kept.tolist() == [0, 3]
    assert ts.load("prunevid_llm", keep=3).select(tokens).kept.tolist() == [0, 1, 3]


def test_the_chain_runs_on_the_tiny_video_model():
    model = build_model(QWEN2_VL_VIDEO)
    inputs = QWEN2_VL_VIDEO.make_inputs(TEXTS)
    n = QWEN2_VL_VIDEO.tokens_per_image
    with ts.apply(model, ts.Chain(ts.load("prunevid", keep=10, tau=0.9), ts.load("prunevid_llm", keep=0.4, layer=1))) as run:
        model(**inputs)
    for record in run.stats.images:
        pre, inside = record.stages
        assert (pre.stage, pre.after, inside.stage, inside.layer) == ("pre_llm", 10, "in_llm", 1)
        assert inside.after == 4 and pre.sizes.sum() == n  # 0.4 of the 10 the video entered the LLM with


#: the contract's cases run with tau=1.0 (tests/cases.py), where no token is static; at 0.9 the tiny videos have static
#: and dynamic places (tau=0.8 makes every place static)
STATIC_CASES = [("prunevid:tau=0.9", {}), ("prunevid:tau=0.9+prunevid_llm", {"layer": 1})]
CONTRACT_CHECKS = ["test_generate_with_cache_equals_a_no_cache_loop", "test_left_padded_batch_equals_each_row_alone",
                   "test_each_stage_keeps_a_subset_of_what_the_stage_before_it_kept"]


@pytest.mark.parametrize("check", CONTRACT_CHECKS)
@pytest.mark.parametrize("name, kwargs", STATIC_CASES, ids=[name for name, _ in STATIC_CASES])
def test_the_contract_with_static_merging(check, name, kwargs):
    getattr(test_contract, check)(QWEN2_VL_VIDEO, name, kwargs)
    if "+" not in name:
        test_contract.test_prefill_equals_the_stock_decoder_with_dropped_tokens_masked(QWEN2_VL_VIDEO, name, kwargs)
