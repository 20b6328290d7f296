"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres layout on a SigLIP
tower (see llava_next.py), with two differences in how an image's placeholder tokens are laid out:

- anyres_max (``vision_aspect_ratio="anyres_max_9"``): a high-res grid larger than about nine crops'
  worth of patches is bilinearly downsampled before the newline tokens are added, so R×C is the
  downsampled grid;
- an image of a multi-image prompt (``batch_num_images`` > 1 for its row) is not cut into crops: it is
  its base view, g×g tokens, and one newline token.

The layout comes from the model's own packing, as for NeXT, so both follow. SigLIP has no [CLS]
token, so ``cls_attention`` and ``vision_keys`` are refused (fastervlm and visionzip with them).
Videos (``pixel_values_videos``) are refused (``takes_video`` is False; docs/video.md).
"""

from __future__ import annotations

import torch

from .llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")

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
