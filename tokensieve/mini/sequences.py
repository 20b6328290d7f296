"""Token sequences for training and fast evaluation on cached features.

One sequence holds one image (or one clip: its frames as images) and several questions about it, as a
multi-turn chat: the image(s) in the first user turn, then question/answer turns. Labels cover only
answer tokens (and the end of turn that stops generation). Pieces are tokenized separately at the same boundaries that
inference uses (the prompt ends at "assistant\\n"), so training and inference see the same ids.
"""

from __future__ import annotations

import torch
from torch import nn

from ..qa import QA
from .chat import END_OF_TURN, IMAGE_TOKEN, assistant_answer, user_turn

IGNORE = -100


class Encoder:
    def __init__(self, tokenizer, image_tokens: int):
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt(self, question: str, images: int = 1) -> list[int]:
        """The first user turn with each image's placeholders expanded, ending where the answer starts."""
        first, *rest = user_turn(question, images).split(IMAGE_TOKEN)
        ids = self._ids(first)
        for piece in rest:  # tokenized apart, as the processor's text splits at each special <image> token
            ids += [self.image_token_id] * self.image_tokens + self._ids(piece)
        return ids

    def conversation(self, qas: list[QA], images: int = 1) -> tuple[list[int], list[int]]:
        """(input ids, labels) for all questions about one image, or one clip of `images` frames."""
        ids, labels = [], []
        for turn, qa in enumerate(qas):
            prompt = self.prompt(qa.question, images) if turn == 0 else self._ids(user_turn(qa.question, images=0))
            answer = self._ids(assistant_answer(qa.answer))
            n_labelled = answer.index(self.end_of_turn_id) + 1  # the answer and its end of turn, not "\n"
            ids += prompt + answer
            labels += [IGNORE] * len(prompt) + answer[:n_labelled] + [IGNORE] * (len(answer) - n_labelled)
        return ids, labels


def embed_with_images(embed: nn.Embedding, ids: torch.Tensor, image_token_id: int,
                      image_embeds: torch.Tensor) -> torch.Tensor:
    """Token embeddings with each row's image placeholders replaced, in order, by that row's image embeddings.

    ids: (B, L); image_embeds: (B, N, D) where each row has exactly N placeholders.
    """
    is_image = ids == image_token_id
    embeds = embed(ids.masked_fill(is_image, 0))
    return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))
