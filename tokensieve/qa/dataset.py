"""The fixed splits of the procedural QA suite.

Example `i` of a split is drawn from the seed (DATA_VERSION number, split seed, i) alone, so any
example can be rebuilt on its own and the splits never share a scene. The test seed is never
used by training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .questions import ASKERS, QA, SKILLS
from .scenes import Scene, sample_scene

DATA_VERSION = "qa-v1"
_VERSION_SEED = 1
SPLIT_SEEDS = {"train": 1000, "validation": 2000, "test": 3000}


@dataclass
class Example:
    split: str
    index: int
    scene: Scene
    qas: list[QA]  # qas[0] is the example's own skill: SKILLS[index % len(SKILLS)]

    def image(self, size: int = 224) -> Image.Image:
        return self.scene.render(size)

    @property
    def skill(self) -> str:
        return self.qas[0].skill


def _scene_for(skill: str, seed: tuple[int, ...], rng: np.random.Generator) -> Scene:
    """A scene in which `skill` can be asked, with the other elements at random."""
    n_large = int(rng.integers(1, 7))
    with_small = bool(rng.random() < 0.35)
    with_word = bool(rng.random() < 0.35)
    if skill == "counting":
        with_small = False
    elif skill == "small":
        with_small, n_large = True, min(n_large, 4)
    elif skill == "reading":
        with_word, n_large = True, min(n_large, 4)
    elif skill == "position":
        n_large = max(n_large, 2)
    return sample_scene(seed, n_large, with_small, with_word)


def example(split: str, index: int, questions: int = 1) -> Example:
    """Example `index` of `split`: its own skill's question first, then up to `questions - 1` others."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    if index < 0:
        raise ValueError(f"example index must be >= 0, got {index}")
    skill = SKILLS[index % len(SKILLS)]
    for attempt in range(100):
        seed = (_VERSION_SEED, SPLIT_SEEDS[split], index, attempt)
        rng = np.random.default_rng((*seed, 2))  # stream 2: question choice
        try:
            scene = _scene_for(skill, seed, rng)
        except RuntimeError:  # crowded layout: try the next attempt
            continue
        first = ASKERS[skill](scene, rng)
        if first is None:
            continue
        qas = [first]
        others = [s for s in SKILLS if s != skill]
        for other in rng.permutation(others):
            if len(qas) >= questions:
                break
            if (qa := ASKERS[str(other)](scene, rng)) is not None:
                qas.append(qa)
        return Example(split, index, scene, qas)
    raise RuntimeError(f"no {skill} question could be made for {split}[{index}]")


def examples(split: str, count: int, start: int = 0, questions: int = 1) -> list[Example]:
    """Examples `start .. start+count-1` of a split; every skill appears equally often in blocks of 7."""
    return [example(split, i, questions) for i in range(start, start + count)]
