"""LLaVA-OneVision videos (tokensieve/adapters/llava_onevision.py, docs/video.md): the layout against the processor's
and the model's own video features, the newline token kept as text, video methods at the unpruned positions, the
``frames`` stage against dropping after the tower, the pooled attention signal against eager attention, an image and a
video in one prompt, and bad videos refused with the model untouched. The shared contract runs on the family
``llava_onevision_video`` (tests/families.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaOnevisionProcessor

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS, _assert_same, _snapshot, greedy
from tiny_llava_next import IMAGE_SIZE, LLAVA_ONEVISION, VIDEO_TOKEN, anyres_inputs, anyres_tokens
from tiny_models import IMAGE_TOKEN
from tiny_llava_onevision_video import (
    FRAME_SIZE, FRAMES, LLAVA_ONEVISION_VIDEO, TOKENS_PER_FRAME, TOKENS_PER_VIDEO, tiny_llava_onevision_video,
    video_placeholders,
)
from tiny_qwen2_vl import random_video
from tokensieve.adapters import adapter_for
from tokensieve.sieve import Selection, Sieve
from tokensieve.signals import Signal

SIDE = 4  # a frame's 7x7 patches pooled to 4x4 tokens
MEAN_ATTENTION = Signal("vision_attention", queries="mean")


class _Records(Sieve):
    """Keeps every token (or the first ``keep``) and records what it was given; ``asks`` are its requests."""

    name = "records"
    paper = "-"
    signals = ("vision_attention", "vision_features", "project")
    asks: tuple = ()
    seen: list

    def requests(self):
        return self.asks

    def select(self, tokens):
        self.seen.append(tokens)
        return Selection.every(tokens)


def recorder(*asks) -> _Records:
    sieve = _Records(keep=1.0)
    sieve.asks, sieve.seen = asks, []
    return sieve


def decoder_inputs(model, inputs, method=None):
    """The decoder's keyword inputs (after tokensieve's hook), and the run's stats (None for the stock model)."""
    seen = []
    run = ts.apply(model, method) if method is not None else None
    handle = adapter_for(model).decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
        if run is not None:
            run.remove()
    return seen[0], (run.stats if run is not None else None)


def test_the_layout_is_the_processors_and_the_models_own():
    """Each video: the processor's count of placeholders (frames x pooled tokens + 1); the sieve sees the model's own
    pooled frame tokens, frame after frame, one block per frame; the newline token follows, as text."""
    model = build_model(LLAVA_ONEVISION_VIDEO)
    inputs = LLAVA_ONEVISION_VIDEO.make_inputs(TEXTS)
    pixels = inputs["pixel_values_videos"]
    processor = SimpleNamespace(num_image_tokens=(FRAME_SIZE // 8) ** 2, video_token="<video>")  # the tower's 7x7 patches
    expanded = LlavaOnevisionProcessor.replace_video_token(processor, {"pixel_values_videos": pixels}, 0)
    assert expanded == "<video>" * len(video_placeholders(FRAMES, TOKENS_PER_FRAME)) == "<video>" * (TOKENS_PER_VIDEO + 1)
    sieve = recorder()
    stock = model.model.get_video_features(pixels).pooler_output  # (videos, frames x 16 + 1, d)
    embeds, _ = decoder_inputs(model, inputs, sieve)
    for video, tokens in enumerate(sieve.seen):
        assert tokens.frames == (FRAMES, SIDE, SIDE) and tokens.grid == (1, TOKENS_PER_VIDEO)
        assert [block.tolist() for block in tokens.layout()] == torch.arange(TOKENS_PER_VIDEO).view(FRAMES, SIDE, SIDE).tolist()
        assert torch.equal(tokens.features, stock[video, :-1])
        assert torch.equal(embeds["inputs_embeds"][video, -len(TEXTS[video]) - 1], model.model.image_newline)


@pytest.mark.parametrize("method", [ts.load("evs", keep=16), ts.load("uniform_frames", keep=16), ts.load("random", keep=16)],
                         ids=["evs", "uniform_frames", "random"])
def test_video_methods_keep_the_unpruned_positions_and_the_newline(method):
    model = build_model(LLAVA_ONEVISION_VIDEO)
    inputs = LLAVA_ONEVISION_VIDEO.make_inputs(TEXTS)
    stock, _ = decoder_inputs(model, inputs)
    pruned, stats = decoder_inputs(model, inputs, method)
    width = inputs["input_ids"].shape[1]
    stock_positions = stock["position_ids"] if stock["position_ids"] is not None else torch.arange(width).expand(2, -1)
    keep = torch.ones(inputs["input_ids"].shape, dtype=torch.bool)
    for record in stats.images:
        assert record.frames == (FRAMES, SIDE, SIDE) and record.before == TOKENS_PER_VIDEO and record.after == 16
        assert int(record.frame_counts.sum()) == 16
        placed = (inputs["input_ids"][record.row] == VIDEO_TOKEN).nonzero().squeeze(1)
        keep[record.row, placed[:-1]] = False
        keep[record.row, placed[:-1][record.kept]] = True
        assert keep[record.row, placed[-1]]  # the newline: never dropped
    for row in range(len(TEXTS)):
        kept = keep[row].nonzero().squeeze(1)
        assert torch.equal(pruned["position_ids"][row, -len(kept):], stock_positions[row, kept])
        assert torch.equal(pruned["inputs_embeds"][row, -len(kept):], stock["inputs_embeds"][row, kept])


def test_the_frames_stage_runs_the_tower_on_the_kept_frames_only_and_gives_their_unpruned_tokens():
    model = build_model(LLAVA_ONEVISION_VIDEO)
    inputs = LLAVA_ONEVISION_VIDEO.make_inputs(TEXTS)
    towers = []
    # inside the tower, after tokensieve's own hook on it gave it the kept frames
    embeddings = model.model.vision_tower.embeddings
    handle = embeddings.register_forward_pre_hook(lambda m, args: towers.append(args[0].shape[0]))
    try:
        stock, _ = decoder_inputs(model, inputs)
        pruned, stats = decoder_inputs(model, inputs, ts.load("uniform_frames", frames=2))
    finally:
        handle.remove()
    assert towers == [len(TEXTS) * FRAMES, len(TEXTS) * 2]  # the tower's frames: all, then two per video
    keep = torch.ones(inputs["input_ids"].shape, dtype=torch.bool)
    for record in stats.images:
        assert record.kept_frames.tolist() == [0, 2]
        assert record.kept.tolist() == list(range(0, 16)) + list(range(32, 48))
        placed = (inputs["input_ids"][record.row] == VIDEO_TOKEN).nonzero().squeeze(1)[:-1]  # the newline stays
        keep[record.row, placed] = False
        keep[record.row, placed[record.kept]] = True
    for row in range(len(TEXTS)):  # the kept frames' tokens as the unpruned video has them
        kept = keep[row].nonzero().squeeze(1)
        assert torch.equal(pruned["inputs_embeds"][row, -len(kept):], stock["inputs_embeds"][row, kept])


def test_vision_attention_is_each_frames_eager_attention_pooled_like_its_tokens():
    """The attention each patch receives within its frame, at the feature layer, pooled 7x7 -> 4x4 bilinearly."""
    model = build_model(LLAVA_ONEVISION_VIDEO)
    inputs = LLAVA_ONEVISION_VIDEO.make_inputs(TEXTS)
    sieve = recorder(MEAN_ATTENTION)
    with ts.apply(model, sieve):
        model(**inputs)
    eager = tiny_llava_onevision_video()  # the same seed: the same weights
    eager.model.vision_tower.set_attn_implementation("eager")
    frames = inputs["pixel_values_videos"].flatten(0, 1)
    attentions = eager.model.vision_tower(frames, output_attentions=True).attentions
    block = adapter_for(model).block_index(None)
    received = attentions[block].float().mean(2)  # (frames, heads, 49): the mean over each frame's query rows
    patches = FRAME_SIZE // 8
    pooled = F.interpolate(received.view(-1, received.shape[1], patches, patches), size=(SIDE, SIDE), mode="bilinear")
    for video, tokens in enumerate(sieve.seen):
        expected = pooled[video * FRAMES : (video + 1) * FRAMES].flatten(2).permute(1, 0, 2).flatten(1)  # (heads, t*h*w)
        torch.testing.assert_close(tokens[MEAN_ATTENTION], expected, atol=1e-5, rtol=1e-4)


def image_and_video(texts, frames=FRAMES, seed=1) -> dict:
    """Rows ``1, image, video, text`` for the image family's tiny model (32-pixel frames: 2x2 tokens each)."""
    images = anyres_inputs([[]] * len(texts), seed=seed)
    video = [VIDEO_TOKEN] * (frames * 4 + 1)
    rows = [[1] + [IMAGE_TOKEN] * anyres_tokens(IMAGE_SIZE) + video + text for text in texts]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    videos = torch.stack([random_video(seed, i, frames, 32) for i in range(len(texts))])
    return {**images, "input_ids": input_ids, "attention_mask": mask, "pixel_values_videos": videos}


def test_an_image_and_a_video_in_one_prompt():
    model = build_model(LLAVA_ONEVISION)
    inputs = image_and_video(TEXTS)
    stock_logits, stock_tokens = model(**inputs).logits, greedy(model, inputs)
    with ts.apply(model, ts.load("divprune", keep=1.0)) as run:
        assert torch.equal(model(**inputs).logits, stock_logits)
        assert torch.equal(greedy(model, inputs), stock_tokens)
    per_image = anyres_tokens(IMAGE_SIZE)
    assert [(r.row, r.before, r.frames) for r in run.stats.images[:4]] == [
        (0, per_image, None), (1, per_image, None), (0, FRAMES * 4, (FRAMES, 2, 2)), (1, FRAMES * 4, (FRAMES, 2, 2))]
    with ts.apply(model, ts.load("divprune", keep=8)) as run:
        pruned = greedy(model, inputs)
    assert [r.after for r in run.stats.images[:4]] == [8] * 4 and pruned.shape == stock_tokens.shape
    # each item's signal from its own pass: the image's as in a call without the video, the video's per frame token
    sieve = recorder(MEAN_ATTENTION)
    with ts.apply(model, sieve):
        model(**inputs)
    alone = recorder(MEAN_ATTENTION)
    with ts.apply(model, alone):
        model(**anyres_inputs(TEXTS))
    assert [tokens[MEAN_ATTENTION].shape[-1] for tokens in sieve.seen] == [per_image, per_image, FRAMES * 4, FRAMES * 4]
    for both, image in zip(sieve.seen[:2], alone.seen):
        assert torch.equal(both[MEAN_ATTENTION], image[MEAN_ATTENTION])


def _one_video(pixels, tokens) -> dict:
    ids = torch.tensor([[1] + [VIDEO_TOKEN] * tokens + [5, 6]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}


def test_bad_videos_are_refused_before_the_model_runs():
    model = build_model(LLAVA_ONEVISION_VIDEO)
    before = _snapshot(model)
    video = random_video(1, 0, FRAMES, FRAME_SIZE)
    cases = [
        (_one_video(random_video(1, 0, FRAMES, 48)[None], FRAMES * 9 + 1), "frames of 48x48 pixels.*the tower's size, 56x56"),
        (_one_video([video[:2], random_video(1, 1, 2, 48)], TOKENS_PER_VIDEO + 1), "every frame of a video must have the same size"),
        (_one_video(video[None, :0], 1), "an empty video"),
        (_one_video(video[None], TOKENS_PER_VIDEO), "need 65 video placeholder tokens, but input_ids has 64"),  # no newline
    ]
    towers = []
    handle = model.model.vision_tower.register_forward_pre_hook(lambda m, args: towers.append(args))
    try:
        with ts.apply(model, ts.load("random", keep=16)):
            for inputs, message in cases:
                with pytest.raises(ValueError, match=message):
                    model(**inputs)
                if "placeholder" not in message:  # refused before the tower: by the forward's check, then generate()'s
                    with pytest.raises(ValueError, match=message):
                        model.generate(**inputs, max_new_tokens=2)
    finally:
        handle.remove()
    assert len(towers) == 1  # only the video whose placeholders are short reached the tower
    _assert_same(model, before)


def test_vision_features_and_project_are_refused_for_a_video_and_given_for_an_image():
    """OneVision pools a video's frames after its (nonlinear) projector: no projector input gives a video token."""
    asks = (Signal("vision_features", missing="zeros"), "project")
    video_model = build_model(LLAVA_ONEVISION_VIDEO)
    before = _snapshot(video_model)
    with ts.apply(video_model, recorder(*asks)):
        with pytest.raises(ValueError, match="vision_features.*project cannot be given for a video's tokens"):
            video_model(**LLAVA_ONEVISION_VIDEO.make_inputs(TEXTS))
    _assert_same(video_model, before)
    sieve = recorder(*asks)
    with ts.apply(build_model(LLAVA_ONEVISION), sieve):
        build_model(LLAVA_ONEVISION)(**anyres_inputs(TEXTS[:1]))
    assert sieve.seen[0][asks[0]].shape[0] == anyres_tokens(IMAGE_SIZE)


def test_the_released_grid_27x27_patches_pool_to_196_tokens_per_frame():
    """The released towers' 27x27 patches (384 / 14) pool to 14x14 = 196 tokens a frame, as the processor counts them."""
    model = tiny_llava_onevision_video(crop=27 * 8)
    processor = SimpleNamespace(num_image_tokens=27 * 27, video_token="<video>")
    pixels = torch.stack([random_video(1, 0, 2, 27 * 8)])
    placeholders = LlavaOnevisionProcessor.replace_video_token(processor, {"pixel_values_videos": pixels}, 0).count("<video>")
    assert placeholders == 2 * 196 + 1
    ids = torch.tensor([[1] + [VIDEO_TOKEN] * placeholders + [5, 6]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}
    stock = model(**inputs).logits
    with ts.apply(model, ts.load("evs", keep=1.0)) as run:
        assert torch.equal(model(**inputs).logits, stock)
    (record,) = run.stats.images
    assert record.frames == (2, 14, 14) and record.before == record.after == 2 * 196
