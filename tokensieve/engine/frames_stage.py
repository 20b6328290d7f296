"""The ``frames`` stage: a video's frames dropped before the vision tower, so the tower runs on fewer.

A sieve at stage ``frames`` (``uniform_frames``) picks, per video of a vision pass, the frames to encode
(``Sieve.select_frames``) from its (t, h, w) grid alone. Hooks on the tower do the rest, through the family's adapter:

- a pre-hook, after the one that opens the capture (so the capture keeps the pass's full grid, which the placeholders
  follow), asks the sieve for each video's frames and gives the tower only their pixels and grid
  (``Adapter.frame_pass``); the kept frames go in ``capture.inputs["kept_frames"]``;
- a post-hook gives the tower's output back its full length, zeros at the dropped frames (``Adapter.full_frames``), so
  the model scatters it into the placeholders as it does unpruned; the engine then keeps only the kept frames' tokens
  at the decoder input (select.py), at their own positions.

A pass of images, or one whose sieve keeps every frame, runs untouched (keeping all is the stock model bit for bit).
"""

from __future__ import annotations

import time

import torch

from ..sieve import Frames, Sieve


class FrameDropping:
    """Hooks of one ``frames`` sieve on the adapter's vision tower; ``seconds`` is the time its latest pass spent
    choosing frames, per video."""

    def __init__(self, sieve: Sieve, adapter, capture):
        self.sieve, self.adapter, self.capture = sieve, adapter, capture
        self.seconds = 0.0
        self._pass: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        tower = adapter.vision_tower
        self.handles = [tower.register_forward_pre_hook(self._before_tower, with_kwargs=True),
                        tower.register_forward_hook(self._after_tower, with_kwargs=True)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self._pass = [], None

    def _before_tower(self, module, args, kwargs):
        self._pass = None
        grid = self.adapter.video_grid(args, kwargs)
        if grid is None:  # a pass of images
            return None
        start = time.perf_counter()
        kept = [self._frames_of(tuple(thw)) for thw in grid.tolist()]
        self.seconds = (time.perf_counter() - start) / len(kept)
        self.capture.inputs["kept_frames"] = kept
        if all(len(frames) == thw[0] for frames, thw in zip(kept, grid.tolist())):
            return None  # every frame kept: the stock pass
        self._pass = (grid, kept)
        return self.adapter.frame_pass(args, kwargs, kept)

    def _after_tower(self, module, args, kwargs, output):
        if self._pass is None:
            return None
        (grid, kept), self._pass = self._pass, None
        return self.adapter.full_frames(output, grid, kept)

    def _frames_of(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """The sieve's frames of one video, checked: ascending, in range, at least one."""
        frames = torch.as_tensor(self.sieve.select_frames(Frames(grid))).long().cpu()
        t = grid[0]
        if frames.ndim != 1 or len(frames) == 0 or int(frames.min()) < 0 or int(frames.max()) >= t:
            raise RuntimeError(f"{self.sieve.name} returned frames {frames.tolist()}: pick at least one of 0..{t - 1}")
        if bool((frames[1:] <= frames[:-1]).any()):
            raise RuntimeError(f"{self.sieve.name} returned frames that are not strictly ascending: {frames.tolist()}")
        return frames


def frame_tokens(grid: tuple[int, int, int], frames: torch.Tensor) -> torch.Tensor:
    """The raster indices of the tokens of ``frames`` in a video of (t, h, w) tokens, frame after frame."""
    _, h, w = grid
    return (frames[:, None] * (h * w) + torch.arange(h * w)).flatten()
