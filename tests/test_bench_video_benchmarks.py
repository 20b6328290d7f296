"""`tokensieve bench --suite videomme|mvbench`: the real video benchmarks as bench suites, read from tiny folders in
each benchmark's downloaded layout (clips rendered and encoded here, as tests/test_video_benchmarks.py does), and a
real sweep of one on the tiny Qwen2-VL that takes videos (the baseline and EVS) writing records and the summary."""

import importlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from tokensieve.bench import sweep
from tokensieve.bench.datasets import mvbench, videomme
from tokensieve.bench.datasets.common import BenchmarkDataMissing
from tokensieve.bench.outputs import write_outputs
from tokensieve.bench.suites import load_suite, safe_id
from tokensieve.bench.sweep import SweepSpecError
from tokensieve.cli import app

from test_video_benchmarks import encode_clip, frame_number
from tiny_qwen2_vl import tiny_qwen2_vl
from tiny_video_processor import tiny_qwen2_vl_processor

SWEEP_MODULE = importlib.import_module("tokensieve.bench.sweep")
FRAMES = 8  # per video: the tiny Qwen2-VL pairs them, so its video grid is (4, 4, 4), 64 tokens

# question_id, videoID, task_type, answer (Video-MME's columns that matter here)
VIDEOMME_ROWS = [("001-1", "fFjv93ACGo8", "Counting Problem", "C"), ("001-2", "fFjv93ACGo8", "Temporal Reasoning", "A"),
                 ("301-1", "Xy9z_Q-1abc", "Temporal Reasoning", "B")]


@pytest.fixture(scope="module")
def videomme_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videomme")
    rows = [dict(video_id=q[:3], duration="short", domain="Knowledge", sub_category="Astronomy", url="", videoID=vid,
                 question_id=q, task_type=task, question=f"Question {q}?",
                 options=[f"A. one {q}", f"B. two {q}", f"C. three {q}", f"D. four {q}"], answer=answer)
            for q, vid, task, answer in VIDEOMME_ROWS]
    (root / "videomme").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme" / "test-00000-of-00001.parquet")
    encode_clip(root / "data" / "fFjv93ACGo8.mp4")  # 20 frames, frame n a grey of level 10 n
    encode_clip(root / "data" / "Xy9z_Q-1abc.mp4")
    return root


@pytest.fixture(scope="module")
def mvbench_dir(tmp_path_factory) -> Path:
    """Three of MVBench's tasks with questions (one asked about a span, one of a folder of frames), every other task's
    file empty, and a Fine-grained Pose question whose video folder (not in the download) is absent."""
    root = tmp_path_factory.mktemp("mvbench")
    (root / "json").mkdir()
    questions = {
        "Action Sequence": [{"video": "AB12C.mp4", "question": "What did the person do first?",
                             "candidates": ["Sat on the bed.", "Opened the door.", "Took the cup."],
                             "answer": "Opened the door.", "start": 0.5, "end": 1.5}],
        "Moving Direction": [{"video": "video_10001.mp4", "question": "Which way does the cube move?",
                              "candidates": ["left", "right", "up", "down"], "answer": "down"}],
        "Episodic Reasoning": [{"video": "s01e02_seg01_clip_03", "question": "Why does she leave?",
                                "candidates": ["She is late.", "She is tired."], "answer": "She is tired.",
                                "start": 0.0, "end": 4.0}],
        "Fine-grained Pose": [{"video": "S001C001P001R001A001_rgb.avi", "question": "Which pose?",
                               "candidates": ["sit", "stand"], "answer": "sit"}],
    }
    for task, (file, *_) in mvbench.TASKS.items():
        (root / "json" / file).write_text(json.dumps(questions.get(task, [])))
    encode_clip(root / "video" / "star" / "Charades_v1_480" / "AB12C.mp4")
    encode_clip(root / "video" / "clevrer" / "video_validation" / "video_10001.mp4", seconds=1)
    frames = root / "video" / "tvqa" / "frames_fps3_hq" / "s01e02_seg01_clip_03"
    frames.mkdir(parents=True)
    for number in range(12):  # 4 s at 3 fps
        Image.new("RGB", (16, 16), (10 * number,) * 3).save(frames / f"{number + 1:05d}.jpg")
    return root


def check_suite(samples, suite: str, categories: list[str]) -> None:
    """Ids filename-safe and unique, the categories, and FRAMES frames decoded per video, first and last included."""
    ids = [s.id for s in samples]
    assert len(set(ids)) == len(ids) and all(safe_id(i) == i and i.startswith(f"{suite}-") for i in ids)
    assert [s.category for s in samples] == categories
    for sample in samples:
        frames = sample.frames()
        assert sample.image is None and len(frames) == FRAMES and all(f.mode == "RGB" for f in frames)


def test_videomme_is_a_suite_of_its_questions_in_the_official_prompt_scored_officially(videomme_dir):
    samples, split = load_suite("videomme", data=videomme_dir, frames=FRAMES)
    assert split == "test" and len(samples) == 3
    check_suite(samples, "videomme", [task for _, _, task, _ in VIDEOMME_ROWS])
    loaded = videomme.load(videomme_dir)
    assert [(s.question, s.target) for s in samples] == [(s.question, s.answers[0]) for s in loaded]
    assert samples[0].question.endswith("D. four 001-1\nThe best answer is:")
    assert [frame_number(f) for f in samples[0].frames()] == [0, 3, 5, 8, 11, 14, 16, 19]  # uniform over 20
    # the official scoring: the first capital A-D once its answer phrases are removed
    assert samples[0].score("The best answer is C.") == 1.0 and samples[0].score("B") == 0.0
    assert samples[0].score("no letter") == 0.0  # unanswered: no credit per sample
    assert len(load_suite("videomme", data=videomme_dir)[0][0].frames()) == 16  # the default
    assert [s.id for s in load_suite("videomme", 2, data=videomme_dir)[0]] == ["videomme-001-1", "videomme-001-2"]


def test_mvbench_is_a_suite_without_the_pose_task_whose_videos_its_download_lacks(mvbench_dir):
    samples, split = load_suite("mvbench", data=mvbench_dir, frames=FRAMES)
    assert split == "train"
    check_suite(samples, "mvbench", ["Action Sequence", "Moving Direction", "Episodic Reasoning"])
    assert [s.id for s in samples] == ["mvbench-action_sequence_0", "mvbench-moving_direction_0",
                                       "mvbench-episodic_reasoning_0"]
    assert samples[0].question == mvbench.question_text("What did the person do first?",
                                                        ["Sat on the bed.", "Opened the door.", "Took the cup."])
    assert [s.target for s in samples] == ["B", "D", "B"]
    # the span asked about (0.5 s to 1.5 s of a 10 fps clip: frames 5 to 15), and a folder of frames at 3 fps
    assert [frame_number(f) for f in samples[0].frames()] == [5, 6, 8, 9, 11, 12, 14, 15]
    assert [frame_number(f) for f in samples[2].frames()] == [0, 2, 3, 5, 6, 8, 9, 11]
    # the official check: the reply's first word against "(x)"
    assert samples[0].score("B) Opened the door.") == 1.0 and samples[0].score("(A) Sat on the bed.") == 0.0
    assert samples[1].score("") == 0.0


def test_mvbench_runs_the_pose_task_where_its_videos_are(mvbench_dir, tmp_path):
    data = shutil.copytree(mvbench_dir, tmp_path / "mvbench")  # the download, with the NTU RGB+D videos unzipped
    encode_clip(data / "video" / "nturgbd" / "S001C001P001R001A001_rgb.avi")
    samples = load_suite("mvbench", data=data, frames=FRAMES)[0]
    assert [s.category for s in samples][-2:] == ["Fine-grained Pose", "Episodic Reasoning"]  # in TASKS' order
    assert samples[-2].id == "mvbench-fine_grained_pose_0" and len(samples[-2].frames()) == FRAMES


@pytest.mark.parametrize("call, error, message", [
    (dict(suite="videomme"), BenchmarkDataMissing, "hf download lmms-lab/Video-MME"),
    (dict(suite="mvbench"), BenchmarkDataMissing, "hf download OpenGVLab/MVBench"),
    (dict(suite="videomme", frames=0), ValueError, "at least one frame"),
    (dict(suite="mvbench", split="test"), ValueError, "one split"),
])
def test_what_a_video_benchmark_cannot_load_is_refused(call, error, message, tmp_path):
    with pytest.raises(error, match=message):
        load_suite(data=tmp_path / "absent", **call)


def test_a_video_with_fewer_frames_than_asked_for_says_so(videomme_dir):
    samples = load_suite("videomme", data=videomme_dir, frames=21)[0]
    with pytest.raises(ValueError, match="has 20 frames, fewer than num_frames=21"):
        samples[0].frames()


def test_the_cli_says_in_one_line_where_the_data_is_missing_and_that_ray_is_not_for_videos(tmp_path, videomme_dir):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--suite", "mvbench", "--data", str(tmp_path / "absent"), "--methods", "evs",
                                 "--keep", "0.25", "--out", str(tmp_path / "out")], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "hf download OpenGVLab/MVBench" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(SweepSpecError, match="the videomme suite does not run on Ray yet"):
        sweep(suite="videomme", data=videomme_dir, ray="local", methods="evs", keeps="0.25", limit=1,
              out=tmp_path / "ray", progress=False)
    questions_only = tmp_path / "questions-only" / "videomme"  # the parquet file without the videos beside it
    questions_only.mkdir(parents=True)
    shutil.copy(videomme_dir / "videomme" / "test-00000-of-00001.parquet", questions_only)
    with pytest.raises(SweepSpecError, match="2 Video-MME videos not found"):  # a sweep refusal, not a traceback
        sweep(suite="videomme", data=questions_only.parent, methods="evs", keeps="0.25", out=tmp_path / "b",
              progress=False, device="cpu")


@pytest.fixture(scope="module")
def videomme_sweep(tmp_path_factory, videomme_dir) -> Path:
    """Video-MME's three questions, 8 frames each, on the tiny Qwen2-VL: the baseline and EVS at a quarter."""
    checkpoint = tmp_path_factory.mktemp("tiny-qwen2-vl")
    model = tiny_qwen2_vl(), tiny_qwen2_vl_processor()
    with pytest.MonkeyPatch.context() as patch:  # the tiny model in place of a checkpoint (tests/test_bench_video.py)
        patch.setattr(SWEEP_MODULE, "load_model", lambda model_name, device, dtype: model)
        out = sweep(model=str(checkpoint), suite="videomme", data=videomme_dir, frames=FRAMES, methods="evs",
                    keeps="0.25", out=tmp_path_factory.mktemp("videomme-sweep"), max_new_tokens=2, show=1,
                    progress=False, device="cpu")
    write_outputs(out)
    return out


def test_a_videomme_sweep_records_every_question_scored_officially_and_summarises_per_category(videomme_sweep,
                                                                                              videomme_dir):
    described = json.loads((videomme_sweep / "sweep.json").read_text())
    assert (described["suite"], described["split"], described["frames"], described["samples"]) == (
        "videomme", "test", FRAMES, 3)
    questions = {safe_id(f"videomme-{s.id}"): s for s in videomme.load(videomme_dir)}
    for config in ["baseline", "evs-k0.25"]:
        records = [json.loads(line) for line in (videomme_sweep / "runs" / f"{config}.jsonl").read_text().splitlines()]
        assert sorted(r["sample"] for r in records) == sorted(questions)
        for record in records:
            question = questions[record["sample"]]
            official = videomme.score([question], [record["prediction"]])["per_sample"][0]
            assert record["score"] == official and record["correct"] == (official == 1.0)
            assert (record["category"], record["target"]) == (question.category, question.answers[0])
            assert record["frames"] == [4, 4, 4] and record["tokens_before"] == 64
            assert record["tokens_after"] == (64 if config == "baseline" else 16)
    categories = pd.read_csv(videomme_sweep / "per_category.csv")
    assert set(categories["category"]) == {"Counting Problem", "Temporal Reasoning"}
    assert categories.set_index(["config", "category"]).loc[("baseline", "Temporal Reasoning"), "n"] == 2
    assert categories["chance"].isna().all()  # no chance row: the loaders keep no option count for it
    assert "evs" in (videomme_sweep / "summary.md").read_text()
    first = sorted(questions)[0]
    assert len(list((videomme_sweep / "images" / first).iterdir())) == FRAMES
    html = (videomme_sweep / "report.html").read_text()
    assert "on the videomme suite (test split, 3 samples, 8 frames per clip)" in html
    assert '<figure class="clip">' in html  # the shown video's frame strip
