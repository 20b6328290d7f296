"""Tiny Qwen3-VL (DeepStack), Qwen3-VL-MoE and Qwen3.5 (hybrid linear attention), with inputs built as their
processors build them: the same patch layout and prompt as Qwen2-VL's (tiny_qwen2_vl.py), 64 tokens per image.

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

from tiny_models import Family, _for_tests
from tiny_qwen2_vl import _TOKEN_IDS, MERGE, PATCH, TEMPORAL_PATCH, TOKENS_PER_IMAGE, _text_config, qwen2_vl_inputs


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
