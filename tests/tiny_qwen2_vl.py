"""Tiny Qwen2-VL and Qwen2.5-VL, and their inputs built by hand the way the processor builds them.

A 64x64 image is cut into 16x16 patches of 4x4 pixels; the 2x2 patch merger turns them into an
8x8 grid of 64 LLM tokens. Each image sits in the prompt as ``vision_start, 64 x image_pad,
vision_end``, and ``mm_token_type_ids`` marks the image_pad tokens (Qwen2.5-VL silently falls back
to 1D positions without it).
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from tiny_models import IMAGE_TOKEN, PAD, VOCAB, Family, _for_tests, left_padded, random_image

VIDEO_TOKEN, VISION_START, VISION_END = 124, 125, 126
IMAGE_SIZE, PATCH, MERGE, TEMPORAL_PATCH = 64, 4, 2, 2
GRID = IMAGE_SIZE // PATCH  # patches per side before merging
TOKENS_PER_IMAGE = (GRID // MERGE) ** 2

_TOKEN_IDS = dict(
    image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
    vision_end_token_id=VISION_END,
)


def _text_config() -> dict:
    # head_dim 16: the rotary half (8) splits into the t, h, w sections
    return dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )


def tiny_qwen2_vl(seed: int = 0) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    vision = dict(
        depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=PATCH,
        spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH,
    )
    config = Qwen2VLConfig(vision_config=vision, text_config=_text_config(), **_TOKEN_IDS)
    return _for_tests(Qwen2VLForConditionalGeneration(config))


def tiny_qwen2_5_vl(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    # 32-pixel windows: 4x4 merged tokens each, so the tower's window reordering is exercised
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=PATCH,
        spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, window_size=32, fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=_text_config(), **_TOKEN_IDS)
    return _for_tests(Qwen2_5_VLForConditionalGeneration(config))


def flattened_patches(image: torch.Tensor) -> torch.Tensor:
    """One still image as the Qwen2-VL processor flattens it: (grid_h*grid_w, C*T*patch*patch), the
    four patches of each 2x2 merge block consecutive, the frame repeated over the temporal patch."""
    channels = image.shape[0]
    frames = image.unsqueeze(0).expand(TEMPORAL_PATCH, -1, -1, -1)
    blocks = frames.reshape(TEMPORAL_PATCH, channels, GRID // MERGE, MERGE, PATCH, GRID // MERGE, MERGE, PATCH)
    blocks = blocks.permute(2, 5, 3, 6, 1, 0, 4, 7)  # block row, block col, row in block, col in block, C, T, y, x
    return blocks.reshape(GRID * GRID, -1)


def qwen2_vl_inputs(
    texts: list[list[int]], n_images: list[int] | None = None, seed: int = 1, image_offset: int = 0
) -> dict:
    """Left-padded rows ``1, (vision_start, image_pad x 64, vision_end) per image, text``."""
    n_images = n_images or [1] * len(texts)
    image_block = [VISION_START] + [IMAGE_TOKEN] * TOKENS_PER_IMAGE + [VISION_END]
    input_ids, attention_mask = left_padded([[1] + image_block * n + text for text, n in zip(texts, n_images)])
    count = sum(n_images)
    images = [random_image(seed, image_offset + i, IMAGE_SIZE) for i in range(count)]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN).int(),
        "pixel_values": torch.cat([flattened_patches(image) for image in images]),
        "image_grid_thw": torch.tensor([[1, GRID, GRID]] * count),
    }


#: a tiny video: 8 frames of 32x32 pixels, so 4 temporal patch pairs of 8x8 patches, each a 4x4 grid of merged
#: tokens: 64 tokens per video, as many as an image has
FRAMES, FRAME_SIZE = 8, 32
FRAME_GRID = FRAME_SIZE // PATCH
TOKENS_PER_FRAME = (FRAME_GRID // MERGE) ** 2
TOKENS_PER_VIDEO = FRAMES // TEMPORAL_PATCH * TOKENS_PER_FRAME


def random_video(seed: int, index: int, frames: int = FRAMES, size: int = FRAME_SIZE) -> torch.Tensor:
    """Video ``index`` of a seeded stream, (frames, 3, size, size): a random first frame that drifts a little from
    frame to frame (so frames are alike, as a video's are), with a few patches that change more."""
    generator = torch.Generator().manual_seed(seed * 1000 + 500 + index)
    first = torch.randn(3, size, size, generator=generator)
    steps = 0.3 * torch.randn(frames, 3, size, size, generator=generator)
    steps[0] = 0
    return first + steps.cumsum(0)


def flattened_video(video: torch.Tensor) -> torch.Tensor:
    """A video (frames, C, H, W) as the Qwen2-VL video processor flattens it: (t*grid_h*grid_w, C*T*patch*patch) for
    t = frames / 2 temporal patch pairs, each pair's patches in merge-block order (as ``flattened_patches``)."""
    frames, channels, height, width = video.shape
    t, gh, gw = frames // TEMPORAL_PATCH, height // PATCH, width // PATCH
    blocks = video.reshape(t, TEMPORAL_PATCH, channels, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, block row, block col, row in block, col in block, C, T, y, x
    return blocks.reshape(t * gh * gw, -1)


def qwen2_vl_video_inputs(
    texts: list[list[int]], n_images: list[int] | None = None, seed: int = 1, image_offset: int = 0,
    frames: int = FRAMES, second_per_grid: float | None = None,
) -> dict:
    """Left-padded rows ``1, (vision_start, video_pad x tokens, vision_end) per video, text`` (``n_images``: videos
    per row), with ``mm_token_type_ids`` 2 at the video tokens as the processor marks them."""
    n_videos = n_images or [1] * len(texts)
    tokens = frames // TEMPORAL_PATCH * TOKENS_PER_FRAME
    video_block = [VISION_START] + [VIDEO_TOKEN] * tokens + [VISION_END]
    input_ids, attention_mask = left_padded([[1] + video_block * n + text for text, n in zip(texts, n_videos)])
    count = sum(n_videos)
    videos = [random_video(seed, image_offset + i, frames) for i in range(count)]
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == VIDEO_TOKEN).int() * 2,
        "pixel_values_videos": torch.cat([flattened_video(video) for video in videos]),
        "video_grid_thw": torch.tensor([[frames // TEMPORAL_PATCH, FRAME_GRID, FRAME_GRID]] * count),
    }
    if second_per_grid is not None:
        inputs["second_per_grid_ts"] = torch.tensor([second_per_grid] * count)
    return inputs


QWEN2_VL = Family("qwen2_vl", tiny_qwen2_vl, qwen2_vl_inputs, TOKENS_PER_IMAGE)
QWEN2_5_VL = Family("qwen2_5_vl", tiny_qwen2_5_vl, qwen2_vl_inputs, TOKENS_PER_IMAGE)
#: the same models given videos: the contract runs on them as on two more families. Qwen2.5-VL's frames are 0.25 s
#: apart, so the temporal positions (tokens_per_second 4 x 0.25 = 1 per frame) stay within the spatial ones: beyond
#: them the stock model's own second turn on its cache differs from a fresh prefill (its rope_deltas come from the
#: largest position, the text after a video from the spatial extent), which the contract could not compare against
QWEN2_VL_VIDEO = Family("qwen2_vl_video", tiny_qwen2_vl, qwen2_vl_video_inputs, TOKENS_PER_VIDEO, VIDEO_TOKEN,
                        videos=True)
QWEN2_5_VL_VIDEO = Family("qwen2_5_vl_video", tiny_qwen2_5_vl, partial(qwen2_vl_video_inputs, second_per_grid=0.25),
                          TOKENS_PER_VIDEO, VIDEO_TOKEN, videos=True)
