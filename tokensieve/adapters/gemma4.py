"""Gemma 4 (``Gemma4ForConditionalGeneration``), images only: a vision tower with its own 2D rotary embedding and
no [CLS] token, whose pooler averages each k x k square of patches (``pooling_kernel_size``, 3 by default) into
one soft token, a norm and linear map (``embed_vision``), and a decoder whose layers mix
sliding-window and full attention.

**Inputs.** The image processor cuts each image, at its own aspect ratio, into patches listed in raster order and
padded to ``max_patches`` (``pixel_values``: images x max_patches x 3 p^2), with each patch's (x, y) in
``image_position_ids`` ((-1, -1) at padding). So images of different sizes give different token counts: an image
of h x w patches gives (h / k) x (w / k) soft tokens in raster order, the grid this adapter reads from the
positions of the vision pass. The prompt holds ``BOI, image token x soft tokens, EOI`` per image, and
``mm_token_type_ids`` is 1 at the image tokens.

**Masks.** With ``use_bidirectional_attention="vision"`` the inner model turns ``mm_token_type_ids`` into one block
per run of image tokens and hands the decoder a dict of prebuilt masks: ``full_attention`` is causal only (unlike
Gemma3), ``sliding_attention`` is (causal OR block) AND window. As for Gemma3, the engine reads the call's 2D mask
from the inner model's inputs (``flat_mask``) and rebuilds the dict for the packed sequence with the model's own
mask functions, from the kept tokens' ``mm_token_type_ids`` and an explicit 2D mask (``decoder_mask``); an image's
kept tokens stay one run, so one block. Sliding windows count indices, so the pruned prefill equals the stock
model with the dropped tokens masked out only while the prompt fits in the window (512 tokens by default): beyond it a sliding layer reaches further back in the original prompt (see gemma3.py).

**Per-layer inputs.** The small models (E2B, E4B) add a per-layer embedding of each token to the residual stream
after every decoder layer. The inner model computes them from ``input_ids`` (image tokens read as the pad token)
and hands the decoder ``per_layer_inputs`` (batch, length, layers, d), aligned with ``inputs_embeds``; the decoder
mixes them with a projection of ``inputs_embeds``. So they are packed with the kept tokens (``pack_token_inputs``):
left unpacked the decoder fails on a shape, and rows of other tokens would be silently wrong.

**KV sharing.** In the small models the last ``num_kv_shared_layers`` layers attend with the keys and values that
the last unshared layer of their type computed in the same forward, over what the cache holds: the packed sequence
and the pruned cache, so nothing to do before the LLM.

Traps this guards (tests/test_adapter_gemma4.py, the ones shared with Gemma3 in tests/test_image_blocks.py):

- without ``mm_token_type_ids`` the model silently runs causal-only masks: images without them are refused, and so
  are ones that do not mark exactly the image tokens of the sequence's tail (stale ones, silently misplaced blocks);
- the rebuilt masks always get an explicit 2D mask (no mask and gapped positions read as packed sequences);
- ``per_layer_inputs`` are gathered with the kept tokens (a pruned prefill equals the masked reference only so);
- ``pixel_values`` and ``image_position_ids`` of different image counts are refused (the stock tower broadcasts
  them, silently encoding other images);
- audio is refused: a method acts on images only (videos: by the engine, ``takes_video`` is False).

Signals: ``vision_features`` is each soft token's pooled vision state (``embed_vision``'s input: the mean of its
k x k patches, scaled and, where the config says so, standardised) and ``project`` is ``embed_vision``, so
``project(vision_features)`` gives exactly the image's tokens. ``vision_attention(queries="mean")`` is the attention
each real patch receives from the image's real patches, averaged over each token's k x k patches as the pooler
averages them. The attention module normalises its queries and keys and turns them by the tower's 2D rotary
embedding after the projections (and scales by 1, not 1/sqrt(d)), so a pre-hook recomputes them from the block's
input with the module's own parts, rather than tapping the projections as other towers do. The tower has no
[CLS] token (no ``cls_attention``, ``vision_keys``). In-LLM stages are refused (``in_llm_problem``), and merging
inside the tower too (the pooler averages a fixed grid of every patch).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..signals import Signal, attention_received
from .base import ImageSlot, VisionCapture
from .image_blocks import ImageBlockAdapter


class Gemma4Adapter(ImageBlockAdapter):
    family = "gemma4"
    model_name = "Gemma 4"
    model_classes = ("Gemma4ForConditionalGeneration", "Gemma4Model")
    signals = frozenset({"cls_attention", "vision_keys", "vision_attention", "vision_features", "project", "vision_tower"})
    type_ids = "mm_token_type_ids"
    aligned_inputs = (type_ids,)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.projector = self.inner.embed_vision
        self.kernel = self.config.vision_config.pooling_kernel_size

    def vision_layer_count(self) -> int:
        return len(self.vision_tower.encoder.layers)

    def why_not(self, request: Signal) -> str | None:
        return self.why_not_without_cls(
            request, "the Gemma 4 vision tower has no [CLS] token",
            "its pooler averages a fixed grid of every patch, so merging inside the tower is not served")

    def in_llm_problem(self) -> str | None:
        return ("its decoder alternates sliding-window and full-attention layers, each type with its own prebuilt mask "
                "and rotary embedding, adds per-layer input embeddings of every token after each layer, and lets its "
                "last layers reuse the keys and values of earlier ones, while an in-LLM stage gathers one mask and one "
                "rotary embedding for every layer after it")

    def bidirectional_images(self) -> bool:
        # full-attention layers stay causal; the sliding ones get the image blocks, when the config asks for them
        return getattr(self.decoder.config, "use_bidirectional_attention", None) == "vision"

    # inputs and masks

    def check_inputs(self, kwargs: dict) -> None:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if kwargs.get("input_features") is not None:
            raise ValueError("tokensieve methods act on images, not audio: run audio inputs (input_features) outside "
                             "the apply() block")
        if kwargs.get("pixel_values") is None and encoded.get("image") is None:
            return
        self._check_patch_positions(kwargs)
        self.check_type_ids(kwargs)

    @staticmethod
    def _check_patch_positions(kwargs: dict) -> None:
        pixels, positions = kwargs.get("pixel_values"), kwargs.get("image_position_ids")
        if pixels is None or positions is None or tuple(pixels.shape[:2]) == tuple(positions.shape[:2]):
            return
        raise ValueError(
            f"pixel_values {tuple(pixels.shape)} and image_position_ids {tuple(positions.shape)} must hold the same "
            f"images and patches (the processor returns them together): the stock tower broadcasts one over the "
            f"other, silently encoding other images"
        )

    def pack_token_inputs(self, kwargs: dict, pack) -> dict:
        per_layer = kwargs.get("per_layer_inputs")
        return {} if per_layer is None else {"per_layer_inputs": pack(per_layer)}

    # vision side

    def open_capture(self, capture: VisionCapture, args: tuple, kwargs: dict) -> None:
        pixels = args[0] if args else kwargs.get("pixel_values")
        positions = args[1] if len(args) > 1 else kwargs.get("pixel_position_ids")
        capture.reset(pixel_shape=tuple(pixels.shape), positions=positions, grids=self._grids(positions))

    def _grids(self, positions: torch.Tensor) -> list[tuple[int, int]]:
        """Each image's (rows, columns) of soft tokens, from its patches' (x, y) positions ((-1, -1): padding)."""
        extent = positions.amax(dim=1) + 1  # (images, 2): columns and rows of patches
        return [(rows // self.kernel, cols // self.kernel) for cols, rows in extent.tolist()]

    def install_signal_hooks(self, wanted, capture: VisionCapture) -> list:
        layers = self.vision_tower.encoder.layers
        blocks = {self.block_index(r.layer) for r in wanted if r.name == "vision_attention"}
        handles = [layers[block].self_attn.register_forward_pre_hook(partial(self._keep_queries_and_keys, capture, block),
                                                                     with_kwargs=True) for block in blocks]
        if any(r.name == "vision_features" for r in wanted):

            def keep_pooled(module, args, kwargs):
                # the first call after a vision pass: the pooled soft tokens of every image; a sieve's own `project`
                # calls come later
                capture.tensors.setdefault("vision_features", (args[0] if args else kwargs["inputs_embeds"]).detach())

            handles.append(self.projector.register_forward_pre_hook(keep_pooled, with_kwargs=True))
        return handles

    def _keep_queries_and_keys(self, capture: VisionCapture, block: int, attention, args, kwargs) -> None:
        """The queries and keys of ``attention`` as its kernel gets them: projected, normalised and turned by the
        tower's 2D rotary embedding (recomputed here from the block's input with the module's own parts)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        where = kwargs.get("position_ids")
        shape = (*hidden.shape[:-1], -1, attention.head_dim)
        turn = self._modeling.apply_multidimensional_rope
        with torch.no_grad():
            queries = turn(attention.q_norm(attention.q_proj(hidden).view(shape)), cos, sin, where)
            keys = turn(attention.k_norm(attention.k_proj(hidden).view(shape)), cos, sin, where)
        capture.tensors[f"q{block}"], capture.tensors[f"k{block}"] = queries, keys  # (images, patches, heads, d)
        capture.tensors[f"scale{block}"] = attention.scaling

    def slots(self, inputs: dict, capture: VisionCapture) -> list[ImageSlot]:
        if not capture.seen:
            raise ValueError(
                "image tokens reached the model but tokensieve saw no vision pass: pass pixel_values "
                "(not precomputed image features) to the model inside the apply() block"
            )
        grids = capture.inputs["grids"]
        described = ", ".join(f"{rows}x{cols}" for rows, cols in grids)
        blocks = self.placeholder_blocks(inputs, [rows * cols for rows, cols in grids],
                                         f"{len(grids)} image(s) of {described} tokens")
        return [ImageSlot(row, positions, grid, image) for image, ((row, positions), grid) in enumerate(zip(blocks, grids))]

    def image_signals(self, wanted, capture: VisionCapture, image: int) -> dict:
        signals = {}
        grids = capture.inputs["grids"]
        start = sum(rows * cols for rows, cols in grids[:image])
        count = grids[image][0] * grids[image][1]
        for request in wanted:
            if request.name == "vision_features":
                signals[request] = capture.tensors["vision_features"][start : start + count]
            elif request.name == "vision_attention":
                signals[request] = self._pooled(self._received(capture, self.block_index(request.layer), image), capture, image)
            elif request.name == "project":
                signals[request] = self.projector
        return signals

    def _received(self, capture: VisionCapture, block: int, image: int) -> torch.Tensor:
        """(heads, real patches) attention each real patch of ``image`` receives at ``block``, averaged over the
        image's real patches as queries (the processor puts the padding patches last; they are masked as keys)."""
        real = int((capture.inputs["positions"][image] >= 0).all(-1).sum())
        queries = capture.tensors[f"q{block}"][image, :real].transpose(0, 1)
        keys = capture.tensors[f"k{block}"][image, :real].transpose(0, 1)
        keys = keys.repeat_interleave(queries.shape[0] // keys.shape[0], dim=0)  # grouped key heads
        return attention_received(queries, keys, capture.tensors[f"scale{block}"])

    def _pooled(self, per_patch: torch.Tensor, capture: VisionCapture, image: int) -> torch.Tensor:
        """(heads, real patches) values averaged over each soft token's k x k patches, as the pooler averages
        them: (heads, tokens) in raster order."""
        rows, cols = capture.inputs["grids"][image]
        where = capture.inputs["positions"][image, : per_patch.shape[1]].to(per_patch.device)
        token = where[:, 0] // self.kernel + cols * (where[:, 1] // self.kernel)
        pooled = per_patch.new_zeros(per_patch.shape[0], rows * cols)
        return pooled.index_add_(1, token, per_patch) / self.kernel**2
