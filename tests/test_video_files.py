"""Reading real video files with PyAV: a clip the test encodes (2 s at 10 fps, each frame painted in a
colour that encodes its number) decodes to the right frames and timestamps in both sampling modes."""

from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from tokensieve.bench.datasets.video_files import fps_indices, read_frame_folder, read_video, uniform_indices

FPS, SECONDS, SIDE = 10, 2, 64


def frame_colour(number: int) -> tuple[int, int, int]:
    """Colours far apart for frames 0..19, so lossy coding cannot turn one into another."""
    return (number * 12, 255 - number * 12, (number % 4) * 80)


def frame_number(image: Image.Image) -> int:
    """The frame whose colour is nearest the image's mean colour."""
    mean = np.asarray(image, dtype=float).reshape(-1, 3).mean(axis=0)
    return int(np.argmin([np.abs(mean - frame_colour(n)).sum() for n in range(FPS * SECONDS)]))


# With B-frames the packets come out of presentation order: the frame count and timestamps must come from
# sorted packet times, and the frames from the decoder's (presentation) order.
@pytest.fixture(scope="module", params=["mpeg4", "libx264"])
def clip(tmp_path_factory, request):
    path = tmp_path_factory.mktemp("video") / f"numbers-{request.param}.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(request.param, rate=FPS)
        stream.codec_context.max_b_frames = 3
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, FPS)
        for number in range(FPS * SECONDS):
            frame = av.VideoFrame.from_image(Image.new("RGB", (SIDE, SIDE), frame_colour(number)))
            frame.pts = number
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        ticks = [p.pts for p in container.demux(container.streams.video[0]) if p.pts is not None]
        assert ticks != sorted(ticks)  # B-frames: the packets are out of presentation order
    return path


def test_uniform_sampling_takes_evenly_spread_frames_first_and_last_included(clip):
    video = read_video(clip, num_frames=5)
    assert video.indices == [0, 5, 10, 14, 19] == uniform_indices(20, 5)
    assert [frame_number(f) for f in video.frames] == video.indices  # the decoded pixels are those frames
    assert video.timestamps == pytest.approx([i / FPS for i in video.indices])
    assert (video.source_fps, video.source_frames) == (FPS, FPS * SECONDS)
    assert {f.size for f in video.frames} == {(SIDE, SIDE)} and video.frames[0].mode == "RGB"
    assert read_video(clip, num_frames=1).indices == [0]
    assert read_video(clip, num_frames=20).indices == list(range(20))


@pytest.mark.parametrize("fps, expected", [
    (10, list(range(20))),            # the file's own rate: every frame
    (2, [0, 5, 10, 15]),              # 0 s, 0.5 s, 1.0 s, 1.5 s (the last frame is at 1.9 s)
    (1, [0, 10]),
    (3, [0, 3, 7, 10, 13, 17]),       # nearest frames to 0, 1/3, 2/3, ... s
])
def test_fps_sampling_takes_the_frame_nearest_each_tick(clip, fps, expected):
    video = read_video(clip, fps=fps)
    assert video.indices == expected
    assert [frame_number(f) for f in video.frames] == expected
    assert video.timestamps == pytest.approx([i / FPS for i in expected])
    assert all(abs(t - k / fps) <= 0.5 / FPS + 1e-9 for k, t in enumerate(video.timestamps))


def test_fps_sampling_thins_to_max_frames(clip):
    video = read_video(clip, fps=10, max_frames=4)
    assert video.indices == [0, 6, 13, 19] and [frame_number(f) for f in video.frames] == video.indices


def test_index_helpers_on_their_own():
    assert uniform_indices(100, 3) == [0, 50, 99]
    assert fps_indices([0.0, 0.04, 0.08, 0.12, 0.16], 12.5) == [0, 2, 4]


def test_bad_requests_get_clear_errors(clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="no video file at"):
        read_video(tmp_path / "absent.mp4", num_frames=4)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        read_video(clip, num_frames=0)
    with pytest.raises(ValueError, match="above the 10 frames per second of"):
        read_video(clip, fps=25)
    with pytest.raises(ValueError, match="exactly one of num_frames"):
        read_video(clip)
    with pytest.raises(ValueError, match="exactly one of num_frames"):
        read_video(clip, num_frames=4, fps=1)
    with pytest.raises(ValueError, match="max_frames thins fps sampling"):
        read_video(clip, num_frames=4, max_frames=2)
    with pytest.raises(ValueError, match="has 20 frames, fewer than num_frames=21"):
        read_video(clip, num_frames=21)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(ValueError, match="not a readable media file"):
        read_video(text, num_frames=1)


def test_a_file_without_video_says_so(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(ValueError, match="has no video stream \\(streams: audio\\)"):
        read_video(path, num_frames=2)


def test_a_window_restricts_both_modes_to_its_span(clip):
    video = read_video(clip, num_frames=3, window=(0.5, 1.5))
    assert video.indices == [5, 10, 15] and [frame_number(f) for f in video.frames] == [5, 10, 15]
    assert read_video(clip, fps=2, window=(0.3, 1.2)).indices == [3, 8]  # 0.3 s, 0.8 s (1.3 s is past the end)
    with pytest.raises(ValueError, match="no frame between 5 s and 6 s"):
        read_video(clip, num_frames=1, window=(5, 6))
    with pytest.raises(ValueError, match="start <= end"):
        read_video(clip, num_frames=1, window=(2, 1))


def test_a_folder_of_frames_reads_like_a_video(tmp_path):
    for number in range(12):
        Image.new("RGB", (SIDE, SIDE), frame_colour(number)).save(tmp_path / f"{number + 1:05d}.jpg")
    video = read_frame_folder(tmp_path, folder_fps=3, num_frames=4)
    assert video.indices == [0, 4, 7, 11] and [frame_number(f) for f in video.frames] == video.indices
    assert video.timestamps == pytest.approx([0, 4 / 3, 7 / 3, 11 / 3]) and video.source_frames == 12
    assert read_frame_folder(tmp_path, folder_fps=3, fps=1).indices == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="above the 3 frames per second"):
        read_frame_folder(tmp_path, folder_fps=3, fps=4)
    with pytest.raises(FileNotFoundError, match="no frame folder"):
        read_frame_folder(tmp_path / "absent", folder_fps=3, num_frames=1)
