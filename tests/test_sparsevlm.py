"""SparseVLM: the schedules, the recycling (DPC-KNN clusters as a merge map), the rater rule and v1's adaptive count
worked by hand or against loops of the official code's steps, and inside tiny models, where each stage reads the
decoder-input embeddings (``llm_input``) and the raters' eager attention rows of the layer before it (v2: divided by
a plain loop's all-ones attention under the rotation) and selects what the rule gives on them."""

from __future__ import annotations

import math
import warnings
from dataclasses import fields

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_in_llm import _image_blocks, _masked_stock_hidden
from tiny_models import LLAVA
from tiny_qwen2_vl import QWEN2_VL
from tokensieve.adapters import adapter_for
from tokensieve.methods.sparsevlm import (DEBIASED_ROWS, IMAGE_INPUT, ROWS, SCHEDULES, TEXT_INPUT, SparseVLM, SparseVLMStage,
                                          adaptive_count, choose_raters, code_totals, default_layers)
from tokensieve.methods.sparsevlm_recycling import dpc_knn, recycled, split_count
from tokensieve.selection import top_k_in_order
from tokensieve.sieve import VisualTokens
from tokensieve.signals import instruction_positions


def _tokens(mean: torch.Tensor, features: torch.Tensor | None = None, heads=None, entered=None, rows=ROWS) -> VisualTokens:
    """An image whose two heads disagree (one holds the even tokens' attention, the other the odd ones'), mean ``mean``,
    rated by one instruction token (so it rates: the only one)."""
    if heads is None:
        even = torch.arange(len(mean)) % 2 == 0
        heads = torch.stack([torch.where(even, 2 * mean, 0.0), torch.where(even, 0.0, 2 * mean)])
    n = heads.shape[-1]
    features = torch.zeros(n, 4) if features is None else features
    inputs = {IMAGE_INPUT: torch.zeros(n, 4), TEXT_INPUT: torch.zeros(1, 4)}
    return VisualTokens(features, (1, n), {rows: heads[:, None], **inputs}, entered=entered)


# the schedules


def test_the_code_schedules_with_their_recycled_tokens_and_the_layer_average():
    assert code_totals(SCHEDULES["1.5"][192], True) == (309, 204, 113)  # 300 + 9, 200 + 4, 110 + 3
    assert code_totals(SCHEDULES["1.5"][128], True) == (312, 117, 39)
    assert code_totals(SCHEDULES["1.5"][96], True) == (249, 55, 27)
    assert code_totals(SCHEDULES["1.5"][64], True) == (82, 32, 18)
    assert code_totals(SCHEDULES["2"][192], False) == (300, 200, 118)
    # 276 dropped at 576 -> 300: the top 30% + 1 = 83 candidates, 83 // 10 + 1 = 9 clusters
    assert recycled(276) == (83, 9) and recycled(1) == (1, 1) and recycled(30) == (10, 2)
    assert [split_count(c, n) for c, n in ((309, 576), (204, 309), (113, 204))] == [(300, 9), (200, 4), (110, 3)]
    # a budget that leaves no room for a cluster is a plain top-k
    assert split_count(1, 64) == (1, 0) and split_count(63, 64) == (62, 1)
    # "192 tokens" is a layer average over 32 layers: the code's comment counts 2·576 + 4·300 + 10·200 + 16·110
    assert round((2 * 576 + 4 * 300 + 10 * 200 + 16 * 110) / 32) == 191
    assert round((3 * 576 + 4 * 309 + 9 * 204 + 16 * 113) / 32) == 206  # as run: layers 0-2 see all, recycled included


def test_each_stage_keeps_the_code_counts_at_576_tokens():
    """The code's top-k and, recycling, its clusters on top: each stage's count is the code's at 576 tokens."""
    generator = torch.Generator().manual_seed(0)
    for method, expected in ((SparseVLM(), [(300, 9), (200, 4), (110, 3)]),
                             (SparseVLM(keep=0.2049, version="2"), [(300, 0), (200, 0), (118, 0)]),
                             (SparseVLM(keep=39, setting=128), [(303, 9), (110, 7), (36, 3)])):
        stages = method.schedule(32)
        assert [s.layer for s in stages] == [3, 7, 16]
        n = 576
        for stage, (top, clusters) in zip(stages, expected):
            scores = torch.rand(n, generator=generator)
            features = torch.randn(n, 8, generator=generator)
            selection = stage.select(_tokens(scores, features, heads=scores.repeat(2, 1), entered=576, rows=stage.rows))
            assert len(selection.kept) == top + clusters
            assert set(top_k_in_order(scores, top).tolist()) <= set(selection.kept.tolist())
            assert (selection.assignment is not None) == (clusters > 0)
            n = len(selection.kept)


def test_layers_scale_the_codes_to_the_depth():
    assert default_layers(32) == (3, 7, 16) and default_layers(4) == (1, 2, 3) and default_layers(28) == (3, 6, 14)
    assert default_layers(2) == (1,)
    stages = SparseVLM(keep=16, layers=(2, 5)).schedule(8)
    assert [s.layer for s in stages] == [2, 5]
    assert stages[0].share == pytest.approx(309 / 113) and stages[1].share == 1.0  # the first stage's, then the last


# one stage, by hand

MEAN = torch.tensor([5.0, 1.0, 9.0, 2.0, 8.0, 3.0, 0.5, 7.0, 4.0, 6.0, 0.2, 0.1])  # distinct, top 5: 2, 4, 7, 9, 0


def test_hand_worked_stage_keeps_the_top_and_recycles_the_best_dropped_into_one_cluster():
    # 6 of 12: top-5 and one cluster (7 dropped: int(2.1) + 1 = 3 candidates, 3 // 10 + 1 = 1 cluster)
    features = torch.arange(12 * 4, dtype=torch.float32).view(12, 4)
    selection = SparseVLMStage(keep=6).select(_tokens(MEAN, features))
    # candidates: the dropped 8 (4.0), 5 (3.0), 3 (2.0); one cluster, centred on the best of them (density ties: lower index)
    assert selection.kept.tolist() == [0, 2, 4, 7, 8, 9]
    expected = torch.full((12,), -1)
    expected[[0, 2, 4, 7, 8, 9]] = torch.arange(6)
    expected[[3, 5]] = 4  # they join token 8's group
    assert torch.equal(selection.assignment, expected)
    torch.testing.assert_close(selection.merged(features)[4], features[[3, 5, 8]].mean(0))
    torch.testing.assert_close(selection.merged(features)[:4], features[[0, 2, 4, 7]])


def test_without_recycling_and_with_a_covering_budget():
    plain = SparseVLMStage(keep=6, recycle=False).select(_tokens(MEAN))
    assert plain.kept.tolist() == [0, 2, 4, 7, 8, 9] and plain.assignment is None
    every = SparseVLMStage(keep=1.0).select(_tokens(MEAN))
    assert torch.equal(every.kept, torch.arange(12)) and every.assignment is None
    # an earlier stage keeps share x final (final of what the image entered with), never more than it has
    stage = SparseVLMStage(keep=4, share=2.0, recycle=False)
    assert stage.select(_tokens(MEAN, entered=100)).kept.tolist() == [0, 2, 3, 4, 5, 7, 8, 9]
    assert len(SparseVLMStage(keep=0.5, share=3.0).select(_tokens(MEAN, entered=12)).kept) == 12


def test_sparsevlm_plus_scores_with_the_heads_that_give_the_image_the_most_attention():
    # heads 1 and 2 spread the most mass (12, 11) over tokens 2-5; head 0 gives token 0 10, head 3 token 1 9
    heads = torch.zeros(4, 6)
    heads[0, 0], heads[3, 1], heads[1, 2:], heads[2, 2:] = 10.0, 9.0, 3.0, 2.75
    # every head (v1.5): token 0 10/4, token 1 9/4, tokens 2-5 5.75/4
    assert SparseVLMStage(keep=2, recycle=False).select(_tokens(None, heads=heads)).kept.tolist() == [0, 1]
    # v2 reads the debiased rows; 2 heads, round(4 * 14 / 32) or given: 1 and 2, tokens 2-5 tie (the lower index first)
    visual = _tokens(None, heads=heads, rows=DEBIASED_ROWS)
    for chosen in (None, 2):
        assert SparseVLMStage(keep=2, recycle=False, version="2", heads=chosen).select(visual).kept.tolist() == [2, 3]
    # 3 heads (1, 2, 0): token 0 10/3 beats 5.75/3; all 4: the plain mean
    assert SparseVLMStage(keep=2, recycle=False, version="2", heads=3).select(visual).kept.tolist() == [0, 2]
    assert SparseVLMStage(keep=2, recycle=False, version="2", heads=9).select(visual).kept.tolist() == [0, 1]


def test_only_the_raters_rows_score():
    """Instruction tokens 0 and 2 match the image's input embeddings and rate; token 1's row (all on token 3) is
    left out; v1 keeps int(rank·scale) of them (rank 1 of the two raters' equal rows: 2 tokens at scale 2)."""
    image = torch.tensor([[1.0, 0.0]] * 6)
    text = torch.tensor([[4.0, 0.0], [0.0, 0.0], [4.0, 0.0]])
    rows = torch.zeros(2, 3, 6)
    rows[:, 0] = rows[:, 2] = torch.tensor([0.1, 0.3, 0.0, 0.0, 0.2, 0.4])
    rows[:, 1, 3] = 1.0
    visual = VisualTokens(torch.zeros(6, 4), (1, 6), {ROWS: rows, IMAGE_INPUT: image, TEXT_INPUT: text})
    assert choose_raters(image, text).tolist() == [True, False, True]
    assert SparseVLMStage(keep=3, recycle=False).select(visual).kept.tolist() == [1, 4, 5]
    assert SparseVLMStage(keep=1, recycle=False, version="1", rank_scale=2).select(visual).kept.tolist() == [1, 5]
    # every text token alike: none above the mean, so all rate (the code's mean over no rows would be NaN)
    assert choose_raters(image, torch.zeros(3, 2)).tolist() == [True, True, True]


# DPC-KNN


def test_dpc_knn_by_hand():
    x = torch.tensor([[0.0], [1.0], [2.0], [50.0], [51.0], [90.0]])
    # k = 2 (itself and its nearest): densities exp(-1/2) for 0-4, ~0 for 90; 0 is densest (ties: the lower index)
    # distance to the nearest denser token: 0: the largest, 90; 1: 1; 2: 1; 50: 48; 51: 1 -> centres 0 and 50
    centres, assignment = dpc_knn(x, 2)
    assert centres.tolist() == [0, 3]
    assert assignment.tolist() == [0, 0, 0, 1, 1, 1]  # 90 is nearer 50 than 0


def _reference_dpc(x, clusters):
    """The code's cluster_and_merge steps for one image, written plainly (no tie noise)."""
    m, d = x.shape
    dist = torch.tensor([[float(torch.linalg.vector_norm(x[i] - x[j])) for j in range(m)] for i in range(m)]) / d ** 0.5
    density = [math.exp(-sum(v * v for v in sorted(dist[i].tolist())[:clusters]) / clusters) for i in range(m)]
    biggest = float(dist.max())
    parent = [min([float(dist[i, j]) for j in range(m) if density[j] > density[i]] or [biggest]) for i in range(m)]
    score = [parent[i] * density[i] for i in range(m)]
    centres = sorted(range(m), key=lambda i: -score[i])[:clusters]
    assignment = [min(range(clusters), key=lambda c: float(dist[centres[c], i])) for i in range(m)]
    for c, i in enumerate(centres):
        assignment[i] = c
    merged = torch.stack([x[[i for i in range(m) if assignment[i] == c]].mean(0) for c in range(clusters)])
    return centres, assignment, merged


@pytest.mark.parametrize("seed", range(4))
def test_dpc_knn_and_the_cluster_means_equal_the_code_steps(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(35, 6, generator=generator, dtype=torch.float64).float()
    clusters = recycled(115)[1]  # 35 candidates: 4 clusters
    centres, assignment = dpc_knn(x, clusters)
    ref_centres, ref_assignment, ref_merged = _reference_dpc(x.double(), clusters)
    assert centres.tolist() == ref_centres and assignment.tolist() == ref_assignment
    merged = torch.stack([x[assignment == c].mean(0) for c in range(clusters)])
    torch.testing.assert_close(merged.double(), ref_merged, atol=1e-6, rtol=1e-5)


# raters and v1's count (the rules the engine's rater rows would need)


def test_raters_are_the_text_tokens_above_the_mean_relevance():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert choose_raters(image, text).tolist() == [True, False, False]  # softmax [e², 1, 1] / (e² + 2): mean 1/3
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 0.0], [-1.0, -1.0]])
    assert choose_raters(image, text).tolist() == [True, True, False, False]
    generator = torch.Generator().manual_seed(3)
    image, text = torch.randn(20, 8, generator=generator), torch.randn(9, 8, generator=generator)
    relevance = [sum(math.exp(float(v @ t)) / sum(math.exp(float(v @ u)) for u in text) for v in image) / 20 for t in text]
    assert choose_raters(image, text).tolist() == [r > sum(relevance) / 9 for r in relevance]


def test_v1s_adaptive_count_is_the_rank_times_scale_plus_bias():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(40, generator=generator), torch.rand(40, generator=generator)
    rows = torch.stack([a, b, a + b])  # rank 2
    assert adaptive_count(rows) == 27 and adaptive_count(rows, 9, 6) == 24  # int(2·13.5), int(2·9 + 6) (POPE's)
    assert adaptive_count(rows[:, :10]) == 9  # at most N - 1
    assert adaptive_count(torch.eye(3)) == 3  # rank N: every token kept, as the code
    assert adaptive_count(rows, 0.1) == 1


def test_v1s_budget_is_a_floor_and_exact_at_the_last_stage():
    generator = torch.Generator().manual_seed(1)
    mean = torch.rand(40, generator=generator)
    heads = torch.stack([mean, mean * 2])  # rank 1: int(13.5) = 13 tokens and 1 cluster of the 27 dropped
    visual = _tokens(mean, heads=heads, entered=40)
    for keep, kept in ((1, 14), (10, 14), (20, 20), (1.0, 40)):
        assert len(SparseVLMStage(keep=keep, version="1").select(visual).kept) == kept
    assert set(top_k_in_order(mean, 13).tolist()) <= set(SparseVLMStage(keep=1, version="1").select(visual).kept.tolist())
    assert len(SparseVLMStage(keep=10, version="1", exact=True).select(visual).kept) == 10
    stages = SparseVLM(keep=10, version="1").schedule(32)
    assert [(s.layer, s.exact) for s in stages] == [(3, False), (7, False), (16, False), (20, True)]
    assert not any(s.exact for s in SparseVLM(keep=1, version="1", exact=False).schedule(32))


# inside tiny models


STILL_THERE = ts.Signal("llm_input")  # the decoder input at the image's tokens still there


class _Recording(SparseVLM):
    """SparseVLM whose stages record the signals (and llm_input at the tokens still there), hidden states and entered
    counts they are given."""

    def schedule(self, n_layers):
        owner, self.seen = self, []

        class Recording(SparseVLMStage):
            def requests(stage):
                return (*super().requests(), STILL_THERE)

            def select(stage, visual):
                signals = {request: visual[request].clone() for request in stage.requests()}
                owner.seen.append((stage.layer, signals, visual.features.clone(), visual.entered))
                return super().select(visual)

        return tuple(Recording(**{f.name: getattr(s, f.name) for f in fields(s)}) for s in super().schedule(n_layers))


def _decoder_inputs(model, inputs) -> torch.Tensor:
    """The stock decoder's input embeddings."""
    seen = []
    hook = adapter_for(model).decoder.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].detach().clone()), with_kwargs=True)
    try:
        model(**inputs)
    finally:
        hook.remove()
    return seen[0]


def _plain_raters(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The code's rule written out: mean over image tokens v of exp(v·t) / sum_u exp(v·u), above its mean."""
    relevance = []
    for t in text.double():
        relevance.append(sum(math.exp(float(v @ t)) / sum(math.exp(float(v @ u)) for u in text.double())
                             for v in image.double()) / len(image))
    mean = sum(relevance) / len(relevance)
    raters = torch.tensor([r > mean for r in relevance])
    return raters if bool(raters.any()) else torch.ones_like(raters)


def _plain_bias(cos: torch.Tensor, sin: torch.Tensor, queries, keys) -> torch.Tensor:
    """(Q, K) q·k / sqrt(d) of all-ones q, k rotated (x·cos + rotate_half(x)·sin) at each pair of positions, by loops."""
    d = cos.shape[-1]
    half = d // 2

    def rotated_ones(p):
        return [float(cos[p, i] - sin[p, i]) if i < half else float(cos[p, i] + sin[p, i]) for i in range(d)]

    q_rot, k_rot = [rotated_ones(int(p)) for p in queries], [rotated_ones(int(p)) for p in keys]
    return torch.tensor([[sum(a * b for a, b in zip(q, k)) / math.sqrt(d) for k in k_rot] for q in q_rot])


@pytest.mark.parametrize("version, keep, recycle", [("1", 1, False), ("1", 1, None), ("1.5", 8, None), ("2", 8, None)])
@pytest.mark.parametrize("family", [LLAVA, QWEN2_VL], ids=lambda f: f.name)
def test_each_stage_reads_the_raters_eager_rows_of_the_layer_before_and_selects_by_them(family, version, keep, recycle):
    """Stage s before layer K_s gets the decoder input at the image's tokens still there and at its instruction, and
    each instruction token's eager attention row in layer K_s - 1 of the stock model in which every layer masks what
    the stages before it dropped (and merges what they recycled); v2's divided by the all-ones attention under the
    rotation (a plain loop over the layer's cos/sin). The raters are the plain rule's on those inputs, v1's count is
    int(rank·13.5) by torch.linalg.matrix_rank, and each selection is the rule's on those eager rows."""
    model = family.build()
    model.set_attn_implementation("eager")
    inputs = family.make_inputs([[5, 6, 7, 8], [9, 10]])
    method = _Recording(keep=keep, version=version, recycle=recycle, exact=False)  # v1: the code's, the rank rule alone
    with ts.apply(model, method) as run:
        model(**inputs)
    records = run.stats.images
    if version != "1":
        assert [r.after for r in records] == [keep, keep]
    blocks = _image_blocks(inputs, family, records)
    embeds = _decoder_inputs(model, inputs)
    attentions, rotations = [], []
    hooks = [model.register_forward_hook(lambda m, a, out: attentions.append(out.attentions)),
             adapter_for(model).decoder.layers[0].register_forward_pre_hook(
                 lambda m, a, kw: rotations.append(kw["position_embeddings"]), with_kwargs=True)]
    try:
        _masked_stock_hidden(model, {**inputs, "output_attentions": True}, records, family)
    finally:
        for hook in hooks:
            hook.remove()
    mask, placeholders = inputs["attention_mask"], inputs["input_ids"] == family.image_token
    stages, seen = SparseVLM.schedule(method, 4), iter(method.seen)
    for stage_index, stage in enumerate(stages):
        for record, (row, positions) in zip(records, blocks):
            layer, got, features, entered = next(seen)
            assert layer == stage.layer and entered == family.tokens_per_image
            left = record.stages[stage_index - 1].kept if stage_index else torch.arange(record.before)
            text = instruction_positions(mask[row], placeholders[row], int(positions[-1]), mask.shape[1] - 1)
            image, instruction = embeds[row, positions], embeds[row, text]  # the raters' rule reads the whole image
            assert torch.equal(got[IMAGE_INPUT], image) and torch.equal(got[TEXT_INPUT], instruction)
            assert torch.equal(got[STILL_THERE], embeds[row, positions[left]])
            expected = attentions[-1][layer - 1][row][:, text][:, :, positions[left]].float()
            if version == "2":
                cos, sin = (t[row] if t.shape[0] > 1 else t[0] for t in rotations[-1])
                expected = expected / _plain_bias(cos.double(), sin.double(), text, positions[left]).float()
            torch.testing.assert_close(got[stage.rows], expected, atol=1e-6, rtol=1e-4)
            raters = _plain_raters(image, instruction)
            assert torch.equal(choose_raters(image, instruction), raters)
            chosen = stage.select(VisualTokens(features, (1, len(left)), {stage.rows: expected, IMAGE_INPUT: image,
                                                                          TEXT_INPUT: instruction}, entered=entered))
            assert torch.equal(left[chosen.kept], record.stages[stage_index].kept)
            if chosen.assignment is not None:
                assert torch.equal(chosen.assignment, record.stages[stage_index].assignment)
            if version == "1" and recycle is False:
                rank = int(torch.linalg.matrix_rank(expected[:, raters].mean(0)))
                n = len(left)
                assert len(chosen.kept) == (n if rank == n else max(min(int(rank * 13.5), n - 1), keep))
    if version in ("1", "1.5") and recycle is None:  # recycling ran: a stage merged a cluster of dropped tokens
        assert any(s.assignment is not None and bool((s.sizes > 1).any()) for r in records for s in r.stages)


def test_llm_input_is_the_decoder_input_at_the_tokens_still_there_after_a_pre_llm_stage_with_padding():
    """After uniform before the LLM (which packs the shorter row's left padding anew) and an in-LLM stage, each stage's
    llm_input is the decoder input at the image tokens still there (a recycled cluster: its centre's), at every token
    the image had there (``whole_image``: what uniform kept) and at the instruction tokens."""
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs([[5, 6, 7, 8], [9, 10]])
    embeds = _decoder_inputs(model, inputs)
    method = _Recording(keep=6)
    with ts.apply(model, ts.Chain(ts.build("uniform", keep=0.5), method)) as run:
        model(**inputs)
    records = run.stats.images
    mask, placeholders = inputs["attention_mask"], inputs["input_ids"] == LLAVA.image_token
    assert bool((mask == 0).any())
    seen = iter(method.seen)
    for stage_index in range(len(SparseVLM.schedule(method, 4))):
        for record, (row, positions) in zip(records, _image_blocks(inputs, LLAVA, records)):
            _, got, _, entered = next(seen)
            left = record.stages[stage_index].kept  # record.stages[0] is uniform's
            assert entered == len(record.stages[0].kept) and len(got[STILL_THERE]) == len(left)
            text = instruction_positions(mask[row], placeholders[row], int(positions[-1]), mask.shape[1] - 1)
            assert torch.equal(got[STILL_THERE], embeds[row, positions[left]])
            assert torch.equal(got[IMAGE_INPUT], embeds[row, positions[record.stages[0].kept]])
            assert torch.equal(got[TEXT_INPUT], embeds[row, text])


def test_repacked_positions_run_and_are_refused_on_mrope():
    inputs = LLAVA.make_inputs([[5, 6, 7, 8]])
    with ts.apply(build_model(LLAVA), SparseVLM(keep=8, positions="repack")) as run:
        build_model(LLAVA)(**inputs)
    assert run.stats.images[0].after == 8
    with pytest.raises(ValueError, match="positions='repack' needs 1D|multi-row"):
        with ts.apply(build_model(QWEN2_VL), SparseVLM(keep=8, positions="repack")):
            build_model(QWEN2_VL)(**QWEN2_VL.make_inputs([[5, 6]]))


def test_spellings_and_bad_arguments():
    assert ts.build("sparsevlm:0.2049,version=2") == SparseVLM(0.2049, version="2")
    assert ts.build("sparsevlm:39,version=1.5,setting=128") == SparseVLM(39, setting=128)
    assert ts.build("sparsevlm:39,version=1,rank_scale=9,rank_bias=6") == SparseVLM(39, version="1", rank_scale=9, rank_bias=6)
    with pytest.raises(ValueError, match="version='3': choose '1'"):
        SparseVLM(version="3")
    with pytest.raises(ValueError, match="llm_input\\(tokens=...\\) must be one of"):
        ts.Signal("llm_input", tokens="text")
    with pytest.raises(ValueError, match="llm_attention\\(debiased=...\\) must be True or False"):
        ts.Signal("llm_attention", queries="instruction", debiased=1)
    with pytest.raises(ValueError, match="exact=1: True"):
        SparseVLM(version=1, exact=1)
    with pytest.raises(ValueError, match="rank_scale=0: v1's count"):
        SparseVLM(version=1, rank_scale=0)
    with pytest.raises(ValueError, match="at most 4 stages at version='1'"):
        SparseVLM(version=1, layers=(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="setting=100: choose the code's schedule 192, 128, 96 or 64"):
        SparseVLM(setting=100)
    with pytest.raises(ValueError, match="at most 3 stages at version='1.5'"):
        SparseVLM(layers=(1, 2, 3, 4))
    for layers in ((3, 2), (0,), ()):
        with pytest.raises(ValueError, match="strictly increasing ints >= 1"):
            SparseVLM(layers=layers)
    with pytest.raises(ValueError, match="recycle='yes': pass True, False or None"):
        SparseVLM(recycle="yes")
    for version, heads in (("1.5", 14), ("2", 0), ("2", True)):
        with pytest.raises(ValueError, match="heads=.*SparseVLM\\+'s"):
            SparseVLM(version=version, heads=heads)
    with pytest.raises(ValueError, match="positions='gaps': choose 'original'"):
        SparseVLM(positions="gaps")
    with pytest.raises(ValueError, match="sparsevlm cannot take an adaptive budget"):
        SparseVLM(keep=ts.Adaptive(mass=0.9))
    with pytest.raises(TypeError, match="runs as stages inside the LLM"):
        SparseVLM().select(_tokens(MEAN))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="has 4 layers"):
            ts.apply(build_model(LLAVA), SparseVLM(layers=(2, 5)))
