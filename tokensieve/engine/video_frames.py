"""``video_frames=``: videos given as their frames, one image per frame, on families that take images only.

An image-only family (LLaVA, sieve-mini, Gemma3) has no video input: a video reaches it as its frames, one image placeholder
each, the frames of a prompt one after another (text between them, a newline, stays text). ``video_frames`` says which
of each prompt's images are frames of one video:

- ``video_frames=n`` (n >= 2): each run of n consecutive images of a prompt is one video of n frames; a prompt's image
  count must be a multiple of n;
- ``video_frames=(1, 16)``: each prompt's images, in order, are visual inputs of these frame counts (1: a still
  image); a prompt's image count must be their sum.

The family's per-image slots (one tower image each, all of one grid) are then grouped (:meth:`VideoFrames.group`): a
video is one slot with ``frames == (t, h, w)``, one block per frame, ``grid == (1, t*h*w)``, its positions the frames'
placeholders in order, and ``image`` the pass index of its first frame (its frames are the t images from there). Its
signals are its frames' (each frame its own tower row), joined on the token axis (:func:`slot_signals`). A ``frames``
stage gives the tower only the kept frames' images and every still image (:class:`ImageFrames`), as frames_stage.py
does for native videos. An ``in_vision`` stage is refused (run.py): the tower encodes each frame on its own, so it
would merge per frame.

An adapter serves this by setting ``frames_as_images`` and giving ``image_grid`` (base.py).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..adapters import ADAPTERS, ImageSlot
from ..adapters.base import spread_rows

#: signals whose token axis is the one before last (the others': the last); ``project`` is a module, the same per frame
_TOKENS_BEFORE_LAST = ("vision_keys", "vision_features")


@dataclass(frozen=True)
class VideoFrames:
    """Which images of a prompt are frames of one video: ``counts``, the frame counts of a prompt's visual inputs in
    order (1: a still image), repeated as often as the prompt's images allow when ``repeats`` (``video_frames=n``)."""

    counts: tuple[int, ...]
    repeats: bool

    @classmethod
    def of(cls, value, adapter, model) -> VideoFrames | None:
        """The run's ``video_frames=``, checked against the family before any hook (None: every image is an image)."""
        if value is None:
            return None
        name = type(model).__name__
        if adapter.takes_video:
            raise ValueError(
                f"video_frames= is for families that take images only, and {name} takes videos: pass the video through its "
                f"processor (videos=...), which gives pixel_values_videos, and drop video_frames=")
        if not adapter.frames_as_images:
            served = ", ".join(a.family for a in ADAPTERS if a.frames_as_images)
            raise ValueError(f"video_frames= (videos as lists of frames) is served on the {served} families, not on "
                             f"{name} ({adapter.family}): run its videos without tokensieve, or give its frames as images")
        if not (_is_int(value) or isinstance(value, tuple) and all(map(_is_int, value))):
            raise ValueError(f"video_frames={value!r}: pass an int (frames per video) or a tuple of ints (each prompt's "
                             f"visual inputs' frame counts, 1 for a still image)")
        if _is_int(value):
            value = int(value)
            if value < 2:
                raise ValueError(f"video_frames={value}: a video has at least 2 frames (one frame is a still image: "
                                 f"leave video_frames=None, or give a tuple such as (1, 8))")
            return cls((value,), True)
        if not value or min(value) < 1:
            raise ValueError(f"video_frames={value!r}: give each visual input's frame count, at least 1 (a still image), "
                             f"and at least one count")
        return cls(tuple(map(int, value)), False)

    def __str__(self) -> str:
        return f"video_frames={self.counts[0] if self.repeats else self.counts}"

    def split(self, images: int, where: str, prompts: bool = False) -> list[int]:
        """The frame counts of ``images`` consecutive images of one prompt (``prompts``: of a vision pass, whole prompts
        one after another), refusing a count that does not fit; ``where`` names them in the message."""
        step = sum(self.counts)
        fits = images > 0 and images % step == 0 and (self.repeats or prompts or images == step)
        if fits:
            return list(self.counts) * (images // step)
        need = f"a multiple of {step}" if self.repeats else f"{step} ({' + '.join(map(str, self.counts))})"
        raise ValueError(f"{where} has {images} image(s), but {self} needs {need} per prompt: give each prompt's video "
                         f"all its frames, one image each, or change video_frames=")

    def group(self, slots: list[ImageSlot], kept_frames: list | None) -> list[ImageSlot]:
        """The family's per-image ``slots`` (in batch-row order) with each video's frames made one slot. ``kept_frames``
        (a ``frames`` stage's, per video of the vision pass, in order) go to the videos' slots."""
        rows: dict[int, list[ImageSlot]] = {}
        for slot in slots:
            rows.setdefault(slot.row, []).append(slot)
        counts = {row: self.split(len(images), f"prompt {row}") for row, images in rows.items()}
        videos = _pass_videos(self, sorted({slot.image for slot in slots}))
        grouped = []
        for row, images in rows.items():
            first = 0
            for count in counts[row]:
                frames = images[first : first + count]
                first += count
                if count == 1:
                    grouped.append(frames[0])
                    continue
                video = videos.get(frames[0].image)
                grouped.append(_video_slot(frames, kept_frames[video] if kept_frames and video is not None else None))
        return grouped


def _is_int(value) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pass_videos(frames: VideoFrames, images: list[int]) -> dict[int, int]:
    """Each video's first image -> its number among the videos of the pass (``kept_frames``' order)."""
    counts = frames.split(len(images), "the call", prompts=True) if images else []
    starts, first = {}, 0
    for count in counts:
        if count > 1:
            starts[images[first]] = len(starts)
        first += count
    return starts


def _video_slot(frames: list[ImageSlot], kept_frames: torch.Tensor | None) -> ImageSlot:
    """One slot for a video's frames, each an image slot of one 2D grid."""
    grids = {slot.grid for slot in frames}
    first = frames[0]
    if len(grids) > 1 or any(slot.blocks or slot.frames for slot in frames):
        sizes = ", ".join(f"{h}x{w}" for h, w in (slot.grid for slot in frames))
        raise ValueError(f"the video of images {first.image}..{first.image + len(frames) - 1} (prompt {first.row}) has frames "
                         f"of token grids {sizes}: every frame of a video must be one image of one size (resize the frames "
                         f"alike, one crop each)")
    if [slot.image for slot in frames] != list(range(first.image, first.image + len(frames))):
        raise ValueError(f"prompt {first.row}'s frames are not consecutive images of the vision pass")
    (h, w), t = first.grid, len(frames)
    positions = torch.cat([slot.positions for slot in frames])
    blocks = tuple(torch.arange(t * h * w).view(t, h, w))
    return ImageSlot(first.row, positions, (1, t * h * w), first.image, blocks, (t, h, w), None, kept_frames, of_images=True)


def frame_images(slot: ImageSlot) -> range:
    """The images of the vision pass a slot covers: a video given as images' frames, or the image itself."""
    return range(slot.image, slot.image + (slot.frames[0] if slot.of_images else 1))


def slot_signals(adapter, wanted, capture, slot: ImageSlot) -> dict:
    """The ``wanted`` signals of one slot: the adapter's, or a video given as images' frames' joined on the token axis,
    frame after frame."""
    if not slot.of_images:
        return adapter.image_signals(wanted, capture, slot.image)
    per_frame = [adapter.image_signals(wanted, capture, image) for image in frame_images(slot)]
    signals = {}
    for request, first in per_frame[0].items():
        if not isinstance(first, torch.Tensor):  # the projector: one module for every frame
            signals[request] = first
            continue
        axis = -2 if request.name in _TOKENS_BEFORE_LAST else -1
        signals[request] = torch.cat([frame[request] for frame in per_frame], dim=axis)
    return signals


class ImageFrames:
    """A ``frames`` stage's view of a vision pass of images (frames_stage.py calls it as it calls an adapter): the
    pass's videos' (t, h, w) grids, the tower given only the kept frames' images and every still image, and its output
    given back one row per image of the pass, zeros at the dropped frames."""

    def __init__(self, adapter, frames: VideoFrames):
        self.adapter, self.frames = adapter, frames
        self.vision_tower = adapter.vision_tower
        self._items: list[int] = []  # the frame counts of the pass's visual inputs

    def _pixels(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["pixel_values"]

    def video_grid(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        pixels = self._pixels(args, kwargs)
        self._items = self.frames.split(pixels.shape[0], "the vision pass", prompts=True)
        h, w = self.adapter.image_grid(tuple(pixels.shape))
        videos = [[t, h, w] for t in self._items if t > 1]
        return torch.tensor(videos) if videos else None

    def _rows(self, kept: list[torch.Tensor]) -> torch.Tensor:
        """The pass's images to encode: each video's kept frames, every still image."""
        rows, first, chosen = [], 0, iter(kept)
        for t in self._items:
            rows.append(first + (next(chosen) if t > 1 else torch.zeros(1, dtype=torch.long)))
            first += t
        return torch.cat(rows)

    def frame_pass(self, args: tuple, kwargs: dict, kept: list[torch.Tensor]) -> tuple[tuple, dict]:
        pixels = self._pixels(args, kwargs)
        chosen = pixels[self._rows(kept).to(pixels.device)]
        return ((chosen, *args[1:]), kwargs) if args else (args, {**kwargs, "pixel_values": chosen})

    def full_frames(self, output, grid: torch.Tensor, kept: list[torch.Tensor]):
        return spread_rows(output, self._rows(kept), sum(self._items))
