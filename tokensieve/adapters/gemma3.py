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

Traps this guards (tests/test_adapter_gemma3.py, the ones shared with Gemma 4 in tests/test_image_blocks.py):

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

import torch
from torch import nn

from ..signals import Signal
from .attention import block_attention, tap_blocks
from .base import ImageSlot, VisionCapture
from .image_blocks import ImageBlockAdapter
from .llava import attention_with_qk


class Gemma3Adapter(ImageBlockAdapter):
    family = "gemma3"
    model_name = "Gemma3"
    model_classes = ("Gemma3ForConditionalGeneration", "Gemma3Model")
    signals = frozenset({"cls_attention", "vision_keys", "vision_attention", "vision_features", "project", "vision_tower"})
    type_ids = "token_type_ids"
    aligned_inputs = (type_ids,)
    frames_as_images = True  # each image is one tower image of one grid: a video can be given as its frames

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.projector = self.inner.multi_modal_projector

    def _blocks(self) -> nn.ModuleList:
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        return tower.encoder.layers

    def vision_layer_count(self) -> int:
        return len(self._blocks())

    def why_not(self, request: Signal) -> str | None:
        return self.why_not_without_cls(
            request, "the Gemma3 vision tower (SigLIP) has no [CLS] token",
            "its projector average-pools a fixed grid of every patch, so merging inside the tower is not served")

    def in_llm_problem(self) -> str | None:
        return ("its decoder alternates sliding-window and full-attention layers, each type with its own prebuilt mask "
                "and rotary embedding, and caches only a window of keys in the sliding ones, while an in-LLM stage "
                "gathers one mask and one rotary embedding for every layer after it")

    def check_inputs(self, kwargs: dict) -> None:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if kwargs.get("pixel_values") is not None or encoded.get("image") is not None:
            self.check_type_ids(kwargs)

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

    def image_grid(self, pixel_shape: tuple[int, ...]) -> tuple[int, int]:
        side = self.projector.tokens_per_side
        return side, side

    def slots(self, inputs: dict, capture: VisionCapture) -> list[ImageSlot]:
        if not capture.seen:
            raise ValueError(
                "image tokens reached the model but tokensieve saw no vision pass: pass pixel_values "
                "(not precomputed image features) to the model inside the apply() block"
            )
        n_images = capture.inputs["pixel_shape"][0]
        grid = self.image_grid(capture.inputs["pixel_shape"])
        blocks = self.placeholder_blocks(inputs, [grid[0] * grid[1]] * n_images, f"{n_images} image(s) of {grid[0]}x{grid[1]} tokens")
        return [ImageSlot(row, positions, grid, image) for image, (row, positions) in enumerate(blocks)]

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
