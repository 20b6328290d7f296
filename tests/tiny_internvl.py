"""Tiny InternVL: a 3-layer InternViT on 32-pixel tiles of 4-pixel patches (8x8 patches, a [CLS] token), pixel
shuffle to 4x4 = 16 tokens per tile, and a 4-layer Qwen2 decoder.

Inputs are built as ``InternVLProcessor`` builds them: the image processor itself
(``GotOcr2ImageProcessorPil`` with ``crop_to_patches``) cuts each picture into tiles, the crops of its best
grid in raster order and then a thumbnail, and stacks every tile of every image in ``pixel_values``;
each image is ``<img>``, 16 ``<IMG_CONTEXT>`` per tile, ``</img>`` in the text. Every contract image is
96x32 (height x width): 3x1 crops and the thumbnail, 4 tiles, 64 tokens; the contract's budget of 16 then
gives each tile a whole 2x2 grid, so grid methods (pool, downsample), which round each piece down to a
grid, keep exactly 16. ``sized_inputs`` builds one row holding images of other sizes (other tile counts).

The random init leaves InternViT's [CLS] token and position embeddings at zero, which would make every
[CLS] row uniform; the builder draws them from a seeded normal, as trained weights are not zero.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration, Qwen2Config

from tiny_models import IMAGE_TOKEN, PAD, VOCAB, Family, _for_tests, left_padded

IMG_START, IMG_END = 125, 126  # <img> and </img>
TILE, PATCH = 32, 4
TOKENS_PER_TILE = (TILE // PATCH // 2) ** 2
IMAGE_SIZE = (96, 32)  # (height, width): 3x1 crops + the thumbnail
MAX_TILES = 6
PROCESSOR = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, max_patches=MAX_TILES)


def tiny_internvl(seed: int = 0, **overrides) -> InternVLForConditionalGeneration:
    torch.manual_seed(seed)
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=TILE, patch_size=PATCH,
    )
    text = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    config = InternVLConfig(
        vision_config={**vision, **overrides}, text_config=text.to_dict(), image_token_id=IMAGE_TOKEN,
        image_seq_length=TOKENS_PER_TILE,
    )
    model = InternVLForConditionalGeneration(config)
    embeddings = model.model.vision_tower.embeddings
    with torch.no_grad():
        embeddings.cls_token.normal_(generator=torch.Generator().manual_seed(seed))
        embeddings.position_embeddings.normal_(std=0.5, generator=torch.Generator().manual_seed(seed + 1))
    return _for_tests(model)


def picture(seed: int, index: int, size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """Picture ``index`` of a seeded stream, so a row built alone gets the pixels it has in a batch."""
    generator = np.random.default_rng(seed * 1000 + index)
    return Image.fromarray(generator.integers(0, 256, (*size, 3), dtype=np.uint8))


def tiles_of(size: tuple[int, int]) -> int:
    """Tiles the processor cuts a picture of ``size`` (height, width) into, thumbnail included."""
    return PROCESSOR.get_number_of_image_patches(*size, {})


def image_tokens(size: tuple[int, int] = IMAGE_SIZE) -> list[int]:
    """One image in the text, as the processor writes it."""
    return [IMG_START] + [IMAGE_TOKEN] * TOKENS_PER_TILE * tiles_of(size) + [IMG_END]


def internvl_inputs(
    texts: list[list[int]], n_images: list[int] | None = None, seed: int = 1, image_offset: int = 0
) -> dict:
    """Left-padded rows ``bos, (image)*n, text``; every picture ``IMAGE_SIZE``, from the seeded stream."""
    n_images = n_images or [1] * len(texts)
    rows = [[1] + image_tokens() * n + text for text, n in zip(texts, n_images)]
    pictures = [picture(seed, image_offset + i) for i in range(sum(n_images))]
    return _with_pixels(rows, pictures)


def sized_inputs(sizes: list[tuple[int, int]], text: tuple[int, ...] = (5, 6), seed: int = 1) -> dict:
    """One row holding one picture of each size, then ``text``."""
    row = [1] + [token for size in sizes for token in image_tokens(size)] + list(text)
    return _with_pixels([row], [picture(seed, i, size) for i, size in enumerate(sizes)])


def _with_pixels(rows: list[list[int]], pictures: list[Image.Image]) -> dict:
    input_ids, attention_mask = left_padded(rows)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pictures:
        inputs["pixel_values"] = PROCESSOR(images=pictures, return_tensors="pt")["pixel_values"]
    return inputs


INTERNVL = Family("internvl", tiny_internvl, internvl_inputs, TOKENS_PER_TILE * tiles_of(IMAGE_SIZE))
