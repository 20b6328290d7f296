"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``): a
SigLIP-like tower, a connector (pixel shuffle, then a linear projection), a Llama-like decoder at
``model.model.text_model``. The two share this layout; only their released scale factors differ.

The processor may split an image into crops plus a downscaled global view. Each of these sub-images is
one image of ``pixel_values`` (batch, images, 3, H, W) and becomes ``(H/patch/s)×(W/patch/s)``
consecutive ``<image>`` tokens (``s`` is ``scale_factor``: pixel shuffle folds each s×s block of patches
into one token), wrapped by ``<fake_token_around_image>`` and a ``<row_r_col_c>`` or ``<global-img>``
text token. The unit of selection is the sub-image: each crop and the global view are pruned on their
own token grid with their own budget, since the model's tensors know nothing of which crops
form one picture. All-zero images pad rows with fewer images; the model drops them before the tower,
so the images counted here are those the tower actually encodes, in batch-row order.

Signals: the tower has no [CLS] token, so ``cls_attention`` and ``vision_keys`` are refused.
``vision_features`` is the connector's projection input per LLM token (the s² patch features of the
token's block, concatenated: width ``s²·d_vision``) and ``project`` is that projection, so
``project(vision_features)`` gives exactly the tokens the LLM sees. ``vision_attention(queries="mean")``
is the attention each patch receives (from hooked q/k, with the mask the block is given), averaged over
the s² patches that pixel shuffle folds into each token (found by running the model's own
``pixel_shuffle`` on patch indices), as the HiPrune reference averages Qwen's 2x2 merged patches.
"""

from __future__ import annotations

import torch
from torch import nn

from ..signals import Signal
from .attention import block_attention, tap_blocks
from .base import Adapter, ImageSlot, VisionCapture
from .llava import attention_with_qk


class Idefics3Adapter(Adapter):
    family = "idefics3"
    model_classes = (
        "Idefics3ForConditionalGeneration", "Idefics3Model", "SmolVLMForConditionalGeneration", "SmolVLMModel",
    )
    signals = frozenset({"cls_attention", "vision_keys", "vision_attention", "vision_features", "project", "vision_tower"})

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.decoder = self.inner.text_model
        self.vision_tower = self.inner.vision_model
        self.projection = self.inner.connector.modality_projection

    def image_token_id(self) -> int:
        return self.config.image_token_id

    def vision_layer_count(self) -> int:
        return len(self.vision_tower.encoder.layers)

    def why_not(self, request: Signal) -> str | None:
        return self.why_not_without_cls(
            request, f"the vision tower ({self.config.vision_config.model_type}, SigLIP-like) has no [CLS] token",
            "its connector folds each square of patches into one token by pixel shuffle, which needs every patch")

    def install_signal_hooks(self, wanted, capture: VisionCapture) -> list:
        layers = self.vision_tower.encoder.layers
        blocks = {self.block_index(r.layer) for r in wanted if r.name == "vision_attention"}
        handles = tap_blocks({block: attention_with_qk(layers[block]) for block in blocks}, blocks, capture)
        if any(r.name == "vision_features" for r in wanted):

            def keep_projection_input(module, args):
                # the first projection after a vision pass; a sieve's own `project` calls come later
                capture.tensors.setdefault("vision_features", args[0].detach())

            handles.append(self.projection.register_forward_pre_hook(keep_projection_input))
        return handles

    def _token_patches(self, patches: int, device) -> torch.Tensor:
        """(tokens, s²) the patch indices pixel shuffle folds into each token, by the model's own function."""
        index = torch.arange(patches, dtype=torch.float64, device=device).view(1, patches, 1)
        return self.inner.connector.pixel_shuffle(index, self.config.scale_factor)[0].long()

    def slots(self, inputs: dict, capture: VisionCapture) -> list[ImageSlot]:
        if not capture.seen:
            raise ValueError(
                "image tokens reached the model but tokensieve saw no vision pass: pass pixel_values "
                "(not precomputed image features) to the model inside the apply() block"
            )
        n_images, _, height, width = capture.inputs["pixel_shape"]  # padding images already dropped
        cell = self.config.vision_config.patch_size * self.config.scale_factor
        grid = (height // cell, width // cell)
        blocks = self.placeholder_blocks(
            inputs, [grid[0] * grid[1]] * n_images,
            f"{n_images} (sub-)image(s) of {grid[0]}x{grid[1]} tokens after pixel shuffle",
            " (all-zero images count as padding and are dropped)",
        )
        return [ImageSlot(row, positions, grid, image) for image, (row, positions) in enumerate(blocks)]

    def image_signals(self, wanted, capture: VisionCapture, image: int) -> dict:
        signals = {}
        heads = self.config.vision_config.num_attention_heads
        for request in wanted:
            if request.name == "vision_features":
                signals[request] = capture.tensors["vision_features"][image]
            elif request.name == "vision_attention":
                received = block_attention(capture, self.block_index(request.layer), image, heads, request.queries)
                signals[request] = received[:, self._token_patches(received.shape[1], received.device)].mean(-1)
            elif request.name == "project":
                signals[request] = self.projection
        return signals
