"""Seeded scenes: coloured shapes, an optional small object and an optional rendered word on a photo.

Geometry is stated as fractions of the canvas side so one scene renders at 224 or 448 px alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .backgrounds import random_background

COLOURS = {
    "red": (225, 30, 30), "green": (40, 180, 50), "blue": (35, 75, 235),
    "yellow": (250, 220, 20), "purple": (150, 45, 200), "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
WORDS = ("cat", "dog", "sun", "car", "box", "cup", "hat", "key",
         "map", "pen", "fish", "bird", "tree", "ship", "moon", "frog")

NORMAL_RADIUS = (0.075, 0.115)  # large enough for DINOv2 patches (14 px of 224) to see the shape
SMALL_RADIUS = (0.036, 0.045)   # about one patch across
WORD_HEIGHT = 0.13              # words smaller than ~24 px at 224 are not learnable by this tower
MARGIN = 0.02


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    x: float  # centre, fraction of the canvas
    y: float
    r: float
    small: bool = False

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Word:
    text: str
    x: float  # top-left corner
    y: float
    w: float
    h: float


@dataclass
class Scene:
    """What is in the image; `render` draws it, the question makers read it."""

    seed: tuple[int, ...]
    shapes: list[Shape] = field(default_factory=list)
    word: Word | None = None

    @property
    def large(self) -> list[Shape]:
        return [s for s in self.shapes if not s.small]

    @property
    def small(self) -> list[Shape]:
        return [s for s in self.shapes if s.small]

    def render(self, size: int = 224) -> Image.Image:
        rng = np.random.default_rng(self.seed)  # the same background for every size
        image = random_background(rng, size)
        draw = ImageDraw.Draw(image)
        for s in self.shapes:
            points = outline(s.shape, s.x * size, s.y * size, s.r * size)
            draw.polygon(points, fill=COLOURS[s.colour], outline=(0, 0, 0), width=max(1, size // 112))
        if self.word is not None:
            font = ImageFont.load_default(size=int(WORD_HEIGHT * size))
            draw.text((self.word.x * size, self.word.y * size), self.word.text, font=font,
                      fill=(255, 255, 255), stroke_width=max(2, size // 75), stroke_fill=(0, 0, 0))
        return image


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon corners of a shape of circumradius about r."""
    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(phase + 2 * math.pi * k / n),
                 cy + radius * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "circle":
        return ring(48, r, 0.0)
    if shape == "square":
        return ring(4, r, math.pi / 4)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "triangle":
        return ring(3, r, -math.pi / 2)
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, 0.45 * r, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, b = 0.35 * r, r
        offsets = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
        return [(cx + dx, cy + dy) for dx, dy in offsets]
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _boxes_overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return not (a[2] + MARGIN <= b[0] or b[2] + MARGIN <= a[0] or a[3] + MARGIN <= b[1] or b[3] + MARGIN <= a[1])


def sample_scene(seed: tuple[int, ...], n_large: int, with_small: bool, with_word: bool) -> Scene:
    """Place shapes (distinct colour+shape pairs) and a word without overlaps, all from `seed`."""
    rng = np.random.default_rng((*seed, 1))  # stream 1: layout (stream 0 is the background)
    scene = Scene(seed=seed)
    boxes: list[tuple[float, ...]] = []

    def place(w: float, h: float) -> tuple[float, float] | None:
        for _ in range(200):
            x, y = rng.uniform(0.02, 0.98 - w), rng.uniform(0.02, 0.98 - h)
            box = (x, y, x + w, y + h)
            if not any(_boxes_overlap(box, other) for other in boxes):
                boxes.append(box)
                return x, y
        return None

    if with_word:
        text = str(rng.choice(WORDS))
        font = ImageFont.load_default(size=100)
        left, top, right, bottom = font.getbbox(text)
        w, h = WORD_HEIGHT * (right - left) / 100 * 1.05, WORD_HEIGHT * 1.25
        if (corner := place(w, h)) is not None:
            scene.word = Word(text, corner[0], corner[1], w, h)

    used: set[tuple[str, str]] = set()
    for small in [False] * n_large + [True] * with_small:
        while True:
            pair = (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))))
            if pair not in used:
                used.add(pair)
                break
        r = rng.uniform(*(SMALL_RADIUS if small else NORMAL_RADIUS))
        corner = place(2 * r, 2 * r)
        if corner is None:
            raise RuntimeError(f"could not place all shapes for seed {seed}")
        scene.shapes.append(Shape(pair[0], pair[1], corner[0] + r, corner[1] + r, r, small))
    return scene
