"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres layout on a SigLIP
tower (see llava_next.py), with two differences in how an image's placeholder tokens are laid out:

- anyres_max (``vision_aspect_ratio="anyres_max_9"``): a high-res grid larger than about nine crops'
  worth of patches is bilinearly downsampled before the newline tokens are added, so R×C is the
  downsampled grid;
- an image of a multi-image prompt (``batch_num_images`` > 1 for its row) is not cut into crops: it is
  its base view, g×g tokens, and one newline token.

The layout comes from the model's own packing, as for NeXT, so both follow. SigLIP has no [CLS]
token, so ``cls_attention`` and ``vision_keys`` are refused (fastervlm and visionzip with them).

Videos (``pixel_values_videos``: (videos, frames, 3, S, S), every frame resized by the processor to the tower's
size S; ``get_video_features``): the tower encodes each frame on its own, the projector maps every patch, and
``apply_pooling`` then pools each frame's projected g×g grid bilinearly to h×w = ceil(g/2)×ceil(g/2) tokens (27×27 to
14×14 = 196 on the released models); last, the model appends one ``image_newline`` token to each video. A video is
thus t*h*w + 1 ``video`` placeholder tokens: its frames one after another, each in raster order, then the newline.
Its slot has ``frames = (t, h, w)`` and one block per frame; the newline token is in no slot, so every method keeps
it, as text (one token per video, which budgets do not count): the LLM still sees where the video ends. Kept tokens
keep their positions (1D here). Being in no slot, the newline also counts as text in a video's instruction
(``text_embeddings``, ``llm_attention(queries="instruction")``: the prompt's text after the video's last frame token,
tests/test_in_llm.py). A call's images and its videos reach the tower in two passes (images first), so the capture
keeps the earlier pass (``capture.earlier``), and each pass is told apart by the model method that started it
(``get_image_features``, ``get_video_features``, wrapped on the instance as NeXT wraps the first).

A ``frames`` stage gives the tower only the kept frames (``frame_pass``) and spreads its output back over every frame
(``full_frames``, zeros at the dropped ones): the tower, the projector and the pooling treat each frame on its own,
so the kept frames' tokens are those of the unpruned video (tested).

Video signals: ``vision_attention(queries="mean")`` is the attention each patch of a frame receives within its frame,
pooled to the frame's tokens by the model's own ``apply_pooling``, as the features are. ``vision_features`` and
``project`` are refused for a call that carries a video, before the tower runs: the model projects each patch and
pools after the projector (a nonlinear MLP), so no projector input gives a video token exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..signals import Signal
from .base import ImageSlot, VisionCapture, carries, spread_rows
from .llava_next import LlavaNextAdapter, _BeforeCall

#: signals whose values could not give a video's tokens exactly (see the module's docstring)
_NO_VIDEO_SIGNALS = ("vision_features", "project")


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    takes_video = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._next_video: tuple[int, int] | None = None  # (videos, frames) of the pass get_video_features starts
        self._video_pass: tuple[int, int] | None = None  # (videos, frames) of the tower pass now running, if videos
        self._wanted: tuple[Signal, ...] = ()
        self._encoded_by: list[tuple[VisionCapture, int]] = []  # per slot of the latest call: its pass, its index there

    def video_token_id(self) -> int:
        return self.config.video_token_id

    def _crop_counts(self, arguments: dict) -> list[int]:
        counts = super()._crop_counts(arguments)
        per_row = arguments.get("batch_num_images")
        if per_row is None:  # the model then cuts every image into crops
            return counts
        single = [int(n) == 1 for n in per_row for _ in range(int(n))]
        return [count if alone else 1 for count, alone in zip(counts, single)]

    def _pack(self, values: torch.Tensor, newline: torch.Tensor, image_size, arguments: dict) -> torch.Tensor:
        aspect = arguments.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        return self.inner.pack_image_features([values], [image_size], newline, aspect)[0][0]

    def _frame_side(self) -> int:
        """Side of a video frame's token grid, as the model's own ``apply_pooling`` pools the tower's g×g patches."""
        patches = self.vision_config.image_size // self.vision_config.patch_size
        pooled = self.inner.apply_pooling(torch.zeros(1, patches * patches, 1)).shape[1]
        return math.isqrt(pooled)

    # inputs

    def visual_placeholder_mask(self, inputs: dict) -> torch.Tensor:
        # only the kinds the call carries: the other kind's id is text there (a random model may draw it)
        images = self.placeholder_mask(inputs)
        videos = self.placeholder_mask(inputs, self.video_token_id())
        return (images & carries(inputs, "image")) | (videos & carries(inputs, "video"))

    def check_inputs(self, kwargs: dict) -> None:
        super().check_inputs(kwargs)
        if carries(kwargs, "video"):
            self._check_videos(kwargs.get("pixel_values_videos"))

    def _check_videos(self, pixels) -> None:
        """Refuse, before the tower runs, videos the model would fail on or that the wanted signals cannot serve."""
        size = self.vision_config.image_size
        if pixels is not None:
            if not isinstance(pixels, torch.Tensor) or pixels.ndim != 5:
                shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
                raise ValueError(
                    f"pixel_values_videos must be one (videos, frames, channels, {size}, {size}) tensor, not {shape}: "
                    f"every frame of a video must have the same size (the processor resizes them all to {size}x{size}), and the "
                    f"videos of one call the same number of frames (else pass them in separate calls)")
            if pixels.shape[0] == 0 or pixels.shape[1] == 0:
                raise ValueError(f"pixel_values_videos of shape {tuple(pixels.shape)} holds an empty video (no frames): "
                                 f"pass at least one frame per video")
            if tuple(pixels.shape[-2:]) != (size, size):
                raise ValueError(
                    f"pixel_values_videos has frames of {pixels.shape[-2]}x{pixels.shape[-1]} pixels, but every frame "
                    f"must have the tower's size, {size}x{size}: build them with the model's processor, which resizes them")
        refused = [str(request) for request in self._wanted if request.name in _NO_VIDEO_SIGNALS]
        if refused:
            raise ValueError(
                f"{', '.join(refused)} cannot be given for a video's tokens on LLaVA-OneVision: it pools each frame's "
                f"tokens after its projector, a nonlinear MLP, so no projector input gives a video token; use a method "
                f"that needs neither for videos")

    # the vision side

    def install_signal_hooks(self, wanted, capture: VisionCapture) -> list:
        handles = super().install_signal_hooks(wanted, capture)
        self._wanted = tuple(wanted)

        def before_videos(arguments: dict) -> None:
            # generate() encodes the videos before the prefill's forward, so they are checked here too
            pixels = arguments["pixel_values_videos"]
            self._check_videos(pixels)
            self._next_video = tuple(pixels.shape[:2])

        return handles + [_BeforeCall(self.inner, "get_video_features", before_videos)]

    def open_capture(self, capture: VisionCapture, args: tuple, kwargs: dict) -> None:
        pixels = args[0] if args else kwargs.get("pixel_values")
        capture.reset(keep_earlier=True, pixel_shape=tuple(pixels.shape))  # a call's videos follow its images
        images, self._next_images = self._next_images, None
        self._video_pass, self._next_video = self._next_video, None
        if images is not None:
            capture.inputs["images"] = images
        if self._video_pass is not None:
            capture.inputs["video"] = self._video_pass

    def passes_pending(self, inputs: dict, capture: VisionCapture) -> bool:
        # the model's forward encodes the images, then the videos: after the first pass the second is to come
        both = inputs.get("pixel_values") is not None and inputs.get("pixel_values_videos") is not None
        return both and "video" not in capture.inputs

    def video_grid(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        if self._video_pass is None:
            return None
        videos, frames = self._video_pass
        side = self._frame_side()
        return torch.tensor([[frames, side, side]] * videos)

    def _frame_rows(self, kept: list[torch.Tensor]) -> torch.Tensor:
        """The tower's rows (one per frame, videos one after another) of the ``kept`` frames of each video."""
        _, frames = self._video_pass
        return torch.cat([video * frames + chosen for video, chosen in enumerate(kept)])

    def frame_pass(self, args: tuple, kwargs: dict, kept: list[torch.Tensor]) -> tuple[tuple, dict]:
        """The kept frames' pixels: one tower image per frame."""
        if args:
            return (args[0][self._frame_rows(kept).to(args[0].device)], *args[1:]), kwargs
        pixels = kwargs["pixel_values"]
        return args, {**kwargs, "pixel_values": pixels[self._frame_rows(kept).to(pixels.device)]}

    def full_frames(self, output, grid: torch.Tensor, kept: list[torch.Tensor]):
        """Every per-frame output of the tower (its states, the selected hidden states among them) given back one row per
        frame of the full videos, zeros at the dropped frames."""
        return spread_rows(output, self._frame_rows(kept), int(grid[:, 0].sum()))

    # slots and signals

    def slots(self, inputs: dict, capture: VisionCapture) -> list[ImageSlot]:
        images, videos = carries(inputs, "image"), carries(inputs, "video")
        if not videos:
            slots = super().slots(inputs, capture)
            self._encoded_by = [(capture, index) for index in range(len(slots))]
            return slots
        latest = (capture.earlier, capture) if images else (capture,)  # the images' pass comes first
        passes = {"video" in p.inputs: p for p in latest if p is not None and p.seen}
        image_pass, video_pass = passes.get(False), passes.get(True)
        if video_pass is None or (images and image_pass is None):
            raise ValueError(
                "video (or image) tokens reached the model but tokensieve saw no vision pass for them: pass "
                "pixel_values_videos (and pixel_values with image_sizes), not precomputed features, to the model inside "
                "the apply() block")
        slots = super().slots(inputs, image_pass) if images else []
        self._encoded_by = [(image_pass, index) for index in range(len(slots))]
        video_slots = self._video_slots(inputs, video_pass, first=len(slots))
        self._encoded_by += [(video_pass, index) for index in range(len(video_slots))]
        return slots + video_slots

    def _video_slots(self, inputs: dict, video_pass: VisionCapture, first: int) -> list[ImageSlot]:
        """One slot per video, numbered on from ``first`` (the call's images come first): its frame tokens, without the
        newline token that follows them."""
        videos, frames = video_pass.inputs["video"]
        side = self._frame_side()
        count = frames * side * side
        blocks = self.placeholder_blocks(
            inputs, [count + 1] * videos,
            f"{videos} video(s) of {frames} frames of {side}x{side} tokens and one newline token each",
            token_id=self.video_token_id())
        kept_frames = video_pass.inputs.get("kept_frames") or [None] * videos
        layout = tuple(torch.arange(count).view(frames, side, side))
        return [ImageSlot(row, positions[:-1], (1, count), first + video, layout, (frames, side, side), None,
                          kept_frames[video])
                for video, (row, positions) in enumerate(blocks)]

    def image_signals(self, wanted, capture: VisionCapture, image: int) -> dict:
        encoded, item = self._encoded_by[image]
        if "video" not in encoded.inputs:
            return super().image_signals(wanted, encoded, item)
        _, frames = encoded.inputs["video"]
        signals = {}
        for request in wanted:  # vision_attention only: the others are refused for videos (_check_videos, why_not)
            per_patch = torch.stack([self.tower_attention(request, encoded, frame)
                                     for frame in range(item * frames, (item + 1) * frames)])  # (t, heads, g²)
            pooled = self.inner.apply_pooling(per_patch.transpose(1, 2).contiguous())  # (t, h*w, heads)
            signals[request] = pooled.permute(2, 0, 1).flatten(1)  # (heads, t*h*w), frame after frame
        return signals
