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


def merge_groups(image: Image.Image, grid: tuple[int, int], groups: Iterable[int], strength: float = 0.75) -> Image.Image:
    """The image with every patch painted the mean colour of its merge group (``groups``: for each raster patch
    over ``grid``, the patch its group is kept as; -1 dropped, greyed out as by :func:`grey_out`)."""
    h, w = grid
    groups = np.asarray(list(groups), dtype=np.int64)
    rgb = image.convert("RGB")
    patches = np.asarray(rgb.resize((w, h), Image.BOX), dtype=np.float64).reshape(h * w, 3)  # each patch's mean colour
    kept = groups >= 0
    sums = np.zeros((h * w, 3))
    np.add.at(sums, groups[kept], patches[kept])
    counts = np.bincount(groups[kept], minlength=h * w)[:, None]
    means = sums / np.maximum(counts, 1)
    painted = np.where(kept[:, None], means[np.maximum(groups, 0)], patches).reshape(h, w, 3).astype(np.uint8)
    mosaic = Image.fromarray(painted, mode="RGB").resize(image.size, Image.NEAREST)
    return grey_out(mosaic, grid, np.flatnonzero(kept), strength)
