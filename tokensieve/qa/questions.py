"""Questions about a scene, one maker per skill. Each answer is one word or number."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .scenes import COLOURS, SHAPES, WORDS, Scene

MIN_SEPARATION = 0.12  # left/right and above/below need at least this gap between centres


@dataclass(frozen=True)
class QA:
    skill: str
    question: str
    answer: str


def _uniquely_named(scene: Scene, rng: np.random.Generator, attribute: str):
    """A random large object whose ``attribute`` (shape or colour) no other object shares, or None."""
    unique = [s for s in scene.large if sum(getattr(o, attribute) == getattr(s, attribute) for o in scene.shapes) == 1]
    return unique[rng.integers(len(unique))] if unique else None


def ask_colour(scene: Scene, rng: np.random.Generator) -> QA | None:
    s = _uniquely_named(scene, rng, "shape")
    return QA("colour", f"What colour is the {s.shape}?", s.colour) if s else None


def ask_shape(scene: Scene, rng: np.random.Generator) -> QA | None:
    s = _uniquely_named(scene, rng, "colour")
    return QA("shape", f"What shape is the {s.colour} object?", s.shape) if s else None


def ask_counting(scene: Scene, rng: np.random.Generator) -> QA | None:
    if scene.small:  # would make "how many" ambiguous
        return None
    return QA("counting", "How many shapes are there?", str(len(scene.large)))


def ask_position(scene: Scene, rng: np.random.Generator) -> QA | None:
    pairs = []
    for a in scene.large:
        for b in scene.large:
            if abs(a.x - b.x) >= MIN_SEPARATION and a.x != b.x:
                pairs.append((a, b, "horizontal"))
            if abs(a.y - b.y) >= MIN_SEPARATION and a.y != b.y:
                pairs.append((a, b, "vertical"))
    if not pairs:
        return None
    a, b, axis = pairs[rng.integers(len(pairs))]
    if axis == "horizontal":
        return QA("position", f"Is the {a.name} left or right of the {b.name}?", "left" if a.x < b.x else "right")
    return QA("position", f"Is the {a.name} above or below the {b.name}?", "above" if a.y < b.y else "below")


def ask_existence(scene: Scene, rng: np.random.Generator) -> QA:
    """POPE-style: half the answers are "no", and most of those share a colour or a shape with the scene."""
    present = {(s.colour, s.shape) for s in scene.shapes}
    if rng.random() < 0.5:
        colour, shape = sorted(present)[rng.integers(len(present))]
        return QA("existence", f"Is there a {colour} {shape}?", "yes")
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    pool = near if near and rng.random() < 0.7 else absent
    colour, shape = pool[rng.integers(len(pool))]
    return QA("existence", f"Is there a {colour} {shape}?", "no")


def ask_small(scene: Scene, rng: np.random.Generator) -> QA | None:
    if len(scene.small) != 1:
        return None
    return QA("small", "What colour is the small object?", scene.small[0].colour)


def ask_reading(scene: Scene, rng: np.random.Generator) -> QA | None:
    if scene.word is None:
        return None
    return QA("reading", "What word is written?", scene.word.text)


def where(s) -> str:
    """Which ninth of the canvas a shape's centre is in, in words."""
    row = ("top", "", "bottom")[min(2, int(s.y * 3))]
    column = ("left", "", "right")[min(2, int(s.x * 3))]
    return " ".join(w for w in (row, column) if w) or "centre"


def describe(scene: Scene) -> QA:
    """A full description (for training only: it ties every visual attribute to the words the questions use)."""
    large = sorted(scene.large, key=lambda s: (min(2, int(s.y * 3)), s.x))
    parts = [f"{len(large)} shape{'s' * (len(large) != 1)}: " + ", ".join(f"{s.name} {where(s)}" for s in large)]
    parts += [f"small {s.name} {where(s)}" for s in scene.small]
    if scene.word is not None:
        parts.append(f"the word {scene.word.text}")
    return QA("description", "Describe the image.", "; ".join(parts) + ".")


ASKERS: dict[str, Callable[[Scene, np.random.Generator], QA | None]] = {
    "colour": ask_colour, "shape": ask_shape, "counting": ask_counting, "position": ask_position,
    "existence": ask_existence, "small": ask_small, "reading": ask_reading,
}
SKILLS = tuple(ASKERS)

# Accuracy of guessing uniformly among the answers a skill can have.
CHANCE = {
    "colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "counting": 1 / 6, "position": 1 / 2,
    "existence": 1 / 2, "small": 1 / len(COLOURS), "reading": 1 / len(WORDS),
}
