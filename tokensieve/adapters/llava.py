"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP-like tower, an MLP projector, a decoder.

Each image becomes ``(H/patch)×(W/patch)`` consecutive placeholder tokens. Attention signals are read
from the q/k projections of the vision layer asked for (by default the one that produces the features
LLaVA uses: ``hidden_states[vision_feature_layer]`` is the output of that layer), so the tower keeps its
fast attention kernel. ``cls_attention`` and ``vision_attention(queries="cls")`` need a tower with a
[CLS] token (CLIP, DINOv2) that LLaVA drops (``vision_feature_select_strategy="default"``);
``vision_attention(queries="mean")``, the attention each token receives, serves any tower, SigLIP
included. The image's tokens are the sequence's columns after the token LLaVA drops ("default": the
first) or all of them ("full").
"""

from __future__ import annotations

import torch
from torch import nn

from ..signals import Signal
from .attention import block_attention, block_keys, tap_blocks
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
    signals = frozenset({"cls_attention", "vision_keys", "vision_attention", "vision_features", "project", "vision_tower"})
    frames_as_images = True  # each image is one tower image of one grid: a video can be given as its frames

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.decoder = self.inner.language_model
        self.vision_tower = self.inner.vision_tower
        self.projector = self.inner.multi_modal_projector
        self.vision_config = self.config.vision_config

    def image_token_id(self) -> int:
        return self.config.image_token_id

    def _blocks(self) -> nn.ModuleList:
        return _find(self.vision_tower, ("vision_model.encoder.layers", "encoder.layers", "encoder.layer"))

    def vision_layer_count(self) -> int:
        return len(self._blocks())

    def _feature_layer_index(self) -> int | None:
        """Index into the tower's layer list of the layer whose output LLaVA uses (None: embeddings or a list)."""
        index = self.config.vision_feature_layer
        if not isinstance(index, int):
            return None
        n_layers = self.vision_config.num_hidden_layers
        position = index if index >= 0 else n_layers + 1 + index
        return position - 1 if position >= 1 else None

    def feature_block(self) -> int | None:
        return self._feature_layer_index()

    def layer_problem(self, layer: int | None) -> str | None:
        if layer is None and self._feature_layer_index() is None:
            return f"vision_feature_layer={self.config.vision_feature_layer!r} is not a single transformer layer"
        return super().layer_problem(layer)

    def _token_offset(self) -> int:
        """Tower tokens before the image's own: the [CLS] (or first) token LLaVA drops with "default"."""
        return 1 if self.config.vision_feature_select_strategy == "default" else 0

    def why_not(self, request: Signal) -> str | None:
        name = request.name
        if name == "vision_tower":
            return self._unmergeable()
        if name not in ("cls_attention", "vision_keys", "vision_attention"):
            return None
        if name != "vision_attention" or request.queries == "cls":
            tower = self.vision_config.model_type
            if tower not in _TOWERS_WITH_CLS:
                return f"the vision tower ({tower}) has no [CLS] token"
            if self.config.vision_feature_select_strategy != "default":
                return "vision_feature_select_strategy is not 'default', so [CLS] is among the image tokens"
        try:
            attention_with_qk(self._blocks()[0])
        except TypeError as error:
            return str(error)
        if name == "cls_attention":
            layers = request.layers or (None,)
        else:
            layers = (request.layer,) if name == "vision_attention" else (None,)
        return next((why for why in map(self.layer_problem, layers) if why), None)

    def _unmergeable(self) -> str | None:
        """Why tokens cannot be merged between this tower's blocks (None: they can)."""
        if self.feature_block() is None:
            return f"vision_feature_layer={self.config.vision_feature_layer!r} is not a single transformer layer"
        if self.vision_config.model_type in _TOWERS_WITH_CLS and self.config.vision_feature_select_strategy != "default":
            return "vision_feature_select_strategy is not 'default', so [CLS] is among the image tokens"
        try:
            attention_with_qk(self._blocks()[0])
        except TypeError as error:
            return str(error)
        return None

    def merge_layout(self) -> tuple[nn.ModuleList, int, bool, int]:
        has_cls = self.vision_config.model_type in _TOWERS_WITH_CLS
        return self._blocks(), self.feature_block(), has_cls, self.vision_config.num_attention_heads

    def _taps(self, wanted) -> tuple[dict[int, bool], bool]:
        """Blocks whose q/k the requests need (block -> every query row needed?), and whether the projector's
        input is needed."""
        blocks: dict[int, bool] = {}
        for request in wanted:
            if request.name == "cls_attention":
                for layer in request.layers or (None,):
                    blocks.setdefault(self.block_index(layer), False)
            elif request.name == "vision_keys":
                blocks.setdefault(self.block_index(None), False)
            elif request.name == "vision_attention":
                block = self.block_index(request.layer)
                blocks[block] = blocks.get(block, False) or request.queries == "mean"
        return blocks, any(request.name == "vision_features" for request in wanted)

    def install_signal_hooks(self, wanted, capture: VisionCapture) -> list:
        blocks, features = self._taps(wanted)
        layers = self._blocks()
        attentions = {block: attention_with_qk(layers[block]) for block in blocks}
        handles = tap_blocks(attentions, {block for block, full in blocks.items() if full}, capture)
        if features:

            def keep_projector_input(module, args):
                # the first projector call after a vision pass; a sieve's own `project` calls come later
                capture.tensors.setdefault("vision_features", args[0].detach())

            handles.append(self.projector.register_forward_pre_hook(keep_projector_input))
        return handles

    def tower_attention(self, request: Signal, capture: VisionCapture, image: int) -> torch.Tensor:
        """An attention request for one tower image (one crop), over the image's own tokens: (heads, N), or
        (layers, heads, N) for ``cls_attention(layers=...)``."""
        heads, offset = self.vision_config.num_attention_heads, self._token_offset()
        if request.name == "vision_keys":
            return block_keys(capture, self.block_index(None), image, heads)[:, offset:]
        if request.name == "vision_attention":
            return block_attention(capture, self.block_index(request.layer), image, heads, request.queries)[:, offset:]
        rows = [block_attention(capture, self.block_index(layer), image, heads, "cls")[:, offset:]
                for layer in request.layers or (None,)]
        return rows[0] if request.layers is None else torch.stack(rows)

    def image_signals(self, wanted, capture: VisionCapture, image: int) -> dict:
        signals = {}
        for request in wanted:
            if request.name in ("cls_attention", "vision_keys", "vision_attention"):
                signals[request] = self.tower_attention(request, capture, image)
            elif request.name == "vision_features":
                signals[request] = capture.tensors["vision_features"][image]
            elif request.name == "project":
                signals[request] = self.projector
        return signals

    def image_grid(self, pixel_shape: tuple[int, ...]) -> tuple[int, int]:
        patch = self.vision_config.patch_size
        return pixel_shape[-2] // patch, pixel_shape[-1] // patch

    def slots(self, inputs: dict, capture: VisionCapture) -> list[ImageSlot]:
        if not capture.seen:
            raise ValueError(
                "image tokens reached the model but tokensieve saw no vision pass: pass pixel_values "
                "(not precomputed image features) to the model inside the apply() block"
            )
        pixel_shape = capture.inputs["pixel_shape"]
        n_images = pixel_shape[0]
        grid = self.image_grid(pixel_shape)
        blocks = self.placeholder_blocks(
            inputs, [grid[0] * grid[1]] * n_images, f"{n_images} image(s) of {grid[0]}x{grid[1]} patches"
        )
        return [ImageSlot(row, positions, grid, image) for image, (row, positions) in enumerate(blocks)]
