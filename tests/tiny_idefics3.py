"""Tiny Idefics3 and SmolVLM: a SigLIP-like tower on 64-pixel images, a pixel-shuffle connector and a
2-layer Llama decoder. Both give 8x8 = 64 LLM tokens per image, by the scale factors of their released
checkpoints: Idefics3 shuffles 16x16 patches (4 pixels) by 2, SmolVLM (256M/500M) 32x32 patches
(2 pixels) by 4.

Inputs are built as the processors build them for images that are not split: each image is
``<fake_token_around_image> <global-img> <image>*64 <fake_token_around_image>``; ``pixel_values`` are
(batch, most images in a row, 3, 64, 64), rows with fewer images padded with all-zero images that
the model drops, and ``pixel_attention_mask`` marks the real pixels. ``split_image_inputs`` builds
one image split into crops plus its global view, as ``do_image_splitting`` does.
"""

from __future__ import annotations

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from tiny_models import IMAGE_TOKEN, Family, _for_tests, _llama, left_padded, random_image

FAKE_TOKEN_AROUND_IMAGE = 126
GLOBAL_IMG = 125
ROW_COL = 100  # <row_r_col_c> tokens take ids from here on (the processor's row-major order)
SIZE = 64
TOKENS_PER_IMAGE = 64


def _config(config_class, seed: int, scale_factor: int):
    torch.manual_seed(seed)
    patch_size = SIZE // (8 * scale_factor)
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
        patch_size=patch_size,
    )
    return config_class(
        vision_config=vision, text_config=_llama().to_dict(), scale_factor=scale_factor, image_token_id=IMAGE_TOKEN
    )


def tiny_idefics3(seed: int = 0) -> Idefics3ForConditionalGeneration:
    return _for_tests(Idefics3ForConditionalGeneration(_config(Idefics3Config, seed, scale_factor=2)))


def tiny_smolvlm(seed: int = 0) -> SmolVLMForConditionalGeneration:
    return _for_tests(SmolVLMForConditionalGeneration(_config(SmolVLMConfig, seed, scale_factor=4)))


def _image_block(label: int) -> list[int]:
    return [FAKE_TOKEN_AROUND_IMAGE, label] + [IMAGE_TOKEN] * TOKENS_PER_IMAGE


def _padded_images(images: list[list[torch.Tensor]]) -> dict:
    """pixel_values and pixel_attention_mask for rows of images, padded with all-zero images."""
    width = max(map(len, images))
    pixel_values = torch.zeros(len(images), width, 3, SIZE, SIZE)
    pixel_attention_mask = torch.zeros(len(images), width, SIZE, SIZE, dtype=torch.long)
    for row, row_images in enumerate(images):
        for j, image in enumerate(row_images):
            pixel_values[row, j] = image
            pixel_attention_mask[row, j] = 1
    return {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask}


def idefics3_inputs(
    texts: list[list[int]], n_images: list[int] | None = None, seed: int = 1, image_offset: int = 0
) -> dict:
    """Left-padded rows ``bos, (image block)*n, text``; images from the seeded stream."""
    n_images = n_images or [1] * len(texts)
    rows, images, index = [], [], image_offset
    for text, n in zip(texts, n_images):
        tokens = [1]
        for _ in range(n):
            tokens += _image_block(GLOBAL_IMG) + [FAKE_TOKEN_AROUND_IMAGE]
        rows.append(tokens + text)
        images.append([random_image(seed, index + j, SIZE) for j in range(n)])
        index += n
    input_ids, attention_mask = left_padded(rows)
    return {"input_ids": input_ids, "attention_mask": attention_mask, **_padded_images(images)}


def split_image_inputs(text: list[int], rows: int, cols: int, seed: int = 1) -> dict:
    """One image split into ``rows x cols`` crops and its global view: ``rows*cols + 1`` sub-images."""
    tokens = [1]
    for r in range(rows):
        for c in range(cols):
            tokens += _image_block(ROW_COL + r * cols + c)
    tokens += _image_block(GLOBAL_IMG) + [FAKE_TOKEN_AROUND_IMAGE]
    input_ids, attention_mask = left_padded([tokens + text])
    crops = [random_image(seed, j, SIZE) for j in range(rows * cols + 1)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, **_padded_images([crops])}


IDEFICS3 = Family("idefics3", tiny_idefics3, idefics3_inputs, TOKENS_PER_IMAGE)
SMOLVLM = Family("smolvlm", tiny_smolvlm, idefics3_inputs, TOKENS_PER_IMAGE)
