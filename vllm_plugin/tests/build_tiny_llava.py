"""Build the LLaVA-1.5-shaped test model of the vLLM plugin's tests and benchmark (run in the MAIN environment).

A random CLIP ViT (6 layers, hidden 384, 336 px, patch 14: 576 image tokens, [CLS] dropped as LLaVA-1.5's
``vision_feature_layer=-2``, strategy "default"), a random 2-layer GELU projector, and the real SmolLM2-135M
decoder and tokenizer (with ``<image>``) of sieve-mini's cache (``tokensieve model build`` makes them; built
here on first use). The shapes are LLaVA-1.5's token counts at a size a 2-core CPU serves in seconds.

Usage: python vllm_plugin/tests/build_tiny_llava.py OUT_DIR   (skips a finished OUT_DIR)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

from tokensieve.mini.build import language_dir
from tokensieve.mini.chat import CHAT_TEMPLATE, IMAGE_TOKEN

SEED = 0
IMAGE_SIZE, PATCH = 336, 14


def build(out: Path) -> Path:
    if (out / "model.safetensors").is_file():
        print(f"tiny LLaVA: {out} exists")
        return out
    language = language_dir()
    tokenizer = AutoTokenizer.from_pretrained(language)
    text_config = AutoConfig.from_pretrained(language)
    text_config.vocab_size = len(tokenizer)  # SmolLM2's 49152 and `<image>`
    vision_config = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                                     image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=384)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_seq_length=(IMAGE_SIZE // PATCH) ** 2, tie_word_embeddings=True)
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    decoder = load_file(language / "model.safetensors")
    table = decoder["model.embed_tokens.weight"]  # `<image>`'s row: zeros (its embedding is always replaced)
    decoder["model.embed_tokens.weight"] = torch.cat([table, table.new_zeros(len(tokenizer) - len(table), table.shape[1])])
    missing, unexpected = model.model.language_model.load_state_dict(
        {k.removeprefix("model."): v for k, v in decoder.items() if k.startswith("model.")}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2's weights do not fit the decoder: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    scratch = out.with_name(out.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    model.save_pretrained(scratch)
    _legacy_tower_keys(scratch / "model.safetensors")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,  # sieve-mini's: an image item becomes `<image>\n`
    )
    processor.save_pretrained(scratch)
    shutil.rmtree(out, ignore_errors=True)
    scratch.rename(out)
    print(f"tiny LLaVA: built {out}")
    return out


def _legacy_tower_keys(path: Path) -> None:
    """vLLM 0.32 loads the CLIP tower from ``vision_tower.vision_model.*`` (the layout llava-hf's checkpoints have,
    which transformers also reads); transformers 5 saves it without ``vision_model``."""
    state = load_file(path)
    renamed = {}
    for key, value in state.items():
        head, sep, rest = key.partition("vision_tower.")
        if sep and not rest.startswith("vision_model."):
            key = f"{head}vision_tower.vision_model.{rest}"
        renamed[key] = value
    save_file(renamed, path, metadata={"format": "pt"})


if __name__ == "__main__":
    build(Path(sys.argv[1]))
