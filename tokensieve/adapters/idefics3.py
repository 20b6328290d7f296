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
``project(vision_features)`` gives exactly the tokens the LLM sees.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, ImageSlot, VisionCapture


class Idefics3Adapter(Adapter):
    family = "idefics3"
    model_classes = (
        "Idefics3ForConditionalGeneration", "Idefics3Model", "SmolVLMForConditionalGeneration", "SmolVLMModel",
    )
    signals = frozenset({"vision_features", "project"})

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.inner = model.model if hasattr(model, "lm_head") else model
        self.decoder = self.inner.text_model
        self.vision_tower = self.inner.vision_model
        self.projection = self.inner.connector.modality_projection
        self.config = model.config

    def image_token_id(self) -> int:
        return self.config.image_token_id

    def missing_signals(self, wanted: tuple[str, ...]) -> dict[str, str]:
        missing = {name: f"the {self.family} adapter does not compute it" for name in wanted if name not in self.signals}
        for name in {"cls_attention", "vision_keys"} & set(wanted):
            missing[name] = f"the vision tower ({self.config.vision_config.model_type}, SigLIP-like) has no [CLS] token"
        return missing

    def install_signal_hooks(self, wanted: tuple[str, ...], capture: VisionCapture) -> list:
        if "vision_features" not in wanted:
            return []

        def keep_projection_input(module, args):
            # the first projection after a vision pass; a sieve's own `project` calls come later
            capture.tensors.setdefault("vision_features", args[0].detach())

        return [self.projection.register_forward_pre_hook(keep_projection_input)]

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

    def image_signals(self, wanted: tuple[str, ...], capture: VisionCapture, image: int) -> dict:
        signals = {}
        if "vision_features" in wanted:
            signals["vision_features"] = capture.tensors["vision_features"][image]
        if "project" in wanted:
            signals["project"] = self.projection
        return signals
