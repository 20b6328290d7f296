"""Vision-tower features of the QA suite, computed once per shard and cached as fp16 safetensors.

Training never runs the tower: the tower and its feature layer are frozen, so each image's patch
tokens (hidden_states[layer] without [CLS], exactly what LLaVA feeds its projector) are computed
once and reused by every epoch and every resumed run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Dinov2Model

from ..engine.compat import from_pretrained
from ..qa import DATA_VERSION, examples
from .assemble import make_processor
from .build import language_dir, mini_dir, vision_dir

SHARD_SIZE = 500


class FeatureCache:
    def __init__(self, layer: int, image_size: int = 224, device: str = "cpu"):
        self.layer, self.image_size, self.device = layer, image_size, device
        self.root = mini_dir() / "features" / f"{DATA_VERSION}-layer{layer}-{image_size}px"
        self._tower: Dinov2Model | None = None
        self._processor = None
        self._loaded: dict[tuple[str, int], torch.Tensor] = {}

    def path(self, split: str, shard: int) -> Path:
        return self.root / f"{split}-{shard:04d}.safetensors"

    def shard(self, split: str, shard: int) -> torch.Tensor:
        """Features of examples [shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE) of `split`: (N, tokens, 384) fp16."""
        if (split, shard) in self._loaded:
            return self._loaded[split, shard]
        path = self.path(split, shard)
        if not path.is_file():
            features = self._compute(split, shard * SHARD_SIZE, SHARD_SIZE)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            save_file({"features": features}, str(partial), metadata={"data_version": DATA_VERSION})
            partial.replace(path)
        self._loaded[split, shard] = load_file(str(path))["features"]
        return self._loaded[split, shard]

    @torch.inference_mode()
    def _compute(self, split: str, start: int, count: int, batch: int = 25) -> torch.Tensor:
        if self._tower is None:
            self._tower = from_pretrained(Dinov2Model, vision_dir()).eval().to(self.device)
            self._processor = make_processor(language_dir(), self.image_size).image_processor
        out = []
        for first in range(start, start + count, batch):
            images = [ex.image(self.image_size) for ex in examples(split, min(batch, start + count - first), first)]
            pixels = self._processor(images, return_tensors="pt").pixel_values.to(self.device)
            hidden = self._tower(pixels, output_hidden_states=True).hidden_states[self.layer]
            out.append(hidden[:, 1:].to("cpu", torch.float16))  # drop [CLS], as strategy "default" does
        return torch.cat(out)
