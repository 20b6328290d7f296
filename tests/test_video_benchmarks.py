"""Video-MME and MVBench loaders read tiny files in each benchmark's downloaded layout (written here, with
clips rendered and encoded here), and their official scorers give hand-computed numbers."""

import json
from fractions import Fraction

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tokensieve.bench.datasets import VIDEO_BENCHMARKS, mvbench, videomme
from tokensieve.bench.datasets.common import BenchmarkDataMissing

FPS = 10


def encode_clip(path, seconds: float = 2.0, side: int = 32) -> None:
    """A clip whose frame n is a flat grey of level 10 n (so a frame's number is its brightness / 10)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, FPS)
        for number in range(int(seconds * FPS)):
            frame = av.VideoFrame.from_image(Image.new("RGB", (side, side), (10 * number,) * 3))
            frame.pts = number
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_number(image: Image.Image) -> int:
    return round(float(np.asarray(image.convert("L"), dtype=float).mean()) / 10)


# --- Video-MME -------------------------------------------------------------------------------------------

VIDEOMME_ROWS = [
    # video_id, duration, domain, sub_category, videoID, question_id, task_type, answer
    ("001", "short", "Knowledge", "Astronomy", "fFjv93ACGo8", "001-1", "Counting Problem", "C"),
    ("001", "short", "Knowledge", "Astronomy", "fFjv93ACGo8", "001-2", "Temporal Reasoning", "A"),
    ("301", "medium", "Sports Competition", "Football", "Xy9z_Q-1abc", "301-1", "Temporal Reasoning", "B"),
    ("601", "long", "Life Record", "Travel", "LongOne0001", "601-1", "Object Recognition", "D"),
]


@pytest.fixture(scope="module")
def videomme_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("videomme")
    rows = [dict(video_id=v, duration=d, domain=dom, sub_category=sub, url=f"https://www.youtube.com/watch?v={vid}",
                 videoID=vid, question_id=q, task_type=task, question=f"Question {q}?",
                 options=[f"A. one {q}", f"B. two {q}", f"C. three {q}", f"D. four {q}"], answer=ans)
            for v, d, dom, sub, vid, q, task, ans in VIDEOMME_ROWS]
    (root / "videomme").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme" / "test-00000-of-00001.parquet")
    encode_clip(root / "data" / "fFjv93ACGo8.mp4")   # where videos_chunked_*.zip unzips
    encode_clip(root / "data" / "Xy9z_Q-1abc.mp4")
    encode_clip(root / "LongOne0001.mp4", seconds=1)  # or directly in the videos folder
    return root


def test_videomme_loads_questions_with_their_videos(videomme_dir):
    samples = videomme.load(videomme_dir)
    assert [s.id for s in samples] == ["001-1", "001-2", "301-1", "601-1"]
    first = samples[0]
    assert first.question == (
        "Select the best answer to the following multiple-choice question based on the video. Respond with only "
        "the letter (A, B, C, or D) of the correct option.\nQuestion 001-1?\nA. one 001-1\nB. two 001-1\n"
        "C. three 001-1\nD. four 001-1\nThe best answer is:")
    assert (first.answers, first.category) == (["C"], "Counting Problem")
    assert first.video == videomme_dir / "data" / "fFjv93ACGo8.mp4"
    assert samples[3].video == videomme_dir / "LongOne0001.mp4"
    assert first.meta["duration"] == "short" and first.meta["domain"] == "Knowledge"
    video = first.frames(num_frames=4)
    assert [frame_number(f) for f in video.frames] == video.indices == [0, 6, 13, 19]
    # The parquet file itself, a duration, a limit; the videos found from the file's download folder.
    assert [s.id for s in videomme.load(videomme_dir / "videomme" / "test-00000-of-00001.parquet",
                                        duration="short", limit=1)] == ["001-1"]
    assert [s.id for s in videomme.load(videomme_dir, duration="long")] == ["601-1"]


def test_videomme_missing_files_say_what_to_do(videomme_dir, tmp_path):
    with pytest.raises(BenchmarkDataMissing, match="hf download lmms-lab/Video-MME"):
        videomme.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="3 Video-MME videos not found .* unzip the download's"):
        videomme.load(videomme_dir, videos=tmp_path)
    with pytest.raises(ValueError, match="unknown Video-MME duration"):
        videomme.load(videomme_dir, duration="tiny")


@pytest.mark.parametrize("reply, letter", [
    ("C", "C"), ("C.", "C"), ("(B) two", "B"), ("The best answer is D.", "D"), ("The answer is: B", "B"),
    ("Answer: C", "A"),            # the official rule reads the first capital A-D anywhere: the A of "Answer"
    ("the cat, no option", None), ("", None), ("I would say it is B, since", "B"),
])
def test_videomme_reads_letters_as_its_official_script(reply, letter):
    assert videomme.answer_letter(reply) == letter


def test_videomme_scores_over_answered_questions_as_official(videomme_dir):
    samples = videomme.load(videomme_dir)  # answers C, A, B, D
    result = videomme.score(samples, ["C", "no idea", "The best answer is B", "A"])
    # right, unanswered, right, wrong: official 2/3; over all questions 2/4
    assert result["accuracy"] == pytest.approx(2 / 3) and result["accuracy_all"] == 0.5
    assert result["unanswered"] == 1 and result["per_sample"] == [1.0, 0.0, 1.0, 0.0]
    assert result["by_duration"] == {"long": 0.0, "medium": 1.0, "short": 1.0}
    assert result["by_category"] == {"Counting Problem": 1.0, "Object Recognition": 0.0, "Temporal Reasoning": 1.0}
    assert result["by_domain"]["Knowledge"] == 1.0 and result["by_sub_category"]["Travel"] == 0.0
    assert result[VIDEO_BENCHMARKS["videomme"][1]] == result["accuracy"]


# --- MVBench ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mvbench_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvbench")
    (root / "json").mkdir()
    sequence = [{"video": "AB12C.mp4", "question": "What did the person do first?",
                 "candidates": ["Sat on the bed.", "Opened the door.", "Took the cup."],
                 "answer": "Opened the door.", "start": 0.5, "end": 1.5}]
    direction = [{"video": "video_10001.mp4", "question": "Which way does the cube move?",
                  "candidates": ["left", "right", "up", "down"], "answer": "down"},
                 {"video": "video_10002.mp4", "question": "Which way does the sphere move?",
                  "candidates": ["up", "left"], "answer": "up"}]
    episodic = [{"video": "s01e02_seg01_clip_03", "question": "Why does she leave?",
                 "candidates": ["She is late.", "She is tired."], "answer": "She is tired.", "start": 1.0,
                 "end": 3.0}]
    (root / "json" / "action_sequence.json").write_text(json.dumps(sequence))
    (root / "json" / "moving_direction.json").write_text(json.dumps(direction))
    (root / "json" / "episodic_reasoning.json").write_text(json.dumps(episodic))
    encode_clip(root / "video" / "star" / "Charades_v1_480" / "AB12C.mp4")
    encode_clip(root / "video" / "clevrer" / "video_validation" / "video_10001.mp4", seconds=1)
    encode_clip(root / "video" / "clevrer" / "video_validation" / "video_10002.mp4", seconds=1)
    frames = root / "video" / "tvqa" / "frames_fps3_hq" / "s01e02_seg01_clip_03"
    frames.mkdir(parents=True)
    for number in range(12):  # 4 s at 3 fps
        Image.new("RGB", (16, 16), (10 * number,) * 3).save(frames / f"{number + 1:05d}.jpg")
    return root


TASKS = ["Action Sequence", "Moving Direction", "Episodic Reasoning"]


def test_mvbench_loads_questions_in_the_official_prompt(mvbench_dir):
    samples = mvbench.load(mvbench_dir, tasks=TASKS)  # in rounds: every task's first question, then the second
    assert [s.id for s in samples] == ["action_sequence#0", "moving_direction#0", "episodic_reasoning#0",
                                       "moving_direction#1"]
    first = samples[0]
    assert first.question == ("Question: What did the person do first?\nOptions:\n(A) Sat on the bed.\n"
                              "(B) Opened the door.\n(C) Took the cup.\nOnly give the best option.")
    assert first.answers == ["B"] and first.category == "Action Sequence"
    assert first.meta["answer_prefix"] == "Best option:(" and first.meta["system"].startswith("Carefully watch")
    assert samples[1].answers == ["D"] and "window" not in samples[1].meta
    # A task asked about a span reads only that span: 0.5 s to 1.5 s of a 10 fps clip.
    video = first.frames(num_frames=3)
    assert video.indices == [5, 10, 15] and [frame_number(f) for f in video.frames] == [5, 10, 15]
    # Episodic reasoning's video is a folder of frames at 3 fps, read within its span (1 s to 3 s).
    episode = samples[2].frames(num_frames=3)
    assert episode.indices == [3, 6, 9] and [frame_number(f) for f in episode.frames] == [3, 6, 9]
    assert [s.category for s in mvbench.load(mvbench_dir, tasks=TASKS, limit=3)] == TASKS  # a limit spans the tasks


def test_mvbench_reads_the_parquet_conversion_too(mvbench_dir, tmp_path):
    rows = json.loads((mvbench_dir / "json" / "moving_direction.json").read_text())
    (tmp_path / "moving_direction" / "train").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "moving_direction" / "train" / "0000.parquet")
    from_parquet = mvbench.load(tmp_path, tasks=["Moving Direction"], videos=mvbench_dir / "video")
    from_json = mvbench.load(mvbench_dir, tasks=["Moving Direction"])
    assert [(s.question, s.answers, s.video) for s in from_parquet] == [(s.question, s.answers, s.video)
                                                                      for s in from_json]


def test_mvbench_missing_files_say_what_to_do(mvbench_dir, tmp_path):
    with pytest.raises(BenchmarkDataMissing,
                       match="no question file for action_prediction.json, action_antonym.json.*pass tasks="):
        mvbench.load(mvbench_dir)  # all 20 tasks by default
    with pytest.raises(BenchmarkDataMissing, match="hf download OpenGVLab/MVBench"):
        mvbench.load(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="4 MVBench videos not found .* unzip"):
        mvbench.load(mvbench_dir, tasks=TASKS, videos=tmp_path)
    with pytest.raises(ValueError, match="unknown MVBench tasks"):
        mvbench.load(mvbench_dir, tasks=["Moving Sideways"])
    with pytest.raises(ValueError, match="one split"):
        mvbench.load(mvbench_dir, split="test", tasks=TASKS)


@pytest.mark.parametrize("reply, right", [
    ("A", True), ("A)", True), ("A) a cube", True), ("(A) a cube", True), ("a.", True),
    ("B", False), ("(B) left", False),
    ("The answer is A", False),    # the official check reads only the first word
    ("A man walks.", True),        # ... so an "A" that starts a sentence reads as option A, officially
    ("  \n(A) a cube", True),      # the reply is stripped first
    ("", None), ("...", None),     # no letter in the first word: wrong (the added guard), counted as letterless
])
def test_mvbench_checks_replies_as_the_official_notebook(reply, right):
    assert mvbench.is_right(reply, "A") is right


def test_mvbench_scores_per_task(mvbench_dir):
    samples = mvbench.load(mvbench_dir, tasks=TASKS)  # answers B, D, B, A
    result = mvbench.score(samples, ["B) Opened the door.", "(C) up", "B", ""])
    assert result["per_sample"] == [1.0, 0.0, 1.0, 0.0] and result["accuracy"] == 0.5
    assert result["letterless"] == 1 and result[VIDEO_BENCHMARKS["mvbench"][1]] == 0.5
    assert result["by_category"] == {"Action Sequence": 1.0, "Episodic Reasoning": 1.0, "Moving Direction": 0.0}
