"""Tiny LLaVA-NeXT (CLIP tower, Llama decoder) and LLaVA-OneVision (SigLIP tower, Qwen2 decoder) on
32-pixel crops of 8-pixel patches: a 4x4 base view per crop.

Every test image is 80x32 (height x width). Of the pinpoints below, 96x32 fits it best: a base view
plus a column of three crops, 12x4 patches, unpadded to 10x4. So each image gives 16 + 10x(4 + 1) = 66
tokens (``anyres_tokens`` counts them with the models' own helpers). Inputs are built as the
processors build them: ``pixel_values`` (images, crops, 3, 32, 32) and ``image_sizes``.
OneVision's ``batch_num_images`` is left out, so every image is cut into crops, as the Family
contract needs (with it, images of a multi-image row are base views only: see test_adapter_llava_next).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from tiny_models import IMAGE_TOKEN, PAD, VOCAB, Family, _for_tests, _llama, left_padded, random_image

CROP = 32
PATCH = 8
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32]]
IMAGE_SIZE = (80, 32)
VIDEO_TOKEN = 126


def anyres_tokens(image_size: tuple[int, int]) -> int:
    """Placeholder tokens of one image: the base view, then each unpadded high-res row and its newline."""
    side = CROP // PATCH
    rows, cols = get_anyres_image_grid_shape(list(image_size), PINPOINTS, CROP)
    unpadded = unpad_image(torch.empty(0, rows * side, cols * side), list(image_size))
    return side * side + unpadded.shape[1] * (unpadded.shape[2] + 1)


def anyres_pixels(seed: int, index: int, image_size: tuple[int, int] = IMAGE_SIZE) -> torch.Tensor:
    """(crops, 3, 32, 32): a seeded picture at its best pinpoint resolution, resized to the base view,
    then cut into crops in raster order."""
    rows, cols = get_anyres_image_grid_shape(list(image_size), PINPOINTS, CROP)
    picture = random_image(seed, index, CROP * max(rows, cols))[:, : CROP * rows, : CROP * cols]
    base = F.interpolate(picture[None], size=(CROP, CROP), mode="bilinear")
    crops = picture.unfold(1, CROP, CROP).unfold(2, CROP, CROP).permute(1, 2, 0, 3, 4).reshape(-1, 3, CROP, CROP)
    return torch.cat([base, crops])


def anyres_inputs(
    texts: list[list[int]], n_images: list[int] | None = None, seed: int = 1, image_offset: int = 0
) -> dict:
    """Left-padded rows of ``bos, image tokens, text``, every image ``IMAGE_SIZE``."""
    n_images = n_images or [1] * len(texts)
    per_image = anyres_tokens(IMAGE_SIZE)
    input_ids, attention_mask = left_padded([[1] + [IMAGE_TOKEN] * per_image * n + text for text, n in zip(texts, n_images)])
    total = sum(n_images)
    pixel_values = torch.stack([anyres_pixels(seed, image_offset + i) for i in range(total)])
    image_sizes = torch.tensor([IMAGE_SIZE] * total)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, "image_sizes": image_sizes}


def tiny_llava_next(seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=CROP,
        patch_size=PATCH, projection_dim=32,
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=_llama(), image_token_id=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS
    )
    return _for_tests(LlavaNextForConditionalGeneration(config))


def tiny_llava_onevision(seed: int = 0, crop: int = CROP, **overrides) -> LlavaOnevisionForConditionalGeneration:
    """``crop``: the tower's image size (a video's frame size), the pinpoints scaled with it."""
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=crop,
        patch_size=PATCH,
    )
    text = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        image_grid_pinpoints=[[side * crop // CROP for side in pinpoint] for pinpoint in PINPOINTS], **overrides,
    )
    return _for_tests(LlavaOnevisionForConditionalGeneration(config))


LLAVA_NEXT = Family("llava_next", tiny_llava_next, anyres_inputs, anyres_tokens(IMAGE_SIZE))
LLAVA_ONEVISION = Family("llava_onevision", tiny_llava_onevision, anyres_inputs, anyres_tokens(IMAGE_SIZE))
