"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP-like tower, an MLP projector, a decoder.

Each image becomes ``(H/patch)×(W/patch)`` consecutive placeholder tokens. [CLS]-based signals
are read from the q/k projections of the vision layer that produces the features LLaVA uses
(``hidden_states[vision_feature_layer]`` is the output of that layer), so the tower keeps its
fast attention kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, ImageSlot, VisionCapture

#: vision towers whose first token is a [CLS] token (SigLIP has none)
_TOWERS_WITH_CLS = {"clip_vision_model", "dinov2"}


def _find(module: nn.Module, paths: tuple[str, ...]) -> nn.Module:
    for path in paths:
        found = module
        for name in path.split("."):
            found = getattr(found, name, None)
            if found is None:
                break
        if found is not None:
            return found
    raise TypeError(f"{type(module).__name__} has none of {paths}: this transformers version changed its layout")


def attention_with_qk(layer: nn.Module) -> nn.Module:
    """The attention submodule of a transformer layer: the one with ``q_proj`` and ``k_proj``."""
    for module in layer.modules():
        if isinstance(getattr(module, "q_proj", None), nn.Linear) and isinstance(getattr(module, "k_proj", None), nn.Linear):
            return module
    raise TypeError(f"{type(layer).__name__} has no q_proj/k_proj: this transformers version renamed them")


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    signals = frozenset({"cls_attention", "vision_keys", "vision_features", "project"})

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.inner = model.model if hasattr(model, "lm_head") else model
        self.decoder = self.inner.language_model
        self.vision_tower = self.inner.vision_tower
        self.projector = self.inner.multi_modal_projector
        self.config = model.config
        self.vision_config = self.config.vision_config

    def image_token_id(self) -> int:
        return self.config.image_token_id

    def _feature_layer_index(self) -> int | None:
        """Index into the tower's layer list of the layer whose output LLaVA uses (None: embeddings or a list)."""
        index = self.config.vision_feature_layer
        if not isinstance(index, int):
            return None
        n_layers = self.vision_config.num_hidden_layers
        position = index if index >= 0 else n_layers + 1 + index
        return position - 1 if position >= 1 else None

    def missing_signals(self, wanted: tuple[str, ...]) -> dict[str, str]:
        missing = {name: f"the {self.family} adapter does not compute it" for name in wanted if name not in self.signals}
        for name in {"cls_attention", "vision_keys"} & set(wanted):
            tower = self.vision_config.model_type
            if tower not in _TOWERS_WITH_CLS:
                missing[name] = f"the vision tower ({tower}) has no [CLS] token"
            elif self.config.vision_feature_select_strategy != "default":
                missing[name] = "vision_feature_select_strategy is not 'default', so [CLS] is among the image tokens"
            elif self._feature_layer_index() is None:
                missing[name] = f"vision_feature_layer={self.config.vision_feature_layer!r} is not a single transformer layer"
        return missing

    def _feature_attention(self) -> nn.Module:
        layers = _find(self.vision_tower, ("vision_model.encoder.layers", "encoder.layers", "encoder.layer"))
        return attention_with_qk(layers[self._feature_layer_index()])

    def install_signal_hooks(self, wanted: tuple[str, ...], capture: VisionCapture) -> list:
        handles = []
        if {"cls_attention", "vision_keys"} & set(wanted):
            attention = self._feature_attention()

            def keep_cls_query(module, args, output):
                capture.tensors["cls_query"] = output[:, :1].detach()

            def keep_keys(module, args, output):
                capture.tensors["keys"] = output.detach()

            handles.append(attention.q_proj.register_forward_hook(keep_cls_query))
            handles.append(attention.k_proj.register_forward_hook(keep_keys))
        if "vision_features" in wanted:

            def keep_projector_input(module, args):
                # the first projector call after a vision pass; a sieve's own `project` calls come later
                capture.tensors.setdefault("vision_features", args[0].detach())

            handles.append(self.projector.register_forward_pre_hook(keep_projector_input))
        return handles

    def slots(self, inputs: dict, capture: VisionCapture) -> list[ImageSlot]:
        if not capture.seen:
            raise ValueError(
                "image tokens reached the model but tokensieve saw no vision pass: pass pixel_values "
                "(not precomputed image features) to the model inside the apply() block"
            )
        pixel_shape = capture.inputs["pixel_shape"]
        n_images = pixel_shape[0]
        patch = self.vision_config.patch_size
        grid = (pixel_shape[-2] // patch, pixel_shape[-1] // patch)
        blocks = self.placeholder_blocks(
            inputs, [grid[0] * grid[1]] * n_images, f"{n_images} image(s) of {grid[0]}x{grid[1]} patches"
        )
        return [ImageSlot(row, positions, grid, image) for image, (row, positions) in enumerate(blocks)]

    def image_signals(self, wanted: tuple[str, ...], capture: VisionCapture, image: int) -> dict:
        signals = {}
        if {"cls_attention", "vision_keys"} & set(wanted):
            heads = self.vision_config.num_attention_heads
            keys = capture.tensors["keys"][image].float()
            keys = keys.view(keys.shape[0], heads, -1).transpose(0, 1)  # (heads, 1+N, d_head)
            if "cls_attention" in wanted:
                query = capture.tensors["cls_query"][image, 0].float().view(heads, 1, -1)
                logits = (query @ keys.transpose(1, 2)).squeeze(1) * keys.shape[-1] ** -0.5
                signals["cls_attention"] = logits.softmax(dim=-1)[:, 1:]
            if "vision_keys" in wanted:
                signals["vision_keys"] = keys[:, 1:]
        if "vision_features" in wanted:
            signals["vision_features"] = capture.tensors["vision_features"][image]
        if "project" in wanted:
            signals["project"] = self.projector
        return signals
