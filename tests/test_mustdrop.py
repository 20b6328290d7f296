"""MustDrop's vision stage: windows and similarities worked by hand on small grids, the merge cap and the key
tokens, a plain reference loop of the docstring's rule, the merge map the engine applies, and its arguments."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from tokensieve.sieve import VisualTokens
from tokensieve.signals import Signal

LAST = Signal("cls_attention", layers=(-1,))


def tokens_for(features, scores, grid, blocks=(), request=LAST):
    """One image with these projected tokens and key scores (two heads that disagree; their mean is ``scores``)."""
    features, scores = torch.as_tensor(features, dtype=torch.float), torch.as_tensor(scores, dtype=torch.float)
    heads = torch.stack([2 * scores, torch.zeros_like(scores)])
    signal = heads[None] if request == LAST else heads
    return VisualTokens(features, grid, {request: signal}, blocks)


def six_by_six(window_0, window_2):
    """A 6×6 grid, windows 0..3 (3×3 each): windows 0 and 2 hold the given directions, every other token its own."""
    features = torch.eye(64)[28:64].clone()  # 36 orthogonal tokens, orthogonal to e0..e27 too
    rows, cols = torch.arange(36) // 6, torch.arange(36) % 6
    in_0, in_2 = (rows < 3) & (cols < 3), (rows >= 3) & (cols < 3)
    features[in_0] = window_0
    features[in_2] = window_2
    return features


def test_windows_and_centres_on_a_partial_grid():
    """4×5 tiled by 3×3 windows from the top-left: 3×3, 3×2, 1×3, 1×2; centres (1,1), (1,3), (3,1), (3,3)."""
    tokens = tokens_for(torch.zeros(20, 4), torch.zeros(20), (4, 5))
    window, centre = ts.MustDrop(keep=4).windows(tokens)
    assert window.view(4, 5).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [2, 2, 2, 3, 3]]
    assert centre.tolist() == [6, 8, 16, 18]


def test_window_similarity_is_the_mean_pairwise_cosine_by_hand():
    """2×2 window: two tokens along e0, two along e1: 4 of the 12 ordered pairs have cosine 1, the rest 0: 1/3."""
    e0, e1 = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 0.5])  # lengths do not count
    features = torch.stack([e0, e1, e0, e1])
    scores = [0.1, 0.4, 0.3, 0.2]
    merged = ts.MustDrop(keep=1, window=2, threshold=0.33).select(tokens_for(features, scores, (2, 2)))
    assert merged.kept.tolist() == [0]  # the window's centre (0, 0) stands for it
    assert merged.assignment.tolist() == [0, 0, 0, 0]
    # above 1/3 the window stays apart and the key score picks the one token kept
    apart = ts.MustDrop(keep=1, window=2, threshold=0.34).select(tokens_for(features, scores, (2, 2)))
    assert apart.kept.tolist() == [1]
    assert apart.assignment.tolist() == [-1, 0, -1, -1]


def test_hand_worked_merge_then_key_tokens():
    """6×6, 3×3 windows: windows 0 and 2 are each one direction (similarity 1), windows 1 and 3 orthogonal tokens
    (similarity 0). Both similar windows merge: 36 - 2·8 = 20 units; the key score (raster index, a window the
    mean of its own) keeps the top 12."""
    e = torch.eye(64)
    features = six_by_six(e[0], e[1])
    scores = torch.arange(36).float()
    selection = ts.MustDrop(keep=12).select(tokens_for(features, scores, (6, 6)))
    # window 0 (tokens 0-2, 6-8, 12-14) scores 7 at centre 7; window 2 (18-20, 24-26, 30-32) scores 25 at 25;
    # the unmerged tokens of windows 1 and 3 score their index: the top 12 units are 35, 34, 33, 29, 28, 27, 25 (window 2),
    # 23, 22, 21, 17, 16
    assert selection.kept.tolist() == [16, 17, 21, 22, 23, 25, 27, 28, 29, 33, 34, 35]
    assignment = selection.assignment.view(6, 6)
    assert (assignment[3:, :3] == 5).all()  # window 2 went into token 25, the sixth kept
    assert (assignment[:3, :3] == -1).all()  # window 0 merged, then dropped whole
    assert selection.sizes().tolist() == [1] * 5 + [9] + [1] * 6
    # the engine gives token 25 the mean of its window
    values = torch.randn(36, 5)
    assert torch.allclose(selection.merged(values)[5], values.view(6, 6, 5)[3:, :3].reshape(9, 5).mean(0))


def test_merging_stops_before_the_budget_most_similar_first():
    """keep=25 leaves room for one merge (36 - 8 = 28 >= 25; two would leave 20): the more similar window merges."""
    e = torch.eye(64)
    features = six_by_six(e[0] + 0.2 * e[2] * (torch.arange(9) % 2).float()[:, None], e[1])  # window 0 below 1, window 2 at 1
    scores = torch.zeros(36)
    scores[:9] = 10.0  # every token of window 0 would be kept first if it stood alone
    selection = ts.MustDrop(keep=25).select(tokens_for(features, scores, (6, 6)))
    assignment = selection.assignment.view(6, 6)
    assert assignment[3:, :3].unique().numel() == 1  # window 2 merged into one token
    assert (assignment[:3, :3] >= 0).all() and assignment[:3, :3].unique().numel() == 9  # window 0 did not
    assert len(selection.kept) == 25


def test_below_the_threshold_nothing_merges_and_it_is_the_key_top_k():
    features = torch.eye(36)
    scores = torch.rand(36, generator=torch.Generator().manual_seed(0))
    selection = ts.MustDrop(keep=9).select(tokens_for(features, scores, (6, 6)))
    assert selection.kept.tolist() == sorted(scores.argsort(descending=True)[:9].tolist())
    assert selection.sizes().tolist() == [1] * 9


def test_pieces_merge_alone_and_the_newline_column_never():
    """An anyres-like layout: a 2×2 piece, a 2×2 piece and a 2×1 newline column of identical tokens."""
    blocks = (torch.arange(4).view(2, 2), 4 + torch.arange(4).view(2, 2), torch.tensor([[8], [9]]))
    features = torch.cat([torch.eye(3)[0].expand(4, 3), torch.eye(3)[1].expand(4, 3), torch.eye(3)[2].expand(2, 3)])
    selection = ts.MustDrop(keep=4, window=2).select(tokens_for(features, torch.zeros(10), (1, 10), blocks))
    assert selection.kept.tolist() == [0, 4, 8, 9]
    assert selection.assignment.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 3]


def test_keep_all_is_the_identity():
    tokens = tokens_for(torch.ones(9, 4), torch.zeros(9), (3, 3))
    selection = ts.MustDrop(keep=9).select(tokens)
    assert selection.kept.tolist() == list(range(9)) and selection.assignment is None


def test_key_signals():
    assert ts.MustDrop().requests() == (Signal("cls_attention", layers=(-1,)),)
    assert ts.MustDrop(key_layer=None).requests() == (Signal("cls_attention"),)
    received = Signal("vision_attention", layer=-1, queries="mean")
    assert ts.MustDrop(key="received").requests() == (received,)
    scores = torch.arange(9).float()
    for method, request in ((ts.MustDrop(keep=3, key="received"), received), (ts.MustDrop(keep=3, key_layer=None), Signal("cls_attention"))):
        assert method.select(tokens_for(torch.eye(9), scores, (3, 3), request=request)).kept.tolist() == [6, 7, 8]


def reference(features, scores, blocks, k, threshold, ws):
    """The docstring's rule, one window and one token at a time: (kept, assignment)."""
    n = len(features)
    windows = []  # (members, centre)
    for block in blocks:
        h, w = block.shape
        if h == 1 or w == 1:
            windows += [([t], t) for t in block.flatten().tolist()]
            continue
        for y0, x0 in itertools.product(range(0, h, ws), range(0, w, ws)):
            ys, xs = range(y0, min(y0 + ws, h)), range(x0, min(x0 + ws, w))
            members = [int(block[y, x]) for y in ys for x in xs]
            windows.append((members, int(block[y0 + (len(ys) - 1) // 2, x0 + (len(xs) - 1) // 2])))

    def similarity(members):
        if len(members) < 2:
            return float("-inf")
        pairs = [F.cosine_similarity(features[i], features[j], dim=0).item() for i in members for j in members if i != j]
        return sum(pairs) / len(pairs)

    order = sorted(range(len(windows)), key=lambda i: (-similarity(windows[i][0]), i))
    group, saved = list(range(n)), 0
    for i in order:
        members, centre = windows[i]
        if similarity(members) < threshold or saved + len(members) - 1 > n - k:
            break
        saved += len(members) - 1
        for t in members:
            group[t] = centre
    units = sorted(set(group))
    score = {u: sum(scores[t] for t in range(n) if group[t] == u) / group.count(u) for u in units}
    kept = sorted(sorted(units, key=lambda u: (-score[u], u))[:k])
    return kept, [kept.index(group[t]) if group[t] in kept else -1 for t in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_reference_loop(seed):
    g = torch.Generator().manual_seed(seed)
    h, w = [(6, 6), (5, 7), (8, 4), (7, 7), (4, 9), (6, 5)][seed]
    n = h * w
    # a few directions with noise, painted in blobs, so that some windows are similar and some are not
    centres = torch.randn(4, 16, generator=g)
    label = (torch.arange(h)[:, None] // 2 + torch.arange(w)[None, :] // 3).flatten() % 4
    features = centres[label] + 0.4 * torch.randn(n, 16, generator=g)
    scores = torch.rand(n, generator=g)
    layouts = [(torch.arange(n).view(h, w),), (torch.arange(n - h).view(h, w - 1), (n - h + torch.arange(h)).view(h, 1))]
    for blocks, ws, k, threshold in itertools.product(layouts, (2, 3), (n // 4, n // 2, n - 3), (0.5, 0.8)):
        tokens = tokens_for(features, scores, (1, n), blocks)
        selection = ts.MustDrop(keep=k, threshold=threshold, window=ws).select(tokens)
        kept, assignment = reference(features, scores.tolist(), blocks, k, threshold, ws)
        assert selection.kept.tolist() == kept
        assert selection.assignment.tolist() == assignment


def test_the_engine_accepts_its_map():
    from tokensieve.sieve import timed_select
    tokens = tokens_for(six_by_six(torch.eye(64)[0], torch.eye(64)[1]), torch.arange(36.0), (6, 6))
    method = ts.MustDrop(keep=0.25)
    selection, _ = timed_select(method, tokens)
    assert len(selection.kept) == 9


@pytest.mark.parametrize("kwargs, words", [
    ({"threshold": 1.5}, "threshold must be a cosine"),
    ({"threshold": True}, "threshold must be a cosine"),
    ({"window": 0}, "window must be a side"),
    ({"window": 2.0}, "window must be a side"),
    ({"key": "mean"}, "key must be one of"),
    ({"key_layer": 0}, "key_layer must be a vision layer"),
    ({"key_layer": True}, "key_layer must be a vision layer"),
    ({"keep": ts.Adaptive(coverage=0.9)}, "mustdrop takes Adaptive\\(mass=...\\)"),
])
def test_bad_arguments_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ts.MustDrop(**kwargs)


def test_built_from_its_spelling():
    method = ts.build("mustdrop:32,threshold=0.7,window=2")
    assert (method.keep, method.threshold, method.window, method.key, method.key_layer) == (32, 0.7, 2, "cls", -1)


def test_on_the_tiny_llava_the_llm_sees_each_windows_mean():
    """threshold=-1: every window may merge, as far as the budget lets; the engine records the groups and the
    decoder input holds each kept token's group mean (the stock tokens averaged by the recorded map)."""
    from conftest import build_model
    from tiny_models import LLAVA
    from tokensieve.adapters import adapter_for

    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs([[5, 6, 7, 8]])
    seen = []

    def decoder_input(method):
        with ts.apply(model, method) as run:
            hook = adapter_for(model).decoder.register_forward_pre_hook(
                lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
            try:
                model(**inputs)
            finally:
                hook.remove()
        return seen[-1], run

    stock, _ = decoder_input(ts.Uniform(keep=1.0))
    merged, run = decoder_input(ts.MustDrop(keep=16, threshold=-1.0))
    stage = run.stats.images[0].stages[0]
    assert len(stage.sizes) == 16 and int(stage.sizes.max()) > 1
    image = (inputs["input_ids"][0] == LLAVA.image_token).nonzero().squeeze(1)
    features = stock[0, image]
    means = torch.stack([features[stage.assignment == group].mean(0) for group in range(16)])
    start = int(image[0])
    torch.testing.assert_close(merged[0, start : start + 16], means, atol=1e-6, rtol=1e-5)


def test_received_attention_serves_a_tower_without_cls():
    """Qwen2-VL has no [CLS]: key="cls" is refused there, key="received" runs and merges on its 2D grid."""
    from conftest import build_model
    from families import FAMILIES

    family = next(f for f in FAMILIES if f.name == "qwen2_vl")
    model = build_model(family)
    with pytest.raises(ValueError, match="cls_attention"):
        ts.apply(model, ts.MustDrop(keep=16))
    with ts.apply(model, ts.MustDrop(keep=16, key="received", threshold=-1.0)) as run:
        model(**family.make_inputs([[5, 6, 7, 8]]))
    (record,) = run.stats.images
    assert record.after == 16 and int(record.stages[0].sizes.max()) > 1
