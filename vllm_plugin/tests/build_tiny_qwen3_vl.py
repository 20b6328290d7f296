"""Build the tiny Qwen3-VL of the vLLM plugin's tests (run in the vLLM environment: the config and processor are saved
by the transformers that vLLM loads them with, < 5.20).

Random weights at shapes vLLM's CPU kernels serve: a 3-block vision tower (patch 16, 2x2 merger, so an image of
H x W pixels is (H/32) x (W/32) LLM tokens) whose blocks 0 and 1 feed DeepStack (two sets of rows per image token,
added to the image positions after decoder layers 0 and 1), a 4-layer Qwen3 decoder (hidden 256, head_dim 64,
interleaved mrope sections 12/10/10), and SmolLM2's tokenizer with Qwen's vision tokens (build_tiny_qwen2_vl.py's).
The image processor caps an image at 448 x 448 pixels (14 x 14 tokens), so vLLM's profiling image stays small.

Usage: python vllm_plugin/tests/build_tiny_qwen3_vl.py OUT_DIR   (OUT_DIR/qwen3-vl; skips a finished one)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                          Qwen3VLVideoProcessor)

from build_tiny_qwen2_vl import CHAT_TEMPLATE, MAX_PIXELS, MIN_PIXELS, SEED, TEMPORAL_PATCH, VISION_TOKENS, tokenizer

PATCH, MERGE = 16, 2
NAME = "qwen3-vl"


def config(tok) -> Qwen3VLConfig:
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tok.convert_tokens_to_ids(list(VISION_TOKENS))))
    text = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [12, 10, 10],
                                 "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, num_position_embeddings=256,
                  deepstack_visual_indexes=[0, 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def build(out: Path) -> None:
    target = out / NAME
    if (target / "model.safetensors").is_file():
        print(f"tiny {NAME}: {target} exists")
        return
    tok = tokenizer()
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=PATCH, merge_size=MERGE,
                                              temporal_patch_size=TEMPORAL_PATCH),
        video_processor=Qwen3VLVideoProcessor(size=size, patch_size=PATCH, merge_size=MERGE,
                                              temporal_patch_size=TEMPORAL_PATCH),
        tokenizer=tok, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(SEED)
    model = Qwen3VLForConditionalGeneration(config(tok)).eval()
    scratch = target.with_name(target.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    model.save_pretrained(scratch)
    processor.save_pretrained(scratch)
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    print(f"tiny {NAME}: built {target}")


if __name__ == "__main__":
    build(Path(sys.argv[1]))
