"""Real photographs to put scenes on: scikit-image's sample images, and Debian opencv-doc's when installed."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..extras import require

# Sample images that ship inside the scikit-image wheel (no download needed).
SKIMAGE_NAMES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
    "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "microaneurysms",
    "moon", "page", "retina", "rocket", "text",
)
OPENCV_DOC_DIR = Path("/usr/share/doc/opencv-doc/examples/data")


def _to_rgb(array: np.ndarray) -> Image.Image:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        array = (255 * (array - array.min()) / max(float(np.ptp(array)), 1e-9)).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


@lru_cache(maxsize=1)
def photos() -> tuple[Image.Image, ...]:
    """All background photos, in a fixed order (so a seed always picks the same one)."""
    require("bench", "skimage", purpose="the built-in QA suite's background photos (scikit-image's samples)")
    import skimage.data

    images = [_to_rgb(getattr(skimage.data, name)()) for name in SKIMAGE_NAMES]
    if OPENCV_DOC_DIR.is_dir():
        for path in sorted(OPENCV_DOC_DIR.glob("*")):
            if path.suffix.lower() in {".jpg", ".jpeg", ".png"}:
                with Image.open(path) as im:
                    if min(im.size) >= 128:
                        images.append(im.convert("RGB"))
    return tuple(images)


def random_background(rng: np.random.Generator, size: int, flat_probability: float = 0.15) -> Image.Image:
    """A random square crop of a random photo resized to `size`, or now and then a flat colour."""
    if rng.random() < flat_probability:
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        return Image.new("RGB", (size, size), colour)
    pool = photos()
    photo = pool[int(rng.integers(len(pool)))]
    w, h = photo.size
    side = int(rng.integers(int(0.4 * min(w, h)), min(w, h) + 1))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop
