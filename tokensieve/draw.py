"""Drawing what a method kept: the image with its dropped patches greyed out (`tokensieve run --show`, the report)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

DROPPED_GREY = (128, 128, 128)


def grey_out(image: Image.Image, grid: tuple[int, int], kept: Iterable[int], strength: float = 0.75) -> Image.Image:
    """The image with every patch not in `kept` (raster indices over `grid`) blended towards grey."""
    h, w = grid
    weights = np.full(h * w, round(255 * (1 - strength)), dtype=np.uint8)
    weights[np.asarray(list(kept), dtype=np.int64)] = 255
    mask = Image.fromarray(weights.reshape(h, w), mode="L").resize(image.size, Image.NEAREST)
    return Image.composite(image.convert("RGB"), Image.new("RGB", image.size, DROPPED_GREY), mask)
