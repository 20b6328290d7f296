"""The tiny LLaVA given videos as their frames, one image per frame (``video_frames=``, docs/video.md): the contract
runs on it as the family ``llava_frames``.

Its CLIP tower takes 32-pixel frames of 8-pixel patches: 4x4 = 16 tokens per frame. A video is 4 frames, each its
own ``<image>`` placeholder run followed by a newline token (text, as a prompt of one ``<image>\\n`` per frame has it),
so a video's 64 tokens are not contiguous; the run says which images are frames of one video (``video_frames=4``).
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from tiny_models import IMAGE_TOKEN, Family, _for_tests, _llama, left_padded
from tiny_qwen2_vl import random_video

FRAME_SIZE = 32
FRAMES = 4
TOKENS_PER_FRAME = (FRAME_SIZE // 8) ** 2
TOKENS_PER_VIDEO = FRAMES * TOKENS_PER_FRAME
NEWLINE = 3  # the text token after each frame


def tiny_llava_frames(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=FRAME_SIZE,
        patch_size=8, projection_dim=32,
    )
    config = LlavaConfig(vision_config=vision, text_config=_llama(), image_token_id=IMAGE_TOKEN)
    return _for_tests(LlavaForConditionalGeneration(config))


def frame_placeholders(counts: list[int]) -> list[int]:
    """A prompt's visual inputs of these frame counts (1: a still image): each frame's placeholders, then a newline."""
    return ([IMAGE_TOKEN] * TOKENS_PER_FRAME + [NEWLINE]) * sum(counts)


def llava_frames_inputs(texts: list[list[int]], n_images: list[int] | None = None, seed: int = 1, image_offset: int = 0,
                        counts: tuple[int, ...] = (FRAMES,)) -> dict:
    """Left-padded rows ``1, visual inputs' frames, text``; ``n_images``: each row's groups of visual inputs of
    frame ``counts`` (default: one video of 4 frames). Each visual input is a drifting video (``random_video``) seeded
    by its index, so that a row built alone gets the pixels it has in a batch."""
    n_groups = n_images or [1] * len(texts)
    input_ids, attention_mask = left_padded([[1] + frame_placeholders(list(counts) * n) + text
                                             for text, n in zip(texts, n_groups)])
    frames = [random_video(seed, image_offset * len(counts) + i, t, FRAME_SIZE)
              for i, t in enumerate(list(counts) * sum(n_groups))]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": torch.cat(frames)}


LLAVA_FRAMES = Family("llava_frames", tiny_llava_frames, llava_frames_inputs, TOKENS_PER_VIDEO, videos=True,
                      options={"video_frames": FRAMES})
