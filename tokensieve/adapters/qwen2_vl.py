"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

The processor cuts an image into ``grid_thw = (1, h, w)`` patches, flattened so that the four
patches of each 2x2 merge block are consecutive. The tower's ``PatchMerger`` (the projector) turns
each block into one LLM token, so an image is ``(h/2)*(w/2)`` consecutive ``image_pad`` tokens
between ``vision_start`` and ``vision_end``, in raster order over an ``(h/2, w/2)`` grid. Qwen2.5-VL
runs its blocks in window order and puts the merger's output back in raster order.

The LLM sees 3D mrope positions (t, h, w) computed by the inner model from ``input_ids``,
``mm_token_type_ids`` and ``image_grid_thw``; the engine gathers the kept tokens' positions, so
they keep their place on the image grid. Images therefore need ``mm_token_type_ids`` (Qwen2.5-VL
silently falls back to 1D positions without it). After the prefill the model numbers new tokens
from the cache length plus its cached ``rope_deltas``; a pruned cache is shorter, so forwards that
continue it without positions get them from the unpruned length here.

Signals: the tower has no [CLS] token. ``vision_features`` is the merger's input with each LLM
token's 2x2 patches concatenated, (N, 4*d_patch), in raster order; ``project`` is the merger, so
``project(vision_features)`` gives exactly the image's tokens. ``vision_attention(queries="mean")`` is
the attention each patch receives at that block, recomputed from the block's hooked ``qkv`` output and
the rotary embedding it was given, within the same segments the block attends over (the image, or
Qwen2.5-VL's windows), averaged over the image's query rows; then, as the HiPrune reference for
Qwen2.5-VL does, averaged over the 4 patches of each merged token and put in raster order.
"""

from __future__ import annotations

import sys
from typing import ClassVar

import torch
from torch import nn
from transformers.vision_utils import get_vision_window_index

from ..signals import Signal, attention_received
from .base import Adapter, ImageSlot, VisionCapture

_NO_CLS = "the {} vision tower has no [CLS] token (its merger pools 2x2 patches; no token stands for the image)"


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = (
        "Qwen2VLForConditionalGeneration", "Qwen2VLModel", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel",
    )
    signals = frozenset({"cls_attention", "vision_keys", "vision_attention", "vision_features", "project", "vision_tower"})
    aligned_inputs = ("mm_token_type_ids",)
    model_name: ClassVar[str] = "Qwen2-VL"  # in messages

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.decoder = self.inner.language_model
        self.vision_tower = self.inner.visual
        self.merger = self.vision_tower.merger
        self.vision_config = self.config.vision_config
        self.merge = self.vision_config.spatial_merge_size

    def image_token_id(self) -> int:
        return self.config.image_token_id

    def vision_layer_count(self) -> int:
        return len(self.vision_tower.blocks)

    def why_not(self, request: Signal) -> str | None:
        if request.name == "vision_tower":
            return ("its tower rotates each patch by its 2D position and attends within windows and images it lays out "
                    "from the grid, and its merger folds every 2x2 patches into one token: merging inside it is not served")
        if request.name in ("cls_attention", "vision_keys") or (request.name == "vision_attention" and request.queries == "cls"):
            return _NO_CLS.format(self.model_name)
        if request.name == "vision_attention":
            return self.layer_problem(request.layer)
        return None

    def check_inputs(self, kwargs: dict) -> None:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        videos = (kwargs.get("pixel_values_videos"), kwargs.get("video_grid_thw"), encoded.get("video"))
        if any(video is not None for video in videos):
            raise ValueError(
                "tokensieve methods act on images, not videos: run video inputs (pixel_values_videos) outside the "
                "apply() block"
            )
        types = kwargs.get("mm_token_type_ids")
        if kwargs.get("pixel_values") is None and encoded.get("image") is None:
            return
        if types is None:
            raise ValueError(
                "images need mm_token_type_ids (the processor returns it with input_ids): without it Qwen2-VL "
                "cannot give image tokens their 3D positions, and Qwen2.5-VL silently uses 1D ones"
            )
        if kwargs.get("input_ids") is None and kwargs.get("position_ids") is None:
            raise ValueError(
                "with inputs_embeds (no input_ids) the model computes no 3D positions for the images (Qwen2-VL and "
                "Qwen2.5-VL build them from input_ids) and silently falls back to 1D ones: pass position_ids, "
                "model.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, attention_mask=...)[0]"
            )
        placeholders = self.placeholder_mask(kwargs)
        if types.shape != placeholders.shape:
            raise ValueError(
                f"mm_token_type_ids has shape {tuple(types.shape)} but the input sequence {tuple(placeholders.shape)}: "
                f"when appending tokens to input_ids, append zeros (text) to mm_token_type_ids, as generate() does"
            )
        if not torch.equal(types == 1, placeholders):
            raise ValueError(
                "mm_token_type_ids must be 1 exactly at the image_pad tokens of input_ids: build both with the processor"
            )

    def _rope_deltas(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """(batch, 1) shift from a text token's 1D position to its mrope position, which the model
        caches at its latest prefill (images take fewer positions than tokens)."""
        deltas = self.inner.rope_deltas
        return None if deltas is None else deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(device)

    def text_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.ndim == 2 or position_ids.shape[0] == 4:
            return super().text_positions(position_ids)
        # mrope rows without the text row (generate() continuing a cache passes one: text positions
        # plus rope_deltas): take the shift off
        deltas = self._rope_deltas(position_ids.shape[1], position_ids.device)
        return position_ids[0] if deltas is None else position_ids[0] - deltas

    def continued_positions(self, kwargs: dict, logical_past: int) -> torch.Tensor | None:
        # The stock model would count on from the cache's physical length (or, with a mask, crash on
        # its full length) plus rope_deltas; count from the unpruned length instead.
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            return None
        batch, length = tokens.shape[:2]
        deltas = self._rope_deltas(batch, tokens.device)
        if deltas is None:
            return None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -length:]
        else:
            text = torch.arange(logical_past, logical_past + length, device=tokens.device).expand(batch, -1)
        return (text + deltas).unsqueeze(0).expand(3, -1, -1)

    def open_capture(self, capture: VisionCapture, args: tuple, kwargs: dict) -> None:
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        capture.reset(grid_thw=grid_thw)

    def _token_counts(self, grid_thw: torch.Tensor) -> list[int]:
        return (grid_thw.prod(-1) // self.merge**2).tolist()

    def install_signal_hooks(self, wanted, capture: VisionCapture) -> list:
        handles = []
        for block in {self.block_index(r.layer) for r in wanted if r.name == "vision_attention"}:
            attention = self.vision_tower.blocks[block].attn

            def keep_segments(module, args, kwargs, block=block):
                capture.tensors[f"cu{block}"] = kwargs["cu_seqlens"]
                capture.tensors[f"rope{block}"] = kwargs["position_embeddings"]

            def keep_qkv(module, args, output, block=block):
                capture.tensors[f"qkv{block}"] = output.detach()

            handles.append(attention.register_forward_pre_hook(keep_segments, with_kwargs=True))
            handles.append(attention.qkv.register_forward_hook(keep_qkv))
        if any(r.name == "vision_features" for r in wanted):

            def keep_merger_input(module, args):
                # the first merger call after a vision pass; a sieve's own `project` calls come later
                if "vision_features" not in capture.tensors:
                    capture.tensors["vision_features"] = self._per_token(args[0].detach(), capture.inputs["grid_thw"])

            handles.append(self.merger.register_forward_pre_hook(keep_merger_input))
        return handles

    def _received(self, capture: VisionCapture, block: int) -> torch.Tensor:
        """(heads, tokens) attention received at ``block`` by every merged token of the pass, in raster order
        (images one after another); computed once per vision pass."""
        cached = capture.tensors.get(f"received{block}")
        if cached is not None:
            return cached
        attention = self.vision_tower.blocks[block].attn
        qkv, (cos, sin) = capture.tensors[f"qkv{block}"], capture.tensors[f"rope{block}"]
        length, heads = qkv.shape[0], attention.num_heads
        query, key, _ = qkv.reshape(length, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision  # the model's own
        query, key = (x.float().transpose(0, 1) for x in rotary(query, key, cos, sin))  # (heads, S, d)
        bounds = capture.tensors[f"cu{block}"].tolist()
        received = query.new_zeros(heads, length)
        for start, end in zip(bounds[:-1], bounds[1:]):  # column sums within each segment it attends over
            received[:, start:end] = attention_received(query[:, start:end], key[:, start:end], attention.scaling) * (end - start)
        patches = capture.inputs["grid_thw"].prod(-1).tolist()  # images are consecutive in the sequence
        received = torch.cat([part / count for part, count in zip(received.split(patches, dim=1), patches)], dim=1)
        merged = received.view(heads, -1, self.merge**2).mean(-1)  # the patches of each merged token
        raster = self._raster_order(merged.T, capture.inputs["grid_thw"]).T
        capture.tensors[f"received{block}"] = raster
        return raster

    def _per_token(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The merger's input as one row per LLM token (its 2x2 patches concatenated), in raster order."""
        return self._raster_order(patches.reshape(-1, self.merger.hidden_size), grid_thw)

    def _raster_order(self, rows: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Rows of one merged token each, from the tower's order (Qwen2.5-VL: window order) to raster order."""
        window_size = getattr(self.vision_config, "window_size", None)
        if window_size is None:
            return rows
        window_index, _ = get_vision_window_index(grid_thw, self.merge, window_size, self.vision_config.patch_size)
        return rows[window_index.argsort().to(rows.device)]

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """The merger on (..., 4*d_patch) rows of concatenated patches: (..., d_llm)."""
        patch_dim = self.merger.hidden_size // self.merge**2
        return self.merger(features.reshape(-1, patch_dim)).reshape(*features.shape[:-1], -1)

    def slots(self, inputs: dict, capture: VisionCapture) -> list[ImageSlot]:
        if not capture.seen or capture.inputs["grid_thw"] is None:
            raise ValueError(
                "image tokens reached the model but tokensieve saw no vision pass: pass pixel_values and "
                "image_grid_thw (not precomputed image features) to the model inside the apply() block"
            )
        grid_thw = capture.inputs["grid_thw"]
        if bool((grid_thw[:, 0] != 1).any()):
            raise ValueError(f"image_grid_thw {grid_thw.tolist()} has images of several frames (t > 1): pass still images")
        counts = self._token_counts(grid_thw)
        blocks = self.placeholder_blocks(inputs, counts, f"images of image_grid_thw {grid_thw.tolist()}")
        return [
            ImageSlot(row, positions, (h // self.merge, w // self.merge), image)
            for image, ((row, positions), (_, h, w)) in enumerate(zip(blocks, grid_thw.tolist()))
        ]

    def image_signals(self, wanted, capture: VisionCapture, image: int) -> dict:
        signals = {}
        counts = self._token_counts(capture.inputs["grid_thw"])
        start = sum(counts[:image])
        for request in wanted:
            if request.name == "vision_features":
                signals[request] = capture.tensors["vision_features"][start : start + counts[image]]
            elif request.name == "vision_attention":
                signals[request] = self._received(capture, self.block_index(request.layer))[:, start : start + counts[image]]
            elif request.name == "project":
                signals[request] = self._project
        return signals
