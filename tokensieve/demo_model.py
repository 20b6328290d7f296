"""A random LLaVA-1.5-shaped model for demos and benchmarks: the CLIP ViT-L/336 token grid
(24×24 = 576 image tokens) with a shallower tower and decoder, so it runs on a laptop CPU."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 32000


def demo_llava(
    vision_layers: int = 6, llm_hidden: int = 512, llm_layers: int = 8, vision_hidden: int = 256, llm_heads: int = 8,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """Random weights; ``demo_llava(24, 4096, 32, 1024, 32)`` has the shapes of LLaVA-1.5-7B."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 4, num_hidden_layers=vision_layers,
                              num_attention_heads=vision_hidden // 64, image_size=336, patch_size=14)
    text = LlamaConfig(vocab_size=32064, hidden_size=llm_hidden, intermediate_size=llm_hidden * 43 // 16,
                       num_hidden_layers=llm_layers, num_attention_heads=llm_heads, num_key_value_heads=llm_heads)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    return LlavaForConditionalGeneration(config).eval()


def demo_inputs(batch: int = 1, prompt_tokens: int = 40, seed: int = 0) -> dict:
    """A prompt of ``prompt_tokens`` text tokens around one 336-px image (576 placeholders)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 32000, (batch, prompt_tokens), generator=generator)
    image = torch.full((batch, 576), IMAGE_TOKEN)
    input_ids = torch.cat([text[:, :5], image, text[:, 5:]], dim=1)
    pixel_values = torch.randn(batch, 3, 336, 336, generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}
