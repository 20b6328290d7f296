"""Gemma3 (``Gemma3ForConditionalGeneration``): a SigLIP tower, a projector that average-pools k x k squares of
patches (k=4 for the released 896-pixel images: 64x64 patches, 256 tokens), an RMS norm and a linear map, and a
decoder whose layers alternate sliding-window and full attention (five to one in the released models).

Each image sits in the prompt as ``BOI, mm_tokens_per_image x image token, EOI``, in raster order over a square
grid; the processor returns ``token_type_ids`` (1 at the image tokens). The inner model turns them into one
bidirectional block per run of image tokens and hands the decoder a dict of prebuilt 4D masks (``full_attention``:
causal OR block; ``sliding_attention``: the same AND within the window), so the engine reads the call's 2D mask
from the inner model's inputs (``flat_mask``) and, once it has packed the kept tokens, rebuilds that dict for the
packed sequence with the model's own mask functions, from the kept tokens' ``token_type_ids`` and the 2D mask over
what the cache holds (``decoder_mask``). An image's kept tokens stay one contiguous run, so one block.

Traps this guards (tests/test_adapter_gemma3.py):

- without ``token_type_ids`` the model silently runs causal-only masks: images without them are refused, and so
  are ``token_type_ids`` that do not mark exactly the image tokens of the sequence's tail (unpruned ones passed
  with a shortened sequence land the blocks in the wrong place, silently);
- the rebuilt masks always get an explicit 2D mask: with none, transformers reads the gaps that pruning leaves in
  the positions as packed sequences (an IndexError with ``token_type_ids``, silently wrong masks without).

Sliding windows count indices, not positions: a sliding layer attends to the ``sliding_window - 1`` tokens before a
query in the sequence it is given. After pruning those are kept tokens only, so it reaches further back in the
original prompt than the stock model does. The pruned prefill equals the stock model with the dropped tokens
masked out only while the prompt fits in the window (1024 tokens in the released configs); beyond it the pruned
model is the stock model run on the kept tokens, which generate() with a cache and a no-cache loop agree on.

Signals: the tower has no [CLS] token, so ``cls_attention`` and ``vision_keys`` are refused (every method that
reads the keys also reads [CLS] attention). ``vision_features`` is the projector's pooled input per LLM token
(the mean of its k x k patches, before the norm) and ``project`` the norm and linear map, so
``project(vision_features)`` gives exactly the image's tokens. ``vision_attention(queries="mean")`` is the
attention each patch receives (from hooked q/k), average-pooled over each token's k x k patches by the
projector's own pooling. In-LLM stages are refused (``in_llm_problem``), and merging inside the tower too: the
projector pools a fixed grid of every patch.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.masking_utils import create_masks_for_generate

from ..signals import Signal
from .attention import block_attention, tap_blocks
from .base import Adapter, ImageSlot, VisionCapture
from .llava import attention_with_qk

_NO_CLS = "the Gemma3 vision tower (SigLIP) has no [CLS] token"


class Gemma3Adapter(Adapter):
    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration", "Gemma3Model")
    signals = frozenset({"cls_attention", "vision_keys", "vision_attention", "vision_features", "project", "vision_tower"})
    aligned_inputs = ("token_type_ids",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.decoder = self.inner.language_model
        self.vision_tower = self.inner.vision_tower
        self.projector = self.inner.multi_modal_projector
        self._modeling = sys.modules[type(self.inner).__module__]  # the model's own mask functions

    def image_token_id(self) -> int:
        return self.config.image_token_id

    def _blocks(self) -> nn.ModuleList:
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        return tower.encoder.layers

    def vision_layer_count(self) -> int:
        return len(self._blocks())

    def why_not(self, request: Signal) -> str | None:
        if request.name == "vision_tower":
            return "its projector average-pools a fixed grid of every patch, so merging inside the tower is not served"
        if request.name in ("cls_attention", "vision_keys") or (request.name == "vision_attention" and request.queries == "cls"):
            return _NO_CLS
        if request.name == "vision_attention":
            return self.layer_problem(request.layer)
        return None

    def in_llm_problem(self) -> str | None:
        return ("its decoder alternates sliding-window and full-attention layers, each type with its own prebuilt mask "
                "and rotary embedding, and caches only a window of keys in the sliding ones, while an in-LLM stage "
                "gathers one mask and one rotary embedding for every layer after it")

    # inputs and masks

    def check_inputs(self, kwargs: dict) -> None:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if kwargs.get("pixel_values") is None and encoded.get("image") is None:
            return
        types = kwargs.get("token_type_ids")
        if types is None:
            raise ValueError(
                "images need token_type_ids (the Gemma3 processor returns them with input_ids): without them the model "
                "silently lets image tokens attend causally only, instead of both ways within each image"
            )
        placeholders = self.placeholder_mask(kwargs)
        if types.shape[0] != placeholders.shape[0] or types.shape[-1] < placeholders.shape[-1] or not torch.equal(
            types[:, -placeholders.shape[-1]:] == 1, placeholders
        ):
            raise ValueError(
                f"token_type_ids (shape {tuple(types.shape)}) must be 1 exactly at the image tokens of the input sequence "
                f"{tuple(placeholders.shape)}: build both with the processor, and shorten both together"
            )

    def flat_mask(self, mask, inner_inputs: dict):
        if not isinstance(mask, dict) or not inner_inputs:
            return mask
        given = inner_inputs.get("attention_mask")
        # the inner model built the dict from the 2D mask it was given (or none); a dict it was given is generate()'s
        # prebuilt static-cache masks, which the engine reads as such
        return mask if isinstance(given, dict) else given

    def decoder_mask(self, mask: torch.Tensor, decoder_inputs: dict, inner_inputs: dict, packing) -> dict:
        """The decoder's dict of masks for the packed sequence: the inner model's own construction, from the kept
        tokens' ``token_type_ids`` (none given: causal, as the stock model does), with the explicit 2D ``mask``."""
        embeds, positions = decoder_inputs["inputs_embeds"], decoder_inputs["position_ids"]
        cache = next((decoder_inputs[name] for name in ("cache", "past_key_values") if name in decoder_inputs), None)
        config = self.decoder.config
        types = inner_inputs.get("token_type_ids")
        if types is None:
            return create_masks_for_generate(config, embeds, mask, cache, positions)
        length = packing.keep.shape[1]
        kept_types = packing.gather(types[:, -length:].to(embeds.device), dim=-1) * packing.filled()
        # cached tokens (earlier turns) take no part in a block of this call's images
        types = torch.cat([kept_types.new_zeros(kept_types.shape[0], mask.shape[1] - kept_types.shape[1]), kept_types], 1)
        blocks = self._modeling.get_block_sequence_ids_for_mask(types, device=embeds.device)
        return self._modeling.create_masks_for_vision_model(config, embeds, mask, cache, positions, blocks)

    # vision side

    def install_signal_hooks(self, wanted, capture: VisionCapture) -> list:
        layers = self._blocks()
        blocks = {self.block_index(r.layer) for r in wanted if r.name == "vision_attention"}
        handles = tap_blocks({block: attention_with_qk(layers[block]) for block in blocks}, blocks, capture)
        if any(r.name == "vision_features" for r in wanted):

            def keep_pooled(module, args):
                # the first norm call after a vision pass: the pooled patches; a sieve's own `project` calls come later
                capture.tensors.setdefault("vision_features", args[0].detach())

            handles.append(self.projector.mm_soft_emb_norm.register_forward_pre_hook(keep_pooled))
        return handles

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """The projector after its pooling, on (..., d_vision) pooled features: (..., d_llm)."""
        normed = self.projector.mm_soft_emb_norm(features)
        return torch.matmul(normed, self.projector.mm_input_projection_weight).type_as(features)

    def _pooled(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(heads, patches) values per patch, averaged over each token's square by the projector's own pooling:
        (heads, tokens) in raster order."""
        side = self.projector.patches_per_image
        return self.projector.avg_pool(per_patch.reshape(-1, 1, side, side)).flatten(1)

    def slots(self, inputs: dict, capture: VisionCapture) -> list[ImageSlot]:
        if not capture.seen:
            raise ValueError(
                "image tokens reached the model but tokensieve saw no vision pass: pass pixel_values "
                "(not precomputed image features) to the model inside the apply() block"
            )
        n_images = capture.inputs["pixel_shape"][0]
        side = self.projector.tokens_per_side
        blocks = self.placeholder_blocks(inputs, [side * side] * n_images, f"{n_images} image(s) of {side}x{side} tokens")
        return [ImageSlot(row, positions, (side, side), image) for image, (row, positions) in enumerate(blocks)]

    def image_signals(self, wanted, capture: VisionCapture, image: int) -> dict:
        signals = {}
        heads = self.config.vision_config.num_attention_heads
        for request in wanted:
            if request.name == "vision_features":
                signals[request] = capture.tensors["vision_features"][image]
            elif request.name == "vision_attention":
                received = block_attention(capture, self.block_index(request.layer), image, heads, request.queries)
                signals[request] = self._pooled(received)
            elif request.name == "project":
                signals[request] = self._project
        return signals
