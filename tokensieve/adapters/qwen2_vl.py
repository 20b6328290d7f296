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

Videos (``pixel_values_videos``, ``video_grid_thw = (t, h, w)``): the processor pairs consecutive frames (the
temporal patch), so each of a video's t frames here is two input frames, and a video is t*(h/2)*(w/2)
``video_pad`` tokens, frame after frame, each frame in raster order; its slot has ``frames = (t, h/2, w/2)`` and
one block per frame. The tower encodes a call's images in one pass and its videos in a second (in the model's
forward and in generate()'s encoding before the prefill), so the capture keeps the image pass as
``capture.earlier``. Qwen2.5-VL spaces frames by ``second_per_grid_ts`` on the temporal mrope axis; those seconds
are the frames' ``timestamps`` (Qwen2-VL numbers frames 0, 1, ...: no timestamps). The temporal, height and width
positions of every kept token are the unpruned video's, as for images. A ``frames`` stage (engine/frames_stage.py)
gives the tower only the kept frame pairs' patch rows (``frame_pass``) and spreads the merger's output back over every
frame (``full_frames``).

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
from .base import Adapter, ImageSlot, VisionCapture, carries


_NO_CLS = "the {} vision tower has no [CLS] token (its merger pools 2x2 patches; no token stands for the image)"


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = (
        "Qwen2VLForConditionalGeneration", "Qwen2VLModel", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel",
    )
    signals = frozenset({"cls_attention", "vision_keys", "vision_attention", "vision_features", "project", "vision_tower"})
    aligned_inputs = ("mm_token_type_ids",)
    model_name: ClassVar[str] = "Qwen2-VL"  # in messages
    takes_video: ClassVar[bool] = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.decoder = self.inner.language_model
        self.vision_tower = self.inner.visual
        self.merger = self.vision_tower.merger
        self.vision_config = self.config.vision_config
        self.merge = self.vision_config.spatial_merge_size
        self._encoded_by: list[tuple[VisionCapture, int]] = []  # per slot of the latest call: its vision pass, its index there

    def image_token_id(self) -> int:
        return self.config.image_token_id

    def vision_layer_count(self) -> int:
        return len(self.vision_tower.blocks)

    def why_not(self, request: Signal) -> str | None:
        return self.why_not_without_cls(
            request, _NO_CLS.format(self.model_name),
            "its tower rotates each patch by its 2D position and attends within windows and images it lays out "
            "from the grid, and its merger folds every 2x2 patches into one token: merging inside it is not served")

    def video_token_id(self) -> int:
        return self.config.video_token_id

    def visual_placeholder_mask(self, inputs: dict) -> torch.Tensor:
        # only the kinds the call carries: the other kind's id is text there (a random model may draw it)
        images = self.placeholder_mask(inputs)
        videos = self.placeholder_mask(inputs, self.video_token_id())
        return (images & carries(inputs, "image")) | (videos & carries(inputs, "video"))

    def check_inputs(self, kwargs: dict) -> None:
        types = kwargs.get("mm_token_type_ids")
        images, videos = carries(kwargs, "image"), carries(kwargs, "video")
        if not images and not videos:
            return
        if videos:
            self._check_video_grid(kwargs.get("video_grid_thw"), kwargs.get("pixel_values_videos"))
        if types is None:
            raise ValueError(
                "images and videos need mm_token_type_ids (the processor returns it with input_ids): without it "
                "Qwen2-VL cannot give their tokens 3D positions, and Qwen2.5-VL silently uses 1D ones"
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
        # a kind the call does not carry is text wherever its id appears (a random model may answer with one)
        if images and not torch.equal(types == 1, placeholders):
            raise ValueError(
                "mm_token_type_ids must be 1 exactly at the image_pad tokens of input_ids: build both with the processor"
            )
        if videos and not torch.equal(types == 2, self.placeholder_mask(kwargs, self.video_token_id())):
            raise ValueError(
                "mm_token_type_ids must be 2 exactly at the video_pad tokens of input_ids: build both with the processor"
            )

    def _check_video_grid(self, grid_thw: torch.Tensor | None, pixels: torch.Tensor | None) -> None:
        """Refuse, before the model runs, a video grid the tower would fail on or silently misread."""
        if grid_thw is None:
            if pixels is not None:
                raise ValueError("pixel_values_videos need video_grid_thw, one (t, h, w) row per video: build both with "
                                 "the processor")
            return
        if grid_thw.ndim != 2 or grid_thw.shape[-1] != 3:
            raise ValueError(f"video_grid_thw must be (videos, 3) rows of (t, h, w), not of shape {tuple(grid_thw.shape)}")
        if bool((grid_thw.prod(-1) == 0).any()):
            raise ValueError(f"video_grid_thw {grid_thw.tolist()} has an empty video (a zero in t, h or w): pass at least "
                             f"{self.vision_config.temporal_patch_size} frames of at least one merge block per video")
        if pixels is not None and pixels.shape[0] != int(grid_thw.prod(-1).sum()):
            raise ValueError(
                f"pixel_values_videos has {pixels.shape[0]} patch rows but video_grid_thw {grid_thw.tolist()} needs "
                f"{int(grid_thw.prod(-1).sum())}: every frame of a video must have the same size (the processor resizes "
                f"them to one), and the grid must be the one the processor returned with the pixels"
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
        capture.reset(keep_earlier=True, grid_thw=grid_thw)  # a call's videos follow its images in a second pass

    def video_grid(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        # a video of one frame pair is encoded as an image is; with nothing to drop, either reading is right
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid_thw is None or not bool((grid_thw[:, 0] > 1).any()):
            return None
        return grid_thw // torch.tensor([1, self.merge, self.merge], device=grid_thw.device)

    def frame_pass(self, args: tuple, kwargs: dict, kept: list[torch.Tensor]) -> tuple[tuple, dict]:
        """The pixel rows of the kept frame pairs (each pair's h*w patch rows are consecutive, videos one after
        another), and their grid."""
        kwargs = dict(kwargs)
        pixels = kwargs.pop("hidden_states", args[0] if args else None)
        grid_thw = kwargs.pop("grid_thw", args[1] if len(args) > 1 else None)
        rows, start = [], 0
        for (t, h, w), frames in zip(grid_thw.tolist(), kept):
            rows.append(start + (frames[:, None] * (h * w) + torch.arange(h * w)).flatten())
            start += t * h * w
        grid = grid_thw.clone()
        grid[:, 0] = torch.tensor([len(frames) for frames in kept])
        return (pixels[torch.cat(rows).to(pixels.device)], grid), kwargs

    def full_frames(self, output, grid: torch.Tensor, kept: list[torch.Tensor]):
        """The merger's output (``pooler_output``, one row per LLM token, each video frame after frame in raster
        order) spread over every frame, zeros at the dropped ones; the patch-level states stay the kept frames'."""
        output.pooler_output = self._over_every_frame(output.pooler_output, grid, kept)
        return output

    @staticmethod
    def _over_every_frame(merged: torch.Tensor, grid: torch.Tensor, kept: list[torch.Tensor]) -> torch.Tensor:
        """Rows of one LLM token each, of the kept frames only, placed in the full grid's rows (zeros elsewhere)."""
        rows, start = [], 0
        for (t, h, w), frames in zip(grid.tolist(), kept):
            per_frame = h * w
            rows.append(start + (frames[:, None] * per_frame + torch.arange(per_frame)).flatten())
            start += t * per_frame
        full = merged.new_zeros(start, merged.shape[-1])
        full[torch.cat(rows).to(merged.device)] = merged
        return full

    def passes_pending(self, inputs: dict, capture: VisionCapture) -> bool:
        # the model's forward encodes the images, then the videos: after the first pass the second is to come
        both = inputs.get("pixel_values") is not None and inputs.get("pixel_values_videos") is not None
        return both and capture.inputs.get("grid_thw") is not inputs.get("video_grid_thw")

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

    def _passes(self, inputs: dict, capture: VisionCapture) -> tuple[VisionCapture | None, VisionCapture | None]:
        """The vision passes of the call's images and of its videos (None: it has none of them): the latest pass
        for one kind, the one before it and the latest for both (images are encoded first)."""
        images, videos = carries(inputs, "image"), carries(inputs, "video")
        passes = [capture.earlier, capture] if images and videos else [capture] if images or videos else []
        if any(p is None or not p.seen or p.inputs.get("grid_thw") is None for p in passes):
            raise ValueError(
                "image or video tokens reached the model but tokensieve saw no vision pass for them: pass "
                "pixel_values / pixel_values_videos with their grid_thw (not precomputed features) to the model inside "
                "the apply() block"
            )
        return (passes[0] if images else None), (passes[-1] if videos else None)

    def slots(self, inputs: dict, capture: VisionCapture) -> list[ImageSlot]:
        image_pass, video_pass = self._passes(inputs, capture)
        slots = []
        if image_pass is not None:
            grid_thw = image_pass.inputs["grid_thw"]
            if bool((grid_thw[:, 0] != 1).any()):
                raise ValueError(f"image_grid_thw {grid_thw.tolist()} has images of several frames (t > 1): pass still "
                                 f"images, and videos as pixel_values_videos")
            blocks = self.placeholder_blocks(inputs, self._token_counts(grid_thw), f"images of image_grid_thw {grid_thw.tolist()}")
            slots += [ImageSlot(row, positions, (h // self.merge, w // self.merge), image)
                      for image, ((row, positions), (_, h, w)) in enumerate(zip(blocks, grid_thw.tolist()))]
        if video_pass is not None:
            slots += self._video_slots(inputs, video_pass, first=len(slots))
        # on the adapter, not the capture: a capture kept as the next pass's ``earlier`` must not chain the ones before
        self._encoded_by = self._item_passes(slots, image_pass, video_pass)
        return slots

    def _video_slots(self, inputs: dict, video_pass: VisionCapture, first: int) -> list[ImageSlot]:
        """One slot per video, numbered on from ``first`` (the call's images come first), with the frames a ``frames``
        stage let the tower encode."""
        grid_thw = video_pass.inputs["grid_thw"]
        kept_frames = video_pass.inputs.get("kept_frames") or [None] * len(grid_thw)
        blocks = self.placeholder_blocks(inputs, self._token_counts(grid_thw), f"videos of video_grid_thw {grid_thw.tolist()}",
                                         token_id=self.video_token_id())
        seconds = inputs.get("second_per_grid_ts")
        slots = []
        for video, ((row, positions), (t, h, w)) in enumerate(zip(blocks, grid_thw.tolist())):
            h, w = h // self.merge, w // self.merge
            frames = torch.arange(t * h * w).view(t, h, w)
            timestamps = None
            if seconds is not None and hasattr(self.vision_config, "tokens_per_second"):  # Qwen2.5-VL spaces frames by it
                timestamps = torch.arange(t, dtype=torch.float32) * float(seconds[video])
            slots.append(ImageSlot(row, positions, (1, t * h * w), first + video, tuple(frames), (t, h, w), timestamps,
                                   kept_frames[video]))
        return slots

    @staticmethod
    def _item_passes(slots: list[ImageSlot], image_pass, video_pass) -> list[tuple[VisionCapture, int]]:
        """For each slot (by its index), the vision pass that encoded it and its index within that pass."""
        images = sum(slot.frames is None for slot in slots)
        return [(image_pass, i) if i < images else (video_pass, i - images) for i in range(len(slots))]

    def image_signals(self, wanted, capture: VisionCapture, image: int) -> dict:
        signals = {}
        encoded, item = self._encoded_by[image]
        counts = self._token_counts(encoded.inputs["grid_thw"])
        start = sum(counts[:item])
        for request in wanted:
            if request.name == "vision_features":
                signals[request] = encoded.tensors["vision_features"][start : start + counts[item]]
            elif request.name == "vision_attention":
                signals[request] = self._received(encoded, self.block_index(request.layer))[:, start : start + counts[item]]
            elif request.name == "project":
                signals[request] = self._project
        return signals
