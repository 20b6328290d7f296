"""The tiny LLaVA-OneVision given videos: the contract runs on it as the family ``llava_onevision_video``.

Its tower takes 56-pixel frames of 8-pixel patches, 7x7, which the model's ``apply_pooling`` pools bilinearly to 4x4
tokens (an odd grid, as the released 27x27 to 14x14, so the pooling's weights are not a plain 2x2 mean). A video is 4
frames: 64 tokens, then the one newline token the model appends to every video. Inputs are laid out as
LlavaOnevisionProcessor lays them out: ``pixel_values_videos`` (videos, frames, 3, 56, 56), and the video's
``<video>`` placeholder expanded to frames * 16 + 1 video tokens (``replace_video_token``).
"""

from __future__ import annotations

from functools import partial

import torch

from tiny_llava_next import VIDEO_TOKEN, tiny_llava_onevision
from tiny_models import Family, left_padded
from tiny_qwen2_vl import random_video

FRAME_SIZE = 56
FRAMES = 4
TOKENS_PER_FRAME = 16  # 7x7 patches pooled to 4x4
TOKENS_PER_VIDEO = FRAMES * TOKENS_PER_FRAME

tiny_llava_onevision_video = partial(tiny_llava_onevision, crop=FRAME_SIZE)


def video_placeholders(frames: int, tokens_per_frame: int) -> list[int]:
    """One video's placeholder tokens: its frames' tokens, then the newline token."""
    return [VIDEO_TOKEN] * (frames * tokens_per_frame + 1)


def onevision_video_inputs(
    texts: list[list[int]], n_images: list[int] | None = None, seed: int = 1, image_offset: int = 0,
    frames: int = FRAMES, size: int = FRAME_SIZE, tokens_per_frame: int = TOKENS_PER_FRAME,
) -> dict:
    """Left-padded rows ``1, videos' placeholders, text`` (``n_images``: videos per row); the videos drift from frame to
    frame (``random_video``), seeded so that a row built alone gets the pixels it has in a batch."""
    n_videos = n_images or [1] * len(texts)
    input_ids, attention_mask = left_padded(
        [[1] + video_placeholders(frames, tokens_per_frame) * n + text for text, n in zip(texts, n_videos)])
    videos = [random_video(seed, image_offset + i, frames, size) for i in range(sum(n_videos))]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values_videos": torch.stack(videos)}


LLAVA_ONEVISION_VIDEO = Family("llava_onevision_video", tiny_llava_onevision_video, onevision_video_inputs,
                               TOKENS_PER_VIDEO, VIDEO_TOKEN, videos=True, trailing_placeholders=1)
