"""The video suite's skills: one clip maker per skill, and what a subset of a clip's frames determines.

Each maker lays out the clip's tracks (the image suite's shapes, each with a pose or nothing per frame)
and asks its question; every colour and every shape is used at most once per clip, so a name such as
"red star" picks one track and a colour's pixels belong to one track only. `seen_answer` reads the
answer that a viewer of only some frames would give, from the tracks alone: on all frames it is the
answer (the tests check this), and on a subset it measures how much of the answer the subset keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .questions import QA, where
from .scenes import COLOURS, MARGIN, NORMAL_RADIUS, SHAPES

DIRECTIONS = ("left", "right", "up", "down")
FLASH_COUNTS = (1, 2, 3, 4)  # 4 flashes need 7 frames (on, off, on, off, on, off, on): fits the 8-frame minimum
TRAVEL = (0.35, 0.6)         # how far a moving object goes over the clip, as a fraction of the canvas


@dataclass(frozen=True)
class Pose:
    x: float  # centre, fraction of the canvas
    y: float
    colour: str


@dataclass(frozen=True)
class Track:
    """One object through the clip: its shape and size, and its pose in each frame (None: not visible)."""

    shape: str
    r: float
    poses: tuple[Pose | None, ...]

    def visible(self, frames: Sequence[int]) -> list[bool]:
        return [self.poses[t] is not None for t in frames]

    def name(self, t: int) -> str:
        return f"{self.poses[t].colour} {self.shape}"


@dataclass(frozen=True)
class VideoQA:
    skill: str
    question: str
    answer: str
    subject: int      # the index of the track the question is about
    variant: str = ""  # "first" or "last" for the order skill


# Each skill's question, said once: the clip makers ask it and suite_questions asks it of every clip.
QUESTIONS = {"order": "Which shape appears {variant}?", "motion": "Which way does the {name} move?",
             "flashes": "How many times does the {name} flash?",
             "needle": "What colour is the shape that appears in only one frame?",
             "change": "Which shape changes colour?"}


def ask(skill: str, answer: str, subject: int, name: str = "", variant: str = "") -> VideoQA:
    """The skill's question about track `subject` (named `name`; `variant` for order)."""
    return VideoQA(skill, QUESTIONS[skill].format(name=name, variant=variant), answer, subject, variant)


class _Layout:
    """Non-overlapping boxes on the canvas, placed at random (as the image suite places its shapes)."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.boxes = rng, []

    def place(self, w: float, h: float) -> tuple[float, float]:
        for _ in range(200):
            x, y = self.rng.uniform(0.02, 0.98 - w), self.rng.uniform(0.02, 0.98 - h)
            box = (x, y, x + w, y + h)
            if all(box[2] + MARGIN <= o[0] or o[2] + MARGIN <= box[0] or box[3] + MARGIN <= o[1]
                   or o[3] + MARGIN <= box[1] for o in self.boxes):
                self.boxes.append(box)
                return x, y
        raise RuntimeError("crowded layout")

    def static(self, shape: str, colour: str, n_frames: int) -> Track:
        r = self.rng.uniform(*NORMAL_RADIUS)
        x, y = self.place(2 * r, 2 * r)
        return Track(shape, r, (Pose(x + r, y + r, colour),) * n_frames)


def _names(rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Shapes and colours in a random order, each to be used once per clip."""
    return [str(s) for s in rng.permutation(SHAPES)], [str(c) for c in rng.permutation(list(COLOURS))]


def make_order(rng: np.random.Generator, n_frames: int) -> tuple[list[Track], VideoQA]:
    """Three objects appear one by one, at distinct frames, and stay; which shape appears first or last?"""
    shapes, colours = _names(rng)
    layout = _Layout(rng)
    starts = [int(t) for t in rng.choice(n_frames - 1, size=3, replace=False)]  # each is seen in >= 2 frames
    tracks = []
    for i, start in enumerate(starts):
        still = layout.static(shapes[i], colours[i], n_frames)
        tracks.append(Track(still.shape, still.r, (None,) * start + still.poses[start:]))
    variant = "first" if rng.random() < 0.5 else "last"
    subject = starts.index(min(starts) if variant == "first" else max(starts))
    return tracks, ask("order", shapes[subject], subject, variant=variant)


def make_motion(rng: np.random.Generator, n_frames: int) -> tuple[list[Track], VideoQA]:
    """One object moves in a straight line, the others stay; which way does it move?"""
    shapes, colours = _names(rng)
    layout = _Layout(rng)
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    r, travel = rng.uniform(*NORMAL_RADIUS), rng.uniform(*TRAVEL)
    horizontal = direction in ("left", "right")
    x, y = layout.place(2 * r + travel * horizontal, 2 * r + travel * (not horizontal))  # the swept box
    sign = 1 if direction in ("right", "down") else -1
    start = (x + r + travel * (sign < 0) * horizontal, y + r + travel * (sign < 0) * (not horizontal))
    poses = []
    for t in range(n_frames):
        step = sign * travel * t / (n_frames - 1)
        poses.append(Pose(start[0] + step * horizontal, start[1] + step * (not horizontal), colours[0]))
    tracks = [Track(shapes[0], r, tuple(poses))]
    tracks += [layout.static(shapes[i], colours[i], n_frames) for i in range(1, 1 + int(rng.integers(3)))]
    return tracks, ask("motion", direction, 0, f"{colours[0]} {shapes[0]}")


def _runs(rng: np.random.Generator, count: int, n_frames: int) -> list[bool]:
    """Visibility per frame with exactly `count` separate runs, and at least one hidden frame."""
    while True:
        # 2*count + 1 segments: hidden, shown, hidden, ..., shown, hidden; inner gaps and runs >= 1 frame
        minimum = np.array([0] + [1] * (2 * count - 1) + [0])
        spare = n_frames - int(minimum.sum())
        lengths = minimum + rng.multinomial(spare, np.full(len(minimum), 1 / len(minimum)))
        shown = [bool(i % 2) for i, n in enumerate(lengths) for _ in range(n)]
        if not all(shown):
            return shown


def make_flashes(rng: np.random.Generator, n_frames: int) -> tuple[list[Track], VideoQA]:
    """One object flashes (is shown in separate runs of frames), the others stay; how many times?"""
    shapes, colours = _names(rng)
    layout = _Layout(rng)
    count = FLASH_COUNTS[int(rng.integers(len(FLASH_COUNTS)))]
    still = layout.static(shapes[0], colours[0], n_frames)
    shown = _runs(rng, count, n_frames)
    tracks = [Track(still.shape, still.r, tuple(p if on else None for p, on in zip(still.poses, shown)))]
    tracks += [layout.static(shapes[i], colours[i], n_frames) for i in range(1, 1 + int(rng.integers(3)))]
    return tracks, ask("flashes", str(count), 0, f"{colours[0]} {shapes[0]}")


def make_needle(rng: np.random.Generator, n_frames: int) -> tuple[list[Track], VideoQA]:
    """Two objects stay; a third is shown in one frame only; what colour is it?"""
    shapes, colours = _names(rng)
    layout = _Layout(rng)
    frame = int(rng.integers(n_frames))
    still = layout.static(shapes[0], colours[0], n_frames)
    needle = Track(still.shape, still.r, tuple(p if t == frame else None for t, p in enumerate(still.poses)))
    tracks = [needle] + [layout.static(shapes[i], colours[i], n_frames) for i in (1, 2)]
    return tracks, ask("needle", colours[0], 0)


def make_change(rng: np.random.Generator, n_frames: int) -> tuple[list[Track], VideoQA]:
    """Three objects stay; one turns to a colour no object has, from some frame on; which shape changes?"""
    shapes, colours = _names(rng)
    layout = _Layout(rng)
    tracks = [layout.static(shapes[i], colours[i], n_frames) for i in range(3)]
    subject, switch = int(rng.integers(3)), int(rng.integers(1, n_frames))
    before = tracks[subject].poses[0]
    after = Pose(before.x, before.y, colours[3])
    tracks[subject] = Track(shapes[subject], tracks[subject].r, (before,) * switch + (after,) * (n_frames - switch))
    return tracks, ask("change", shapes[subject], subject)


MAKERS: dict[str, Callable[[np.random.Generator, int], tuple[list[Track], VideoQA]]] = {
    "order": make_order, "motion": make_motion, "flashes": make_flashes, "needle": make_needle,
    "change": make_change,
}
VIDEO_SKILLS = tuple(MAKERS)

# Chance: a uniform guess among the answers that a single frame leaves possible (the clip's three shapes
# for order and change; four directions; four counts; the needle's colour among the four colours that the
# two ever-present objects do not have). tests/test_video_suite.py checks that no answer is more common.
VIDEO_CHANCE = {"order": 1 / 3, "motion": 1 / len(DIRECTIONS), "flashes": 1 / len(FLASH_COUNTS),
                "needle": 1 / (len(COLOURS) - 2), "change": 1 / 3}


def _seen_order(tracks: list[Track], frames: list[int], qa: VideoQA) -> str | None:
    first_seen = {i: next(t for t in frames if tr.poses[t] is not None)
                  for i, tr in enumerate(tracks) if any(tr.visible(frames))}
    if not first_seen:
        return None
    pick = min if qa.variant == "first" else max
    edge = pick(first_seen.values())
    (winner, *others) = [i for i, t in first_seen.items() if t == edge]
    return None if others else tracks[winner].shape


def _direction(poses: list[Pose]) -> str | None:
    """Which way an object went from its first pose to its last (None: fewer than two, or no move)."""
    if len(poses) < 2:
        return None
    dx, dy = poses[-1].x - poses[0].x, poses[-1].y - poses[0].y
    if dx == dy == 0:
        return None
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _seen_motion(tracks: list[Track], frames: list[int], qa: VideoQA) -> str | None:
    return _direction([tracks[qa.subject].poses[t] for t in frames if tracks[qa.subject].poses[t] is not None])


def _seen_flashes(tracks: list[Track], frames: list[int], qa: VideoQA) -> str | None:
    shown = tracks[qa.subject].visible(frames)
    return str(sum(on and (i == 0 or not shown[i - 1]) for i, on in enumerate(shown)))


def _seen_needle(tracks: list[Track], frames: list[int], qa: VideoQA) -> str | None:
    once = [tr for tr in tracks if sum(tr.visible(frames)) == 1]
    if len(once) != 1:
        return None
    return next(once[0].poses[t].colour for t in frames if once[0].poses[t] is not None)


def _seen_change(tracks: list[Track], frames: list[int], qa: VideoQA) -> str | None:
    changed = [tr.shape for tr in tracks if len({tr.poses[t].colour for t in frames if tr.poses[t]}) > 1]
    return changed[0] if len(changed) == 1 else None


_READERS = {"order": _seen_order, "motion": _seen_motion, "flashes": _seen_flashes, "needle": _seen_needle,
            "change": _seen_change}


def describe_clip(tracks: list[Track]) -> str:
    """What happens in a clip, object by object in the order they first appear (for training only: it ties
    each object's events over time, with 1-based frame numbers, to the words the questions use)."""
    frames = range(len(tracks[0].poses))
    events = []
    for track in sorted(tracks, key=lambda tr: next(t for t in frames if tr.poses[t] is not None)):
        shown = [t for t in frames if track.poses[t] is not None]
        first, colours = track.poses[shown[0]], [track.poses[t].colour for t in shown]
        runs = sum(t - 1 not in shown for t in shown)
        name = f"{first.colour} {track.shape}"
        if len(shown) == 1:
            events.append(f"{name} only in frame {shown[0] + 1}")
        elif runs > 1 or shown[-1] != frames[-1]:
            events.append(f"{name} flashes {runs} time{'s' * (runs != 1)}")
        elif shown[0] > 0:
            events.append(f"{name} appears in frame {shown[0] + 1}")
        elif len(set(colours)) > 1:
            switch = shown[colours.index(colours[-1])]
            events.append(f"{track.shape} turns from {first.colour} to {colours[-1]} in frame {switch + 1}")
        elif (way := _direction([track.poses[t] for t in shown])) is not None:
            events.append(f"{name} moves {way}")
        else:
            events.append(f"{name} stays")
    return "; ".join(events) + "."


def describe_frame(tracks: list[Track], t: int) -> str:
    """What frame `t` (0-based) shows, top to bottom, each object with the ninth of the canvas it is in (for
    training only: with the prompt's frame numbers it ties each frame's content to its number)."""
    shown = sorted((pose.y, pose.x, f"{pose.colour} {track.shape} {where(pose)}")
                   for track in tracks if (pose := track.poses[t]) is not None)
    return (", ".join(words for _, _, words in shown) or "no shapes") + "."


def named_objects(text: str) -> set[str]:
    """The objects ("red star") a text names: of a frame description, what the frame shows, positions aside
    (a partial score of the lookups, which an exact match hides)."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    return {f"{colour} {shape}" for colour, shape in zip(words, words[1:]) if colour in COLOURS and shape in SHAPES}


def _spans(frames: list[int]) -> str:
    """Sorted 0-based frame indices as 1-based runs: [2, 3, 4, 8] -> "frames 3 to 5 and 9"."""
    runs = []
    for t in frames:
        if runs and t == runs[-1][1] + 1:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    words = [f"{a + 1} to {b + 1}" if b > a else f"{a + 1}" for a, b in runs]
    return ("frame " if len(frames) == 1 else "frames ") + " and ".join(words)


def object_spans(tracks: list[Track]) -> list[tuple[str, str]]:
    """(name, the frames it is seen in) for every object of a clip under every colour it shows, in the order
    they first appear: ("red star", "frames 3 to 5 and 9 to 12"). For training only: where each object is in
    time, the step between single frames and the order, flashes, needle and change questions."""
    n_frames = len(tracks[0].poses) if tracks else 0
    seen: dict[str, list[int]] = {}
    for t in range(n_frames):
        for track in tracks:
            if track.poses[t] is not None:
                seen.setdefault(track.name(t), []).append(t)
    return [(name, _spans(frames)) for name, frames in seen.items()]


def suite_questions(tracks: list[Track]) -> list[QA]:
    """Every question of the suite's five kinds that a clip answers, whatever skill it was made for (for
    training only: a clip made for one skill often answers others, e.g. an order clip's late objects each
    flash once). Objects are named as the suite names them; an object seen in every frame is not asked how
    often it flashes, and a question whose answer the clip leaves open is not asked."""
    frames = list(range(len(tracks[0].poses)))
    asked = [ask("order", "", 0, variant=v) for v in ("first", "last")] + [ask("needle", "", 0), ask("change", "", 0)]
    for i, track in enumerate(tracks):
        name = track.name(next(t for t in frames if track.poses[t] is not None))
        asked.append(ask("motion", "", i, name))
        if not all(track.visible(frames)):
            asked.append(ask("flashes", "", i, name))
    answered = [(qa, seen_answer(tracks, frames, qa)) for qa in asked]
    return [QA(qa.skill, qa.question, answer) for qa, answer in answered if answer]


def seen_answer(tracks: list[Track], frames: Sequence[int], qa: VideoQA) -> str | None:
    """The answer that only `frames` of the clip determine (None: they leave it open), from the tracks alone."""
    return _READERS[qa.skill](tracks, sorted(frames), qa)
