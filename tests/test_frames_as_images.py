"""Videos given as their frames, one image per frame, on a family that takes images only (``video_frames=``,
tokensieve/engine/video_frames.py, docs/video.md), on the tiny LLaVA of tests/tiny_llava_frames.py: a video is one
visual input whose positions skip the newline between its frames, with its frames' signals; run.stats has one video
record; a still image beside a video; the ``frames`` stage runs the tower on the kept frames only and equals the same
frames dropped after it; bad counts, families and frames are refused with the model untouched. The shared contract runs
on the families ``llava_frames`` and ``gemma3_frames`` (tests/families.py); the frames stage is checked on both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS, _assert_same, _snapshot, greedy
from tiny_llava_frames import FRAMES, LLAVA_FRAMES, NEWLINE, TOKENS_PER_FRAME, TOKENS_PER_VIDEO, llava_frames_inputs
from tiny_gemma3 import GEMMA3_FRAMES
from tiny_models import IMAGE_TOKEN, LLAVA
from tiny_llava_next import LLAVA_NEXT
from tiny_qwen2_vl import QWEN2_VL
from tokensieve.adapters import ImageSlot, adapter_for
from tokensieve.engine.video_frames import VideoFrames
from tokensieve.sieve import Selection, Sieve
from tokensieve.signals import Signal

SIDE = 4  # a 32-pixel frame of 8-pixel patches


class _Records(Sieve):
    """Keeps every token, or the tokens ``keeping(tokens)`` gives, and records what it was given."""

    name = "records"
    paper = "-"
    signals = ("vision_attention", "cls_attention", "vision_keys", "vision_features", "project")
    asks: tuple = ()
    seen: list
    keeping = None

    def requests(self):
        return self.asks

    def select(self, tokens):
        self.seen.append(tokens)
        return Selection.every(tokens) if self.keeping is None else Selection(self.keeping(tokens))


def recorder(*asks, keeping=None) -> _Records:
    sieve = _Records(keep=1.0)
    sieve.asks, sieve.seen, sieve.keeping = asks, [], keeping
    return sieve


def decoder_inputs(model, inputs, method=None, **options):
    """The decoder's ``inputs_embeds`` (after tokensieve's hook) and the run's stats (None for the stock model)."""
    seen = []
    run = ts.apply(model, method, **options) if method is not None else None
    handle = adapter_for(model).decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"]),
                                                                  with_kwargs=True)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
        if run is not None:
            run.remove()
    return seen[0], logits, (run.stats if run is not None else None)


def test_a_video_is_one_input_of_its_frames_placeholders_in_order_and_the_newlines_stay_text():
    model = build_model(LLAVA_FRAMES)
    inputs = LLAVA_FRAMES.make_inputs(TEXTS)
    stock, _, _ = decoder_inputs(model, inputs)
    sieve = recorder()
    decoder_inputs(model, inputs, sieve, video_frames=FRAMES)
    assert len(sieve.seen) == len(TEXTS)
    for row, tokens in enumerate(sieve.seen):
        assert tokens.frames == (FRAMES, SIDE, SIDE) and tokens.grid == (1, TOKENS_PER_VIDEO)
        assert tokens.timestamps is None and tokens.prompt == row
        assert [block.tolist() for block in tokens.blocks] == torch.arange(TOKENS_PER_VIDEO).view(FRAMES, SIDE, SIDE).tolist()
        # the frames' placeholders in order, a newline (text) after each: not one contiguous run
        placed = (inputs["input_ids"][row] == IMAGE_TOKEN).nonzero().squeeze(1)
        assert len(placed) == TOKENS_PER_VIDEO and int(placed[-1] - placed[0]) == TOKENS_PER_VIDEO + FRAMES - 2
        assert torch.equal(tokens.features, stock[row, placed])

    # a method that keeps a quarter: the newlines and the text stay, at their places among the kept tokens
    pruned, _, stats = decoder_inputs(model, inputs, ts.load("random", keep=16), video_frames=FRAMES)
    for record in stats.images:
        row = record.row
        real = inputs["attention_mask"][row].bool()
        placed = (inputs["input_ids"][row] == IMAGE_TOKEN).nonzero().squeeze(1)
        keep = real.clone()
        keep[placed] = False
        keep[placed[record.kept]] = True
        kept = keep.nonzero().squeeze(1)
        assert torch.equal(pruned[row, -len(kept):], stock[row, kept])
        assert int((inputs["input_ids"][row, kept] == NEWLINE).sum()) == FRAMES


def test_a_video_record_has_its_frames_and_the_tokens_kept_in_each():
    model = build_model(LLAVA_FRAMES)
    inputs = LLAVA_FRAMES.make_inputs(TEXTS, n_images=[2, 1])  # rows of 8 and of 4 frames: two videos, then one
    with ts.apply(model, ts.load("uniform_frames", frames=2), video_frames=FRAMES) as run:
        model(**inputs)
    assert [(r.row, r.frames, r.before, r.after) for r in run.stats.images] == [
        (0, (FRAMES, SIDE, SIDE), TOKENS_PER_VIDEO, 2 * TOKENS_PER_FRAME)] * 2 + [
        (1, (FRAMES, SIDE, SIDE), TOKENS_PER_VIDEO, 2 * TOKENS_PER_FRAME)]
    for record in run.stats.images:
        assert record.kept_frames.tolist() == [0, 2]
        assert record.frame_counts.tolist() == [TOKENS_PER_FRAME, 0, TOKENS_PER_FRAME, 0]
        assert record.timestamps is None
    with ts.observe(model, video_frames=np.int64(FRAMES)) as run:  # numpy's ints are ints
        model(**inputs)
    assert [r.frame_counts.tolist() for r in run.stats.images] == [[TOKENS_PER_FRAME] * FRAMES] * 3


def test_each_frame_budget_and_signals_are_the_frames_own():
    model = build_model(LLAVA_FRAMES)
    inputs = LLAVA_FRAMES.make_inputs(TEXTS[:1])
    asks = (Signal("vision_attention", queries="mean"), Signal("cls_attention"), Signal("vision_keys"),
            Signal("vision_features"))
    as_video, as_images = recorder(*asks), recorder(*asks)
    decoder_inputs(model, inputs, as_video, video_frames=FRAMES)
    decoder_inputs(model, inputs, as_images)
    (video,), frames = as_video.seen, as_images.seen
    assert len(frames) == FRAMES and all(frame.frames is None for frame in frames)
    for request in asks:  # each frame is its own tower image: the video's values are its frames', frame after frame
        axis = -2 if request.name in ("vision_keys", "vision_features") else -1
        assert torch.equal(video[request], torch.cat([frame[request] for frame in frames], dim=axis))
    with ts.apply(model, ts.load("fastervlm", keep=ts.Budget(8, per_crop=True)), video_frames=FRAMES) as run:
        model(**inputs)
    (record,) = run.stats.images
    assert record.frame_counts.tolist() == [2] * FRAMES  # 8 tokens shared evenly among the 4 frames


def test_a_still_image_and_a_video_in_one_prompt():
    model = build_model(LLAVA_FRAMES)
    inputs = llava_frames_inputs(TEXTS, counts=(1, FRAMES))
    expected = model(**inputs).logits
    with ts.apply(model, ts.load("divprune", keep=1.0), video_frames=(1, FRAMES)) as run:
        assert torch.equal(model(**inputs).logits, expected)  # keeping all is the stock model
    assert [(r.row, r.frames, r.before) for r in run.stats.images] == [
        (0, None, TOKENS_PER_FRAME), (0, (FRAMES, SIDE, SIDE), TOKENS_PER_VIDEO),
        (1, None, TOKENS_PER_FRAME), (1, (FRAMES, SIDE, SIDE), TOKENS_PER_VIDEO)]
    with ts.apply(model, ts.load("divprune", keep=8), video_frames=(1, FRAMES)) as run:
        greedy(model, inputs)
    assert [r.after for r in run.stats.images[:4]] == [8] * 4
    # a video method given the still image refuses it, as on the families that take videos
    with ts.apply(model, ts.load("evs", keep=8), video_frames=(1, FRAMES)):
        with pytest.raises(ValueError, match="evs acts on videos.*carries an image"):
            model(**inputs)


def test_a_padded_batch_of_rows_with_different_frame_counts_equals_each_row_alone():
    model = build_model(LLAVA_FRAMES)
    batch = LLAVA_FRAMES.make_inputs(TEXTS, n_images=[2, 1], seed=3)
    first = llava_frames_inputs(TEXTS[:1], n_images=[2], seed=3)
    second = llava_frames_inputs(TEXTS[1:], seed=3, image_offset=2)
    for method in (ts.load("evs", keep=16), ts.load("uniform_frames", frames=3), ts.load("fastvid", keep=16)):
        with ts.apply(model, method, video_frames=FRAMES):
            logits = model(**batch).logits[:, -1]
            alone = [model(**row).logits[0, -1] for row in (first, second)]
        for row, expected in enumerate(alone):
            torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", [LLAVA_FRAMES, GEMMA3_FRAMES], ids=lambda family: family.name)
def test_the_frames_stage_runs_the_tower_on_the_kept_frames_only_and_equals_dropping_them_after_it(family):
    model = build_model(family)
    inputs = family.make_inputs(TEXTS, n_images=[1, 2])
    towers = []
    # inside the tower, after tokensieve's hook on it
    embeddings = next(m for n, m in adapter_for(model).vision_tower.named_modules() if n.endswith("embeddings"))
    handle = embeddings.register_forward_pre_hook(lambda m, args: towers.append(args[0].shape[0]))
    kept_frames = torch.tensor([0, 2])  # uniform_frames: floor(i * 4 / 2)

    def same_frames(tokens):
        return (kept_frames[:, None] * TOKENS_PER_FRAME + torch.arange(TOKENS_PER_FRAME)).flatten()

    try:
        before, before_logits, stats = decoder_inputs(model, inputs, ts.load("uniform_frames", frames=2),
                                                      video_frames=FRAMES)
        after, after_logits, _ = decoder_inputs(model, inputs, recorder(keeping=same_frames), video_frames=FRAMES)
    finally:
        handle.remove()
    assert towers == [2 * 3, 4 * 3]  # two frames of each of the three videos; then every frame
    assert [r.kept_frames.tolist() for r in stats.images] == [kept_frames.tolist()] * 3
    assert torch.equal(before, after)
    assert torch.equal(before_logits, after_logits)
    with ts.apply(model, ts.load("uniform_frames", frames=2), video_frames=FRAMES):  # generate(): encoded before
        tokens = greedy(model, inputs)
    with ts.apply(model, recorder(keeping=same_frames), video_frames=FRAMES):
        assert torch.equal(greedy(model, inputs), tokens)



@pytest.mark.parametrize("family", [LLAVA_FRAMES, GEMMA3_FRAMES], ids=lambda family: family.name)
def test_the_vision_flops_of_a_frames_stage_count_the_kept_frames_pass_once(family):
    # the count replays the tower's pass after the run: a pass of the kept frames, which must not be dropped again
    model = build_model(family)
    inputs = family.make_inputs(TEXTS, n_images=[1, 2])
    counts = {}
    for spec in ("uniform_frames:frames=4", "uniform_frames:frames=2", "uniform_frames:keep=0.5", "uniform_frames:frames=1"):
        with ts.apply(model, ts.build(spec), video_frames=FRAMES, vision_flops=True) as run:
            model(**inputs)
        counts[spec] = run.stats.vision_flops
    with ts.observe(model, video_frames=FRAMES, vision_flops=True) as stock:
        model(**inputs)
    assert counts["uniform_frames:frames=4"] == stock.stats.vision_flops
    assert counts["uniform_frames:keep=0.5"] == counts["uniform_frames:frames=2"]  # the same two frames of four
    assert stock.stats.vision_flops > counts["uniform_frames:frames=2"] > counts["uniform_frames:frames=1"] > 0

def test_keeping_all_with_video_methods_is_the_stock_model_bit_for_bit():
    model = build_model(LLAVA_FRAMES)
    inputs = LLAVA_FRAMES.make_inputs(TEXTS, n_images=[2, 1])
    expected, tokens = model(**inputs).logits, greedy(model, inputs)
    for method in (ts.load("evs", keep=1.0), ts.load("uniform_frames", frames=FRAMES), ts.load("holitom", keep=1.0)):
        with ts.apply(model, method, video_frames=FRAMES):
            assert torch.equal(model(**inputs).logits, expected)
            assert torch.equal(greedy(model, inputs), tokens)


@pytest.mark.parametrize("video_frames, message", [
    (0, r"video_frames=0: a video has at least 2 frames"),
    (1, r"video_frames=1: a video has at least 2 frames"),
    (-4, r"video_frames=-4: a video has at least 2 frames"),
    ((), r"video_frames=\(\): give each visual input's frame count, at least 1"),
    ((0, 4), r"video_frames=\(0, 4\): give each visual input's frame count, at least 1"),
    ((4, -1), r"video_frames=\(4, -1\): give each"),
    ("4", r"video_frames='4': pass an int \(frames per video\) or a tuple of ints"),
    (4.0, r"pass an int"),
    (True, r"pass an int"),
    ([1, 4], r"pass an int"),
])
def test_bad_video_frames_are_refused_before_the_model_is_touched(video_frames, message):
    model = build_model(LLAVA_FRAMES)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        ts.apply(model, ts.load("evs", keep=8), video_frames=video_frames)
    with pytest.raises(ValueError, match=message):
        ts.observe(model, video_frames=video_frames)
    _assert_same(model, before)


@pytest.mark.parametrize("video_frames, n_images, message", [
    (FRAMES, None, r"has 3 image\(s\), but video_frames=4 needs a multiple of 4 per prompt"),
    ((1, FRAMES), None, r"has 3 image\(s\), but video_frames=\(1, 4\) needs 5 \(1 \+ 4\) per prompt"),
    ((1, 2), [2], r"prompt 0 has 6 image\(s\), but video_frames=\(1, 2\) needs 3 \(1 \+ 2\) per prompt"),
])
def test_a_prompt_whose_image_count_does_not_fit_is_refused(video_frames, n_images, message):
    """Refused by the prompt's count (the ``frames`` stage: by the vision pass's, before the tower runs)."""
    model = build_model(LLAVA_FRAMES)
    inputs = llava_frames_inputs(TEXTS[:1], n_images=n_images, counts=(3,) if n_images is None else (1, 2))
    before = _snapshot(model)
    for method in (ts.load("evs", keep=8), ts.load("uniform_frames", frames=2), None):
        with ts.apply(model, method, video_frames=video_frames):
            with pytest.raises(ValueError, match=message):
                model(**inputs)
            with pytest.raises(ValueError, match=message):
                greedy(model, inputs)
    _assert_same(model, before)


def test_frames_of_different_sizes_are_refused():
    def image(index, side):
        return ImageSlot(0, torch.arange(side * side) + 100 * index, (side, side), index)

    with pytest.raises(ValueError, match=r"the video of images 0..3 \(prompt 0\) has frames of token grids 4x4, 4x4, 3x3, "
                                         r"4x4: every frame of a video must be one image of one size"):
        VideoFrames((4,), True).group([image(0, 4), image(1, 4), image(2, 3), image(3, 4)], None)


def test_families_that_take_videos_or_are_not_served_refuse_video_frames():
    qwen = build_model(QWEN2_VL)
    with pytest.raises(ValueError, match="video_frames= is for families that take images only, and "
                                         "Qwen2VLForConditionalGeneration takes videos: pass the video through its processor"):
        ts.apply(qwen, ts.load("evs", keep=8), video_frames=4)
    next_model = build_model(LLAVA_NEXT)
    with pytest.raises(ValueError, match=r"video_frames= \(videos as lists of frames\) is served on the llava, gemma3 families, "
                                         r"not on LlavaNextForConditionalGeneration \(llava_next\)"):
        ts.observe(next_model, video_frames=4)


def test_a_video_method_without_video_frames_and_a_merge_inside_the_tower_are_refused_clearly():
    model = build_model(LLAVA)
    with pytest.raises(ValueError, match=r"evs acts on videos, and tokensieve takes videos only on .* not on "
                                         r"LlavaForConditionalGeneration \(or give a video as its frames, one image each.*"
                                         r"video_frames=16"):
        ts.apply(model, ts.load("evs", keep=8))
    with pytest.raises(ValueError, match=r"tome_vit merges inside the vision tower, which encodes each frame of a video "
                                         r"given as images on its own .* with video_frames=4, use a pre-LLM method"):
        ts.apply(model, ts.load("tome_vit", keep=8), video_frames=4)
