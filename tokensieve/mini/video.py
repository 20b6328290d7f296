"""Videos for sieve-mini: a clip is its frames, each an image of its own, at VIDEO_FRAME_SIZE pixels.

The processor's chat template writes one `<image>` per frame, and LlavaProcessor expands each to the
tokens its pixel size gives (112 px: 8x8 = 64, so 16 frames are 1,024 visual tokens, the cost of four
224 px images). DINOv2 interpolates its position embeddings to the smaller grid. Training and the fast
evaluation read the frames' layer-8 patch tokens from a cache, as features.py does for images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Dinov2Model

from ..engine.compat import from_pretrained
from ..qa import VIDEO_DATA_VERSION, VideoExample, video_examples
from .assemble import PATCH_SIZE, make_processor
from .build import language_dir, mini_dir, vision_dir

VIDEO_FRAME_SIZE = 112
FRAME_TOKENS = (VIDEO_FRAME_SIZE // PATCH_SIZE) ** 2
VIDEO_SHARD_SIZE = 100  # clips per cached shard (16 frames at 112 px: 75 MB of fp16 features)


def video_messages(question: str, n_frames: int) -> list[dict]:
    """The chat for one clip: one image item per frame, then the question."""
    return [{"role": "user", "content": [{"type": "image"}] * n_frames + [{"type": "text", "text": question}]}]


def video_inputs(processor, frames: list[Image.Image], question: str) -> dict:
    """sieve-mini's model inputs for one clip: its frames as images at VIDEO_FRAME_SIZE, then the question.

    The processor resizes each frame (whatever its size) to VIDEO_FRAME_SIZE square and expands each frame's
    `<image>` to FRAME_TOKENS placeholders; pass the result to `model(**inputs)` or `model.generate(**inputs)`.
    """
    if not frames:
        raise ValueError("a clip needs at least one frame; got an empty list of frames")
    text = processor.apply_chat_template(video_messages(question, len(frames)), add_generation_prompt=True)
    return processor(images=frames, text=text, return_tensors="pt",
                     size={"height": VIDEO_FRAME_SIZE, "width": VIDEO_FRAME_SIZE})


class VideoFeatureCache:
    """Layer-`layer` patch tokens of the video suite's clips, all frames of a clip in one row, cached as fp16.

    A shard holds clips [shard * VIDEO_SHARD_SIZE, (shard + 1) * VIDEO_SHARD_SIZE) of a split:
    (clips, frames * FRAME_TOKENS, 384), frame after frame, each frame's patches in raster order.
    """

    def __init__(self, layer: int, frames: int = 16, frame_size: int = VIDEO_FRAME_SIZE, device: str = "cpu"):
        self.layer, self.frames, self.frame_size, self.device = layer, frames, frame_size, device
        self.frame_tokens = (frame_size // PATCH_SIZE) ** 2
        self.root = mini_dir() / "features" / f"{VIDEO_DATA_VERSION}-{frames}f-{frame_size}px-layer{layer}"
        self._tower: Dinov2Model | None = None
        self._processor = None
        self._loaded: dict[tuple[str, int], torch.Tensor] = {}

    def path(self, split: str, shard: int) -> Path:
        return self.root / f"{split}-{shard:04d}.safetensors"

    def examples(self, split: str, shard: int) -> list[VideoExample]:
        return video_examples(split, VIDEO_SHARD_SIZE, shard * VIDEO_SHARD_SIZE, self.frames)

    def shard(self, split: str, shard: int) -> torch.Tensor:
        if (split, shard) in self._loaded:
            return self._loaded[split, shard]
        path = self.path(split, shard)
        if not path.is_file():
            features = self._compute(self.examples(split, shard))
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            save_file({"features": features}, str(partial), metadata={
                "data_version": VIDEO_DATA_VERSION, "frames": str(self.frames),
                "frame_size": str(self.frame_size), "layer": str(self.layer)})
            partial.replace(path)
        self._loaded[split, shard] = load_file(str(path))["features"]
        return self._loaded[split, shard]

    def first(self, split: str, count: int) -> torch.Tensor:
        """Features of clips [0, count) of a split."""
        shards = [self.shard(split, s) for s in range(-(-count // VIDEO_SHARD_SIZE))]
        return torch.cat(shards)[:count]

    @torch.inference_mode()
    def _compute(self, clips: list[VideoExample], batch: int = 4) -> torch.Tensor:
        if self._tower is None:
            self._tower = from_pretrained(Dinov2Model, vision_dir()).eval().to(self.device)
            self._processor = make_processor(language_dir(), self.frame_size).image_processor
        out = []
        for first in range(0, len(clips), batch):
            frames = [frame for ex in clips[first:first + batch] for frame in ex.frames(self.frame_size)]
            pixels = self._processor(frames, return_tensors="pt").pixel_values.to(self.device)
            hidden = self._tower(pixels, output_hidden_states=True).hidden_states[self.layer][:, 1:]  # drop [CLS]
            out.append(hidden.reshape(-1, self.frames * self.frame_tokens, hidden.shape[-1]).to("cpu", torch.float16))
        return torch.cat(out)


__all__ = ["FRAME_TOKENS", "VIDEO_FRAME_SIZE", "VIDEO_SHARD_SIZE", "VideoFeatureCache", "video_inputs",
           "video_messages"]
