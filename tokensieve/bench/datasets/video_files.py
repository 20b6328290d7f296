"""Frames of a real video file, decoded with PyAV: N frames spread uniformly, or a fixed rate in frames per second.

`read_video(path, num_frames=N)` takes frames round(linspace(0, count - 1, N)) of the file's frames in
presentation order (first and last frame included, as lmms-eval's and Qwen2-VL's uniform samplers do);
`read_video(path, fps=f)` takes the frame nearest to each time 0, 1/f, 2/f, ... up to the last frame
(the file's own rate or below), optionally thinned uniformly to `max_frames`. Either way the result holds
the frames as RGB PIL images, their indices and their timestamps in seconds from the stream's start.

Two passes: the first only demuxes (no decoding) to count frames and read their timestamps, the second
decodes and converts only the chosen frames, so a long file costs no more memory than its chosen frames.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """The index of the frame nearest to each time 0, 1/fps, 2/fps, ... up to the last frame's time."""
    times_array = np.asarray(times)
    targets = np.arange(0.0, times[-1] + 0.5 / fps, 1.0 / fps)
    targets = targets[targets <= times[-1] + 1e-9]
    return [int(np.abs(times_array - t).argmin()) for t in targets]


def read_video(path: Path | str, num_frames: int | None = None, fps: float | None = None,
               max_frames: int | None = None) -> VideoFrames:
    """Decode the chosen frames of a video file: `num_frames` uniformly, or `fps` frames per second."""
    if (num_frames is None) == (fps is None):
        raise ValueError("pass exactly one of num_frames (uniform sampling) and fps (a fixed rate)")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    container = _open(path)
    try:
        times = _frame_times(container)
        source_fps = _source_fps(container, times)
        if num_frames is not None:
            if num_frames > len(times):
                raise ValueError(f"{path} has {len(times)} frames, fewer than num_frames={num_frames}; "
                                 f"ask for at most {len(times)}")
            indices = uniform_indices(len(times), num_frames)
        else:
            if fps > source_fps + 1e-6:
                raise ValueError(f"fps={fps} is above the file's {source_fps:g} frames per second; "
                                 f"pass fps <= {source_fps:g} (or num_frames)")
            indices = fps_indices(times, fps)
            if max_frames is not None and len(indices) > max_frames:
                indices = [indices[i] for i in uniform_indices(len(indices), max_frames)]
        container.seek(0)
        images = _decode(container, indices)
    finally:
        container.close()
    return VideoFrames([images[i] for i in indices], indices, [times[i] for i in indices], source_fps, len(times))


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
