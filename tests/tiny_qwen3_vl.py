"""Tiny Qwen3-VL (DeepStack), Qwen3-VL-MoE and Qwen3.5 (hybrid linear attention), with inputs built as their
processors build them: the same patch layout and prompt as Qwen2-VL's (tiny_qwen2_vl.py), 64 tokens per image; a
video has Qwen2-VL's pixels and grid but each temporal patch in the prompt after its timestamp text
(``qwen3_vl_video_inputs``).

The contract's Qwen3-VL adds one DeepStack set (from vision block 1) after decoder layer 0, so in-LLM stages at
layer 1 and later are served; ``deepstack`` gives others (tests/test_adapter_qwen3_vl.py uses three sets, after
layers 0 to 2). The contract's Qwen3.5 has layers [linear, linear, linear, full].
"""

from __future__ import annotations

import torch
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

from tiny_models import Family, _for_tests, left_padded
from tiny_qwen2_vl import (
    _TOKEN_IDS, FRAME_GRID, FRAMES, MERGE, PATCH, TEMPORAL_PATCH, TOKENS_PER_FRAME, TOKENS_PER_IMAGE, TOKENS_PER_VIDEO,
    VIDEO_TOKEN, VISION_END, VISION_START, _text_config, flattened_video, qwen2_vl_inputs, random_video,
)


def _vision_config(**overrides) -> dict:
    # a 4x4 learned position grid, interpolated to each image's 16x16 patches
    config = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=PATCH,
        spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, num_position_embeddings=16,
    )
    config.update(overrides)
    return config


def _qwen3_text_config(**overrides) -> dict:
    config = _text_config()
    config.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                               "mrope_interleaved": True})
    config.update(overrides)
    return config


def tiny_qwen3_vl(seed: int = 0, deepstack: tuple[int, ...] = (1,)) -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(seed)
    vision = _vision_config(depth=max(2, max(deepstack, default=0) + 1), deepstack_visual_indexes=list(deepstack))
    config = Qwen3VLConfig(vision_config=vision, text_config=_qwen3_text_config(), **_TOKEN_IDS)
    return _for_tests(Qwen3VLForConditionalGeneration(config))


def tiny_qwen3_vl_moe(seed: int = 0) -> Qwen3VLMoeForConditionalGeneration:
    torch.manual_seed(seed)
    vision = _vision_config(deepstack_visual_indexes=[0, 1])
    text = _qwen3_text_config(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    config = Qwen3VLMoeConfig(vision_config=vision, text_config=text, **_TOKEN_IDS)
    return _for_tests(Qwen3VLMoeForConditionalGeneration(config))


def tiny_qwen3_5(seed: int = 0) -> Qwen3_5ForConditionalGeneration:
    torch.manual_seed(seed)
    text = _qwen3_text_config(
        layer_types=["linear_attention"] * 3 + ["full_attention"], linear_conv_kernel_dim=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    )
    text["rope_parameters"]["partial_rotary_factor"] = 1.0
    config = Qwen3_5Config(vision_config=_vision_config(), text_config=text, **_TOKEN_IDS)
    return _for_tests(Qwen3_5ForConditionalGeneration(config))


QWEN3_VL = Family("qwen3_vl", tiny_qwen3_vl, qwen2_vl_inputs, TOKENS_PER_IMAGE)
QWEN3_5 = Family("qwen3_5", tiny_qwen3_5, qwen2_vl_inputs, TOKENS_PER_IMAGE, reference="gathered")


#: the timestamp text's tokens, one id per character class: ``<``, the digits 0-9, ``.``, `` seconds>``
_TIME_OPEN, _DIGITS, _POINT, _SECONDS = 13, 14, 24, 25
#: the fps the tiny videos' frames were sampled at (Qwen3VLProcessor defaults to 24 when it has none)
VIDEO_FPS = 2.0


def timestamp_tokens(seconds: float) -> list[int]:
    """``f"<{seconds:.1f} seconds>"`` as the tiny vocabulary spells it: one token per character, the unit one token."""
    text = f"{seconds:.1f}"
    return [_TIME_OPEN] + [_POINT if c == "." else _DIGITS + int(c) for c in text] + [_SECONDS]


def frame_timestamps(frames: int = FRAMES, fps: float = VIDEO_FPS) -> list[float]:
    """Each temporal patch's time as ``Qwen3VLProcessor._calculate_timestamps`` gives it: the mean of its first and last
    frame's index / fps."""
    seconds = [index / fps for index in range(frames)]
    return [(seconds[i] + seconds[i + TEMPORAL_PATCH - 1]) / 2 for i in range(0, frames, TEMPORAL_PATCH)]


def video_prompt(frames: int = FRAMES) -> list[int]:
    """One video's tokens as ``Qwen3VLProcessor.replace_video_token`` (transformers 5.24) writes them: per temporal
    patch ``f"<{t:.1f} seconds>"``, then ``vision_start``, the frame's video_pad tokens, ``vision_end``."""
    tokens = []
    for seconds in frame_timestamps(frames):
        tokens += timestamp_tokens(seconds) + [VISION_START] + [VIDEO_TOKEN] * TOKENS_PER_FRAME + [VISION_END]
    return tokens


def qwen3_vl_video_inputs(
    texts: list[list[int]], n_images: list[int] | None = None, seed: int = 1, image_offset: int = 0, frames: int = FRAMES,
) -> dict:
    """Left-padded rows ``1, video_prompt per video, text`` (``n_images``: videos per row), with ``mm_token_type_ids``
    2 at the video_pad tokens only (``ProcessorMixin.create_mm_token_type_ids``: timestamps, start and end are text).
    The pixels and ``video_grid_thw`` are Qwen2-VL's (the Qwen3-VL video processor flattens frames the same way);
    the processor returns no seconds to the model: they are in the prompt only."""
    n_videos = n_images or [1] * len(texts)
    input_ids, attention_mask = left_padded([[1] + video_prompt(frames) * n + text for text, n in zip(texts, n_videos)])
    count = sum(n_videos)
    videos = [random_video(seed, image_offset + i, frames) for i in range(count)]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == VIDEO_TOKEN).int() * 2,
        "pixel_values_videos": torch.cat([flattened_video(video) for video in videos]),
        "video_grid_thw": torch.tensor([[frames // TEMPORAL_PATCH, FRAME_GRID, FRAME_GRID]] * count),
    }


#: the contract's Qwen3-VL and Qwen3.5 given videos: 4 temporal patches of 16 tokens, timestamp text between them
QWEN3_VL_VIDEO = Family("qwen3_vl_video", tiny_qwen3_vl, qwen3_vl_video_inputs, TOKENS_PER_VIDEO, VIDEO_TOKEN, videos=True)
QWEN3_5_VIDEO = Family("qwen3_5_video", tiny_qwen3_5, qwen3_vl_video_inputs, TOKENS_PER_VIDEO, VIDEO_TOKEN,
                       reference="gathered", videos=True)
