"""Tiny Gemma 4 (``Gemma4ForConditionalGeneration``), and its inputs built by hand the way its processor builds them.

The processor (processing_gemma4.py, image_processing_gemma4.py) cuts each image into patches of ``patch_size``
pixels, flattened (row, column, channel) and listed in raster order, pads the list to ``max_patches`` with
zero patches at position (-1, -1), and returns ``pixel_values`` (images, max_patches, 3 * patch**2) with
``image_position_ids`` (images, max_patches, 2): each patch's (x, y). The vision tower's pooler averages each
k x k square of patches (``pooling_kernel_size``) into one soft token, so an image of h x w patches gives
(h / k) x (w / k) tokens in raster order, and images of different sizes give different counts. The prompt holds
``BOI, image token x soft tokens, EOI`` per image, and ``mm_token_type_ids`` is 1 at the image tokens.

Here: 64x64 images in 4-pixel patches (16x16 patches), k=2, so 64 tokens per image (an 8x8 grid);
``gemma4_inputs(..., sizes=[(h, w), ...])`` gives images of other sizes (each a multiple of 8 pixels). The
decoder has 4 layers (sliding, full, sliding, full) with the features of the released small models: per-layer
input embeddings (``hidden_size_per_layer_input``), the last two layers reusing the keys and values of the
first two (``num_kv_shared_layers``), and bidirectional attention over each image in the sliding layers
(``use_bidirectional_attention="vision"``). No audio tower.
"""

from __future__ import annotations

import torch
from transformers import Gemma4Config, Gemma4ForConditionalGeneration

from tiny_models import IMAGE_TOKEN, PAD, VOCAB, Family, _for_tests, left_padded, random_image

BOI, EOI, VIDEO_TOKEN, AUDIO_TOKEN = 125, 126, 124, 123
SIZE, PATCH, KERNEL = 64, 4, 2
TOKENS_PER_IMAGE = (SIZE // PATCH // KERNEL) ** 2
LONG_WINDOW = 512


def tiny_gemma4(seed: int = 0, window: int = LONG_WINDOW, shared_layers: int = 2, **text_overrides) -> Gemma4ForConditionalGeneration:
    """``text_overrides`` change the text config (the larger models' MoE blocks, the smaller ones' causal images)."""
    torch.manual_seed(seed)
    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=16, max_position_embeddings=512, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2, sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8, num_kv_shared_layers=shared_layers,
        use_bidirectional_attention="vision",
    ) | text_overrides
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        head_dim=8, patch_size=PATCH, pooling_kernel_size=KERNEL, position_embedding_size=64,
    )
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None, boi_token_id=BOI, eoi_token_id=EOI,
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, audio_token_id=AUDIO_TOKEN,
    )
    return _for_tests(Gemma4ForConditionalGeneration(config))


def patches(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One (3, H, W) image as the image processor gives it: (patches, 3 * PATCH**2) in raster order, each
    flattened (row, column, channel), and their (x, y) positions."""
    channels, height, width = image.shape
    rows, cols = height // PATCH, width // PATCH
    flat = image.reshape(channels, rows, PATCH, cols, PATCH).permute(1, 3, 2, 4, 0).reshape(rows * cols, -1)
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return flat, torch.stack([x, y], dim=-1).reshape(rows * cols, 2)


def pixel_inputs(images: list[torch.Tensor]) -> dict:
    """``pixel_values`` and ``image_position_ids`` for ``images``, padded to the largest one's patches."""
    pieces = [patches(image) for image in images]
    longest = max(len(flat) for flat, _ in pieces)
    pixels = torch.zeros(len(images), longest, 3 * PATCH**2)
    positions = torch.full((len(images), longest, 2), -1, dtype=torch.long)
    for i, (flat, where) in enumerate(pieces):
        pixels[i, : len(flat)], positions[i, : len(flat)] = flat, where
    return {"pixel_values": pixels, "image_position_ids": positions}


def soft_tokens(height: int, width: int) -> int:
    return (height // PATCH // KERNEL) * (width // PATCH // KERNEL)


def gemma4_inputs(
    texts: list[list[int]], n_images: list[int] | None = None, seed: int = 1, image_offset: int = 0,
    sizes: list[tuple[int, int]] | None = None,
) -> dict:
    """Left-padded rows ``bos, (BOI, image x soft tokens, EOI) per image, text``; images from the seeded stream,
    all SIZE x SIZE unless ``sizes`` gives each image's (height, width)."""
    n_images = n_images or [1] * len(texts)
    sizes = sizes or [(SIZE, SIZE)] * sum(n_images)
    images = [random_image(seed, image_offset + i, max(h, w))[:, :h, :w] for i, (h, w) in enumerate(sizes)]
    blocks = [[BOI] + [IMAGE_TOKEN] * soft_tokens(h, w) + [EOI] for h, w in sizes]
    rows, start = [], 0
    for text, n in zip(texts, n_images):
        rows.append([1] + sum(blocks[start : start + n], []) + text)
        start += n
    input_ids, attention_mask = left_padded(rows)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN).long(),
        **pixel_inputs(images),
    }


def per_layer_inputs(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The per-layer input embeddings the stock model gives ``input_ids``: those of the pad token at image tokens."""
    ids = input_ids.masked_fill(input_ids == IMAGE_TOKEN, model.config.text_config.pad_token_id)
    return model.model.language_model.get_per_layer_inputs(ids)


def gemma4_masked_reference(model, inputs: dict, embeds, mask, positions):
    """The stock decoder's output on ``embeds`` under the 2D ``mask``: the inner model builds its masks (image blocks
    from ``mm_token_type_ids``, the sliding window) as in a stock call, with the stock per-layer inputs."""
    return model.model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, mm_token_type_ids=inputs["mm_token_type_ids"],
        per_layer_inputs=per_layer_inputs(model, inputs["input_ids"]),
    ).last_hidden_state


GEMMA4 = Family("gemma4", tiny_gemma4, gemma4_inputs, TOKENS_PER_IMAGE, masked_reference=gemma4_masked_reference)
