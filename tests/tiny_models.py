"""Shared pieces of the tiny test models, and the tiny LLaVA-1.5. Other families live in
``tiny_<family>.py`` files; ``families.py`` lists them all."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

VOCAB = 128
IMAGE_TOKEN = 127
PAD = 0


def _llama(**overrides) -> LlamaConfig:
    config = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
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
    return _for_tests(LlavaForConditionalGeneration(config))


def _for_tests(model):
    # generation runs a fixed number of steps so a random model's early EOS cannot end it
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


@dataclass
class Family:
    """How to build a tiny model of one family and a batch of prompts with images for it.

    ``make_inputs(texts, n_images=None, seed=1, image_offset=0)`` returns the model's keyword
    inputs for left-padded rows, row i holding ``n_images[i]`` images (default 1) and then the text
    ids ``texts[i]``; images come from a seeded stream (``random_image``) starting at
    ``image_offset``, so a batch row rebuilt alone gets the same pixels. Every image must give
    exactly ``tokens_per_image`` placeholder tokens with id ``image_token``. ``reference`` is what a pruned
    prefill equals: "masked", the stock decoder with the dropped tokens masked out, or "gathered", the decoder
    run on each row's kept tokens alone at their positions (recurrent layers, Qwen3.5: a masked token still
    advances their state).

    ``masked_reference(model, inputs, embeds, mask, positions)``, for families whose decoder takes more than a 2D
    mask, runs the stock decoder on ``embeds`` with the 2D ``mask`` and ``positions`` as the stock model would
    (Gemma3: through the inner model, which builds its masks from ``token_type_ids``); None: the decoder itself.
    """

    name: str
    build: Callable[[], torch.nn.Module]
    make_inputs: Callable[..., dict]
    tokens_per_image: int
    image_token: int = IMAGE_TOKEN
    masked_reference: Callable[..., torch.Tensor] | None = None
    reference: str = "masked"
    videos: bool = False  # its inputs are videos (tokens_per_image: per video, image_token: the video placeholder)
    #: placeholders after each video's tokens that its record does not count (LLaVA-OneVision's newline, kept always)
    trailing_placeholders: int = 0
    #: the keywords ``ts.apply`` needs for its inputs (``video_frames=`` for videos given as their frames)
    options: dict = field(default_factory=dict)

    def visual_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, length) True at the tokens a method acts on: every placeholder but the trailing ones of each run."""
        placed = input_ids == self.image_token
        ahead = torch.cat([placed, placed.new_zeros(placed.shape[0], self.trailing_placeholders)], dim=1)
        acted_on = placed.clone()
        for step in range(1, self.trailing_placeholders + 1):  # followed by a placeholder at each of the next steps
            acted_on &= ahead[:, step : step + placed.shape[1]]
        return acted_on


def random_image(seed: int, index: int, size: int) -> torch.Tensor:
    """Image ``index`` of a seeded stream, so a row built alone gets the pixels it has in a batch."""
    return torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed * 1000 + index))


def llava_inputs(
    texts: list[list[int]], n_images: list[int] | None = None, seed: int = 1, size: int = 64, image_offset: int = 0
) -> dict:
    """Left-padded inputs: each row is ``bos, image tokens, text``; ``texts`` gives each row's text ids.
    ``image_offset`` starts the image stream later (row i of a batch, built alone)."""
    n_images = n_images or [1] * len(texts)
    per_image = (size // 8) ** 2
    input_ids, attention_mask = left_padded([[1] + [IMAGE_TOKEN] * per_image * n + text for text, n in zip(texts, n_images)])
    pixel_values = torch.stack([random_image(seed, image_offset + i, size) for i in range(sum(n_images))])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask for token rows of different lengths, padded on the left."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), PAD)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


LLAVA = Family("llava", tiny_llava, llava_inputs, 64)
