"""Tiny random models of each supported family, built from configs (no download), and inputs for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

VOCAB = 128
IMAGE_TOKEN = 127
PAD = 0


def _llama(**overrides) -> LlamaConfig:
    config = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    config.update(overrides)
    return LlamaConfig(**config)


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=64, patch_size=8,
        projection_dim=32,
    )
    config = LlavaConfig(vision_config=vision, text_config=_llama(), image_token_id=IMAGE_TOKEN)
    return LlavaForConditionalGeneration(config).eval()


@dataclass
class Family:
    """How to build a tiny model of one family and a batch of prompts with images for it."""

    name: str
    build: Callable[[], torch.nn.Module]
    make_inputs: Callable[..., dict]
    tokens_per_image: int


def llava_inputs(texts: list[list[int]], n_images: list[int] | None = None, seed: int = 1, size: int = 64) -> dict:
    """Left-padded inputs: each row is ``bos, image tokens, text``; ``texts`` gives each row's text ids."""
    n_images = n_images or [1] * len(texts)
    per_image = (size // 8) ** 2
    rows = [[1] + [IMAGE_TOKEN] * per_image * n + text for text, n in zip(texts, n_images)]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), PAD)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(sum(n_images), 3, size, size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


FAMILIES = [Family("llava", tiny_llava, llava_inputs, 64)]
