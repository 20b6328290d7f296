"""Frames of a real video file, decoded with PyAV: N frames spread uniformly, or a fixed rate in frames per second;
and VideoSample, the question shape of the video benchmarks (videomme.py, mvbench.py).

`read_video(path, num_frames=N)` takes frames round(linspace(0, count - 1, N)) of the file's frames in
presentation order (first and last frame included, as lmms-eval's and Qwen2-VL's uniform samplers do);
`read_video(path, fps=f)` takes the frame nearest to each time 0, 1/f, 2/f, ... up to the last frame
(the file's own rate or below), optionally thinned uniformly to `max_frames`. Either way the result holds
the frames as RGB PIL images, their indices and their timestamps in seconds from the stream's start.

`window=(start, end)` restricts either mode to the frames whose timestamps lie in that span (MVBench's
clips with a start and an end), and `read_frame_folder` does the same for a video stored as numbered
frame images (MVBench's episodic reasoning).

Two passes: the first only demuxes (no decoding) to count frames and read their timestamps, the second
decodes and converts only the chosen frames, so a long file costs no more memory than its chosen frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ...extras import require


@dataclass
class VideoFrames:
    frames: list[Image.Image]
    indices: list[int]         # positions of the frames among the file's frames, in presentation order
    timestamps: list[float]    # seconds from the stream's first frame
    source_fps: float          # the file's average frame rate
    source_frames: int         # how many frames the file has


def _open(path: Path | str):
    require("video", "av", purpose="reading video files (PyAV)")
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}; check the path (or the video folder it is resolved in)")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        raise ValueError(f"{path} is not a readable media file ({error})") from error
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        container.close()
        raise ValueError(f"{path} has no video stream (streams: {kinds}); pass a video file")
    return container


def _frame_times(container) -> list[float]:
    """Timestamps (seconds from the first frame) of the video stream's frames, in presentation order."""
    stream = container.streams.video[0]
    ticks = sorted(packet.pts for packet in container.demux(stream) if packet.pts is not None and packet.size)
    if not ticks:
        raise ValueError(f"{container.name} has a video stream with no frames")
    return [float((tick - ticks[0]) * stream.time_base) for tick in ticks]


def _source_fps(container, times: list[float]) -> float:
    rate = container.streams.video[0].average_rate
    if rate:
        return float(rate)
    return (len(times) - 1) / times[-1] if len(times) > 1 and times[-1] > 0 else 1.0


def uniform_indices(count: int, num_frames: int) -> list[int]:
    """`num_frames` frame indices spread evenly over `count` frames, the first and the last included."""
    return [int(i) for i in np.linspace(0, count - 1, num_frames).round()]


def fps_indices(times: list[float], fps: float) -> list[int]:
    """The index of the frame nearest to each time t0, t0 + 1/fps, ... up to the last frame (t0: the first frame's)."""
    times_array = np.asarray(times)
    targets = times[0] + np.arange(0.0, times[-1] - times[0] + 0.5 / fps, 1.0 / fps)
    targets = targets[targets <= times[-1] + 1e-9]
    return [int(np.abs(times_array - t).argmin()) for t in targets]


def _check_request(num_frames: int | None, fps: float | None, max_frames: int | None,
                   window: tuple[float, float] | None) -> None:
    if (num_frames is None) == (fps is None):
        raise ValueError("pass exactly one of num_frames (uniform sampling) and fps (a fixed rate)")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if max_frames is not None and num_frames is not None:
        raise ValueError("max_frames thins fps sampling; with num_frames it has no use: pass one of the two")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if window is not None and not window[0] <= window[1]:
        raise ValueError(f"window (start, end) in seconds needs start <= end, got {window}")


def choose_frames(source: str, times: list[float], source_fps: float, num_frames: int | None = None,
                  fps: float | None = None, max_frames: int | None = None,
                  window: tuple[float, float] | None = None) -> list[int]:
    """Indices of the frames to take, from the frames' timestamps (see read_video)."""
    candidates = list(range(len(times)))
    if window is not None:
        candidates = [i for i in candidates if window[0] - 1e-6 <= times[i] <= window[1] + 1e-6]
        if not candidates:
            raise ValueError(f"{source} has no frame between {window[0]:g} s and {window[1]:g} s "
                             f"(its frames span 0 to {times[-1]:g} s); check the window")
    if num_frames is not None:
        if num_frames > len(candidates):
            raise ValueError(f"{source} has {len(candidates)} frames{' in the window' if window else ''}, "
                             f"fewer than num_frames={num_frames}; ask for at most {len(candidates)}")
        return [candidates[i] for i in uniform_indices(len(candidates), num_frames)]
    if fps > source_fps + 1e-6:
        raise ValueError(f"fps={fps} is above the {source_fps:g} frames per second of {source}; "
                         f"pass fps <= {source_fps:g} (or num_frames)")
    chosen = [candidates[i] for i in fps_indices([times[i] for i in candidates], fps)]
    if max_frames is not None and len(chosen) > max_frames:
        chosen = [chosen[i] for i in uniform_indices(len(chosen), max_frames)]
    return chosen


def read_video(path: Path | str, num_frames: int | None = None, fps: float | None = None,
               max_frames: int | None = None, window: tuple[float, float] | None = None) -> VideoFrames:
    """Decode the chosen frames of a video file: `num_frames` uniformly, or `fps` frames per second, from
    the whole file or from the frames whose timestamps lie in `window` = (start, end) seconds."""
    _check_request(num_frames, fps, max_frames, window)
    container = _open(path)
    try:
        times = _frame_times(container)
        source_fps = _source_fps(container, times)
        indices = choose_frames(str(path), times, source_fps, num_frames, fps, max_frames, window)
        container.seek(0)
        images = _decode(container, indices)
    finally:
        container.close()
    return VideoFrames([images[i] for i in indices], indices, [times[i] for i in indices], source_fps, len(times))


FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_frame_folder(path: Path | str, folder_fps: float, num_frames: int | None = None, fps: float | None = None,
                      max_frames: int | None = None, window: tuple[float, float] | None = None) -> VideoFrames:
    """As read_video, for a video stored as a folder of frame images (sorted by name) taken at `folder_fps`."""
    _check_request(num_frames, fps, max_frames, window)
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no frame folder at {path}; check the path (or the video folder it is resolved in)")
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise ValueError(f"{path} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
    times = [i / folder_fps for i in range(len(files))]
    indices = choose_frames(str(path), times, folder_fps, num_frames, fps, max_frames, window)
    frames = []
    for i in indices:
        with Image.open(files[i]) as image:
            frames.append(image.convert("RGB"))
    return VideoFrames(frames, indices, [times[i] for i in indices], folder_fps, len(files))


def _decode(container, indices: list[int]) -> dict[int, Image.Image]:
    """The frames at these presentation-order indices as RGB images, decoding no further than the last one."""
    wanted, last = set(indices), max(indices)
    images: dict[int, Image.Image] = {}
    for position, frame in enumerate(container.decode(container.streams.video[0])):
        if position in wanted:
            images[position] = frame.to_image().convert("RGB")
        if position >= last:
            break
    missing = wanted - set(images)
    if missing:
        raise ValueError(f"{container.name}: the decoder gave fewer frames than the container lists "
                         f"(frames {sorted(missing)[:5]} missing); the file may be truncated")
    return images


@dataclass
class VideoSample:
    """One video benchmark question, as the model sees it and as the scorer needs it."""

    id: str
    video: Path  # a video file, or a folder of frame images (meta["folder_fps"] gives their rate)
    question: str  # the full prompt text of the benchmark's official evaluation
    answers: list[str]  # the option letter
    category: str  # for per-category accuracy
    meta: dict = field(default_factory=dict)  # "window": (start, end) seconds when only that span is asked about

    def frames(self, num_frames: int | None = None, fps: float | None = None,
               max_frames: int | None = None) -> VideoFrames:
        """The video's frames, sampled as read_video does (within meta["window"] when there is one)."""
        window = self.meta.get("window")
        if self.video.is_dir():
            return read_frame_folder(self.video, self.meta["folder_fps"], num_frames, fps, max_frames, window)
        return read_video(self.video, num_frames, fps, max_frames, window)
