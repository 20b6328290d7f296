"""What Gemma3 and Gemma 4 share: an inner model that turns a per-token type input (1 at the image tokens) into one
bidirectional block per run of image tokens and hands the decoder a dict of prebuilt masks, one per layer type.

The engine reads the call's 2D mask from the inner model's inputs (``flat_mask``) and, once it has packed the kept
tokens, rebuilds that dict for the packed sequence with the model's own mask functions, from the kept tokens' type
ids and an explicit 2D mask over what the cache holds (``decoder_mask``). An image's kept tokens stay one run, so one
block. Traps (guarded in tests/test_adapter_gemma3.py and test_adapter_gemma4.py): without the type ids the model
silently runs causal-only masks, and type ids that do not mark exactly the image tokens of the sequence's tail land
the blocks in the wrong place; with no explicit 2D mask, transformers reads the gaps pruning leaves in the positions
as packed sequences.
"""

from __future__ import annotations

import sys
from typing import ClassVar

import torch
from torch import nn
from transformers.masking_utils import create_masks_for_generate

from .base import Adapter


class ImageBlockAdapter(Adapter):
    #: the input marking the image tokens with 1, as the processor returns it with input_ids (and in ``aligned_inputs``)
    type_ids: ClassVar[str]
    #: the family as messages name it
    model_name: ClassVar[str]

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.decoder = self.inner.language_model
        self.vision_tower = self.inner.vision_tower
        self._modeling = sys.modules[type(self.inner).__module__]  # the model's own mask functions

    def image_token_id(self) -> int:
        return self.config.image_token_id

    def bidirectional_images(self) -> bool:
        """Whether the model lets each image's tokens attend both ways (else its masks are causal only)."""
        return True

    def check_type_ids(self, kwargs: dict) -> None:
        """Refuse images whose type ids are missing or do not mark exactly the image tokens of the sequence's tail."""
        types = kwargs.get(self.type_ids)
        if types is None:
            raise ValueError(
                f"images need {self.type_ids} (the {self.model_name} processor returns them with input_ids): without "
                f"them the model silently lets image tokens attend causally only, instead of both ways within each image"
            )
        placeholders = self.placeholder_mask(kwargs)
        if types.shape[0] != placeholders.shape[0] or types.shape[-1] < placeholders.shape[-1] or not torch.equal(
            types[:, -placeholders.shape[-1]:] == 1, placeholders
        ):
            raise ValueError(
                f"{self.type_ids} (shape {tuple(types.shape)}) must be 1 exactly at the image tokens of the input "
                f"sequence {tuple(placeholders.shape)}: build both with the processor, and shorten both together"
            )

    def flat_mask(self, mask, inner_inputs: dict):
        if not isinstance(mask, dict) or not inner_inputs:
            return mask
        given = inner_inputs.get("attention_mask")
        # the inner model built the dict from the 2D mask it was given (or none); a dict it was given is generate()'s
        # prebuilt static-cache masks, which the engine reads as such
        return mask if isinstance(given, dict) else given

    def decoder_mask(self, mask: torch.Tensor, decoder_inputs: dict, inner_inputs: dict, packing) -> dict:
        """The decoder's dict of masks for the packed sequence, built as the inner model builds it: image blocks from
        the kept tokens' type ids (none given, or a model without bidirectional images: causal), with the explicit
        2D ``mask``."""
        embeds, positions = decoder_inputs["inputs_embeds"], decoder_inputs["position_ids"]
        cache = next((decoder_inputs[name] for name in ("cache", "past_key_values") if name in decoder_inputs), None)
        config = self.decoder.config
        types = inner_inputs.get(self.type_ids)
        if types is None or not self.bidirectional_images():
            return create_masks_for_generate(config, embeds, mask, cache, positions)
        length = packing.keep.shape[1]
        kept_types = packing.gather(types[:, -length:].to(embeds.device), dim=-1) * packing.filled()
        # cached tokens (earlier turns) take no part in a block of this call's images
        types = torch.cat([kept_types.new_zeros(kept_types.shape[0], mask.shape[1] - kept_types.shape[1]), kept_types], 1)
        blocks = self._modeling.get_block_sequence_ids_for_mask(types, device=embeds.device)
        return self._modeling.create_masks_for_vision_model(config, embeds, mask, cache, positions, blocks)
