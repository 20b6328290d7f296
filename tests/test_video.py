"""Video as one visual input with a (t, h, w) grid (docs/video.md): Qwen2-VL / Qwen2.5-VL videos next to images in one
prompt, the frame axis in VisualTokens and run.stats, kept tokens at the unpruned video's 3D positions, budgets per
video and per frame, and bad video input refused with the model untouched. The shared contract runs on videos as
the families ``qwen2_vl_video`` and ``qwen2_5_vl_video`` (tests/families.py)."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS, _assert_same, _snapshot, greedy
from tiny_models import IMAGE_TOKEN, LLAVA
from tiny_qwen2_vl import (
    FRAME_GRID, QWEN2_5_VL, QWEN2_5_VL_VIDEO, QWEN2_VL, QWEN2_VL_VIDEO, TOKENS_PER_FRAME, TOKENS_PER_IMAGE,
    TOKENS_PER_VIDEO, VIDEO_TOKEN, VISION_END, VISION_START, flattened_video, qwen2_vl_inputs, qwen2_vl_video_inputs,
    random_video,
)
from tokensieve.adapters import adapter_for
from tokensieve.sieve import Selection, Sieve

VIDEO_FAMILIES = [pytest.param(family, id=family.name) for family in (QWEN2_VL_VIDEO, QWEN2_5_VL_VIDEO)]
FRAMES_T = TOKENS_PER_VIDEO // TOKENS_PER_FRAME  # frames (temporal patch pairs) of the tiny video


def image_and_video(texts, seed=1, second_per_grid=None) -> dict:
    """Each row ``1, image, video, text``: the processor's layout for a prompt with an image and then a video."""
    images = qwen2_vl_inputs([[]] * len(texts), seed=seed)
    videos = qwen2_vl_video_inputs([[]] * len(texts), seed=seed, second_per_grid=second_per_grid)
    rows = []
    for row, text in enumerate(texts):
        image_ids = images["input_ids"][row][images["attention_mask"][row].bool()].tolist()
        video_ids = videos["input_ids"][row][videos["attention_mask"][row].bool()].tolist()[1:]  # one leading 1
        rows.append(image_ids + video_ids + text)
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    types = torch.where(input_ids == VIDEO_TOKEN, 2, (input_ids == IMAGE_TOKEN).int())
    return {**images, **videos, "input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": types}


def decoder_positions(model, inputs, method=None):
    """The position ids the decoder receives (3, batch, width), after tokensieve's hook, and the run's stats (None for
    the stock model)."""
    seen = []
    run = ts.apply(model, method) if method is not None else None
    handle = adapter_for(model).decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"]),
                                                                  with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
        if run is not None:
            run.remove()
    return seen[0], (run.stats if run is not None else None)


@pytest.mark.parametrize("family", [QWEN2_VL, QWEN2_5_VL], ids=lambda f: f.name)
def test_an_image_and_a_video_in_one_prompt(family):
    model = build_model(family)
    inputs = image_and_video(TEXTS, second_per_grid=2.0 if family is QWEN2_5_VL else None)
    stock_logits, stock_tokens = model(**inputs).logits, greedy(model, inputs)
    with ts.apply(model, ts.load("divprune", keep=1.0)) as run:
        assert torch.equal(model(**inputs).logits, stock_logits)
        assert torch.equal(greedy(model, inputs), stock_tokens)
    kinds = [(r.row, r.before, r.frames) for r in run.stats.images[:4]]
    assert kinds == [(0, TOKENS_PER_IMAGE, None), (1, TOKENS_PER_IMAGE, None),
                     (0, TOKENS_PER_VIDEO, (FRAMES_T, 4, 4)), (1, TOKENS_PER_VIDEO, (FRAMES_T, 4, 4))]
    with ts.apply(model, ts.load("divprune", keep=16)) as run:
        pruned = greedy(model, inputs)
    assert [r.after for r in run.stats.images[:4]] == [16] * 4 and pruned.shape == stock_tokens.shape
    video = run.stats.images[2]
    assert int(video.frame_counts.sum()) == 16 and torch.equal(video.kept_frames, video.frame_counts.nonzero().squeeze(1))
    if family is QWEN2_5_VL:
        assert torch.equal(video.timestamps, torch.arange(FRAMES_T) * 2.0)
    else:
        assert video.timestamps is None  # Qwen2-VL numbers frames 0, 1, ... and has no seconds


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_kept_video_tokens_keep_all_three_positions_of_the_unpruned_video(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS)
    stock, _ = decoder_positions(model, inputs)
    pruned, stats = decoder_positions(model, inputs, ts.load("random", keep=16))
    keep = torch.ones(inputs["input_ids"].shape, dtype=torch.bool)
    for record in stats.images:
        video = (inputs["input_ids"][record.row] == VIDEO_TOKEN).nonzero().squeeze(1)
        keep[record.row, video] = False
        keep[record.row, video[record.kept]] = True
        t, h, w = record.frames
        frame, place = record.kept // (h * w), record.kept % (h * w)
        kept = stock[:, record.row, video[record.kept]]
        # the temporal axis follows the frame, the others the place in the frame, as in the unpruned video
        assert torch.equal(kept[0] - kept[0, 0], (frame - frame[0]) * (kept[0].max() - kept[0].min()) // max(int(frame[-1] - frame[0]), 1))
        assert torch.equal(kept[1] - stock[1, record.row, video[0]], place // w)
        assert torch.equal(kept[2] - stock[2, record.row, video[0]], place % w)
    for row in range(keep.shape[0]):  # each packed row: the stock positions of what it kept, all three axes
        kept = keep[row].nonzero().squeeze(1)
        assert torch.equal(pruned[:, row, -len(kept):], stock[:, row, kept])


class _Records(Sieve):
    """Keeps every token and records what it was given."""

    name = "records"
    paper = "-"
    seen: list

    def select(self, tokens):
        self.seen.append(tokens)
        return Selection.every(tokens)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_a_video_reaches_the_sieve_as_frames(family):
    model = build_model(family)
    sieve = _Records(keep=1.0)
    sieve.seen = []
    with ts.apply(model, sieve):
        model(**family.make_inputs(TEXTS[:1]))
    (tokens,) = sieve.seen
    t, h, w = tokens.frames
    assert (t, h, w) == (FRAMES_T, FRAME_GRID // 2, FRAME_GRID // 2) and tokens.grid == (1, t * h * w)
    assert [block.tolist() for block in tokens.layout()] == torch.arange(t * h * w).view(t, h, w).tolist()


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_budgets_per_video_and_per_frame(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS, n_images=[2, 1])
    with ts.apply(model, ts.load("random", keep=ts.Budget(total=24))) as run:
        model(**inputs)
    assert [r.after for r in run.stats.images] == [12, 12, 24]  # a prompt's videos share its total
    with ts.apply(model, ts.load("pool", keep=ts.Budget(8, per_crop=True))) as run:
        model(**inputs)
    for record in run.stats.images:  # per frame: the count shared among the frames, two each
        assert record.frame_counts.tolist() == [2] * FRAMES_T


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_a_total_budget_below_one_token_per_frame_is_refused(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS[:1])
    before = _snapshot(model)
    with ts.apply(model, ts.load("random", keep=ts.Budget(total=FRAMES_T - 1))):
        with pytest.raises(ValueError, match=f"total budget of {FRAMES_T - 1} tokens.*{FRAMES_T} frames"):
            model(**inputs)
    _assert_same(model, before)


def _one_video_prompt(video: torch.Tensor, tokens: int, grid_thw: list[int]) -> dict:
    ids = torch.tensor([[1, VISION_START] + [VIDEO_TOKEN] * tokens + [VISION_END, 5, 6]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == VIDEO_TOKEN).int() * 2,
            "pixel_values_videos": video, "video_grid_thw": torch.tensor([grid_thw])}


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_bad_videos_are_refused_before_the_model_runs(family):
    model = build_model(family)
    before = _snapshot(model)
    frames = random_video(1, 0)
    # frames of different sizes: pixels for the first frames at 32 px and the rest at 16 px, under one grid
    mixed = torch.cat([flattened_video(frames[:4]), flattened_video(frames[4:, :, :16, :16])])
    empty = _one_video_prompt(torch.zeros(0, flattened_video(frames).shape[1]), 0, [0, FRAME_GRID, FRAME_GRID])
    cases = [
        (_one_video_prompt(mixed, TOKENS_PER_VIDEO, [FRAMES_T, FRAME_GRID, FRAME_GRID]), "every frame of a video must have the same size"),
        (empty, "an empty video"),
    ]
    with ts.apply(model, ts.load("random", keep=16)):
        for inputs, message in cases:
            with pytest.raises(ValueError, match=message):
                model(**inputs)
    _assert_same(model, before)


def test_a_family_that_takes_no_video_says_so():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS[:1])
    before = _snapshot(model)
    with ts.apply(model, ts.load("random", keep=16)):
        with pytest.raises(ValueError, match="carries a video.*only on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-OneVision.*frames as images"):
            model(**inputs, pixel_values_videos=torch.randn(1, 2, 3, 32, 32))
    _assert_same(model, before)
