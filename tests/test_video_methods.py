"""The video methods against vLLM's rules on fixed tensors, and on the tiny Qwen2-VL videos.

vLLM's functions are not importable here (no vLLM in the main environment), so ``vllm_evs_mask`` and
``vllm_vidcom2_mask`` are those functions as read (vllm/multimodal/evs.py ``compute_retention_mask`` at 926c71f6,
vllm/multimodal/video_prune/vidcom2.py at 0f17ee06), step for step with vLLM's operations, as the reference.
"""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS
from tiny_qwen2_vl import QWEN2_VL, QWEN2_VL_VIDEO
from tokensieve.sieve import VisualTokens

T, H, W, D = 4, 3, 5, 8


def vllm_evs_mask(embeds: torch.Tensor, t: int, h: int, w: int, q: float) -> torch.Tensor:
    frames = embeds.reshape(t, h, w, embeds.size(-1))
    dissimilarity = 1 - torch.nn.functional.cosine_similarity(frames[1:], frames[:-1], dim=-1)
    dissimilarity = torch.cat([255 * torch.ones_like(frames[:1, :, :, 0]), dissimilarity], dim=0).view(-1)
    order = torch.argsort(dissimilarity, dim=-1, descending=True, stable=True)
    retained = max(h * w, int(t * h * w * (1 - q)))
    mask = torch.zeros_like(dissimilarity, dtype=torch.bool)
    mask[order[:retained]] = True
    return mask


def vllm_vidcom2_mask(embeds: torch.Tensor, t: int, h: int, w: int, q: float) -> torch.Tensor:
    alphas = tuple(2.0**k for k in range(-3, 2))
    per_frame, total = h * w, t * h * w
    target = min(max(t, min(int(total * (1.0 - q)), total)), total)
    channels = max(1, int(embeds.size(-1) * 0.5))
    low = torch.topk(embeds.var(dim=0, unbiased=False), k=channels, largest=False).indices
    frames = torch.nn.functional.normalize(embeds.index_select(-1, low).view(t, per_frame, channels), dim=-1)

    def gaussian(x, center):
        return sum(torch.exp(-((x - center) ** 2).sum(-1) / (2.0 * a)) for a in alphas)

    v_score = gaussian(frames, frames.mean(dim=(0, 1), keepdim=True))
    similarity = v_score + gaussian(frames, frames.mean(dim=1, keepdim=True))
    frame_scores = -v_score.mean(dim=-1)
    probs = torch.softmax((frame_scores - frame_scores.max()) / 0.01, dim=0)
    ks = ((1.0 - q) * (1.0 + probs - probs.mean())).clamp(max=1.0).mul(per_frame).round().long().clamp(1, per_frame)
    mask = torch.zeros(t, per_frame, dtype=torch.bool)
    for i in range(t):
        mask[i].scatter_(0, torch.topk(similarity[i], k=int(ks[i]), largest=False, sorted=False).indices, True)
    flat, flat_similarity = mask.view(-1), similarity.view(-1)
    current = int(flat.sum())
    if current > target:
        kept = flat.nonzero().squeeze(-1)
        flat[kept[torch.topk(flat_similarity[kept], k=current - target, largest=True).indices]] = False
    elif current < target:
        free = (~flat).nonzero().squeeze(-1)
        flat[free[torch.topk(flat_similarity[free], k=target - current, largest=False).indices]] = True
    return flat


def a_video(seed: int, t=T, h=H, w=W) -> VisualTokens:
    features = torch.randn(t * h * w, D, generator=torch.Generator().manual_seed(seed))
    return VisualTokens(features, (1, t * h * w), blocks=tuple(torch.arange(t * h * w).view(t, h, w)), frames=(t, h, w))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("q", [0.5, 0.75, 0.95])  # N (1 - q) whole for N = 60: vidcom2's keep / N is vLLM's 1 - q
@pytest.mark.parametrize("method, reference", [("evs", vllm_evs_mask), ("vidcom2", vllm_vidcom2_mask)])
def test_matches_vllm_on_a_fixed_tensor(method, reference, q, seed):
    video = a_video(seed)
    count = int(len(video) * (1 - q))  # vLLM's count for its pruning rate q
    kept = ts.load(method, keep=max(count, 1)).select(video).kept
    expected = reference(video.features, T, H, W, q).nonzero().squeeze(1)
    assert torch.equal(kept, expected)


def test_evs_keeps_the_first_frame_and_the_patches_that_move():
    still = torch.randn(H * W, D, generator=torch.Generator().manual_seed(0))
    frames = still.repeat(T, 1, 1)
    for t, patch in ((1, 3), (2, 7), (3, 1)):  # one patch of each later frame changes, and stays so
        frames[t:, patch] = -still[patch]
    frames = frames.reshape(T * H * W, D)
    moving = [H * W + 3, 2 * H * W + 7, 3 * H * W + 1]
    video = VisualTokens(frames, (1, T * H * W), frames=(T, H, W))
    kept = ts.load("evs", keep=H * W + 3).select(video).kept
    assert kept.tolist() == list(range(H * W)) + moving
    # a budget below one frame keeps the first frame, as vLLM does
    assert ts.load("evs", keep=2).select(video).kept.tolist() == list(range(H * W))


def test_vidcom2_keeps_at_least_one_token_per_frame():
    video = a_video(1)
    kept = ts.load("vidcom2", keep=1).select(video).kept
    assert torch.bincount(kept // (H * W), minlength=T).tolist() == [1] * T


@pytest.mark.parametrize("method", ["evs", "vidcom2"])
def test_video_methods_refuse_a_still_image(method):
    image = VisualTokens(torch.randn(16, D), (4, 4))
    with pytest.raises(ValueError, match=f"{method} acts on videos.*still image"):
        ts.load(method).select(image)
    model = build_model(QWEN2_VL)
    with ts.apply(model, ts.load(method, keep=16)):
        with pytest.raises(ValueError, match=f"{method} acts on videos.*carries an image"):
            model(**QWEN2_VL.make_inputs(TEXTS))


@pytest.mark.parametrize("method", ["evs", "vidcom2"])
def test_video_methods_on_a_tiny_qwen2_vl_video_keep_the_frame_structure(method):
    model = build_model(QWEN2_VL_VIDEO)
    with ts.apply(model, ts.load(method, keep=0.25)) as run:
        model(**QWEN2_VL_VIDEO.make_inputs(TEXTS))
    for record in run.stats.images:
        assert record.after == 16
        counts = record.frame_counts
        if method == "evs":
            assert counts[0] == 16  # the first frame whole: 16 tokens is one frame of the tiny video
        else:
            assert bool((counts >= 1).all())


def tower_rows(model, inputs, method) -> tuple[list[int], object]:
    """The patch rows each vision-tower pass runs on under ``method`` (seen after tokensieve's hooks), and the stats."""
    rows = []
    with ts.apply(model, method) as run:
        handle = model.model.visual.register_forward_pre_hook(
            lambda m, a, kw: rows.append((a[0] if a else kw["hidden_states"]).shape[0]), with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
    return rows, run.stats


def test_uniform_frames_runs_the_tower_on_the_kept_frames_only():
    model = build_model(QWEN2_VL_VIDEO)
    inputs = QWEN2_VL_VIDEO.make_inputs(TEXTS)
    patches_per_frame = inputs["pixel_values_videos"].shape[0] // 2 // 4  # two videos of four frame pairs
    rows, stats = tower_rows(model, inputs, ts.load("uniform_frames", frames=2))
    assert rows == [2 * 2 * patches_per_frame]
    for record in stats.images:
        assert record.kept_frames.tolist() == [0, 2] and record.frame_counts.tolist() == [16, 0, 16, 0]
        assert [(s.method, s.stage) for s in record.stages] == [("uniform_frames", "frames")]
    rows, _ = tower_rows(model, inputs, ts.load("uniform_frames", keep=1.0))
    assert rows == [2 * 4 * patches_per_frame]  # every frame kept: the stock pass


class _KeepTokens(ts.sieve.Sieve):
    """A pre-LLM sieve keeping fixed token indices."""

    name = "keep_tokens"
    paper = "-"
    kept: torch.Tensor

    def select(self, tokens):
        return ts.sieve.Selection(self.kept)


def test_dropping_frames_before_the_tower_equals_dropping_their_tokens_after_it():
    """Qwen2-VL's tower encodes each frame pair on its own (attention within a frame pair, windows within a frame), so
    the kept frames' tokens are the same whether the tower saw the others or not."""
    model = build_model(QWEN2_VL_VIDEO)
    inputs = QWEN2_VL_VIDEO.make_inputs(TEXTS)
    with ts.apply(model, ts.load("uniform_frames", keep=32)):
        dropped_before = model(**inputs).logits
    after = _KeepTokens(keep=1.0)
    after.kept = torch.cat([torch.arange(16), torch.arange(32, 48)])
    with ts.apply(model, after):
        dropped_after = model(**inputs).logits
    torch.testing.assert_close(dropped_before, dropped_after, atol=1e-5, rtol=1e-4)


def test_a_frames_stage_then_a_pre_llm_method_sees_the_kept_frames():
    model = build_model(QWEN2_VL_VIDEO)
    with ts.apply(model, ts.Chain(ts.load("uniform_frames", frames=2), ts.load("evs", keep=20))) as run:
        model(**QWEN2_VL_VIDEO.make_inputs(TEXTS))
    for record in run.stats.images:
        assert [(s.method, s.after) for s in record.stages] == [("uniform_frames", 32), ("evs", 20)]
        assert record.frame_counts[0] == 16 and record.frame_counts[1] == record.frame_counts[3] == 0


@pytest.mark.parametrize("methods", [("evs", "uniform_frames"), ("fastv", "uniform_frames")])
def test_stages_out_of_order_are_refused(methods):
    with pytest.raises(ValueError, match="at most one frames method, first"):
        ts.Chain(*(ts.load(name) for name in methods))


def test_a_frames_stage_refuses_a_pre_llm_method_that_reads_the_tower():
    model = build_model(QWEN2_VL_VIDEO)
    with pytest.raises(ValueError, match="after uniform_frames drops frames before the vision tower, hiprune would read"):
        ts.apply(model, ts.Chain(ts.load("uniform_frames"), ts.load("hiprune", object_layer=1)))


def test_the_vision_flops_fall_with_the_frames_dropped():
    model = build_model(QWEN2_VL_VIDEO)
    inputs = QWEN2_VL_VIDEO.make_inputs(TEXTS[:1])
    counts = []
    for frames in (4, 2, 1):
        with ts.apply(model, ts.load("uniform_frames", frames=frames), vision_flops=True) as run:
            model(**inputs)
        counts.append(run.stats.vision_flops)
    assert counts[0] > counts[1] > counts[2] > 0
    # a token budget keeps the same 2 of 4 pairs; the count replays the kept pairs' pass once, not dropped again
    with ts.apply(model, ts.load("uniform_frames", keep=0.5), vision_flops=True) as run:
        model(**inputs)
    assert run.stats.vision_flops == counts[1]


def test_a_frames_stage_refuses_an_in_llm_method_that_reads_the_tower():
    model = build_model(QWEN2_VL_VIDEO)
    with pytest.raises(ValueError, match="after uniform_frames drops frames before the vision tower, mustdrop_llm would read"):
        ts.apply(model, ts.Chain(ts.load("uniform_frames"), ts.load("mustdrop_llm")))
    with ts.apply(model, ts.load("divprune")):  # refused before any hook stayed
        pass
