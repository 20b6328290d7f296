"""Tiny Gemma3 (``Gemma3ForConditionalGeneration``), and its inputs built by hand the way the processor builds them.

A SigLIP tower (2 layers, hidden 32) cuts a 64x64 image into 16x16 patches of 4 pixels; the projector
average-pools each 2x2 square of patches into one token (``mm_tokens_per_image=64``: an 8x8 grid), as the
released models pool 4x4 squares of a 64x64 grid into 256 tokens. The decoder has 4 layers, sliding-window and
full-attention in turn (the released models: five sliding to one full). Each image sits in the prompt as
``BOI, 64 x image token, EOI``, and ``token_type_ids`` marks the image tokens (1) against text (0): the model
lets an image's tokens attend to each other both ways, and without ``token_type_ids`` it silently does not.

``GEMMA3`` has a sliding window (512) longer than any test prompt, so its sliding layers see every token and the
pruned prefill equals the stock one with the dropped tokens masked out. ``tiny_gemma3(window=8)`` is shorter
than an image: its sliding layers count indices, so pruning lets them reach further back (test_adapter_gemma3.py).
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from tiny_models import IMAGE_TOKEN, PAD, VOCAB, Family, _for_tests, left_padded, random_image

BOI, EOI = 125, 126
SIZE, PATCH, TOKENS_PER_IMAGE = 64, 4, 64
LONG_WINDOW = 512


def tiny_gemma3(seed: int = 0, window: int = LONG_WINDOW, tokens_per_image: int = TOKENS_PER_IMAGE) -> Gemma3ForConditionalGeneration:
    torch.manual_seed(seed)
    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=512, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2, sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    vision = dict(
        model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, image_size=SIZE, patch_size=PATCH,
    )
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image, boi_token_index=BOI,
        eoi_token_index=EOI, image_token_index=IMAGE_TOKEN,
    )
    return _for_tests(Gemma3ForConditionalGeneration(config))


def gemma3_inputs(
    texts: list[list[int]], n_images: list[int] | None = None, seed: int = 1, image_offset: int = 0,
    tokens_per_image: int = TOKENS_PER_IMAGE,
) -> dict:
    """Left-padded rows ``bos, (BOI, image x 64, EOI) per image, text``; images from the seeded stream."""
    n_images = n_images or [1] * len(texts)
    image_block = [BOI] + [IMAGE_TOKEN] * tokens_per_image + [EOI]
    input_ids, attention_mask = left_padded([[1] + image_block * n + text for text, n in zip(texts, n_images)])
    images = [random_image(seed, image_offset + i, SIZE) for i in range(sum(n_images))]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": (input_ids == IMAGE_TOKEN).long(),
        "pixel_values": torch.stack(images),
    }


def gemma3_masked_reference(model, inputs: dict, embeds, mask, positions):
    """The stock decoder's output on ``embeds`` under the 2D ``mask``: the inner model builds its masks (image blocks
    from ``token_type_ids``, the sliding window) as in a stock call."""
    return model.model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, token_type_ids=inputs["token_type_ids"],
    ).last_hidden_state


GEMMA3 = Family("gemma3", tiny_gemma3, gemma3_inputs, TOKENS_PER_IMAGE, masked_reference=gemma3_masked_reference)

FRAMES = 4  # frames of each video of ``gemma3_frames``
TOKENS_PER_FRAME = 16  # its model pools each frame's 16x16 patches to 4x4 tokens


def gemma3_frames_inputs(texts: list[list[int]], n_images: list[int] | None = None, seed: int = 1,
                         image_offset: int = 0) -> dict:
    """``gemma3_inputs`` with videos given as their frames (``video_frames=4``): ``n_images`` videos per row (default
    one), each frame one image (``BOI, image x 16, EOI``)."""
    n_videos = n_images or [1] * len(texts)
    return gemma3_inputs(texts, [FRAMES * n for n in n_videos], seed, FRAMES * image_offset, TOKENS_PER_FRAME)


GEMMA3_FRAMES = Family("gemma3_frames", partial(tiny_gemma3, tokens_per_image=TOKENS_PER_FRAME), gemma3_frames_inputs,
                       FRAMES * TOKENS_PER_FRAME, masked_reference=gemma3_masked_reference, videos=True,
                       options={"video_frames": FRAMES})
